"""Training a segmentation network on the user's own cases (a cohort manifest).

One input channel per modality, prepared by ``model_inputs`` (presets, common spacing,
fixed intensity windows); patches sampled half on the lesion, half on the background;
flips, small rotations and scalings, intensity jitter; Dice + cross-entropy loss; AdamW
with a cosine learning-rate decay; mixed precision on CUDA; validation Dice every epoch,
best-checkpoint keeping and early stopping; deterministic for a given seed.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from MultiModalAnalysisLib.case import Manifest
from MultiModalAnalysisLib.errors import ConfigError, LabelError, ManifestError, TrainingError
from MultiModalAnalysisLib.modalities import canonical_modality
from MultiModalAnalysisLib.preprocess import preset_for
from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel
from MultiModalAnalysisLib.segmentation.inference import predict_probabilities
from MultiModalAnalysisLib.segmentation.model_file import SegmentationModel, library_versions
from MultiModalAnalysisLib.segmentation.model_inputs import default_normalisation
from MultiModalAnalysisLib.segmentation.network import (
    DEFAULT_NETWORK,
    build_network,
    size_multiple,
)
from MultiModalAnalysisLib.segmentation.result import default_label_colors
from MultiModalAnalysisLib.segmentation.training_data import (
    TrainingCase,
    as_manifest,
    label_values,
    load_training_cases,
    median_spacing,
)

log = logging.getLogger(__name__)

MAX_SKIPPED_STEPS = 50
"""Steps whose loss is not finite are left out (a step on one would turn every weight into
NaN); past this many in one training, it stops with a :class:`TrainingError`."""
MAX_LABELS = 254  # labels 1..K of a UInt8 label map


@dataclass
class TrainingResult:
    """What :func:`train_segmentation` produced.

    Attributes:
        model: the trained model (best validation checkpoint, or the last epoch).
        path: where it was written.
        history: one dict per epoch (``epoch``, ``loss``, ``validation_dice``, ``seconds``).
        best_epoch: the epoch whose weights were kept.
        best_validation_dice: its validation Dice (None without validation cases).
        runtime_s: wall time of the whole training.
    """

    model: SegmentationModel
    path: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_validation_dice: float | None = None
    runtime_s: float = 0.0


def _split_cases(
    manifest: Manifest,
    cases: Sequence[str] | None,
    validation_cases: Sequence[str] | None,
    fraction: float,
    seed: int,
) -> tuple[list[str], list[str]]:
    """(training ids, validation ids); see ``train_segmentation``'s arguments."""
    chosen = [str(c) for c in cases] if cases is not None else manifest.case_ids
    validation = [str(c) for c in validation_cases] if validation_cases is not None else None
    unknown = [c for c in chosen + (validation or []) if c not in manifest.case_ids]
    if unknown or not chosen:
        raise ManifestError(f"case(s) {', '.join(unknown) or '(none)'} not in {manifest.path}.")
    if validation is not None:
        if cases is None:  # every other case trains
            chosen = [c for c in chosen if c not in validation]
        if not chosen:
            raise ManifestError("no case is left for training after taking the validation cases.")
        return chosen, validation
    if len(chosen) == 1:
        if fraction > 0:
            log.warning("one training case: it is also the validation case, so the validation "
                        "Dice measures the fit to it, not how the model does on new cases.")
        return chosen, chosen if fraction > 0 else []  # one case: validate on itself
    if fraction <= 0:
        return chosen, []
    count = min(max(int(round(fraction * len(chosen))), 1), len(chosen) - 1)
    drawn = set(np.random.default_rng(seed).choice(chosen, count, replace=False).tolist())
    return [c for c in chosen if c not in drawn], [c for c in chosen if c in drawn]


