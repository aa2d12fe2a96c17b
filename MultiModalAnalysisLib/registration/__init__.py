"""Registration: rigid, affine and deformable (torch or SimpleITK B-spline), from images or
landmarks, with quality metrics and a QC figure.

Every transform follows the ITK convention: it maps a point of the fixed image's physical
space to the moving image's.
"""

from MultiModalAnalysisLib.registration.api import (
    BACKENDS,
    TRANSFORM_TYPES,
    RegistrationWarning,
    register,
)
from MultiModalAnalysisLib.registration.landmarks import (
    read_landmarks_csv,
    register_landmarks,
)
from MultiModalAnalysisLib.registration.result import RegistrationResult
from MultiModalAnalysisLib.registration.similarity import METRICS, choose_metric

__all__ = [
    "BACKENDS",
    "METRICS",
    "TRANSFORM_TYPES",
    "RegistrationResult",
    "RegistrationWarning",
    "choose_metric",
    "read_landmarks_csv",
    "register",
    "register_landmarks",
]
