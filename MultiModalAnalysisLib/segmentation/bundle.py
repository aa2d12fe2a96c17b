"""MONAI bundles from a local folder (the user's own, or one downloaded from the MONAI Model
Zoo beforehand; nothing is downloaded here): build the bundle's inference network with its
weights and run it on the given volumes.

What is taken from the bundle, from ``configs/inference.{json,yaml}`` (references and
expressions resolved by MONAI's ConfigParser, so settings given as ``"@name"`` or
``"$@preprocessing_transforms"`` count as written out) and ``configs/metadata.json``:

- the network: ``network_def`` (or ``network``) with the weights in ``models/model.pt``,
  or the TorchScript ``models/model.ts`` alone; the bundle's own code (``scripts/``) is
  importable while it is built. 2-D bundles are refused.
- the sliding window of its ``inferer``: ``roi_size``, ``overlap``, ``sw_batch_size``,
  ``mode``.
- of its ``preprocessing``: the axis orientation (``Orientationd``), the spacing
  (``Spacingd``, along the oriented axes when it comes after ``Orientationd``, as in MONAI)
  and the transforms that only change intensities; a preprocessing that cannot be read as
  a list of transforms is warned about and not applied.
- of its ``postprocessing``: whether the outputs are a sigmoid per channel (``Activationsd``
  with ``sigmoid``) and the threshold of ``AsDiscreted``. Such channels (BraTS's tumour
  core, whole tumour, enhancing tumour) are labels 1..C of their own; where they overlap,
  a voxel takes the label of the smallest region. Otherwise the outputs are softmax
  classes, channel 0 the background.
- of the metadata: the input channels (their number, else the network's, and their order
  by name: images named as the channels are put in that order) and the label names.

Reading, resampling and orientation are done here on SimpleITK images (in physical space), so
the labels come back on the first input image's grid.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.device import run_with_device_fallback
from MultiModalAnalysisLib.errors import ModelError
from MultiModalAnalysisLib.images import image_from_array
from MultiModalAnalysisLib.modalities import canonical_modality
from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel
from MultiModalAnalysisLib.segmentation.inputs import require_images, stack_images
from MultiModalAnalysisLib.segmentation.model_inputs import model_grid, onto_grid
from MultiModalAnalysisLib.segmentation.result import (
    SegmentationResult,
    default_label_colors,
    probability_image,
)

log = logging.getLogger(__name__)

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
# Preprocessing transforms applied from a bundle: those that only change intensities.
INTENSITY_TRANSFORMS = {
    "ScaleIntensityd", "ScaleIntensityRanged", "ScaleIntensityRangePercentilesd",
    "NormalizeIntensityd", "ClipIntensityPercentilesd", "ThresholdIntensityd",
    "ShiftIntensityd", "CastToTyped", "EnsureTyped",
}
# Bundles whose overlapping labels were flattened and warned about (once per bundle).
_FLATTENING_WARNED: set[str] = set()


@dataclass
class MonaiBundle:
    """A bundle's inference network and what is needed to feed it."""

    folder: Path
    network: Any
    in_channels: int
    label_names: dict[int, str]
    input_names: list[str] = field(default_factory=list)  # metadata channel_def, in order
    roi_size: list[int] | None = None
    overlap: float | None = None  # the inferer's; None: not given there
    sw_batch_size: int | None = None
    mode: str | None = None  # "gaussian" or "constant" blending of the windows
    spacing: list[float] | None = None  # x y z along the oriented axes; <= 0: keep the image's
    orientation: str | None = None
    orientation_first: bool = True  # Orientationd before Spacingd, as bundles usually have it
    intensity: Any = None  # a MONAI Compose over {"image": tensor}, or None
    multi_label: bool = False  # a sigmoid per output channel (postprocessing Activationsd)
    threshold: float = 0.5  # of each sigmoid channel (postprocessing AsDiscreted)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or self.folder.name)


def is_monai_bundle(path: str | Path) -> bool:
    """True for a folder laid out as a MONAI bundle (``configs/`` with an inference config)."""
    configs = Path(path) / "configs"
    return configs.is_dir() and any((configs / n).is_file() for n in CONFIG_NAMES)


