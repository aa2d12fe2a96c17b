"""Which similarity metric to use for a pair of images, and the SimpleITK side of it.

``metric="auto"`` picks by modality pair: two images of one modality (CT/CT, MR_T1/MR_T1)
are compared by correlation (NCC for linear registration, local NCC for deformable);
anything else, including a pair whose modalities are unknown, by mutual information, which
only assumes that intensities are statistically related.
"""

from __future__ import annotations

import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError
from MultiModalAnalysisLib.modalities import canonical_modality

METRICS = ("auto", "mi", "ncc", "lncc", "mind")
MI_BINS = 32


def choose_metric(
    metric: str,
    fixed_modality: str | None,
    moving_modality: str | None,
    *,
    deformable: bool = False,
) -> str:
    """Resolve ``metric`` ("auto", "mi", "ncc", "lncc", "mind") to a concrete metric name.

    Args:
        metric: the requested metric; "auto" picks from the modalities.
        fixed_modality, moving_modality: modality names (any spelling) or None (unknown).
        deformable: the metric is for a deformable stage (``auto`` then prefers local NCC
            within one modality).

    Raises:
        ConfigError: an unknown metric name.
    """
    name = str(metric).strip().lower()
    if name not in METRICS:
        raise ConfigError(f"unknown metric '{metric}': use one of {', '.join(METRICS)}.")
    if name != "auto":
        return name
    if same_modality(fixed_modality, moving_modality):
        return "lncc" if deformable else "ncc"
    return "mi"


def same_modality(fixed_modality: str | None, moving_modality: str | None) -> bool:
    """True only when both modalities are known and the same (T1 vs T2 counts as cross-modal)."""
    if not fixed_modality or not moving_modality:
        return False
    return canonical_modality(fixed_modality) == canonical_modality(moving_modality)


def set_sitk_metric(method: sitk.ImageRegistrationMethod, metric: str) -> None:
    """Configure ``method``'s metric for a concrete metric name (linear/B-spline stages).

    MIND is a torch-backend metric; SimpleITK stages use Mattes MI in its place.
    """
    if metric in ("mi", "mind"):
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=MI_BINS)
    elif metric == "ncc":
        method.SetMetricAsCorrelation()
    elif metric == "lncc":
        method.SetMetricAsANTSNeighborhoodCorrelation(radius=2)
    else:  # choose_metric resolves "auto" first
        raise ConfigError(f"metric '{metric}' has no SimpleITK equivalent.")


def metric_label(metric: str) -> str:
    """Human-readable metric name for reports (all are minimised: lower is better)."""
    return {
        "mi": "negative Mattes mutual information",
        "ncc": "negative normalised cross-correlation",
        "lncc": "negative local normalised cross-correlation",
        "mind": "negative Mattes mutual information",
    }[metric]
