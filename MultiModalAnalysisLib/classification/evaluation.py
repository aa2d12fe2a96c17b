"""Honest evaluation: repeated stratified (nested) cross-validation of a whole training
recipe, with the AUC's bootstrap confidence interval and threshold metrics.

The estimator evaluated is the complete recipe (:class:`TunedClassifier`: selection and
hyper-parameter search happen inside its ``fit``), refitted from scratch on the training
cases of every outer fold; the test cases of that fold are only ever predicted. Each
repeat therefore yields one out-of-fold probability per case.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.model_selection import RepeatedStratifiedKFold

from MultiModalAnalysisLib.classification.estimators import (
    TunedClassifier,
    build_model,
    describe_param,
    selected_features,
)
from MultiModalAnalysisLib.classification.folds import outer_folds
from MultiModalAnalysisLib.classification.labels import align_labels, encode_labels
from MultiModalAnalysisLib.classification.settings import ClassifierSettings, load_settings
from MultiModalAnalysisLib.metrics import (
    binary_classification_metrics,
    bootstrap_auc,
    confusion_counts,
    roc_auc,
)
from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel

THRESHOLD_METRICS = ("sensitivity", "specificity", "balanced_accuracy", "precision", "f1",
                     "accuracy")


@dataclass
class CVResult:
    """Out-of-fold predictions of a repeated stratified CV and the figures drawn from them.

    ``probabilities`` and ``predictions`` are [repeat, case] arrays; the AUC is computed per
    repeat over all cases (pooled out-of-fold predictions) and averaged; the CI is a
    stratified case bootstrap of that average.
    """

    case_ids: list[str]
    labels: np.ndarray  # 0/1 per case
    class_names: list[str]  # [negative, positive]
    probabilities: np.ndarray
    predictions: np.ndarray
    folds: int
    repeats: int
    auc_per_repeat: np.ndarray
    auc: float
    auc_ci: tuple[float, float]
    confidence: float
    metrics: dict[str, dict[str, float]]  # name -> {"mean", "sd"}
    confusion_matrix: np.ndarray  # mean counts per repeat, [[tn, fp], [fn, tp]]
    brier: float
    fold_params: list[dict[str, Any]] = field(default_factory=list)
    feature_selection_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    runtime_s: float = 0.0
    nested: bool = True  # selection/tuning inside the training folds (TunedClassifier)

    @property
    def n_positive(self) -> int:
        return int(self.labels.sum())

    def summary(self) -> dict[str, Any]:
        """The figures as a JSON-ready dictionary (what ``train-classifier`` writes)."""
        n_fits = self.folds * self.repeats
        return {
            "validation": f"repeated stratified {'nested ' if self.nested else ''}"
            f"cross-validation, {self.folds} folds x {self.repeats} repeats",
            "n_cases": len(self.case_ids),
            "n_positive": self.n_positive,
            "classes": self.class_names,
            "folds": self.folds,
            "repeats": self.repeats,
            "auc": round(self.auc, 4),
            "auc_ci": [round(v, 4) for v in self.auc_ci],
            "auc_ci_level": self.confidence,
            "auc_sd_over_repeats": round(float(np.std(self.auc_per_repeat)), 4),
            "auc_per_repeat": [round(float(a), 4) for a in self.auc_per_repeat],
            **{name: {k: round(v, 4) for k, v in values.items()}
               for name, values in self.metrics.items()},
            "brier_score": round(self.brier, 4),
            "confusion_matrix_mean": {
                "tn": round(float(self.confusion_matrix[0, 0]), 2),
                "fp": round(float(self.confusion_matrix[0, 1]), 2),
                "fn": round(float(self.confusion_matrix[1, 0]), 2),
                "tp": round(float(self.confusion_matrix[1, 1]), 2),
            },
            "feature_selection_frequency": {
                name: round(count / n_fits, 3)
                for name, count in sorted(self.feature_selection_counts.items(),
                                          key=lambda kv: (-kv[1], kv[0]))
            },
            "hyperparameters_chosen": _count_params(self.fold_params),
            "notes": self.notes,
            "runtime_s": round(self.runtime_s, 2),
        }

    def describe(self) -> str:
        """A few lines for a terminal."""
        lo, hi = self.auc_ci
        lines = [
            f"{self.folds}-fold stratified {'nested ' if self.nested else ''}CV x "
            f"{self.repeats} repeats on "
            f"{len(self.case_ids)} cases ({self.n_positive} positive = "
            f"{self.class_names[1]!r}):",
            f"  AUC {self.auc:.3f} ({100 * self.confidence:.0f}% CI {lo:.3f}-{hi:.3f}; "
            f"sd over repeats {np.std(self.auc_per_repeat):.3f})",
        ]
        for name in ("sensitivity", "specificity", "balanced_accuracy", "f1"):
            values = self.metrics[name]
            lines.append(f"  {name:<18} {values['mean']:.3f} +/- {values['sd']:.3f}")
        cm = self.confusion_matrix
        lines.append(
            f"  confusion (mean per repeat): TN {cm[0, 0]:.1f}  FP {cm[0, 1]:.1f}  "
            f"FN {cm[1, 0]:.1f}  TP {cm[1, 1]:.1f}"
        )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def predictions_table(self):
        """Per-case out-of-fold probabilities (mean and per repeat) as a DataFrame."""
        import pandas as pd

        table = pd.DataFrame({
            "case_id": self.case_ids,
            "label": [self.class_names[v] for v in self.labels],
            "probability_mean": self.probabilities.mean(axis=0),
            "predicted_positive_fraction": self.predictions.mean(axis=0),
        })
        for r in range(self.repeats):
            table[f"probability_repeat_{r + 1}"] = self.probabilities[r]
        return table

    # what save() writes: a model folder retrained without cross-validation loses them
    FILES = ("cv_metrics.json", "cv_predictions.csv", "roc_curve.png", "confusion_matrix.png")

    def save(self, output_dir: str | Path, title: str = "") -> dict[str, Path]:
        """Write cv_metrics.json, cv_predictions.csv, roc_curve.png, confusion_matrix.png."""
        from MultiModalAnalysisLib.classification.figures import (
            plot_confusion_matrix,
            plot_roc_curves,
        )

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        paths = {
            "cv_metrics": output_dir / "cv_metrics.json",
            "cv_predictions": output_dir / "cv_predictions.csv",
        }
        paths["cv_metrics"].write_text(json.dumps(self.summary(), indent=2), encoding="utf-8")
        self.predictions_table().to_csv(paths["cv_predictions"], index=False)
        paths["roc_curve"] = plot_roc_curves(
            self.labels, self.probabilities, output_dir / "roc_curve.png",
            auc=self.auc, auc_ci=self.auc_ci, title=title,
        )
        paths["confusion_matrix"] = plot_confusion_matrix(
            self.confusion_matrix, self.class_names, output_dir / "confusion_matrix.png",
            title=title,
        )
        return paths


def _count_params(fold_params: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = {}
    for params in fold_params:
        for key, value in params.items():
            counts.setdefault(key, Counter())[str(describe_param(value))] += 1
    return {key: dict(counter.most_common()) for key, counter in counts.items()}


def _take(X, index: np.ndarray):
    return X.iloc[index] if hasattr(X, "iloc") else np.asarray(X)[index]


def evaluate_cv(
    features,
    labels: Sequence[Any] | np.ndarray,
    settings: ClassifierSettings | dict | str | Path | None = None,
    *,
    estimator: BaseEstimator | None = None,
    case_ids: Sequence[str] | None = None,
    positive_label: Any = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    fit_params: dict[str, Any] | None = None,
) -> CVResult:
    """Repeated stratified nested cross-validation of a classifier recipe.

    Args:
        features: one row per case (a DataFrame of numeric features, or an array whose
            first axis is the case, e.g. image crops for the deep classifier).
        labels: the outcome per case, two distinct values; a pandas Series beside a
            DataFrame is matched to its rows by case id (the index), anything else by
            position.
        settings: folds, repeats, bootstrap size and (without ``estimator``) the recipe.
        estimator: evaluate this (unfitted) estimator instead of the one ``settings``
            describe; it is cloned and refitted on every training fold.
        case_ids: names of the cases (default: the DataFrame index, else 0..n-1).
        positive_label: which label value is the positive class (default: the larger).
        progress, cancel: reporting and cancellation between folds.
        fit_params: passed to every ``fit``.

    Returns:
        A :class:`CVResult`. The number of folds shrinks (with a note) when the rarer
        class has fewer cases than folds, so every test fold still holds one.

    Raises:
        ConfigError: one class only, or fewer than two cases of the rarer class.
    """
    start = time.perf_counter()
    settings = load_settings(settings)
    labels = align_labels(features, labels)
    y, class_names = encode_labels(labels, positive_label, what="the labels")
    n = len(y)
    if np.shape(features)[0] != n:
        raise ValueError(f"{np.shape(features)[0]} feature rows but {n} labels.")
    if case_ids is None:
        case_ids = [str(i) for i in (features.index if hasattr(features, "index") else range(n))]
    folds, note = outer_folds(y, settings.cv_folds, "the cohort")
    notes = [note] if note else []
    model = estimator if estimator is not None else build_model(settings)
    splitter = RepeatedStratifiedKFold(
        n_splits=folds, n_repeats=settings.cv_repeats, random_state=settings.random_state
    )
    repeats = settings.cv_repeats
    probabilities = np.full((repeats, n), np.nan)
    predictions = np.zeros((repeats, n), dtype=int)
    fold_params: list[dict[str, Any]] = []
    selection_counts: Counter = Counter()
    fold_notes: Counter = Counter()
    report = as_progress(progress)
    names = list(features.columns) if hasattr(features, "columns") else None
    total = folds * repeats
    for i, (train, test) in enumerate(splitter.split(np.zeros(n), y)):
        check_cancel(cancel, "cross-validation")
        fitted = clone(model).fit(_take(features, train), y[train], **(fit_params or {}))
        r = i // folds
        probabilities[r, test] = fitted.predict_proba(_take(features, test))[:, 1]
        predictions[r, test] = fitted.predict(_take(features, test))
        if isinstance(fitted, TunedClassifier):
            fold_params.append(fitted.best_params_)
            fold_notes.update(fitted.notes_)
            if names is not None:
                selection_counts.update(selected_features(fitted, names))
        report((i + 1) / total, f"fold {i % folds + 1}/{folds}, repeat {r + 1}/{repeats}")
    notes += [f"{note} (in {count} of {total} training folds)"
              for note, count in fold_notes.items()]

    auc_per_repeat = np.atleast_1d(roc_auc(y, probabilities))
    lower, upper, _ = bootstrap_auc(
        y, probabilities, n_bootstrap=settings.n_bootstrap, seed=settings.random_state
    )
    per_repeat = [binary_classification_metrics(y, p) for p in predictions]
    metrics = {
        name: {"mean": float(np.mean([m[name] for m in per_repeat])),
               "sd": float(np.std([m[name] for m in per_repeat]))}
        for name in THRESHOLD_METRICS
    }
    counts = [confusion_counts(y, p) for p in predictions]
    confusion = np.array([[np.mean([c[a] for c in counts]) for a in row]
                          for row in (("tn", "fp"), ("fn", "tp"))])
    return CVResult(
        case_ids=[str(c) for c in case_ids],
        labels=y,
        class_names=class_names,
        probabilities=probabilities,
        predictions=predictions,
        folds=folds,
        repeats=repeats,
        auc_per_repeat=auc_per_repeat,
        auc=float(auc_per_repeat.mean()),
        auc_ci=(lower, upper),
        confidence=0.95,
        metrics=metrics,
        confusion_matrix=confusion,
        brier=float(np.mean((probabilities - y) ** 2)),
        fold_params=fold_params,
        feature_selection_counts=dict(selection_counts),
        notes=notes,
        runtime_s=time.perf_counter() - start,
        nested=isinstance(model, TunedClassifier),
    )
