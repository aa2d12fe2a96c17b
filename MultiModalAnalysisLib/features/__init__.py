"""Radiomics features in torch, as the IBSI reference manual (IBSI 1) defines them.

``extract_features(images, mask, settings)`` computes the eleven IBSI feature families
(morphology, local intensity, intensity statistics, intensity histogram, intensity-volume
histogram, GLCM, GLRLM, GLSZM, GLDZM, NGTDM, NGLDM) with IBSI's 2-D / 2.5-D / 3-D
aggregation, after IBSI's image-processing chain (interpolation, re-segmentation,
discretisation) set by :class:`FeatureSettings`. Columns are ``<image>_<IBSI tag>``.
"""

from MultiModalAnalysisLib.features.cohort import extract_cohort_features
from MultiModalAnalysisLib.features.extract import (
    UndefinedFeatureWarning,
    extract_features,
    extract_on_own_grids,
)
from MultiModalAnalysisLib.features.settings import FAMILIES, FeatureSettings, load_settings

__all__ = [
    "FAMILIES",
    "FeatureSettings",
    "UndefinedFeatureWarning",
    "extract_cohort_features",
    "extract_features",
    "extract_on_own_grids",
    "load_settings",
]
