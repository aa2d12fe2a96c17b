"""Modality names: one canonical spelling per modality, and the family each belongs to.

Canonical names are upper case with underscores: ``CT``, ``PET``, ``MR_T1``, ``MR_T1C``,
``MR_T2``, ``FLAIR``, ``MR`` (other MR), ``US``. Anything else is kept, upper-cased, as a
user-defined modality of family ``OTHER``.
"""

from __future__ import annotations

import re

_ALIASES = {
    "CT": "CT",
    "CTA": "CT",
    "PET": "PET",
    "PT": "PET",
    "FDG": "PET",
    "SUV": "PET",
    "MR": "MR",
    "MRI": "MR",
    "T1": "MR_T1",
    "T1W": "MR_T1",
    "T1N": "MR_T1",
    "MR_T1": "MR_T1",
    "MR_T1W": "MR_T1",
    "T1C": "MR_T1C",
    "T1CE": "MR_T1C",
    "T1GD": "MR_T1C",
    "MR_T1C": "MR_T1C",
    "T2": "MR_T2",
    "T2W": "MR_T2",
    "MR_T2": "MR_T2",
    "T2FS": "MR_T2",
    "FLAIR": "FLAIR",
    "T2F": "FLAIR",
    "MR_FLAIR": "FLAIR",
    "US": "US",
}

FAMILIES = {
    "CT": "CT",
    "PET": "PET",
    "MR": "MR",
    "MR_T1": "MR",
    "MR_T1C": "MR",
    "MR_T2": "MR",
    "FLAIR": "MR",
    "US": "US",
}


def canonical_modality(name: str) -> str:
    """The canonical spelling of a modality name (``"mr-t1"`` -> ``MR_T1``, ``"PT"`` -> ``PET``)."""
    key = re.sub(r"[\s\-\.]+", "_", str(name).strip()).upper()
    return _ALIASES.get(key, _ALIASES.get(key.replace("_", ""), key))


def modality_family(name: str) -> str:
    """``"CT"``, ``"PET"``, ``"MR"``, ``"US"`` or ``"OTHER"`` for a modality name."""
    return FAMILIES.get(canonical_modality(name), "OTHER")