def _transform_name(entry: Any) -> str:
    """A transform's class name from its ``_target_``, in MONAI's dictionary spelling
    (``monai.transforms.SpacingD`` -> ``Spacingd``); ``""`` for what is not a transform."""
    if not isinstance(entry, dict):
        return ""
    name = str(entry.get("_target_", "")).split(".")[-1]
    for alias in ("Dict", "D"):  # MONAI's aliases of each dictionary transform
        if name.endswith(alias) and len(name) > len(alias):
            return name[: -len(alias)] + "d"
    return name


def _find_transform(transforms: list[dict], *names: str) -> dict | None:
    """The first transform named one of ``names`` in a list of transforms."""
    return next((t for t in transforms if _transform_name(t) in names), None)


def _position(transforms: list[dict], entry: dict | None) -> int:
    """Where ``entry`` is in ``transforms`` (past the end for ``None``)."""
    return next((i for i, t in enumerate(transforms) if t is entry), len(transforms))


def _plain(value: Any) -> Any:
    """A resolved config value with MONAI's config items unwrapped into dicts and lists."""
    from monai.bundle.config_item import ConfigItem

    if isinstance(value, ConfigItem):
        return _plain(value.get_config())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _transform_list(parser, key: str, config: Path, unread: str) -> list[dict]:
    """The transforms of the config's ``key`` (``preprocessing``, ``postprocessing``), every
    reference and expression resolved and nested ``Compose`` flattened; ``[]`` without one.

    Resolved as a whole rather than looked up entry by entry, because bundles often write
    ``"transforms": "$@preprocessing_transforms"`` (a reference to a list defined elsewhere).
    What cannot be read as a list of transforms (an expression that builds them in code, a
    broken reference) is warned about, saying what is lost (``unread``), and taken as none.
    """
    if key not in parser:
        return []
    try:
        resolved = _plain(parser.get_parsed_content(key, instantiate=False))
    except Exception as error:  # a bundle may reference anything; say so and go on
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    else:
        if isinstance(resolved, dict) and _transform_name(resolved) == "Compose":
            resolved = resolved.get("transforms")
        transforms = _flattened(resolved) if isinstance(resolved, list) else None
        if transforms is not None:
            return transforms
        reason = f"it is a {type(resolved).__name__}, not a list of transforms"
    log.warning("the bundle's %s could not be read from %s (%s): %s.", key, config, reason,
                unread)
    return []


def _flattened(entries: list) -> list[dict] | None:
    """The transforms of a list, those of nested ``Compose`` in their place; ``None`` when an
    entry is not a transform's config."""
    flat: list[dict] = []
    for entry in entries:
        if not isinstance(entry, dict):
            return None
        if str(entry.get("_disabled_", "")).lower() == "true":  # switched off in the config
            continue
        if _transform_name(entry) == "Compose" and isinstance(entry.get("transforms"), list):
            inner = _flattened(entry["transforms"])
            if inner is None:
                return None
            flat.extend(inner)
        else:
            flat.append(entry)
    return flat


def _setting(parser, key: str, config: Path) -> Any:
    """A config value with its references (``@name``) and expressions (``$...``) resolved."""
    try:
        return parser.get_parsed_content(key, instantiate=False)
    except Exception as error:  # a bundle may reference anything; report it plainly
        raise ModelError(f"could not read '{key}' of {config}: {error}") from None


