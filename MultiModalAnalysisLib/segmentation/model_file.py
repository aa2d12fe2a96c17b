"""A trained segmentation model: the network's weights plus everything needed to use it
right (modalities in order, spacing, intensity normalisation, patch size, label names and
colours, clean-up) and to judge it (training cases, validation Dice, library versions).

On disk a model is one torch file (``*.pt``) or a folder holding ``model.pt`` and a
readable copy of the metadata in ``metadata.json``.
"""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from MultiModalAnalysisLib.errors import MissingModalityError, ModelError
from MultiModalAnalysisLib.images import require_plausible_units
from MultiModalAnalysisLib.modalities import canonical_modality, modality_family
from MultiModalAnalysisLib.segmentation.network import build_network

log = logging.getLogger(__name__)
MODEL_FORMAT = "MultiModalAnalysis segmentation model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.pt"
METADATA_FILE = "metadata.json"


def library_versions() -> dict[str, str]:
    """Versions of the libraries a model was trained with."""
    import monai
    import numpy
    import torch

    from MultiModalAnalysisLib import __version__

    return {
        "MultiModalAnalysis": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "SimpleITK": sitk.Version_VersionString(),
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


class SegmentationModel:
    """A network and its metadata (see the module docstring for the fields)."""

    def __init__(self, network, metadata: dict[str, Any], path: Path | None = None) -> None:
        self.network = network
        self.metadata = metadata
        self.path = path

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or (self.path.stem if self.path else "model"))

    @property
    def modalities(self) -> list[str]:
        return list(self.metadata["modalities"])

    @property
    def spacing(self) -> list[float]:
        return [float(s) for s in self.metadata["spacing"]]

    @property
    def patch_size(self) -> list[int]:
        """Patch size in voxels, x y z."""
        return [int(s) for s in self.metadata["patch_size"]]

    @property
    def normalisations(self) -> dict[str, dict[str, Any]]:
        return dict(self.metadata["normalisation"])

    @property
    def label_names(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in self.metadata["label_names"].items()}

    @property
    def label_colors(self) -> dict[int, tuple[float, float, float]]:
        return {int(k): tuple(map(float, v)) for k, v in self.metadata["label_colors"].items()}

    @property
    def postprocess(self) -> dict[str, Any]:
        return dict(self.metadata.get("postprocess", {}))

    def check_inputs(self, images: Mapping[str, sitk.Image]) -> dict[str, sitk.Image]:
        """The images this model needs, by its modality names, in its channel order.

        Names are matched in any spelling (``mr-t1`` is ``MR_T1``); extra images are ignored
        (with a log line).

        Raises:
            MissingModalityError: a modality the model needs is not among ``images``.
            ModelError: an image's values do not fit its modality (a CT that is not in HU,
                a PET with negative uptake or values far above SUV: e.g. two inputs
                swapped, or a PET in Bq/ml).
        """
        by_name = {}
        for name, image in images.items():
            key = canonical_modality(name)
            if key in by_name:
                raise MissingModalityError(
                    f"two inputs are both {key} ({', '.join(map(str, images))}): give each "
                    "modality once."
                )
            by_name[key] = image
        missing = [m for m in self.modalities if m not in by_name]
        for needed in list(missing):
            # An input named by its family alone (MR, from mr.nii.gz) stands for the one
            # modality of that family the model takes, when no other input could.
            # (a name that says another sequence, FLAIR or MR_T2 for MR_T1, is not one)
            family = modality_family(needed)
            candidates = [n for n in by_name if n not in self.modalities and n == family]
            takers = [m for m in self.modalities if modality_family(m) == family]
            if family in ("CT", "PET", "MR") and len(candidates) == 1 and len(takers) == 1:
                log.warning("model '%s': the input %s is taken as its %s (name it %s=PATH "
                            "to say so).", self.name, candidates[0], needed, needed)
                by_name[needed] = by_name.pop(candidates[0])
                missing.remove(needed)
        if missing:
            others = [n for n in by_name if n not in self.modalities and any(
                modality_family(n) == modality_family(m) for m in missing)]
            raise MissingModalityError(
                f"model '{self.name}' needs {', '.join(self.modalities)} (in that order) but "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing from the "
                f"inputs (given: {', '.join(map(str, images)) or 'none'}). Name each input by "
                "its modality, e.g. CT=ct.nii.gz PET=pet.nii.gz."
                + (f" {', '.join(others)} {'is' if len(others) == 1 else 'are'} another "
                   "sequence than the model learnt: a network trained on one sequence "
                   "mis-reads another's contrast." if others else "")
            )
        extra = [name for name in by_name if name not in self.modalities]
        if extra:
            log.info("model '%s' ignores the inputs %s", self.name, ", ".join(extra))
        ordered = {m: by_name[m] for m in self.modalities}
        # The network's intensity windows assume these units: a swapped or unconverted
        # input gives a confident, wrong segmentation (a PET given as CT segmented 2.6 L of
        # "tumour" on STS_001, 0.4 L in truth).
        require_plausible_units(ordered, f"model '{self.name}'", pet_in_suv=True)
        return ordered

    def save(self, path: str | Path) -> Path:
        """Write the model: ``path`` ending in ``.pt``/``.pth`` is a single file, anything
        else a folder with ``model.pt`` and ``metadata.json``. Returns the weights file."""
        import torch

        path = Path(path)
        weights = path if path.suffix in (".pt", ".pth") else path / WEIGHTS_FILE
        weights.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.network.state_dict().items()}
        payload = {
            "format": MODEL_FORMAT,
            "format_version": FORMAT_VERSION,
            "metadata": json.loads(json.dumps(self.metadata)),  # plain JSON types only
            "state_dict": state,
        }
        torch.save(payload, weights)
        if weights.name == WEIGHTS_FILE:
            (weights.parent / METADATA_FILE).write_text(json.dumps(self.metadata, indent=2),
                                                        encoding="utf-8")
        self.path = weights
        return weights


