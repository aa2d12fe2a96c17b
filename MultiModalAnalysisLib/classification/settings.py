"""The settings of a radiomics classifier and of its cross-validation, as one dataclass that
round-trips through JSON (it is stored in every model file)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from MultiModalAnalysisLib.errors import ConfigError
from MultiModalAnalysisLib.settings_file import read_settings_file
from MultiModalAnalysisLib.values import finite, whole

CLASSIFIERS = (
    "logistic_l2", "logistic_l1", "svm", "random_forest", "gradient_boosting", "auto",
)
SELECTIONS = ("none", "univariate", "l1", "mrmr", "correlation")
IMPUTATIONS = ("median", "mean", "most_frequent")
SCALINGS = ("standard", "robust", "none")
CALIBRATIONS = ("sigmoid", "isotonic", "none")
RESAMPLINGS = ("none", "oversample")


@dataclass
class ClassifierSettings:
    """How a classifier is built, tuned and validated.

    Attributes:
        classifier: one of ``CLASSIFIERS``; ``"auto"`` lets the inner CV choose among
            the others (each with its default grid).
        selection: feature selection inside the pipeline: ``univariate`` (ANOVA F, k best),
            ``l1`` (k largest L1-logistic coefficients), ``mrmr`` (minimum redundancy,
            maximum relevance), ``correlation`` (redundancy filter only) or ``none``.
        n_features: candidate numbers of selected features, tuned in the inner loop
            (``univariate``, ``l1`` and ``mrmr`` only; the others keep every feature).
        correlation_threshold: before selection, drop one of every pair of features whose
            absolute Spearman correlation exceeds this (``None``: no filter; always applied
            when ``selection="correlation"``).
        imputation: how missing feature values are filled (fitted on the training cases).
        scaling: feature scaling.
        class_weight: ``"balanced"`` weighs each class by the inverse of its frequency;
            ``None`` leaves the classes as they are.
        resampling: ``"oversample"`` duplicates random minority-class cases up to balance,
            at fit time only (so only inside the training folds).
        calibration: probability calibration of the tuned model (Platt ``sigmoid``,
            ``isotonic`` or ``none``), by an inner cross-validation.
        param_grid: hyper-parameter candidates (``classify__C``, ...); ``None`` uses the
            classifier's default grid (see ``estimators.default_param_grid``).
        inner_folds: folds of the inner (tuning) cross-validation.
        calibration_folds: folds of the calibration cross-validation.
        calibration_min_cases: calibrate only when the training set holds at least this
            many cases of the rarer class (fewer: probabilities left uncalibrated, noted).
        scoring: scikit-learn scorer name used to pick hyper-parameters.
        threshold: decision threshold on the positive-class probability: a number, or
            ``"auto"`` (the training prevalence when calibrated, else 0.5).
        cv_folds: folds of the outer (evaluation) cross-validation.
        cv_repeats: repeats of the outer cross-validation with different shuffles.
        n_bootstrap: bootstrap replicates for the AUC confidence interval.
        random_state: seed of every shuffle and randomised model.
        n_jobs: parallel jobs for the random forest.
    """

    classifier: str = "logistic_l2"
    selection: str = "mrmr"
    n_features: list[int] = field(default_factory=lambda: [3, 5, 10])
    correlation_threshold: float | None = None
    imputation: str = "median"
    scaling: str = "standard"
    class_weight: str | None = "balanced"
    resampling: str = "none"
    calibration: str = "sigmoid"
    param_grid: dict[str, list[Any]] | None = None
    inner_folds: int = 3
    calibration_folds: int = 3
    calibration_min_cases: int = 10
    scoring: str = "roc_auc"
    threshold: float | str = "auto"
    cv_folds: int = 5
    cv_repeats: int = 10
    n_bootstrap: int = 2000
    random_state: int = 0
    n_jobs: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.n_features, int | float | str):
            self.n_features = [self.n_features]
        self.n_features = [whole("n_features", n, 1) for n in self.n_features or ()]
        # whole numbers (a settings file's "five" or 2.5 is refused here, not deep in sklearn)
        for name, least in (("inner_folds", 2), ("calibration_folds", 2), ("cv_folds", 2),
                            ("cv_repeats", 1), ("n_bootstrap", 100),
                            ("calibration_min_cases", 0), ("random_state", 0),
                            ("n_jobs", -1)):
            setattr(self, name, whole(name, getattr(self, name), least))
        if self.correlation_threshold is not None:
            self.correlation_threshold = finite("correlation_threshold",
                                                self.correlation_threshold)
        if not isinstance(self.threshold, str):
            self.threshold = finite("threshold", self.threshold)
        for name, allowed in (
            ("classifier", CLASSIFIERS),
            ("selection", SELECTIONS),
            ("imputation", IMPUTATIONS),
            ("scaling", SCALINGS),
            ("calibration", CALIBRATIONS),
            ("resampling", RESAMPLINGS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"unknown {name} '{value}': use one of {', '.join(allowed)}."
                )
        from sklearn.metrics import get_scorer_names

        if self.scoring not in get_scorer_names():
            raise ConfigError(
                f"unknown scoring '{self.scoring}': use a scikit-learn scorer name, e.g. "
                "roc_auc, balanced_accuracy, f1, average_precision, neg_log_loss.")
        if self.param_grid is not None and (not isinstance(self.param_grid, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and v
                for k, v in self.param_grid.items())):
            raise ConfigError(
                "param_grid must map parameter names to non-empty lists of candidates, "
                'e.g. {"classify__C": [0.1, 1, 10]}, not ' f"{self.param_grid!r}.")
        if self.classifier == "auto" and self.param_grid:
            raise ConfigError(
                "param_grid cannot be combined with classifier='auto' (each candidate "
                "classifier is tuned on its default grid); name one classifier instead."
            )
        if self.class_weight not in ("balanced", None):
            raise ConfigError(
                f"class_weight must be 'balanced' or None, got {self.class_weight!r}."
            )
        if not self.n_features:  # (each one is a whole number >= 1 already)
            raise ConfigError(f"n_features must be positive integers, got {self.n_features}.")
        if self.correlation_threshold is not None and not 0 < self.correlation_threshold <= 1:
            raise ConfigError(
                f"correlation_threshold must be in (0, 1], got {self.correlation_threshold}."
            )
        if isinstance(self.threshold, str) and self.threshold != "auto":
            raise ConfigError(f"threshold must be a number or 'auto', got '{self.threshold}'.")
        if not isinstance(self.threshold, str) and not 0 < float(self.threshold) < 1:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClassifierSettings:
        """Settings from a dictionary; unknown keys are an error naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown classifier setting(s) {', '.join(unknown)}; known: "
                f"{', '.join(sorted(known))}."
            )
        settings = cls(**values)
        from MultiModalAnalysisLib.classification.estimators import uses_n_features

        # (a saved model's settings carry the default n_features whatever the selection)
        if (not uses_n_features(settings.selection)
                and settings.n_features != cls().n_features):
            raise ConfigError(
                f"selection {settings.selection} does not use n_features: it keeps every "
                "feature it does not filter out. Leave n_features out, or choose a selection "
                "that picks that many (mrmr, univariate, l1).")
        return settings


def load_settings(source: ClassifierSettings | dict | str | Path | None) -> ClassifierSettings:
    """Settings from an object, a dictionary, a JSON/YAML file, or the defaults (``None``)."""
    if source is None:
        return ClassifierSettings()
    if isinstance(source, ClassifierSettings):
        return source
    if isinstance(source, dict):
        return ClassifierSettings.from_dict(source)
    return ClassifierSettings.from_dict(read_settings_file(source, "classifier settings"))
