"""Segmentation of co-registered multi-modal images: classical multichannel classification
(Gaussian mixture, k-means) with spatial regularisation, thresholds (Otsu, range, fraction
of SUVmax), mask clean-up, and deep networks (MONAI) trained on the user's own cases."""

from MultiModalAnalysisLib.segmentation.classical import (
    GaussianMixtureSegmenter,
    KMeansSegmenter,
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

__all__ = [
    "METHODS",
    "GaussianMixtureSegmenter",
    "KMeansSegmenter",
    "SegmentationResult",
    "clean_labels",
    "component_at",
    "connected_components",
    "fill_holes",
    "keep_largest_component",
    "otsu_threshold",
    "range_threshold",
    "remove_small_components",
    "segment",
    "suv_fraction_threshold",
]