def _read_configs(folder: Path, config: Path):
    """The bundle's parsed inference config and its metadata (``{}`` without one)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_config(str(config))
    except Exception as error:  # JSON or YAML syntax, unreadable file
        raise ModelError(f"cannot read the bundle config {config}: "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
                         ". Fix or replace the file.") from None
    meta_path = folder / "configs" / "metadata.json"
    metadata: Any = {}
    if meta_path.is_file():
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ModelError(f"cannot read the bundle metadata {meta_path}: {error}. Fix or "
                             "replace the file.") from None
    if not isinstance(metadata, dict):
        raise ModelError(f"the bundle metadata {meta_path} is not a JSON object.")
    return parser, metadata


def _number_list(value: Any, key: str, config: Path, kind: type) -> list | None:
    if value is None:
        return None
    values = list(value) if isinstance(value, list | tuple) else [value] * 3
    try:
        return [kind(v) for v in values]
    except (TypeError, ValueError):
        raise ModelError(f"'{key}' of {config} should be numbers, not {value!r}.") from None


def load_monai_bundle(folder: str | Path) -> MonaiBundle:
    """Build a bundle's inference network with its trained weights, and read how to feed
    it (see the module's docstring for what is taken from the bundle).

    Raises:
        ModelError: not a bundle, no network (definition with weights, or TorchScript),
            missing or unfitting weights, a 2-D bundle, unreadable or out-of-range settings.
    """
    import torch

    folder = Path(folder)
    if not is_monai_bundle(folder):
        raise ModelError(
            f"{folder} is not a MONAI bundle: expected configs/inference.json (or .yaml)."
        )
    config = next(p for p in (folder / "configs" / n for n in CONFIG_NAMES) if p.is_file())
    parser, metadata = _read_configs(folder, config)
    parser["bundle_root"] = str(folder)
    with _bundle_code_importable(folder):
        network = _build_network(parser, folder, config, torch)
        transforms = _transform_list(
            parser, "preprocessing", config, "none of it is applied (no spacing, orientation "
            "or intensity scaling of the bundle's own); check the labels, or write the "
            "transforms out as a list in the config")
        intensity = _intensity_transforms(transforms)
        multi_label, threshold = _sigmoid_outputs(_transform_list(
            parser, "postprocessing", config, "its outputs are read as softmax classes"),
            config)
        inferer = _inferer_settings(parser, config)
    _refuse_other_than_3d(folder, config, network, inferer["roi_size"])
    data_format = metadata.get("network_data_format", {})
    inputs = data_format.get("inputs", {}).get("image", {})
    outputs = data_format.get("outputs", {}).get("pred", {})
    return MonaiBundle(
        folder=folder,
        network=network,
        in_channels=_input_channels(inputs, network),
        label_names=_label_names(outputs, multi_label),
        input_names=[str(name) for _, name in sorted(
            (int(k), v) for k, v in (inputs.get("channel_def") or {}).items())],
        **inferer,
        **_geometry(transforms, config),
        intensity=intensity,
        multi_label=multi_label,
        threshold=threshold,
        metadata=metadata,
    )


def _geometry(transforms: list[dict], config: Path) -> dict[str, Any]:
    """The ``spacing``, ``orientation`` and ``orientation_first`` of a bundle from its
    (resolved) preprocessing's ``Spacingd`` and ``Orientationd``."""
    spacing, orientation = None, None
    if (spacing_entry := _find_transform(transforms, "Spacingd", "Spacing")) is not None:
        spacing = _number_list(spacing_entry.get("pixdim"), "Spacingd pixdim", config, float)
        # MONAI pads a shorter pixdim with its last value and ignores the rest of a longer one.
        spacing = (spacing + spacing[-1:] * 3)[:3] if spacing else None
    if (orient := _find_transform(transforms, "Orientationd", "Orientation")) is not None:
        # (as_closest_canonical: MONAI's closest canonical orientation, RAS)
        axcodes = orient.get("axcodes") or ("RAS" if orient.get("as_closest_canonical") else None)
        orientation = str(axcodes) if axcodes else None
    orientation_first = (_position(transforms, orient) <= _position(transforms, spacing_entry)
                         if orientation else True)
    return {"spacing": spacing, "orientation": orientation,
            "orientation_first": orientation_first}


def _inferer_settings(parser, config: Path) -> dict[str, Any]:
    """The sliding window of the bundle's ``inferer``: ``roi_size``, ``overlap``,
    ``sw_batch_size`` and ``mode``, each ``None`` where the config does not give it.

    Raises:
        ModelError: a setting that cannot be read or is out of its range.
    """
    inferer = parser.get("inferer", {}) or {}
    given = inferer if isinstance(inferer, dict) else {}

    def setting(key: str) -> Any:
        return _setting(parser, f"inferer#{key}", config) if key in given else None

    def refuse(key: str, value: Any, expected: str) -> ModelError:
        return ModelError(f"'inferer#{key}' of {config} should be {expected}, not {value!r}. "
                          "Fix the bundle's config.")

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    overlap, batch, mode = setting("overlap"), setting("sw_batch_size"), setting("mode")
    if overlap is not None and not (number(overlap) and 0.0 <= overlap < 1.0):
        raise refuse("overlap", overlap, "a fraction from 0 to under 1")
    if batch is not None and not (number(batch) and batch == int(batch) and batch >= 1):
        raise refuse("sw_batch_size", batch, "a whole number of windows, at least 1")
    if mode is not None and mode not in ("constant", "gaussian"):
        raise refuse("mode", mode, "'constant' or 'gaussian'")
    return {
        "roi_size": _number_list(setting("roi_size"), "inferer#roi_size", config, int),
        "overlap": None if overlap is None else float(overlap),
        "sw_batch_size": None if batch is None else int(batch),
        "mode": mode,
    }


def _refuse_other_than_3d(folder: Path, config: Path, network, roi: list[int] | None) -> None:
    """Refuse a 2-D bundle (a sliding window of 2 numbers, a first convolution that is not
    3-D) before MONAI fails on a volume with a traceback that does not say so.

    Raises:
        ModelError: the bundle is not made for 3-D volumes.
    """
    first = _first_convolution(network)
    why = ("its inferer's roi_size has 2 numbers" if roi is not None and len(roi) == 2
           else f"its network's first layer is a Conv{first[1]}d" if first and first[1] != 3
           else None)
    if why:
        raise ModelError(f"bundle {folder} is a 2-D bundle ({why}): 2-D bundles are not "
                         "supported, as this project segments 3-D volumes. Use a 3-D bundle.")
    if roi is not None and len(roi) != 3:
        raise ModelError(f"'inferer#roi_size' of {config} should be 3 numbers (x y z), not "
                         f"{len(roi)}.")


def _input_channels(inputs: Mapping[str, Any], network) -> int:
    """How many images the network takes: the metadata's ``num_channels``, else the built
    network's own ``in_channels`` or that of its first convolution (1 when none says)."""
    if inputs.get("num_channels") is not None:
        return int(inputs["num_channels"])
    own = getattr(network, "in_channels", None)
    if isinstance(own, int):
        return own
    first = _first_convolution(network)
    return first[0] if first else 1


def _first_convolution(network) -> tuple[int, int] | None:
    """``(in_channels, spatial dimensions)`` of the network's first convolution (a torch
    ``Conv1d/2d/3d`` or its TorchScript form), ``None`` when it has none to be found."""
    import torch

    kinds = ((torch.nn.Conv3d, 3), (torch.nn.Conv2d, 2), (torch.nn.Conv1d, 1))
    scripted = {"Conv3d": 3, "Conv2d": 2, "Conv1d": 1}
    for module in network.modules():
        dims = next((d for kind, d in kinds if isinstance(module, kind)), None)
        dims = dims or scripted.get(getattr(module, "original_name", ""))
        if dims and isinstance(getattr(module, "in_channels", None), int):
            return module.in_channels, dims
    return None


def _sigmoid_outputs(transforms: list[dict], config: Path) -> tuple[bool, float]:
    """Whether the bundle's postprocessing applies a sigmoid (``Activationsd`` with
    ``sigmoid=True``: one independent probability per output channel, as BraTS's TC/WT/ET),
    and the threshold its ``AsDiscreted`` applies after it (0.5 without one)."""
    activation = _find_transform(transforms, "Activationsd", "Activations")
    sigmoid = activation is not None and _truthy(activation.get("sigmoid"))
    discrete = _find_transform(transforms, "AsDiscreted", "AsDiscrete") or {}
    value = discrete.get("threshold")
    if value is None and _truthy(discrete.get("threshold_values")):  # MONAI < 0.8 spelling
        value = discrete.get("logit_thresh", 0.5)
    if value is None:
        return sigmoid, 0.5
    values = _number_list(value if isinstance(value, list | tuple) else [value],
                          "AsDiscreted threshold", config, float)
    return sigmoid, values[0]  # (one per key: the first key is the prediction)


def _truthy(value: Any) -> bool:
    """A config flag that may be given per key (a list) or as text."""
    if isinstance(value, list | tuple):
        return any(_truthy(v) for v in value)
    return value is True or str(value).lower() == "true"


def _label_names(outputs: Mapping[str, Any], multi_label: bool) -> dict[int, str]:
    """Label value -> name from the metadata's output ``channel_def``: channel k is label k
    of a softmax (channel 0 the background), label k + 1 when each channel is a label of its
    own (a sigmoid per channel, or a single output channel)."""
    channel_def = {int(k): str(v) for k, v in (outputs.get("channel_def") or {}).items()}
    out_channels = int(outputs.get("num_channels", len(channel_def) or 2))
    if multi_label or out_channels == 1:
        return {c + 1: channel_def.get(c, f"label {c + 1}") for c in range(out_channels)}
    return {k: channel_def.get(k, f"label {k}") for k in range(1, max(out_channels, 2))}


@contextmanager
def _bundle_code_importable(folder: Path) -> Iterator[None]:
    """The bundle's own Python code importable while its config is read and built.

    Bundles name their own classes relative to their folder (``scripts.net.MyNet``), as
    MONAI runs them from there. Modules of the same top-level names imported before
    (another bundle's ``scripts``) are set aside meanwhile and put back after, so that one
    bundle never builds from another's code, and the folder leaves ``sys.path`` again.
    """
    own = {p.stem for p in folder.iterdir()
           if p.suffix == ".py" or (p.is_dir() and any(p.glob("*.py")))}

    def from_bundle(module: str) -> bool:
        return module.split(".")[0] in own

    aside = {name: module for name, module in sys.modules.items() if from_bundle(name)}
    for name in aside:
        del sys.modules[name]
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        if str(folder) in sys.path:
            sys.path.remove(str(folder))
        for name in [name for name in sys.modules if from_bundle(name)]:
            del sys.modules[name]
        sys.modules.update(aside)


def _build_network(parser, folder: Path, config: Path, torch):
    """The bundle's network with its weights: ``network_def`` (or ``network``) with
    ``models/model.pt``, else the TorchScript ``models/model.ts``, which needs no definition
    (some bundles ship only that)."""
    weights, torchscript = folder / "models" / "model.pt", folder / "models" / "model.ts"
    key = "network_def" if "network_def" in parser else "network" if "network" in parser else None
    if key is not None and (weights.is_file() or not torchscript.is_file()):
        try:
            network = parser.get_parsed_content(key, instantiate=True)
        except Exception as error:  # a bundle may reference anything; report it plainly
            raise ModelError(f"could not build the network of bundle {folder}: {error}") from None
        return _load_weights(network, weights, folder, torch)
    if torchscript.is_file():
        try:
            with warnings.catch_warnings():
                # (torch deprecates TorchScript in favour of torch.export; bundles still
                # ship it, and the user cannot act on the warning)
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(torchscript), map_location="cpu").eval()
        except Exception as error:
            raise ModelError(f"the TorchScript network {torchscript} cannot be loaded "
                             f"({type(error).__name__}): the file is damaged or not "
                             "TorchScript.") from None
    raise ModelError(f"{config} defines no 'network_def' (or 'network') and bundle {folder} has "
                     "no TorchScript models/model.ts: there is no network to build. Use the "
                     "bundle's folder as it was published, configs and models together.")


