"""A deep classifier: a small MONAI DenseNet or ResNet on multichannel ROI crops.

:class:`CropClassifier` is a scikit-learn estimator over crop arrays [case, channel, z, y,
x], so the same repeated stratified CV (:func:`evaluate_cv`) validates it.
:func:`train_deep_classifier` goes from a manifest of image paths + a mask column to a
saved model folder: ``network.pt`` (a plain state dict, loaded with
``torch.load(weights_only=True)``, so no pickle is involved) and ``classifier.json`` with
the modalities and their order, the crop geometry, the channel normalisation, the network
settings, the training cohort, the CV figures and the library versions.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from MultiModalAnalysisLib.case import Case, Manifest, read_manifest
from MultiModalAnalysisLib.classification.crops import CropSettings, roi_crop
from MultiModalAnalysisLib.classification.evaluation import CVResult, evaluate_cv
from MultiModalAnalysisLib.classification.labels import encode_labels
from MultiModalAnalysisLib.classification.model import model_card, prediction_frame
from MultiModalAnalysisLib.classification.modelfile import (
    FORMAT,
    FORMAT_VERSION,
    library_versions,
    now_iso,
    save_model_folder,
    verify_weights,
    warn_on_version_change,
)
from MultiModalAnalysisLib.classification.settings import ClassifierSettings
from MultiModalAnalysisLib.device import resolve_device, run_with_device_fallback
from MultiModalAnalysisLib.errors import ConfigError, FeatureSetError
from MultiModalAnalysisLib.modalities import canonical_modality
from MultiModalAnalysisLib.progress import Progress, ProgressCallback, as_progress, check_cancel

log = logging.getLogger(__name__)

WEIGHTS_FILE = "network.pt"
ARCHITECTURES = ("densenet", "resnet")


def build_network(architecture: str, in_channels: int, width: int = 8):
    """A small 3-D MONAI network with two outputs (logits of negative, positive).

    Small on purpose: cohorts here are tens of patients, so a DenseNet-121 would only
    memorise them.
    """
    from monai.networks.nets import DenseNet, ResNet

    if architecture == "densenet":
        return DenseNet(spatial_dims=3, in_channels=in_channels, out_channels=2,
                        init_features=width, growth_rate=width, block_config=(2, 2, 2),
                        bn_size=2, dropout_prob=0.1)
    if architecture == "resnet":
        return ResNet(block="basic", layers=[1, 1, 1, 1],
                      block_inplanes=[width, 2 * width, 4 * width, 8 * width],
                      spatial_dims=3, n_input_channels=in_channels, num_classes=2)
    raise ConfigError(f"unknown architecture '{architecture}': use one of "
                      f"{', '.join(ARCHITECTURES)}.")


def _augment(batch, generator):
    """Random flips along each spatial axis (the lesion's class does not depend on them)."""
    import torch

    for axis in (2, 3, 4):
        flip = torch.rand(batch.shape[0], generator=generator) < 0.5
        if flip.any():
            batch[flip] = batch[flip].flip(axis)
    return batch


class CropClassifier(ClassifierMixin, BaseEstimator):
    """A 3-D CNN on ROI crops, as a scikit-learn classifier.

    Args:
        architecture: ``"densenet"`` or ``"resnet"`` (MONAI).
        width: channels of the first layer (the network's size).
        epochs, batch_size, learning_rate, weight_decay: AdamW training.
        augment: random flips during training.
        class_weight: ``"balanced"`` weighs the loss by inverse class frequency.
        mask_channel: the last channel is the lesion mask (not intensity-normalised).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (see ``device.py``).
        random_state: seed of initialisation, batching and augmentation.

    Attributes:
        network_: the trained torch module (on the CPU).
        channel_mean_, channel_std_: intensity normalisation learnt on the training crops.
        loss_history_: mean training loss per epoch.
    """

    def __init__(
        self,
        architecture: str = "densenet",
        width: int = 8,
        epochs: int = 40,
        batch_size: int = 8,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        augment: bool = True,
        class_weight: str | None = "balanced",
        mask_channel: bool = True,
        device: str = "auto",
        random_state: int = 0,
    ) -> None:
        self.architecture = architecture
        self.width = width
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.augment = augment
        self.class_weight = class_weight
        self.mask_channel = mask_channel
        self.device = device
        self.random_state = random_state

    def _normalise(self, X: np.ndarray) -> np.ndarray:
        shape = (1, -1, 1, 1, 1)
        return ((X - self.channel_mean_.reshape(shape)) / self.channel_std_.reshape(shape)
                ).astype(np.float32)

    def _learn_normalisation(self, X: np.ndarray) -> None:
        mean = X.mean(axis=(0, 2, 3, 4))
        std = X.std(axis=(0, 2, 3, 4))
        std = np.where(std > 0, std, 1.0)
        if self.mask_channel:
            mean[-1], std[-1] = 0.0, 1.0
        self.channel_mean_, self.channel_std_ = mean.astype(np.float64), std.astype(np.float64)

    def fit(
        self,
        X: np.ndarray,
        y: Sequence[int],
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ):
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 5:
            raise ValueError(f"crops must be [case, channel, z, y, x], got shape {X.shape}.")
        y = np.asarray(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) != 2:
            raise ValueError(f"two classes needed, got {self.classes_.tolist()}.")
        self._learn_normalisation(X)
        self.n_channels_ = X.shape[1]
        data = self._normalise(X)
        report = as_progress(progress)
        self.network_, self.loss_history_ = run_with_device_fallback(
            lambda device: self._train(data, encoded, device, report, cancel),
            self.device, "training the deep classifier",
        )
        return self

    def _train(self, data, labels, device, report: Progress, cancel):
        import torch

        torch.manual_seed(self.random_state)
        generator = torch.Generator().manual_seed(self.random_state)
        network = build_network(self.architecture, data.shape[1], self.width).to(device)
        counts = np.bincount(labels, minlength=2).astype(float)
        weights = (counts.sum() / (2 * counts)) if self.class_weight == "balanced" else \
            np.ones(2)
        loss_fn = torch.nn.CrossEntropyLoss(
            weight=torch.as_tensor(weights, dtype=torch.float32, device=device))
        optimiser = torch.optim.AdamW(network.parameters(), lr=self.learning_rate,
                                      weight_decay=self.weight_decay)
        inputs = torch.from_numpy(data)
        targets = torch.from_numpy(labels.astype(np.int64))
        history = []
        for epoch in range(self.epochs):
            network.train()
            order = torch.randperm(len(inputs), generator=generator)
            losses = []
            for start in range(0, len(order), self.batch_size):
                check_cancel(cancel, "training the deep classifier")
                index = order[start:start + self.batch_size]
                if len(index) < 2 and len(order) > 1:
                    continue  # batch norm cannot learn from a batch of one
                batch = inputs[index].clone()
                if self.augment:
                    batch = _augment(batch, generator)
                optimiser.zero_grad()
                loss = loss_fn(network(batch.to(device)), targets[index].to(device))
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
            history.append(float(np.mean(losses)) if losses else float("nan"))
            report((epoch + 1) / self.epochs, f"epoch {epoch + 1}/{self.epochs}, "
                   f"loss {history[-1]:.3f}")
        return network.cpu().eval(), history

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "network_")
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 5 or X.shape[1] != self.n_channels_:
            raise FeatureSetError(
                f"crops must be [case, {self.n_channels_} channels, z, y, x]; got {X.shape}.")
        data = self._normalise(X)

        def infer(device):
            import torch

            network = self.network_.to(device)
            try:
                with torch.no_grad():
                    logits = torch.cat([
                        network(torch.from_numpy(data[i:i + 16]).to(device)).cpu()
                        for i in range(0, len(data), 16)
                    ])
            finally:
                self.network_ = network.cpu()
            return torch.softmax(logits, dim=1).numpy().astype(float)

        return run_with_device_fallback(infer, self.device, "deep classifier inference")

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[(self.predict_proba(X)[:, 1] >= 0.5).astype(int)]


