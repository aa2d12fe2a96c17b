"""The classifier shipped with the extension for the demo: trained on the development
cohort's features as ``mma demo`` computes them (``benchmarks/classification.py --ship``)."""

from __future__ import annotations

from pathlib import Path

from MultiModalAnalysisLib.classification.modelfile import METADATA_FILE

SHIPPED_CLASSIFIER = "sts_lungmets_classifier"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def shipped_classifier_dir() -> Path | None:
    """The shipped classifier's folder, or ``None`` when it has not been trained yet."""
    for root in (_REPO_ROOT / "Resources", _REPO_ROOT / "MultiModalAnalysis" / "Resources"):
        folder = root / "Models" / SHIPPED_CLASSIFIER
        if (folder / METADATA_FILE).is_file():
            return folder
    return None