def _load_weights(network, weights: Path, folder: Path, torch):
    """``network`` with the trained weights of ``weights`` (a state dict or a MONAI
    checkpoint), in evaluation mode."""
    if weights.is_file():
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a foreign or broken file
            # (torch's own text suggests weights_only=False, i.e. running the file's code:
            # not advice to pass on about a file that does not load as plain weights)
            raise ModelError(
                f"the weights {weights} cannot be read as plain tensors ({type(error).__name__}"
                "): the file is damaged or is not a weights file. Replace it with the "
                "bundle's own models/model.pt."
            ) from None
        try:
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]  # checkpoints saved by MONAI's CheckpointSaver
            network.load_state_dict(state)
        except Exception as error:
            raise ModelError(
                f"the weights {weights} do not fit the bundle's network: "
                f"{str(error).splitlines()[0]}"
            ) from None
        return network.eval()
    raise ModelError(f"bundle {folder} has no weights (models/model.pt or models/model.ts).")


def _intensity_transforms(transforms: list[dict]):
    """The bundle's intensity-only preprocessing as one MONAI Compose over ``{"image": ...}``
    (or None); the transforms come resolved (see :func:`_transform_list`)."""
    from monai.bundle import ConfigParser

    # Applied to the image alone: whatever keys the bundle names (its own image key, a
    # label), here there is one input, "image".
    kept = [{**t, "keys": "image"} for t in transforms if _transform_name(t) in
            INTENSITY_TRANSFORMS]
    if not kept:
        return None
    sub = ConfigParser({"transforms": {"_target_": "Compose", "transforms": kept}})
    try:
        return sub.get_parsed_content("transforms", instantiate=True)
    except Exception as error:
        raise ModelError(f"could not build the bundle's intensity preprocessing: {error}") from None


