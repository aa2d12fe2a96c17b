"""Multichannel tissue classification without training data: Gaussian mixture and k-means
over the voxels of any number of co-registered images, inside an optional mask, with
spatial regularisation. They behave like scikit-learn estimators (``fit`` / ``predict`` /
``predict_proba``, hyper-parameters in ``__init__``, learned state in attributes ending in
``_``) but take and return images.

Class numbers are stable: class 1 has the lowest mean of the ``order_by`` channel and class
K the highest, so "class 3 of PET" means the same thing on every case.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Literal

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError, ConstantImageError, MissingModalityError
from MultiModalAnalysisLib.images import image_from_array
from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel
from MultiModalAnalysisLib.segmentation.inputs import ImageStack, stack_images, stack_region
from MultiModalAnalysisLib.segmentation.regularise import icm, smooth_probabilities
from MultiModalAnalysisLib.segmentation.result import (
    SegmentationResult,
    default_label_colors,
    probability_image,
)
from MultiModalAnalysisLib.values import finite, whole

log = logging.getLogger(__name__)

Regularisation = Literal["icm", "smoothing", "none"]
# Voxels classified at a time: bounds the memory of the posteriors' intermediates and
# lets a cancel request through between blocks.
VOXELS_PER_BLOCK = 1 << 20
REGULARISATIONS = ("icm", "smoothing", "none")


class VoxelClassifier:
    """Base of the classical segmenters: voxel features, class ordering, regularisation.

    Args:
        n_classes: number of classes inside the region (labels 1..n_classes; 0 = outside).
        order_by: the channel whose class means set the class order (default: the first).
        regularisation: ``"icm"`` (Potts MRF), ``"smoothing"`` (Gaussian smoothing of the
            posteriors) or ``"none"``.
        beta: ICM smoothness weight (per neighbour; larger = smoother).
        iterations: ICM sweeps at most.
        smoothing_mm: Gaussian sigma (mm) of posterior smoothing.
        max_samples: fit on at most this many voxels (drawn at random), for speed.
        random_state: seed of the sampling and of the model's initialisation.
    """

    def __init__(
        self,
        n_classes: int = 3,
        *,
        order_by: str | None = None,
        regularisation: Regularisation = "icm",
        beta: float = 1.0,
        iterations: int = 5,
        smoothing_mm: float = 2.0,
        max_samples: int = 200_000,
        random_state: int = 0,
    ) -> None:
        self.n_classes = n_classes
        self.order_by = order_by
        self.regularisation = regularisation
        self.beta = beta
        self.iterations = iterations
        self.smoothing_mm = smoothing_mm
        self.max_samples = max_samples
        self.random_state = random_state

    # -- what subclasses provide -------------------------------------------------------
    def _fit_model(self, features: np.ndarray) -> None:
        raise NotImplementedError

    def _log_posteriors(self, features: np.ndarray) -> np.ndarray:
        """``[n_voxels, n_classes]`` log posteriors in the model's own component order."""
        raise NotImplementedError

    def _component_means(self) -> np.ndarray:
        """``[n_classes, n_channels]`` component means in standardised units."""
        raise NotImplementedError

    # -- the estimator API -------------------------------------------------------------
    def fit(
        self,
        images: Mapping[str, sitk.Image],
        mask: sitk.Image | None = None,
        *,
        cancel: threading.Event | None = None,
    ):
        """Learn the classes from the voxels inside ``mask`` (the whole grid without one).

        ``cancel`` is checked before and after the model's fit (``OperationCancelled``).

        Sets ``channels_``, ``center_``, ``scale_`` (per-channel standardisation),
        ``order_`` (model component of each class), ``means_`` (class means per channel, in
        the images' units, class 1 first) and ``n_samples_fit_``.
        """
        self._check_parameters()
        stack = stack_images(images)
        # (an order_by missing from the images: said before the fit, not after it)
        order_channel = stack.index(self.order_by) if self.order_by else 0
        region = stack_region(stack, mask, warn=False)  # (segment() warns)
        values = stack.channels[:, region].T.astype(np.float64)  # [voxels, channels]
        if values.shape[0] < self.n_classes:
            raise ConfigError(
                f"the region has {values.shape[0]} voxels, fewer than the {self.n_classes} "
                "classes asked for: use a larger mask or fewer classes."
            )
        self.channels_ = list(stack.names)
        self.center_ = values.mean(axis=0)
        scale = values.std(axis=0)
        if np.all(scale == 0):
            raise ConstantImageError(
                f"every input ({', '.join(stack.names)}) is constant inside the region: there "
                "is nothing to classify. Check the images and the mask."
            )
        self.scale_ = np.where(scale > 0, scale, 1.0)
        features = (values - self.center_) / self.scale_
        rng = np.random.default_rng(self.random_state)
        if features.shape[0] > self.max_samples:
            features = features[rng.choice(features.shape[0], self.max_samples, replace=False)]
        self.n_samples_fit_ = int(features.shape[0])
        distinct = len(np.unique(features, axis=0))
        if distinct < self.n_classes:
            raise ConfigError(
                f"the region holds only {distinct} distinct value(s) of "
                f"{', '.join(stack.names)}, fewer than the {self.n_classes} classes asked "
                "for: ask for fewer classes (or check the images and the mask)."
            )
        check_cancel(cancel, f"{self.method_name} segmentation")
        self._fit_model(features)
        check_cancel(cancel, f"{self.method_name} segmentation")
        means = self._component_means() * self.scale_ + self.center_
        self.order_ = np.argsort(means[:, order_channel], kind="stable")
        self.means_ = means[self.order_]
        return self

    def predict_proba(
        self, images: Mapping[str, sitk.Image], mask: sitk.Image | None = None
    ) -> sitk.Image:
        """Per-label probabilities: a vector image, component k for label k (component 0 is
        "outside the region")."""
        return self.segment(images, mask).probabilities

    def predict(
        self, images: Mapping[str, sitk.Image], mask: sitk.Image | None = None
    ) -> sitk.Image:
        """The regularised label map (UInt8: 0 outside the region, classes 1..n_classes)."""
        return self.segment(images, mask).labels

    def fit_predict(
        self, images: Mapping[str, sitk.Image], mask: sitk.Image | None = None
    ) -> sitk.Image:
        """``fit`` then ``predict`` on the same images."""
        return self.fit(images, mask).predict(images, mask)

    def segment(
        self,
        images: Mapping[str, sitk.Image],
        mask: sitk.Image | None = None,
        *,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> SegmentationResult:
        """Labels and probabilities of ``images`` in one pass (the model must be fitted).

        ``progress(fraction, message)`` is told as the voxels are classified; ``cancel`` is
        checked between blocks of voxels and between regularisation sweeps.
        """
        if not hasattr(self, "order_"):
            raise ConfigError(f"this {type(self).__name__} is not fitted yet: call fit() first.")
        report = as_progress(progress)
        stack = self._stack_matching_channels(images)
        region = stack_region(stack, mask)
        values = stack.channels[:, region].T  # [voxels, channels], float32
        log_posteriors = np.empty((values.shape[0], self.n_classes), dtype=np.float32)
        for start in range(0, values.shape[0], VOXELS_PER_BLOCK):
            check_cancel(cancel, f"{self.method_name} segmentation")
            block = values[start:start + VOXELS_PER_BLOCK].astype(np.float64)
            log_posteriors[start:start + VOXELS_PER_BLOCK] = self._log_posteriors(
                (block - self.center_) / self.scale_)
            report(0.7 * min(start + VOXELS_PER_BLOCK, len(values)) / max(len(values), 1),
                   "classifying voxels")
        log_posteriors = log_posteriors[:, self.order_]  # class order: 1..K
        check_cancel(cancel, f"{self.method_name} segmentation")
        report(0.7, f"regularising ({self.regularisation})")
        classes, probabilities = self._regularise(log_posteriors, region, stack, cancel)
        report(1.0, "labelled")
        labels = np.where(region, classes + 1, 0).astype(np.uint8)
        found = np.bincount(labels[region], minlength=self.n_classes + 1)[1:]
        if not found.all():
            log.warning(
                "%s: class(es) %s of the %d asked for label no voxel: the images support "
                "fewer classes here, so the class numbers may not mean the same as on other "
                "cases; consider fewer classes.", self.method_name,
                ", ".join(str(k + 1) for k in np.flatnonzero(found == 0)), self.n_classes)
        outside = (~region).astype(np.float32)[None]
        per_label = np.concatenate([outside, probabilities], axis=0)  # component k = label k
        # uncertainty: 1 - the largest class probability (0 where one class is certain, up to
        # 1 - 1/K where all are equally likely; 0 outside the region)
        uncertainty = np.where(region, 1.0 - probabilities.max(axis=0), 0.0).astype(np.float32)
        return SegmentationResult(
            labels=image_from_array(labels, stack.reference),
            probabilities=probability_image(per_label, stack.reference),
            uncertainty=image_from_array(uncertainty, stack.reference),
            label_names={k: f"class {k}" for k in range(1, self.n_classes + 1)},
            label_colors=default_label_colors(self.n_classes),
            method=self.method_name,
            info={
                "channels": list(self.channels_),
                "order_by": self.order_by or self.channels_[0],
                "class_means": {
                    k + 1: dict(zip(self.channels_, map(float, row), strict=True))
                    for k, row in enumerate(self.means_)
                },
                "regularisation": self.regularisation,
            },
        )

    method_name = "classifier"

    # -- helpers ----------------------------------------------------------------------
    def _check_parameters(self) -> None:
        if not isinstance(self.n_classes, int | np.integer) or not 1 <= self.n_classes <= 254:
            raise ConfigError(f"n_classes must be an integer from 1 to 254, not {self.n_classes}.")
        if self.regularisation not in REGULARISATIONS:
            raise ConfigError(
                f"unknown regularisation '{self.regularisation}': use one of "
                f"{', '.join(REGULARISATIONS)}."
            )
        self.beta = finite("beta", self.beta, 0.0)
        self.smoothing_mm = finite("smoothing_mm", self.smoothing_mm, 0.0)
        self.iterations = whole("iterations", self.iterations, 0)
        self.max_samples = whole("max_samples", self.max_samples, max(self.n_classes, 1))
        self.random_state = whole("random_state", self.random_state, 0, 2**32 - 1)
        if hasattr(self, "n_init"):
            self.n_init = whole("n_init", self.n_init, 1)

    def _stack_matching_channels(self, images: Mapping[str, sitk.Image]) -> ImageStack:
        stack = stack_images(images)
        if stack.names != self.channels_:
            raise MissingModalityError(
                f"this {type(self).__name__} was fitted on {', '.join(self.channels_)} but was "
                f"given {', '.join(stack.names)}: give the same images, in the same order."
            )
        return stack

    def _regularise(
        self,
        log_posteriors: np.ndarray,
        region: np.ndarray,
        stack: ImageStack,
        cancel: threading.Event | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class index (0-based, -1 outside) and probabilities ``[class, z, y, x]``."""
        volume = np.full((self.n_classes, *region.shape), -np.inf, dtype=np.float32)
        volume[:, region] = log_posteriors.T
        volume[:, ~region] = 0.0
        spacing_zyx = stack.reference.GetSpacing()[::-1]
        if self.regularisation == "icm":
            return icm(volume, region, spacing_zyx, self.beta, self.iterations, cancel)
        probabilities = np.exp(volume - volume.max(axis=0, keepdims=True))
        probabilities /= probabilities.sum(axis=0, keepdims=True)
        probabilities *= region[None]
        if self.regularisation == "smoothing":
            probabilities = smooth_probabilities(
                probabilities, region, spacing_zyx, self.smoothing_mm
            )
        classes = np.where(region, probabilities.argmax(axis=0), -1)
        return classes, probabilities.astype(np.float32)


class GaussianMixtureSegmenter(VoxelClassifier):
    """Multichannel Gaussian-mixture classification (full covariances, EM by scikit-learn).

    EM is run from ``n_init`` k-means initialisations and the most likely fit is kept: a
    single start often lands in a worse local optimum (splitting a large class in two and
    merging two small ones) when the classes differ much in size.

    Extra args:
        n_init: EM restarts.
    """

    method_name = "gmm"

    def __init__(self, n_classes: int = 3, *, n_init: int = 4, **options) -> None:
        super().__init__(n_classes, **options)
        self.n_init = n_init

    def _fit_model(self, features: np.ndarray) -> None:
        from sklearn.mixture import GaussianMixture

        # A small covariance floor keeps a near-constant class (air, background padding)
        # from collapsing to a singularity.
        self.model_ = GaussianMixture(
            self.n_classes,
            covariance_type="full",
            n_init=self.n_init,
            reg_covar=1e-3,
            random_state=self.random_state,
        ).fit(features)

    def _log_posteriors(self, features: np.ndarray) -> np.ndarray:
        # log w_k + log N(x | mu_k, Sigma_k) from the fitted model's public attributes
        # (full covariances: precisions_cholesky_[k] is the Cholesky factor of Sigma_k^-1),
        # not sklearn's private _estimate_weighted_log_prob.
        model = self.model_
        weighted = np.empty((features.shape[0], self.n_classes), dtype=np.float64)
        for k in range(self.n_classes):
            factor = model.precisions_cholesky_[k]
            projected = (features - model.means_[k]) @ factor
            weighted[:, k] = (
                np.log(model.weights_[k])
                + np.log(np.diag(factor)).sum()
                - 0.5 * (features.shape[1] * np.log(2.0 * np.pi) + (projected**2).sum(axis=1))
            )
        return weighted - _logsumexp(weighted)

    def _component_means(self) -> np.ndarray:
        return self.model_.means_


class KMeansSegmenter(VoxelClassifier):
    """Multichannel k-means classification (scikit-learn), with soft assignments.

    The probabilities are ``softmax(-d_k^2 / (2 s^2))`` with ``d_k`` the distance to centre
    k in standardised units and ``s^2`` the pooled within-cluster variance per channel: the
    posterior of an isotropic Gaussian mixture with k-means' centres.

    Extra args:
        n_init: k-means restarts.
    """

    method_name = "kmeans"

    def __init__(self, n_classes: int = 3, *, n_init: int = 4, **options) -> None:
        super().__init__(n_classes, **options)
        self.n_init = n_init

    def _fit_model(self, features: np.ndarray) -> None:
        from sklearn.cluster import KMeans

        self.model_ = KMeans(
            self.n_classes, n_init=self.n_init, random_state=self.random_state
        ).fit(features)
        pooled = self.model_.inertia_ / max(features.shape[0] * features.shape[1], 1)
        self.variance_ = max(float(pooled), 1e-6)

    def _log_posteriors(self, features: np.ndarray) -> np.ndarray:
        centres = self.model_.cluster_centers_
        squared = (
            (features**2).sum(axis=1, keepdims=True)
            - 2.0 * features @ centres.T
            + (centres**2).sum(axis=1)[None]
        )
        scores = -np.maximum(squared, 0.0) / (2.0 * self.variance_)
        return scores - _logsumexp(scores)

    def _component_means(self) -> np.ndarray:
        return self.model_.cluster_centers_


def _logsumexp(values: np.ndarray) -> np.ndarray:
    from scipy.special import logsumexp

    return logsumexp(values, axis=1, keepdims=True)
