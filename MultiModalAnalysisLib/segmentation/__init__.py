"""Segmentation of co-registered multi-modal images: classical multichannel classification
(Gaussian mixture, k-means) with spatial regularisation, thresholds (Otsu, range, fraction
of SUVmax), mask clean-up, and deep networks (MONAI) trained on the user's own cases."""

from MultiModalAnalysisLib.segmentation.bundle import MonaiBundle, load_monai_bundle
from MultiModalAnalysisLib.segmentation.classical import (
    GaussianMixtureSegmenter,
    KMeansSegmenter,
)
from MultiModalAnalysisLib.segmentation.model_file import (
    SegmentationModel,
    load_segmentation_model,
)
from MultiModalAnalysisLib.segmentation.postprocess import (
    clean_labels,
    component_at,
    connected_components,
    fill_holes,
    keep_largest_component,
    remove_small_components,
)
from MultiModalAnalysisLib.segmentation.result import SegmentationResult
from MultiModalAnalysisLib.segmentation.segment import METHODS, segment
from MultiModalAnalysisLib.segmentation.threshold import (
    otsu_threshold,
    range_threshold,
    suv_fraction_threshold,
)
from MultiModalAnalysisLib.segmentation.train import TrainingResult, train_segmentation

__all__ = [
    "METHODS",
    "GaussianMixtureSegmenter",
    "KMeansSegmenter",
    "MonaiBundle",
    "SegmentationModel",
    "SegmentationResult",
    "TrainingResult",
    "clean_labels",
    "component_at",
    "connected_components",
    "fill_holes",
    "keep_largest_component",
    "load_monai_bundle",
    "load_segmentation_model",
    "otsu_threshold",
    "range_threshold",
    "remove_small_components",
    "segment",
    "suv_fraction_threshold",
    "train_segmentation",
]