def order_inputs(images: Mapping[str, sitk.Image], bundle: MonaiBundle) -> dict:
    """``images`` in the order of the bundle's input channels (its metadata's
    ``channel_def``), told by their names.

    Names match case-insensitively, without ``-`` and ``_`` (``t1-c`` is ``T1c``), or as the
    same modality (``t1ce`` is ``T1c``, ``t2f`` is ``FLAIR``). Images named otherwise than
    every channel keep the order given, with a warning naming the bundle's order: a network
    fed its channels in another order gives wrong labels without failing.

    Raises:
        ModelError: some names match the bundle's channels and others do not, or two
            images match one channel.
    """
    expected, given = bundle.input_names, list(images)
    if len(given) < 2 or len(expected) != len(given):
        return dict(images)
    matches = {name: _matching_channels(name, expected) for name in given}
    if not any(matches.values()):
        log.warning("bundle '%s' takes its input channels in the order %s; none of the "
                    "images given (%s) is named as one of them, so they are fed in the order "
                    "given. Name them as the bundle does to have them checked.", bundle.name,
                    ", ".join(expected), ", ".join(given))
        return dict(images)
    problems = [f"{name} matches none of its channels" for name in given if not matches[name]]
    problems += [f"{name} matches several ({', '.join(expected[i] for i in matches[name])})"
                 for name in given if len(matches[name]) > 1]
    taken = [matches[name][0] for name in given if len(matches[name]) == 1]
    problems += [f"{' and '.join(n for n in given if matches[n] == [i])} match the same "
                 f"channel, {expected[i]}" for i in sorted(set(taken)) if taken.count(i) > 1]
    if problems:
        raise ModelError(
            f"bundle '{bundle.name}' takes its input channels in the order "
            f"{', '.join(expected)}, but the images given are {', '.join(given)}: "
            f"{'; '.join(problems)}. Name each image after one of the bundle's channels "
            f"({' '.join(f'{name}=...' for name in expected)}).")
    ordered = {name: images[name] for name in sorted(given, key=lambda n: matches[n][0])}
    if list(ordered) != given:
        log.info("bundle '%s' takes its input channels in the order %s: the images are fed "
                 "as %s (given as %s).", bundle.name, ", ".join(expected),
                 ", ".join(ordered), ", ".join(given))
    return ordered