def shipped_model_path(name: str = "sts_gtv") -> Path:
    """The folder of a model shipped with the extension (``Resources/Models/<name>``).

    Raises:
        ModelError: it is not there (a checkout without the models, or a wrong name).
    """
    root = Path(__file__).resolve().parents[2]
    candidates = [
        root / "Resources" / "Models" / name,
        root / "MultiModalAnalysis" / "Resources" / "Models" / name,  # inside Slicer
    ]
    for candidate in candidates:
        if (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise ModelError(
        f"the shipped model '{name}' was not found (looked in "
        f"{', '.join(map(str, candidates))})."
    )


def load_segmentation_model(path: str | Path, device: str = "cpu") -> SegmentationModel:
    """Read a model written by :meth:`SegmentationModel.save` (a ``.pt`` file or its folder).

    Args:
        path: the ``.pt`` file, or the folder holding ``model.pt``.
        device: where to put the network (``"cpu"``, ``"cuda"``, ``"auto"``).

    Raises:
        ModelError: missing path, not a model of this project, a newer format, or weights
            that do not fit the network the metadata describes.
    """
    import torch

    from MultiModalAnalysisLib.device import resolve_device

    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise ModelError(
            f"no segmentation model at {path} (expected a .pt file or a folder holding "
            f"{WEIGHTS_FILE}). Train one with `mma train-segmentation` or check the path."
        )
    try:
        payload = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a foreign or broken file
        # torch's own text suggests weights_only=False, i.e. running the file's code: not
        # advice to pass on about a file that is not a model of this project
        raise ModelError(
            f"{weights} is not a segmentation model file of this project (torch could not "
            f"read it: {type(error).__name__}). Give a model written by "
            "`mma train-segmentation` (a folder with model.pt), or a MONAI bundle folder."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelError(
            f"{weights} is not a {MODEL_FORMAT} (a MONAI bundle is a folder with configs/; "
            "plain weights need the network's description)."
        )
    if int(payload.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelError(
            f"{weights} was written by a newer MultiModalAnalysis (format "
            f"{payload['format_version']} > {FORMAT_VERSION}): update the extension."
        )
    metadata = _checked_metadata(payload.get("metadata"), weights)
    copy = weights.parent / METADATA_FILE
    if weights.name == WEIGHTS_FILE and copy.is_file():
        try:
            differs = json.loads(copy.read_text(encoding="utf-8")) != json.loads(
                json.dumps(metadata))
        except (OSError, ValueError):
            differs = True
        if differs:
            log.warning("%s differs from the metadata inside %s (or cannot be read); the one "
                        "inside the weights file is used.", copy, weights.name)
    network = build_network(
        metadata["network"], len(metadata["modalities"]), len(metadata["label_names"]) + 1
    )
    try:
        network.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise ModelError(
            f"the weights in {weights} do not fit the network its metadata describes: "
            f"{str(error).splitlines()[0]}"
        ) from None
    network.eval().to(resolve_device(device))
    return SegmentationModel(network, metadata, weights)


# metadata key -> what it must be, for a model to be usable
_REQUIRED_METADATA = {
    "modalities": "a non-empty list of modality names",
    "spacing": "three positive numbers (mm)",
    "patch_size": "three positive whole numbers (voxels)",
    "normalisation": "a mapping with an entry per modality",
    "network": "a mapping describing the network",
    "label_names": "a non-empty mapping of label value -> name",
}


def _checked_metadata(metadata: Any, weights: Path) -> dict[str, Any]:
    """The model's metadata, refused with a clear message when a needed field is missing
    or malformed (a hand-edited or damaged file)."""

    def positive(values: Any, whole: bool) -> bool:
        try:
            return len(values) == 3 and all(
                float(v) > 0 and (not whole or float(v) == int(v)) for v in values)
        except (TypeError, ValueError):
            return False

    if not isinstance(metadata, dict):
        raise ModelError(f"{weights} holds no metadata: it cannot be used (retrain the model).")
    problems = [key for key in _REQUIRED_METADATA if key not in metadata]
    if not problems:
        checks = {
            "modalities": isinstance(metadata["modalities"], list)
            and bool(metadata["modalities"])
            and all(isinstance(m, str) for m in metadata["modalities"]),
            "spacing": positive(metadata["spacing"], whole=False),
            "patch_size": positive(metadata["patch_size"], whole=True),
            "normalisation": isinstance(metadata["normalisation"], dict),
            "network": isinstance(metadata["network"], dict),
            "label_names": isinstance(metadata["label_names"], dict)
            and bool(metadata["label_names"]),
        }
        problems = [key for key, ok in checks.items() if not ok]
        if not problems and any(
                m not in metadata["normalisation"] for m in metadata["modalities"]):
            problems = ["normalisation"]
    if problems:
        raise ModelError(
            f"the metadata in {weights} is damaged: "
            + "; ".join(f"'{key}' should be {_REQUIRED_METADATA[key]}" for key in problems)
            + ". Use the model as `mma train-segmentation` wrote it, or retrain it."
        )
    return metadata
