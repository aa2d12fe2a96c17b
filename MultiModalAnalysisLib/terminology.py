"""Standard terminology (SNOMED-CT codes, as in Slicer's General Anatomy list) for segment names.

A segment named "tumour", "GTV" or "necrosis" is recognised and gets the code Slicer's
Segment Editor would give it, so a saved segmentation (or a DICOM SEG exported from it)
says what it is in standard terms, not just in a free-text name. Codes and recommended
colours are those of Slicer's ``SegmentationCategoryTypeModifier-SlicerGeneralAnatomy``
terminology.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

Code = tuple[str, str, str]  # (coding scheme, code value, code meaning)

#: The name of the Slicer terminology context the codes below come from.
GENERAL_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"

_TISSUE: Code = ("SCT", "85756007", "Tissue")
_ALTERED: Code = ("SCT", "49755003", "Morphologically Altered Structure")


@dataclass(frozen=True)
class Term:
    """A category/type pair of standard codes and the colour Slicer recommends for it."""

    category: Code
    type: Code
    color: tuple[float, float, float]


def _rgb(r: int, g: int, b: int) -> tuple[float, float, float]:
    return (r / 255.0, g / 255.0, b / 255.0)


_MASS = Term(_ALTERED, ("SCT", "4147007", "Mass"), _rgb(144, 238, 144))
_TERMS: dict[str, Term] = {
    "mass": _MASS,
    "necrosis": Term(_ALTERED, ("SCT", "6574001", "Necrosis"), _rgb(216, 191, 216)),
    "edema": Term(_ALTERED, ("SCT", "79654002", "Edema"), _rgb(140, 224, 228)),
    "cyst": Term(_ALTERED, ("SCT", "367643001", "Cyst"), _rgb(205, 205, 100)),
    "hemorrhage": Term(_ALTERED, ("SCT", "50960005", "Hemorrhage"), _rgb(188, 65, 28)),
    "tissue": Term(_TISSUE, ("SCT", "85756007", "Tissue"), _rgb(128, 174, 128)),
    "fat": Term(_TISSUE, ("SCT", "248300009", "Body fat"), _rgb(230, 220, 70)),
    "bone": Term(_TISSUE, ("SCT", "272673000", "Bone"), _rgb(241, 214, 145)),
    "muscle": Term(_TISSUE, ("SCT", "71616004", "Muscle"), _rgb(192, 104, 88)),
    "skin": Term(_TISSUE, ("SCT", "39937001", "Skin"), _rgb(177, 122, 101)),
    "connective tissue": Term(
        _TISSUE, ("SCT", "21793004", "Connective tissue"), _rgb(111, 184, 210)
    ),
}

# Words people use for the same thing (British spellings, radiotherapy names).
_SYNONYMS = {
    "tumour": "mass",
    "tumor": "mass",
    "gtv": "mass",
    "gtv mass": "mass",
    "lesion": "mass",
    "lesions": "mass",
    "neoplasm": "mass",
    "sarcoma": "mass",
    "enhancing tumour": "mass",
    "enhancing tumor": "mass",
    "necrotic": "necrosis",
    "necrotic core": "necrosis",
    "oedema": "edema",
    "peritumoural oedema": "edema",
    "peritumoral edema": "edema",
    "haemorrhage": "hemorrhage",
    "adipose": "fat",
    "adipose tissue": "fat",
    "body fat": "fat",
    "soft tissue": "tissue",
    "muscles": "muscle",
}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def terminology_for(name: str) -> Term | None:
    """The standard term for a segment name, or ``None`` when none fits."""
    key = _key(name)
    return _TERMS.get(_SYNONYMS.get(key, key))


def default_color(name: str) -> tuple[float, float, float] | None:
    """The colour Slicer recommends for a segment of this name, if it has a standard term."""
    term = terminology_for(name)
    return term.color if term else None
