"""The on-disk layout shared by every classifier: a folder with ``classifier.json``
(metadata: what the model expects, how it was trained, how well it validated, library
versions) next to the model weights, whose SHA-256 the metadata records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from MultiModalAnalysisLib import __version__
from MultiModalAnalysisLib.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = "mma-classifier"
FORMAT_VERSION = 1
METADATA_FILE = "classifier.json"
WEIGHT_FILES = ("classifier.joblib", "network.pt")  # radiomics, deep


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries a saved model depends on."""
    import joblib
    import numpy
    import pandas
    import scipy
    import sklearn

    versions = {
        "python": platform.python_version(),
        "MultiModalAnalysis": __version__,
        "scikit-learn": sklearn.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "pandas": pandas.__version__,
        "joblib": joblib.__version__,
    }
    try:
        import monai
        import torch

        versions.update({"torch": torch.__version__, "monai": monai.__version__})
    except ImportError:  # the radiomics classifier does not need them
        pass
    return versions


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_dir(path: str | Path) -> Path:
    """The model folder for a folder, its ``classifier.json`` or its weights file."""
    path = Path(path)
    return path if path.is_dir() or not path.suffix else path.parent


def write_metadata(folder: Path, metadata: dict[str, Any]) -> Path:
    path = folder / METADATA_FILE
    path.write_text(json.dumps(metadata, indent=2, default=str), encoding="utf-8")
    return path


def read_metadata(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(model folder, metadata) of a saved classifier.

    Raises:
        ConfigError: no ``classifier.json`` there, unreadable, or not a classifier's.
    """
    folder = model_dir(path)
    meta_path = folder / METADATA_FILE
    if not meta_path.is_file():
        raise ConfigError(
            f"no classifier at {path}: expected a folder written by `mma train-classifier` "
            f"holding {METADATA_FILE}."
        )
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{meta_path} is not valid JSON ({error}).") from None
    if metadata.get("format") != FORMAT:
        raise ConfigError(f"{meta_path} does not describe a MultiModalAnalysis classifier.")
    if int(metadata.get("format_version", 0)) > FORMAT_VERSION:
        raise ConfigError(
            f"{meta_path} was written by a newer MultiModalAnalysis (format "
            f"{metadata['format_version']} > {FORMAT_VERSION}); update the extension."
        )
    return folder, metadata


def verify_weights(folder: Path, metadata: dict[str, Any]) -> Path:
    """The weights file named in the metadata, after checking its SHA-256.

    The checksum catches a weights file swapped or damaged after saving; it is no defence
    against someone who rewrites both files (see the pickle caveat in ``model.py``).

    Raises:
        ConfigError: the file is missing or its checksum differs.
    """
    entry = metadata.get("model_file", {})
    path = folder / entry.get("name", "")
    if not path.is_file():
        raise ConfigError(f"{folder} lacks the model weights {entry.get('name')!r}.")
    if entry.get("sha256") and sha256(path) != entry["sha256"]:
        raise ConfigError(
            f"{path} does not match the checksum in {METADATA_FILE}: the file was changed "
            "or damaged after the model was saved. Retrain or restore the original."
        )
    return path


def warn_on_version_change(metadata: dict[str, Any], what: str) -> None:
    """Log a warning for each library whose version differs from training time."""
    saved = metadata.get("versions", {})
    current = library_versions()
    for name in ("scikit-learn", "torch", "monai"):
        if name in saved and name in current and saved[name] != current[name]:
            log.warning(
                "%s was saved with %s %s and is loaded with %s; predictions may differ "
                "slightly.", what, name, saved[name], current[name],
            )


def save_model_folder(folder: str | Path, weights: str, write_weights: Callable[[Path], None],
                      metadata: dict[str, Any], file_info: dict[str, Any], cv_result: Any,
                      cv_title: str, card: Callable[[dict[str, Any]], str]) -> Path:
    """Write a classifier's folder: its ``weights`` (by ``write_weights(path)``), their
    checksum in the metadata (``metadata["model_file"]``, with ``file_info``), the
    cross-validation outputs of ``cv_result`` (or none) and the card.

    Everything is written into a staging folder and moved into place at the end, so a save
    stopped half-way (Ctrl-C while the figures are drawn) leaves the model that was there
    whole: new weights beside the old metadata failed its checksum, and it did not load.
    """
    from MultiModalAnalysisLib.classification.evaluation import CVResult
    from MultiModalAnalysisLib.io import publish_staged, staged_writes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with staged_writes(folder, "model") as staging:
        write_weights(staging / weights)
        metadata["model_file"] = {"name": weights, "sha256": sha256(staging / weights),
                                  **file_info}
        if cv_result is not None:
            cv_result.save(staging, title=cv_title)
        write_metadata(staging, metadata)
    clear_previous_model(folder, weights, () if cv_result is not None else CVResult.FILES)
    publish_staged(staging, folder)
    (folder / "MODEL_CARD.md").write_text(card(metadata), encoding="utf-8")
    return folder


def clear_previous_model(folder: Path, weights: str, cv_files: tuple[str, ...]) -> None:
    """Remove what a model saved into ``folder`` before leaves that this one does not
    replace: the other kind's weights (``weights`` is this model's file) and ``cv_files``
    (the cross-validation outputs, when this model has none): a model must not sit beside
    the figures or weights of the one it replaces."""
    stale = [name for name in WEIGHT_FILES if name != weights] + list(cv_files)
    for name in stale:
        if (folder / name).is_file():
            (folder / name).unlink()
            log.info("removed %s, left by the model this one replaces", folder / name)