def cohort_crops(
    cases: Sequence[Case],
    modalities: Sequence[str],
    mask_name: str,
    crop: CropSettings,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> np.ndarray:
    """Stack the ROI crops of several cases: [case, channel, z, y, x]."""
    report = as_progress(progress)
    crops = []
    for i, case in enumerate(cases):
        check_cancel(cancel, "cutting ROI crops")
        images = {m: case.image(m) for m in modalities}
        crops.append(roi_crop(images, case.mask(mask_name), crop))
        report((i + 1) / len(cases), f"cropped {case.case_id}")
    return np.stack(crops)


def _manifest_cases(manifest: Manifest, modalities: Sequence[str], mask_column: str):
    for case_id in manifest.case_ids:
        yield manifest.load_case(case_id, modalities, [mask_column])


class DeepClassifier:
    """A trained :class:`CropClassifier` with its metadata: modalities (in order), mask
    column, crop geometry and normalisation; checks what it is given against them."""

    kind = "deep"

    def __init__(self, estimator: CropClassifier, metadata: dict[str, Any],
                 cv_result: CVResult | None = None) -> None:
        self.estimator = estimator
        self.metadata = metadata
        self.cv_result = cv_result

    @property
    def modalities(self) -> list[str]:
        return list(self.metadata["inputs"]["modalities"])

    @property
    def mask_column(self) -> str:
        return self.metadata["inputs"]["mask_column"]

    @property
    def crop_settings(self) -> CropSettings:
        return CropSettings(**self.metadata["inputs"]["crop"])

    @property
    def feature_names(self) -> list[str]:
        """The input channels, in order (the counterpart of a radiomics model's features)."""
        return list(self.metadata["inputs"]["channels"])

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["label"]["classes"])

    def predict_images(
        self, images: Mapping[str, sitk.Image], mask: sitk.Image
    ) -> np.ndarray:
        """[P(negative), P(positive)] for one case from its images (by modality) and mask.

        Raises:
            FeatureSetError: a modality the model needs is missing.
        """
        by_name = {canonical_modality(k): v for k, v in images.items()}
        missing = [m for m in self.modalities if m not in by_name]
        if missing:
            raise FeatureSetError(
                f"the deep classifier needs {', '.join(self.modalities)} (in that order); "
                f"missing: {', '.join(missing)}."
            )
        crop = roi_crop({m: by_name[m] for m in self.modalities}, mask, self.crop_settings)
        return self.estimator.predict_proba(crop[None])[0]

    def predict_proba(self, crops: np.ndarray) -> np.ndarray:
        """Probabilities for crops already cut with this model's crop settings."""
        return self.estimator.predict_proba(crops)

    def predict_manifest(
        self, path: str | Path, *, progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None, mask_column: str | None = None,
    ) -> pd.DataFrame:
        """Per-case probabilities for a manifest of image paths with the mask column (the
        one named at training time unless ``mask_column`` names another)."""
        manifest = read_manifest(path)
        mask_column = manifest.column(mask_column or self.mask_column)
        cases = list(_manifest_cases(manifest, self.modalities, mask_column))
        crops = cohort_crops(cases, self.modalities, mask_column, self.crop_settings,
                             progress=progress, cancel=cancel)
        probability = self.predict_proba(crops)[:, 1]
        return prediction_frame(manifest.case_ids, probability, 0.5, self.class_names)

    def save(self, folder: str | Path) -> Path:
        """Write ``network.pt``, ``classifier.json``, ``MODEL_CARD.md`` (+ CV outputs)."""
        import torch

        return save_model_folder(
            folder, WEIGHTS_FILE,
            lambda path: torch.save(self.estimator.network_.state_dict(), path),
            self.metadata, {"format": "torch state_dict (weights_only)"}, self.cv_result,
            f"{self.metadata['label']['column']}: deep {self.estimator.architecture}",
            model_card)