def _matching_channels(name: str, expected: list[str]) -> list[int]:
    """The positions in ``expected`` of the channels ``name`` stands for: the same letters
    (case, ``-`` and ``_`` aside) or else the same modality."""
    def key(text: str) -> str:
        return re.sub(r"[-_\s]", "", str(text)).lower()

    same = [i for i, channel in enumerate(expected) if key(channel) == key(name)]
    if same:
        return same
    modality = canonical_modality(name)
    return [i for i, channel in enumerate(expected) if canonical_modality(channel) == modality]


def network_grid(reference: sitk.Image, bundle: MonaiBundle) -> sitk.Image:
    """The grid the bundle's network sees: ``reference``'s extent, its axes turned to the
    bundle's orientation (``Orientationd``) and spaced at its ``Spacingd`` pixdim.

    Done in the order of the bundle's preprocessing, as MONAI does: usually orient, then
    space, so pixdim applies along the turned axes and a sagittally stored image gives the
    network the same grid as the same image stored axially.
    """
    grid = reference
    if bundle.orientation and bundle.orientation_first:
        grid = sitk.DICOMOrient(grid, bundle.orientation)
    if bundle.spacing:
        # (a pixdim <= 0 keeps the spacing along that axis, as MONAI's Spacingd does)
        spacing = [s if s > 0 else own
                   for s, own in zip(bundle.spacing, grid.GetSpacing(), strict=True)]
        grid = model_grid(grid, spacing)
    if bundle.orientation and not bundle.orientation_first:
        grid = sitk.DICOMOrient(grid, bundle.orientation)
    return grid


