"""Where the bundled sample patient and the development data live."""

from __future__ import annotations

import os
from pathlib import Path

from MultiModalAnalysisLib.errors import MMAError

SAMPLE_CASE = "STS_002"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def sample_case_dir() -> Path:
    """The folder of the bundled sample patient (``Resources/SampleData/STS_002``).

    ``$MMA_SAMPLE_DATA`` overrides it (a folder laid out like ``STS_xxx/``); set to a folder
    without ``CT_image.nii.gz``, it is an error, not a silent fall-back to the bundled case.
    """
    if os.environ.get("MMA_SAMPLE_DATA"):
        chosen = Path(os.environ["MMA_SAMPLE_DATA"])
        if (chosen / "CT_image.nii.gz").is_file():
            return chosen
        raise MMAError(
            f"MMA_SAMPLE_DATA is {chosen}, which holds no CT_image.nii.gz: set it to a case "
            "folder (CT_image.nii.gz, PET_image.nii.gz, MR_T1_image.nii.gz), or unset it to "
            "use the bundled patient."
        )
    candidates = [
        _REPO_ROOT / "Resources" / "SampleData" / SAMPLE_CASE,
        # Inside an installed Slicer extension the Lib sits next to the module's Resources.
        _REPO_ROOT / "MultiModalAnalysis" / "Resources" / "SampleData" / SAMPLE_CASE,
    ]
    for candidate in candidates:
        if (candidate / "CT_image.nii.gz").is_file():
            return candidate
    raise MMAError(
        "the bundled sample patient was not found (looked in "
        f"{', '.join(map(str, candidates))}). Run from a checkout of the repository, or set "
        "MMA_SAMPLE_DATA to a case folder with CT_image.nii.gz, PET_image.nii.gz and "
        "MR_T1_image.nii.gz."
    )


def development_data_dir() -> Path | None:
    """The development data folder (``$MMA_DATA`` or ``../shared/data``), if present."""
    if os.environ.get("MMA_DATA"):
        path = Path(os.environ["MMA_DATA"])
        return path if path.is_dir() else None
    path = _REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None
