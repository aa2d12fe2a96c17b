"""Guessing a volume's modality from its DICOM tags or its name, for the module's input list.

The guess only pre-fills a choice the user can change: Modality (0008,0060) decides CT and
PET; for MR, the series description or the name decides T1, T2 or FLAIR.
"""

from __future__ import annotations

import re

#: The choices the module offers, in the user's words.
MODALITY_CHOICES = ("CT", "PET", "MR-T1", "MR-T2", "FLAIR", "other")

# Words in series descriptions or file names, checked in this order (FLAIR before T2, because
# "T2 FLAIR" is a FLAIR).
_MR_WORDS = (
    ("FLAIR", ("flair", "tirm", "darkfluid", "dark fluid", "t2f")),
    ("MR-T1", ("t1", "t1w", "mprage", "spgr", "tfl", "vibe", "t1c", "t1ce", "t1gd", "bravo")),
    ("MR-T2", ("t2", "t2w", "tse", "haste")),
)
_PET_WORDS = ("pet", "suv", "fdg", "psma")
_CT_WORDS = ("ct", "cta", "hu")


def _tokens(text: str) -> list[str]:
    """Lower-case words of a name: 'MR_T1_image' -> ['mr', 't1', 'image']."""
    return [t for t in re.split(r"[^a-z0-9]+", text.lower()) if t]


def _mr_sequence(text: str) -> str | None:
    tokens = _tokens(text)
    joined = " ".join(tokens)
    for choice, words in _MR_WORDS:
        if any(word in tokens or (" " in word and word in joined) for word in words):
            return choice
    return None


def guess_modality(
    name: str = "", dicom_modality: str | None = None, series_description: str | None = None
) -> str:
    """One of :data:`MODALITY_CHOICES` for a volume.

    Args:
        name: the volume's name (often the file name).
        dicom_modality: DICOM Modality (0008,0060), e.g. ``CT``, ``PT``, ``MR``.
        series_description: DICOM Series Description (0008,103E).

    Returns:
        The best guess; ``"other"`` when nothing points anywhere. A DICOM MR series with no
        recognisable sequence name is guessed ``MR-T1`` (the usual anatomical sequence).
    """
    description = series_description or ""
    dicom = (dicom_modality or "").strip().upper()
    if dicom == "CT":
        return "CT"
    if dicom in ("PT", "PET", "NM"):
        return "PET"
    if dicom == "MR":
        return _mr_sequence(description) or _mr_sequence(name) or "MR-T1"
    text = f"{description} {name}"
    tokens = _tokens(text)
    sequence = _mr_sequence(text)
    if sequence is not None:
        return sequence
    if any(word in tokens for word in _PET_WORDS):
        return "PET"
    if any(word in tokens for word in _CT_WORDS):
        return "CT"
    if any(word in tokens for word in ("mr", "mri")):
        return "MR-T1"
    return "other"