def _augmentations(patch_zyx: Sequence[int], patches_per_case: int):
    """The training transforms of a ``{"image", "label"}`` case (arrays, channel first)."""
    from monai.transforms import (
        Compose,
        RandAffined,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    keys = ["image", "label"]
    return Compose([
        SpatialPadd(keys, spatial_size=list(patch_zyx), mode="edge"),
        RandCropByPosNegLabeld(keys, "label", list(patch_zyx), pos=1.0, neg=1.0,
                               num_samples=patches_per_case),
        # Rotations mostly in-plane (about z): slices are thick and patients lie flat.
        RandAffined(keys, prob=0.3, rotate_range=(0.26, 0.05, 0.05), scale_range=0.1,
                    mode=("bilinear", "nearest"), padding_mode="border"),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandGaussianNoised("image", prob=0.15, std=0.03),
    ])


def _plain(tensor):
    """A batch without MONAI's metadata, which the training step does not need."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


def _dice_per_label(predicted: np.ndarray, truth: np.ndarray, labels: int) -> float:
    """Mean Dice over the labels present in the prediction or the truth (a label absent
    from both says nothing, and would score 1); 1.0 when neither has any."""
    scores = []
    for k in range(1, labels + 1):
        p, t = predicted == k, truth == k
        total = p.sum() + t.sum()
        if total:
            scores.append(2.0 * np.logical_and(p, t).sum() / total)
    return float(np.mean(scores)) if scores else 1.0


def validation_dice(network, cases: Sequence[TrainingCase], patch_zyx, device, labels) -> float:
    """Mean Dice over ``cases`` on the model grid (sliding window, no test-time flips)."""
    scores = []
    for case in cases:
        probabilities, _ = predict_probabilities(network, case.image, patch_zyx, device,
                                                 overlap=0.25)
        scores.append(_dice_per_label(probabilities.argmax(axis=0), case.label, labels))
    network.train()
    return float(np.mean(scores))


def train_segmentation(
    manifest: str | Path | Manifest,
    modalities: Sequence[str],
    label_column: str,
    output: str | Path | None,
    *,
    epochs: int = 100,
    iterations_per_epoch: int | None = None,
    spacing: Sequence[float] | None = None,
    patch_size: Sequence[int] = (64, 64, 32),
    batch_size: int = 1,
    patches_per_case: int = 2,
    learning_rate: float = 2e-3,
    weight_decay: float = 1e-5,
    workers: int = 0,
    cases: Sequence[str] | None = None,
    validation_cases: Sequence[str] | None = None,
    validation_fraction: float = 0.2,
    validate_every: int = 1,
    keep_best: bool = True,
    patience: int | None = 20,
    label_names: dict[int, str] | None = None,
    network: dict[str, Any] | None = None,
    postprocess: dict[str, Any] | None = None,
    name: str | None = None,
    seed: int = 0,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> TrainingResult:
    """Train a segmentation network on the cases of a manifest and save it.

    Args:
        manifest: a manifest CSV (``case_id``, one column per modality, a label column) or
            a read :class:`Manifest`.
        modalities: the input channels, in order (e.g. ``["CT", "PET", "MR_T1"]``); the
            first one's extent and orientation set each case's grid.
        label_column: the column of label maps (0 = background, 1..N = labels; a mask with
            one value other than 0 becomes label 1).
        output: where to write the model (``.pt`` file or folder; None: not written). The
            best checkpoint is written each time it improves.
        epochs: at most this many epochs.
        iterations_per_epoch: optimiser steps per epoch (default: one per training case).
        spacing: the common voxel spacing (mm, x y z); default: the median spacing of the
            first modality, coarsened to at least 2 mm in-plane.
        patch_size: training and sliding-window patch, voxels x y z.
        batch_size: cases per optimiser step (each gives ``patches_per_case`` patches, half
            of them centred on a lesion voxel).
        learning_rate, weight_decay: AdamW settings (cosine decay over the epochs).
        workers: processes that augment the next patches while the network trains (0: the
            training process does it between steps). The augmentation runs on the CPU, so
            on a GPU it is what bounds the steps; 1-3 workers keep the GPU busy. The
            training is reproducible for a given seed and number of workers: 0 and 1 give
            the same training, and from 2 on each worker draws its own random numbers, so
            another number gives another draw of the same recipe.
        cases: train on these case ids (default: every case not used for validation).
        validation_cases: validate on these (default: ``validation_fraction`` of the
            training cases, drawn with ``seed``, and not trained on; an empty list: no
            validation, the last epoch is kept). A single case validates on itself.
        validation_fraction: see ``validation_cases``.
        validate_every: validate every this many epochs (and after the last one).
        keep_best: keep the weights of the best validation Dice (else the last epoch's).
        patience: stop after this many epochs without a better validation Dice (None: never).
        label_names: model label -> name. The non-zero values found in the label maps
            become the model's labels 1..K in increasing order (a 0/255 mask gives label 1;
            values 2 and 5 give labels 1 and 2; the metadata keeps the mapping as
            ``label_values_in_training``). Default ``{1: "tumour"}`` for one label, else
            ``"label <value>"``.
        network: a MONAI network spec (see ``network.build_network``); default: a compact
            3-D U-Net.
        postprocess: clean-up stored with the model and applied at inference (default:
            keep the largest component and fill holes when there is one label).
        name: the model's name (default: the output's name).
        seed: makes sampling, augmentation and initialisation reproducible.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        cache_dir: keep prepared cases here, for repeated trainings.
        progress: ``progress(fraction, message)`` callback.
        cancel: stops the training when set (the best checkpoint so far stays written).
    """
    import torch
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    from MultiModalAnalysisLib.device import autocast, autocast_dtype, run_with_device_fallback

    start = time.perf_counter()
    report = as_progress(progress)
    manifest = as_manifest(manifest)
    names = [canonical_modality(m) for m in modalities]
    if not names:
        raise ConfigError("train_segmentation needs at least one modality.")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"the modalities name {', '.join(twice)} more than once "
                          f"({', '.join(map(str, modalities))}): give each input channel once.")
    if epochs < 1 or batch_size < 1 or patches_per_case < 1:
        raise ConfigError("epochs, batch_size and patches_per_case must be at least 1.")
    if iterations_per_epoch is not None and iterations_per_epoch < 1:
        raise ConfigError(f"iterations_per_epoch must be at least 1 (or None: one per "
                          f"training case), not {iterations_per_epoch}.")
    if isinstance(workers, bool) or not isinstance(workers, int | np.integer) or workers < 0:
        raise ConfigError(f"workers must be a whole number, 0 or more, not {workers!r}.")
    if not learning_rate >= 0 or not weight_decay >= 0:
        raise ConfigError(f"the learning rate and the weight decay must be 0 or more (got "
                          f"{learning_rate} and {weight_decay}).")
    if not 0.0 <= validation_fraction < 1.0:
        raise ConfigError(f"validation_fraction is the share of cases held out, from 0 to "
                          f"below 1, not {validation_fraction}.")
    spec = network or DEFAULT_NETWORK
    multiple = size_multiple(spec)
    if len(patch_size) != 3 or any(int(n) < multiple or int(n) % multiple for n in patch_size):
        raise ConfigError(
            f"patch size {' x '.join(str(n) for n in patch_size)}: give three sizes (x y z), "
            f"each a multiple of {multiple} (the network halves the patch "
            f"{multiple.bit_length() - 1} times), e.g. 64 64 32.")
    train_ids, validation_ids = _split_cases(
        manifest, cases, validation_cases, validation_fraction, seed
    )
    case_ids = list(dict.fromkeys(train_ids + validation_ids))

    if spacing is None:
        median = median_spacing(manifest, names[0], train_ids)
        spacing = [max(median[0], 2.0), max(median[1], 2.0), median[2]]
    spacing = [float(s) for s in spacing]
    patch_zyx = [int(s) for s in patch_size][::-1]
    values = label_values(manifest, label_column, case_ids)
    # The label values found become the model's labels 1..K in their order (a mask of 0/255
    # gives label 1; values 2 and 5 give labels 1 and 2): no class that never occurs.
    values_as_labels = {v: k for k, v in enumerate(values, start=1)}
    n_labels = len(values_as_labels)
    if n_labels > MAX_LABELS:
        raise LabelError(
            f"{label_column} holds {n_labels} different label values over the training "
            f"cases ({', '.join(map(str, values[:8]))}, ...): more than the {MAX_LABELS} a "
            "model can learn here. Is it a label map (not an intensity image)?")
    label_names = label_names or ({1: "tumour"} if n_labels == 1 else
                                  {k: f"label {v}" for v, k in values_as_labels.items()})
    if set(label_names) != set(range(1, n_labels + 1)):
        raise ConfigError(
            f"label_names must name the model's labels 1..{n_labels} (the label values "
            f"{', '.join(map(str, values))} in that order), not {sorted(label_names)}.")
    normalisations = {m: default_normalisation(m) for m in names}

    set_determinism(seed=seed)
    report(0.0, "preparing the training cases")
    prepared = load_training_cases(
        manifest, case_ids, names, label_column, spacing, normalisations,
        list(values_as_labels), cache_dir=cache_dir, progress=report.sub(0.0, 0.1), cancel=cancel,
    )
    by_id = {case.case_id: case for case in prepared}
    training = [by_id[c] for c in train_ids]
    validation = [by_id[c] for c in validation_ids]
    empty = [c.case_id for c in validation if not c.label.any()]
    if empty:
        log.warning("validation case(s) %s have no label on the model grid: their Dice is 0 "
                    "whenever the network marks anything, which weighs on the best-epoch "
                    "choice and early stopping; validate on cases with a label.",
                    ", ".join(empty))
    largest = np.max([c.label.shape for c in prepared], axis=0)
    fits = -(-largest // multiple) * multiple  # the largest case, padded to the multiple
    if any(p > 2 * f for p, f in zip(patch_zyx, fits, strict=True)):
        # mostly padding, and the memory may not hold it (512 x 512 x 256 took 22 GB)
        raise ConfigError(
            f"patch size {' x '.join(str(int(n)) for n in patch_size)} is more than twice "
            f"the largest training case ({' x '.join(str(int(n)) for n in largest[::-1])} "
            f"voxels at {' x '.join(f'{s:g}' for s in spacing)} mm): the patches would be "
            f"mostly padding; {' x '.join(str(int(n)) for n in fits[::-1])} already covers "
            "it.")

    def fit(torch_device) -> TrainingResult:
        # everything that holds state is built here, so a CUDA out-of-memory error can
        # restart the training on the CPU from the same seed
        reduced = autocast_dtype(torch_device)  # bfloat16 on a GPU that has it
        spec_copy = copy.deepcopy(spec)  # the metadata must not share the caller's dict
        torch.manual_seed(seed)
        net = build_network(spec_copy, len(names), n_labels + 1).to(torch_device)
        transforms = _augmentations(patch_zyx, patches_per_case)
        transforms.set_random_state(seed=seed)
        dataset = Dataset([{"image": c.image, "label": c.label[None]} for c in training],
                          transforms)
        # persistent: the iterator restarts every pass over the cases, and the workers
        # would start again each time
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                            num_workers=int(workers), persistent_workers=workers > 0,
                            generator=torch.Generator().manual_seed(seed))
        steps = iterations_per_epoch or max(len(training) // batch_size, 1)
        optimiser = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs * steps,
                                                               eta_min=learning_rate * 0.01)
        # float16 needs its gradients scaled (they underflow); bfloat16 and float32 do not
        scaler = torch.amp.GradScaler("cuda", enabled=reduced == torch.float16)
        loss_function = DiceCELoss(to_onehot_y=True, softmax=True)

        metadata: dict[str, Any] = {
            "name": name or (Path(output).stem if output else "segmentation model"),
            "task": f"segmentation of {', '.join(label_names.values())}",
            "modalities": names,
            "spacing": spacing,
            "normalisation": normalisations,
            "presets": {m: preset_for(m).describe() for m in names},
            "label_names": {str(k): v for k, v in label_names.items()},
            "label_colors": {str(k): list(v) for k, v in default_label_colors(n_labels).items()},
            "label_values_in_training": {str(k): v for k, v in values_as_labels.items()},
            "patch_size": [int(s) for s in patch_size],
            "network": spec_copy,
            "postprocess": postprocess if postprocess is not None else (
                {"keep_largest": True, "fill_holes": True} if n_labels == 1 else {}),
            "versions": library_versions(),
        }
        model = SegmentationModel(net, metadata)
        history: list[dict[str, Any]] = []
        best = {"dice": -1.0, "epoch": 0, "state": None}
        stale = 0
        skipped = 0  # steps left out because their loss was not finite

        def save_model(epoch: int) -> None:
            metadata["training"] = {
                "manifest": str(manifest.path),
                "label_column": label_column,
                "cases": train_ids,
                "validation_cases": validation_ids,
                "validation_dice": best["dice"] if best["dice"] >= 0 else None,
                "epoch_kept": epoch,
                "epochs_run": len(history),
                "iterations_per_epoch": steps,
                "batch_size": batch_size,
                "patches_per_case": patches_per_case,
                "learning_rate": learning_rate,
                "workers": int(workers),
                "seed": seed,
                "device": str(torch_device),
                "precision": str(reduced or torch.float32).replace("torch.", ""),
                "skipped_steps": skipped,
                "runtime_s": round(time.perf_counter() - start, 1),
                "history": history,
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            if output is not None:
                model.save(output)

        net.train()
        iterator = iter(loader)
        for epoch in range(1, epochs + 1):
            epoch_start = time.perf_counter()
            losses = []
            for _ in range(steps):
                check_cancel(cancel, "segmentation training")
                try:
                    batch = next(iterator)
                except StopIteration:
                    iterator = iter(loader)
                    batch = next(iterator)
                inputs = _plain(batch["image"]).to(torch_device).float()
                targets = _plain(batch["label"]).to(torch_device).long()
                optimiser.zero_grad(set_to_none=True)
                with autocast(torch_device, reduced):
                    loss = loss_function(net(inputs), targets)
                value = float(loss.detach())
                if not math.isfinite(value):
                    # A step on a non-finite loss would turn every weight into NaN.
                    skipped += 1
                    if skipped > MAX_SKIPPED_STEPS:
                        raise TrainingError(
                            f"the training diverged: the loss was not finite in "
                            f"{skipped} steps (the last at epoch {epoch}). Lower the "
                            "learning rate, or train on the CPU (full float32).")
                    scheduler.step()
                    continue
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
                scheduler.step()
                losses.append(value)
            record: dict[str, Any] = {
                "epoch": epoch,
                "loss": round(float(np.mean(losses)), 5) if losses else float("nan")}
            last = epoch == epochs
            if validation and (epoch % validate_every == 0 or last):
                check_cancel(cancel, "segmentation training")
                dice = validation_dice(net, validation, patch_zyx, torch_device, n_labels)
                record["validation_dice"] = round(dice, 5)
                if dice > best["dice"]:
                    best.update(dice=dice, epoch=epoch, state=copy.deepcopy(net.state_dict()))
                    stale = 0
                    if keep_best:
                        save_model(epoch)
                else:
                    stale += validate_every
            record["seconds"] = round(time.perf_counter() - epoch_start, 2)
            history.append(record)
            message = f"epoch {epoch}/{epochs}: loss {record['loss']:.4f}"
            if "validation_dice" in record:
                message += (f", validation Dice {record['validation_dice']:.3f} "
                            f"(best {best['dice']:.3f})")
            log.info(message)
            report(0.1 + 0.9 * epoch / epochs, message)
            if patience is not None and validation and stale >= patience:
                log.info("no better validation Dice for %d epochs: stopping early", stale)
                break

        kept_epoch = len(history)
        if keep_best and best["state"] is not None:
            net.load_state_dict(best["state"])
            kept_epoch = best["epoch"]
        net.eval()
        save_model(kept_epoch)
        report(1.0, "training done")
        return TrainingResult(
            model=model,
            path=model.path,
            history=history,
            best_epoch=kept_epoch,
            best_validation_dice=best["dice"] if best["dice"] >= 0 else None,
            runtime_s=time.perf_counter() - start,
        )

    return run_with_device_fallback(fit, device, what="segmentation training")
