"""IBSI compliance: compare computed features with the IBSI 1 reference values.

The digital phantom's reference table (IBSI 1 manual, Zwanenburg et al., Radiology 2020;
295:328-338) lists each feature's consensus value to three significant digits, with a
tolerance for some. A value matches when it lies within the tolerance, or (tolerance 0)
when it rounds to the reference at three significant digits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from MultiModalAnalysisLib.features.settings import FeatureSettings


def ibsi_phantom_settings() -> FeatureSettings:
    """The IBSI manual's configuration for the digital phantom.

    No interpolation or re-segmentation; the phantom's grey levels (1..6) are used as they
    are for texture, the intensity histogram and the IVH; every aggregation level.
    """
    return FeatureSettings(
        discretisation_method="none",
        ih_discretisation_method="none",
        ivh_discretisation_method="none",
    )


def read_reference_values(path: str | Path):
    """The reference table (pandas DataFrame: family, feature, tag, reference, tolerance).

    Rows without a reference value (features IBSI does not standardise) are dropped.
    """
    import pandas as pd

    table = pd.read_csv(path, encoding="utf-8-sig")
    table = table.rename(columns={"reference value": "reference"})
    table = table[pd.to_numeric(table["reference"], errors="coerce").notna()].copy()
    table["reference"] = table["reference"].astype(float)
    table["tolerance"] = pd.to_numeric(table["tolerance"], errors="coerce").fillna(0.0)
    return table[["family", "feature", "tag", "reference", "tolerance"]].reset_index(drop=True)


def matches_reference(value: float, reference: float, tolerance: float) -> bool:
    """True when ``value`` lies within ``tolerance`` or rounds to ``reference`` (3 digits)."""
    if value != value:  # NaN
        return False
    if reference == 0:
        rounding = 5e-4
    else:
        rounding = 0.5 * 10 ** (math.floor(math.log10(abs(reference))) - 2)
    return abs(value - reference) <= max(tolerance, rounding) * (1 + 1e-9)


def compare_with_reference(values: Mapping[str, float], reference, prefix: str = ""):
    """The reference table with ``value`` and ``matched`` columns added.

    Args:
        values: computed features (keys ``<prefix><tag>``).
        reference: the table from :func:`read_reference_values`.
        prefix: e.g. ``"phantom_"`` when the keys carry an image name.
    """
    table = reference.copy()
    table["value"] = [values.get(prefix + tag, float("nan")) for tag in table["tag"]]
    table["matched"] = [
        matches_reference(v, r, t)
        for v, r, t in zip(table["value"], table["reference"], table["tolerance"], strict=True)
    ]
    return table


def compliance_by_family(comparison):
    """Matched and total reference values per family (pandas DataFrame)."""
    summary = comparison.groupby("family", sort=False)["matched"].agg(["sum", "count"])
    return summary.rename(columns={"sum": "matched", "count": "reference_values"})