def _onto_network_grid(image: sitk.Image, grid: sitk.Image, name: str) -> sitk.Image:
    """``image`` on the network's grid, its voxels first turned to the grid's axis order
    (a lossless permutation and flip): resampling smooths before down-sampling along the
    image's own axes by comparing spacings axis by axis, which only holds when the axes
    are the same ones."""
    axes = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(grid.GetDirection())
    own = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    if own != axes:
        image = sitk.DICOMOrient(image, axes)
    return onto_grid(image, grid, name=name)


def segment_with_bundle(
    images: Mapping[str, sitk.Image],
    bundle: MonaiBundle,
    *,
    device: str = "auto",
    overlap: float = 0.5,
    region: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> SegmentationResult:
    """Run a bundle's network on ``images``; labels on the first image's grid.

    Args:
        images: name -> image, one per input channel of the bundle (put in its order when
            the names tell it, see :func:`order_inputs`).
        bundle: a bundle from :func:`load_monai_bundle`.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        overlap: of the sliding windows, where the bundle's inferer gives none.
        region: boolean ``[z, y, x]`` on the first image's grid; background outside it.
        progress: ``progress(fraction, message)`` callback.
        cancel: stops the work when set.
    """
    import torch
    from monai.inferers import sliding_window_inference

    require_images(images)
    report = as_progress(progress)
    if len(images) != bundle.in_channels:
        raise ModelError(
            f"bundle '{bundle.name}' takes {bundle.in_channels} input image(s) but "
            f"{len(images)} were given ({', '.join(map(str, images))})."
        )
    reference = images[next(iter(images))]
    images = order_inputs(images, bundle)
    grid = network_grid(reference, bundle)
    stack = stack_images({n: _onto_network_grid(image, grid, str(n))
                          for n, image in images.items()})
    # MONAI's layout is channel, x, y, z; SimpleITK arrays are z, y, x.
    volume = torch.from_numpy(np.ascontiguousarray(np.transpose(stack.channels, (0, 3, 2, 1))))
    if bundle.intensity is not None:
        volume = bundle.intensity({"image": volume})["image"]
    volume = torch.as_tensor(volume, dtype=torch.float32)
    roi = bundle.roi_size or list(volume.shape[1:])
    overlap = bundle.overlap if bundle.overlap is not None else overlap
    sw_batch_size = bundle.sw_batch_size or 2
    mode = bundle.mode or "gaussian"
    check_cancel(cancel, "segmentation with a MONAI bundle")

    def run(torch_device):
        network = bundle.network.to(torch_device).eval()
        with torch.no_grad():
            logits = sliding_window_inference(volume[None].to(torch_device), roi,
                                              sw_batch_size, network, overlap=overlap,
                                              mode=mode)
        network.to("cpu")
        logits = logits[0].float()
        if bundle.multi_label or logits.shape[0] == 1:  # a sigmoid per channel
            return torch.sigmoid(logits).cpu().numpy()
        return torch.softmax(logits, dim=0).cpu().numpy()

    probabilities = run_with_device_fallback(run, device, f"bundle {bundle.name}")
    report(0.8, "network done")
    zyx = np.transpose(probabilities, (0, 3, 2, 1))
    independent = bundle.multi_label or len(zyx) == 1
    if independent:
        labels, on_reference = _labels_of_independent_channels(
            zyx, stack.reference, reference, region, bundle)
        output = "multi-label sigmoid" if len(zyx) > 1 else "sigmoid"
    else:
        labels, on_reference = _labels_of_classes(zyx, stack.reference, reference, region)
        output = "softmax"
    report(1.0, "segmented")
    names = {k: bundle.label_names.get(k, f"label {k}")
             for k in range(1, len(zyx) + (1 if independent else 0))}
    return SegmentationResult(
        labels=image_from_array(labels, reference),
        probabilities=probability_image(on_reference, reference),
        label_names=names,
        label_colors=default_label_colors(max(names, default=1)),
        method="model",
        info={"bundle": str(bundle.folder), "roi_size": roi, "overlap": overlap,
              "sw_batch_size": sw_batch_size, "mode": mode, "spacing": bundle.spacing,
              "orientation": bundle.orientation, "masked": region is not None,
              "inputs": list(images), "output": output,
              **({"threshold": bundle.threshold} if independent else {})},
    )


def _labels_of_classes(probabilities: np.ndarray, grid: sitk.Image, reference: sitk.Image,
                       region: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Labels (the most probable class) and class probabilities on ``reference``'s grid, from
    softmax ``[class, z, y, x]`` probabilities on the network's ``grid``."""
    from MultiModalAnalysisLib.segmentation.inference import (
        background_outside,
        probabilities_on_reference,
    )

    on_reference = background_outside(
        probabilities_on_reference(probabilities, grid, reference), region)
    return on_reference.argmax(axis=0).astype(np.uint8), on_reference


def _labels_of_independent_channels(
    probabilities: np.ndarray, grid: sitk.Image, reference: sitk.Image,
    region: np.ndarray | None, bundle: MonaiBundle,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels 1..C and the probabilities to keep, on ``reference``'s grid, from C sigmoid
    channels ``[channel, z, y, x]`` on the network's ``grid``, each thresholded at the
    bundle's threshold (see :func:`flatten_overlapping` for where they overlap).

    The probabilities kept are each channel's own (not summing to 1); a single channel is
    kept as ``[1 - p, p]``, background and foreground, like a softmax's.
    """
    from MultiModalAnalysisLib.preprocess import resample_to_reference

    on_reference = np.stack([sitk.GetArrayFromImage(resample_to_reference(
        image_from_array(channel.astype(np.float32), grid), reference, default_value=0.0,
        name="probabilities")) for channel in probabilities])
    if region is not None:
        on_reference[:, ~region] = 0.0
    labels, smallest_first = flatten_overlapping(on_reference >= bundle.threshold)
    if smallest_first and str(bundle.folder) not in _FLATTENING_WARNED:
        _FLATTENING_WARNED.add(str(bundle.folder))
        log.warning(
            "bundle '%s' gives one sigmoid per output channel and its labels overlap: a "
            "voxel in several took the label of the channel with the smallest region in the "
            "image (here, smallest first: %s). The probabilities file holds each channel's "
            "own probability.", bundle.name,
            ", ".join(bundle.label_names.get(c + 1, f"label {c + 1}") for c in smallest_first))
    if len(on_reference) == 1:
        on_reference = np.concatenate([1.0 - on_reference, on_reference])
    return labels, on_reference


def flatten_overlapping(masks: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """One label map (uint8, labels 1..C) from C boolean masks ``[channel, z, y, x]`` that
    may overlap: a voxel in several masks gets the label of the channel whose mask is the
    smallest over the whole image.

    So nested regions, such as enhancing tumour inside tumour core inside whole tumour, come
    out as the innermost region and the rings around it.

    Returns:
        ``(labels, channels from the smallest mask up)``, the list empty when no masks
        overlap.
    """
    volumes = masks.reshape(len(masks), -1).sum(axis=1)
    by_size = sorted(range(len(masks)), key=lambda c: volumes[c])
    labels = np.zeros(masks.shape[1:], np.uint8)
    for channel in reversed(by_size):  # the largest first, smaller ones painted over it
        labels[masks[channel]] = channel + 1
    overlapping = bool((masks.sum(axis=0) > 1).any())
    return labels, by_size if overlapping else []