def _network_params(estimator: CropClassifier) -> dict[str, Any]:
    return {k: v for k, v in estimator.get_params().items() if k != "device"}


def train_deep_classifier(
    manifest: str | Path | Manifest,
    label_column: str,
    modalities: Sequence[str],
    mask_column: str,
    *,
    crop: CropSettings | None = None,
    network: dict[str, Any] | None = None,
    cv_folds: int = 0,
    cv_repeats: int = 1,
    positive_label: Any = None,
    device: str = "auto",
    output: str | Path | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> DeepClassifier:
    """Train the ROI-crop network from a manifest of image paths and save it.

    Args:
        manifest: CSV (or :class:`Manifest`): ``case_id``, one image-path column per
            modality, the mask column, the label column.
        label_column: the outcome (two values); cases without one are left out.
        modalities: the input channels, in order (co-registered images).
        mask_column: the lesion mask column.
        crop: the ROI crop geometry.
        network: :class:`CropClassifier` parameters (architecture, epochs, ...).
        cv_folds: > 1 runs a repeated stratified CV of the whole training first (its
            figures go into the metadata); 0 skips it.
        cv_repeats: repeats of that CV.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        output: write the model folder here.
        progress, cancel: reporting and cancellation (between batches).
    """
    manifest = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    crop = crop or CropSettings()
    modalities = [canonical_modality(m) for m in modalities]
    if not modalities:
        raise ConfigError("the deep classifier needs at least one modality.")
    labels = manifest.table[manifest.column(label_column)]
    manifest.column(mask_column)
    kept = manifest.table[labels.notna()]
    excluded = dict.fromkeys(manifest.table["case_id"][labels.isna()], f"no {label_column} value")
    y, classes = encode_labels(kept[label_column], positive_label,
                               what=f"label column {label_column}")
    report = as_progress(progress)
    cases = [manifest.load_case(c, modalities, [mask_column]) for c in kept["case_id"]]
    crops = cohort_crops(cases, modalities, mask_column, crop, progress=report.sub(0, 0.1),
                         cancel=cancel)
    estimator = CropClassifier(**{**(network or {}), "mask_channel": crop.include_mask,
                                  "device": device})
    cv_result = None
    if cv_folds > 1:
        settings = ClassifierSettings(  # the folds follow the network's seed
            cv_folds=cv_folds, cv_repeats=cv_repeats,
            random_state=estimator.random_state)
        # (the labels themselves, so that the CV outputs name the classes)
        cv_result = evaluate_cv(crops, kept[label_column].to_numpy(), settings,
                                positive_label=classes[1], estimator=estimator,
                                case_ids=list(kept["case_id"]), progress=report.sub(0.1, 0.6),
                                cancel=cancel, fit_params={"cancel": cancel})
    final = report.sub(0.6 if cv_result else 0.1, 1.0)
    estimator.fit(crops, y, progress=final, cancel=cancel)
    channels = [*modalities, *(["mask"] if crop.include_mask else [])]
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": DeepClassifier.kind,
        "created": now_iso(),
        "label": {"column": label_column, "classes": classes, "positive": classes[1]},
        "inputs": {
            "modalities": modalities,
            "mask_column": mask_column,
            "channels": channels,
            "crop": crop.to_dict(),
            "normalisation": {
                "method": "per-channel z-score with the training crops' mean and sd",
                "mean": estimator.channel_mean_.tolist(),
                "std": estimator.channel_std_.tolist(),
            },
        },
        "network": _network_params(estimator),
        "model": {"threshold": 0.5, "loss_history": [round(v, 5) for v in
                                                      estimator.loss_history_]},
        "training_cohort": {
            "source": str(manifest.path),
            "n_cases": len(y),
            "n_positive": int(y.sum()),
            "n_negative": int(len(y) - y.sum()),
            "case_ids": list(kept["case_id"]),
            "excluded_cases": excluded,
        },
        "cross_validation": cv_result.summary() if cv_result else None,
        "versions": library_versions(),
    }
    model = DeepClassifier(estimator, metadata, cv_result)
    if output is not None:
        model.save(output)
    return model


def load_deep_classifier(folder: Path, metadata: dict[str, Any],
                         device: str = "auto") -> DeepClassifier:
    """Rebuild a saved deep classifier (weights loaded with ``weights_only=True``)."""
    import torch

    weights = verify_weights(folder, metadata)
    warn_on_version_change(metadata, f"deep classifier {folder}")
    params = {**metadata["network"], "device": device}
    estimator = CropClassifier(**params)
    channels = metadata["inputs"]["channels"]
    network = build_network(estimator.architecture, len(channels), estimator.width)
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    estimator.network_ = network.eval()
    estimator.n_channels_ = len(channels)
    estimator.classes_ = np.array([0, 1])
    norm = metadata["inputs"]["normalisation"]
    estimator.channel_mean_ = np.asarray(norm["mean"], dtype=np.float64)
    estimator.channel_std_ = np.asarray(norm["std"], dtype=np.float64)
    estimator.loss_history_ = metadata["model"].get("loss_history", [])
    resolve_device(device)  # a clear error now rather than at the first prediction
    return DeepClassifier(estimator, metadata)
