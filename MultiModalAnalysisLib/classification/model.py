"""Train, save, load and apply a radiomics classifier.

A saved classifier is a folder: ``classifier.joblib`` (the fitted scikit-learn recipe),
``classifier.json`` (metadata: the features in order, the settings, the training cohort,
the cross-validated figures, library versions, the joblib file's SHA-256), ``MODEL_CARD.md``
and, when it was cross-validated, ``cv_metrics.json``, ``cv_predictions.csv``,
``roc_curve.png`` and ``confusion_matrix.png``.

Trust caveat: ``classifier.joblib`` is a pickle. Loading a pickle can run arbitrary code,
so only load classifier folders you made or got from someone you trust; the checksum only
detects a damaged or swapped file, not a deliberate forgery of both files. (The deep
classifier stores plain tensors instead and is loaded with ``torch.load(weights_only=True)``.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from MultiModalAnalysisLib.classification.estimators import (
    TunedClassifier,
    build_model,
    describe_param,
    selected_features,
)
from MultiModalAnalysisLib.classification.evaluation import CVResult, evaluate_cv
from MultiModalAnalysisLib.classification.labels import align_labels, encode_labels
from MultiModalAnalysisLib.classification.modelfile import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    library_versions,
    now_iso,
    read_metadata,
    save_model_folder,
    verify_weights,
    warn_on_version_change,
)
from MultiModalAnalysisLib.classification.settings import ClassifierSettings, load_settings
from MultiModalAnalysisLib.classification.table import (
    UNMEASURED,
    FeatureTable,
    read_feature_table,
)
from MultiModalAnalysisLib.errors import ConfigError, FeatureSetError
from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel

log = logging.getLogger(__name__)

WEIGHTS_FILE = "classifier.joblib"
PICKLE_CAVEAT = (
    f"{WEIGHTS_FILE} is a Python pickle: loading it can run arbitrary code. Load only "
    "classifiers you trained or received from a trusted source."
)


def _names(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f" ... ({len(items)} in all)" if len(items) > limit else "")


class TrainedClassifier:
    """A fitted radiomics classifier with its metadata; checks the features it is given.

    Attributes:
        estimator: the fitted :class:`TunedClassifier`.
        metadata: everything ``classifier.json`` holds.
        cv_result: the cross-validation done at training time (``None`` once loaded; its
            figures stay in ``metadata["cross_validation"]``).
    """

    kind = "radiomics"

    def __init__(
        self, estimator: TunedClassifier, metadata: dict[str, Any],
        cv_result: CVResult | None = None,
    ) -> None:
        self.estimator = estimator
        self.metadata = metadata
        self.cv_result = cv_result

    @property
    def feature_names(self) -> list[str]:
        """The features the model was trained on, in order."""
        return list(self.metadata["features"]["input"])

    @property
    def used_features(self) -> list[str]:
        """The features that reach the classifier after selection (a subset, in order)."""
        return list(self.metadata["features"]["used"])

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["label"]["classes"])

    @property
    def threshold(self) -> float:
        return float(self.metadata["model"]["threshold"])

    def check_features(self, features: pd.DataFrame, *, source: str = "the data") -> pd.DataFrame:
        """``features`` reordered to the training columns, or a clear error.

        Columns the model never uses (dropped by its feature selection) may be absent:
        they are filled with NaN, which cannot change a prediction. Extra columns are
        ignored with a warning, the model's own label column silently.

        Raises:
            FeatureSetError: not a table, a used feature missing, or a non-numeric value.
        """
        if not isinstance(features, pd.DataFrame):
            raise FeatureSetError(
                f"{source} must be a table (pandas DataFrame) with one column per feature; "
                f"the model expects {len(self.feature_names)} named features."
            )
        present = set(map(str, features.columns))
        missing = [f for f in self.feature_names if f not in present]
        missing_used = [f for f in missing if f in set(self.used_features)]
        if missing_used:
            spaced = sorted(c for c in present if c != c.strip() and c.strip() in missing_used)
            raise FeatureSetError(
                f"{source} lacks {len(missing_used)} feature(s) the classifier uses: "
                f"{_names(missing_used)}. "
                + (f"Its column(s) {_names([repr(c) for c in spaced])} have spaces around "
                   "the name: remove them. " if spaced else "")
                + "Compute the features with the same settings as "
                f"for training ({len(self.feature_names)} features, e.g. "
                f"{_names(self.feature_names, 3)})."
            )
        if missing:
            log.info("%s lacks %d feature(s) the classifier does not use (%s); filled with "
                     "NaN.", source, len(missing), _names(missing, 5))
        # the outcome the model was trained on is expected beside the features (a table
        # with the truth, to check the model on): not an unknown feature
        known = {*self.feature_names, self.metadata["label"]["column"]}
        extra = [c for c in map(str, features.columns) if c not in known]
        if extra:
            log.warning("%s has %d column(s) the classifier was not trained on, ignored: %s",
                        source, len(extra), _names(extra, 5))
        aligned = features.reindex(columns=self.feature_names)
        numeric = aligned.apply(pd.to_numeric, errors="coerce")
        bad = [c for c in self.used_features
               if (numeric[c].isna() & aligned[c].notna()).any()]
        if bad:
            raise FeatureSetError(f"{source} has non-numeric values in {_names(bad)}.")
        return numeric.astype(float)

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        """[P(negative), P(positive)] per row of ``features`` (checked, see above)."""
        return self.estimator.predict_proba(self.check_features(features))

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        """Class names per row, positive where P(positive) >= the model's threshold."""
        return decide(self.predict_proba(features)[:, 1], self.threshold, self.class_names)

    def predict_table(self, table: FeatureTable) -> pd.DataFrame:
        """Per-case probabilities for a feature table: case_id, probability, prediction."""
        unusable = {c: why for c, why in table.dropped_columns.items()
                    if c in set(self.used_features)}
        if unusable:
            raise FeatureSetError(
                f"{table.source} has feature column(s) the classifier uses that could not be "
                "read as features: " + "; ".join(f"{c} ({why})" for c, why in unusable.items())
                + ".")
        empty = [c for c in self.used_features
                 if c in table.features.columns and table.features[c].isna().all()]
        if empty:
            log.warning("%s: feature(s) the classifier uses have no value in any case and are "
                        "imputed with the training median: %s", table.source, _names(empty))
        used = [c for c in self.used_features if c in table.features.columns and c not in empty]
        gaps = table.features[used].isna()  # (text and infinities were read as missing)
        for case_id, row in zip(table.case_ids, gaps.to_numpy(), strict=True):
            if row.any():
                log.warning("%s: case %s has no value for %d of the %d feature(s) the "
                            "classifier uses (%s): imputed with the training median, so its "
                            "prediction rests on less of its own data.", table.source,
                            case_id, int(row.sum()), len(self.used_features),
                            _names([c for c, gap in zip(used, row, strict=True) if gap], 3))
        proba = self.predict_proba(self.check_features(table.features, source=table.source))
        return prediction_frame(table.case_ids, proba[:, 1], self.threshold, self.class_names)

    def predict_manifest(self, path: str | Path, **extraction: Any) -> pd.DataFrame:
        """Per-case probabilities for a feature-table CSV or an image manifest (``mma
        classify``). For an image manifest the features are computed as at training time
        (the model's ``extraction`` metadata) unless ``extraction`` says otherwise; a case
        left out with ``on_error="skip"`` keeps its row, with no probability and the reason
        in an ``error`` column (see :func:`with_unmeasured_cases`)."""
        from MultiModalAnalysisLib.case import read_manifest
        from MultiModalAnalysisLib.classification.table import image_path_columns

        options = {**(self.metadata.get("extraction") or {}), **extraction}
        manifest = read_manifest(path)
        if not image_path_columns(manifest.table):
            log.info("%s is a feature table: its features are taken as given, so they must "
                     "have been computed as this classifier's training features were (its "
                     "model card says how).", path)
        elif not self.metadata.get("extraction"):
            log.warning(
                "this classifier was trained on a feature table, which does not record how "
                "its features were computed; the features of %s are computed now with %s. "
                "Use the settings that made the training table, or the predictions do not "
                "mean what the model learnt.", path,
                "the settings given" if extraction.get("feature_settings")
                else "default settings")
        table = read_feature_table(path, **options)
        return with_unmeasured_cases(self.predict_table(table), table, manifest.case_ids)

    def save(self, folder: str | Path) -> Path:
        """Write the model folder (see the module docstring); returns the folder."""
        import joblib

        return save_model_folder(
            folder, WEIGHTS_FILE, lambda path: joblib.dump(self.estimator, path),
            self.metadata, {"format": "joblib (pickle)", "caveat": PICKLE_CAVEAT},
            self.cv_result, f"{self.metadata['label']['column']}: "
            f"{self.metadata['settings']['classifier']}", model_card)


def predictions_of(classifier: Any, features: pd.DataFrame) -> pd.DataFrame:
    """``prediction`` (the class name), ``probability`` (of the positive class) and the
    ``threshold`` that decides, per row of ``features``, as :meth:`TrainedClassifier.predict`
    and ``mma classify`` decide. A stand-in without a threshold or class names takes 0.5
    and 0 / 1."""
    probability = np.asarray(classifier.predict_proba(features), dtype=float)[:, 1]
    threshold = float(getattr(classifier, "threshold", 0.5))
    classes = list(getattr(classifier, "class_names", [0, 1]))
    return pd.DataFrame({
        "prediction": decide(probability, threshold, classes),
        "probability": probability,
        "threshold": threshold,
    }, index=features.index)


def prediction_frame(
    case_ids: Sequence[str], probability: np.ndarray, threshold: float, classes: list[str]
) -> pd.DataFrame:
    """The table ``mma classify`` writes: one row per case."""
    probability = np.asarray(probability, dtype=float)
    return pd.DataFrame({
        "case_id": list(case_ids),
        f"probability_{classes[1]}": probability,
        "prediction": decide(probability, threshold, classes),
        "threshold": threshold,
    })


def with_unmeasured_cases(
    predictions: pd.DataFrame, table: FeatureTable, order: Sequence[str]
) -> pd.DataFrame:
    """``predictions`` with a row for each case of ``table`` that could not be measured
    (``on_error="skip"``): no probability or prediction, and why in an ``error`` column,
    as the Slicer batch writes a failed case. Rows follow ``order`` (the manifest's).
    Without such a case, ``predictions`` unchanged (no ``error`` column)."""
    failed = {case_id: why for case_id, why in table.excluded_cases.items()
              if why.startswith(UNMEASURED)}
    if not failed:
        return predictions
    # object, so that class names stay as they are beside the empty rows (1, not 1.0)
    predictions = predictions.astype({"prediction": object})
    rows = pd.DataFrame({"case_id": list(failed), "error": list(failed.values())})
    rank = {str(c).strip(): i for i, c in enumerate(order)}
    return (pd.concat([predictions, rows], ignore_index=True)
            .sort_values("case_id", key=lambda ids: ids.map(rank), kind="stable")
            .reset_index(drop=True))


def decide(probability: np.ndarray, threshold: float, classes: Sequence[Any]) -> np.ndarray:
    """The class per row: ``classes[1]`` (the positive class) where P(positive) >=
    ``threshold``, else ``classes[0]``. The one place the decision is made."""
    positive = np.asarray(probability, dtype=float) >= threshold
    names = np.asarray(list(classes))
    if names.dtype.kind in "US":  # class names as Python strings, numbers as numbers
        names = names.astype(object)
    return names[positive.astype(int)]


def train_classifier(
    features: pd.DataFrame | FeatureTable,
    labels: Sequence[Any] | pd.Series | None = None,
    settings: ClassifierSettings | dict | str | Path | None = None,
    *,
    label_column: str = "label",
    positive_label: Any = None,
    evaluate: bool = True,
    output: str | Path | None = None,
    source: str | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> TrainedClassifier:
    """Cross-validate a classifier recipe, then fit it on every case (and save it).

    Args:
        features: numeric features, one row per case, indexed by case id; or a
            :class:`FeatureTable` (then ``labels`` and ``label_column`` come from it).
        labels: the outcome per case (two distinct values); a pandas Series is matched
            to the features by case id (its index), anything else by position.
        settings: see :class:`ClassifierSettings` (object, dict or JSON path).
        label_column: the outcome's name (recorded in the metadata).
        positive_label: the value meaning positive (default: the larger).
        evaluate: run the repeated nested CV first (its figures go into the metadata).
        output: write the model folder here.
        source: where the features came from (recorded).
        progress, cancel: reporting and cancellation.

    Returns:
        The :class:`TrainedClassifier` fitted on all cases.
    """
    excluded: dict[str, str] = {}
    extraction = None
    if isinstance(features, FeatureTable):
        table = features
        extraction = table.extraction
        features, labels = table.features, table.labels
        label_column = table.label_column or label_column
        source = source or table.source
        excluded = table.excluded_cases
    if labels is None:
        raise ConfigError("train_classifier needs the labels (outcome per case).")
    if not isinstance(features, pd.DataFrame):
        raise FeatureSetError("train_classifier needs the features as a pandas DataFrame "
                              "(one named column per feature).")
    settings = load_settings(settings)
    labels = align_labels(features, labels, what=f"label column {label_column}")
    y, classes = encode_labels(labels, positive_label, what=f"label column {label_column}")
    report = as_progress(progress)
    cv_result = None
    if evaluate:
        # (the labels themselves, so that the CV outputs name the classes)
        cv_result = evaluate_cv(features, np.asarray(labels, dtype=object), settings,
                                positive_label=classes[1],
                                case_ids=list(map(str, features.index)),
                                progress=report.sub(0.0, 0.9), cancel=cancel)
    check_cancel(cancel, "training the classifier")
    report(0.9 if evaluate else 0.0, "fitting the final model on all cases")
    estimator = build_model(settings).fit(features, y)
    names = list(map(str, features.columns))
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": TrainedClassifier.kind,
        "created": now_iso(),
        "label": {"column": label_column, "classes": classes, "positive": classes[1]},
        "features": {
            "input": names,
            "used": selected_features(estimator, names),
            "note": "`input` is the column order of the training table; `used` are those "
            "left after feature selection in the final model.",
        },
        "settings": settings.to_dict(),
        "model": {
            "best_params": {k: describe_param(v) for k, v in estimator.best_params_.items()},
            "calibrated": bool(estimator.calibrated_),
            "threshold": estimator.threshold_,
            "notes": estimator.notes_,
        },
        "training_cohort": {
            "source": source,
            "n_cases": len(y),
            "n_positive": int(y.sum()),
            "n_negative": int(len(y) - y.sum()),
            "case_ids": list(map(str, features.index)),
            "excluded_cases": excluded,
            "missing_value_fraction": round(float(features.isna().to_numpy().mean()), 4),
        },
        "cross_validation": cv_result.summary() if cv_result else None,
        "versions": library_versions(),
    }
    if extraction is not None:  # trained from images: classify computes features alike
        metadata["extraction"] = extraction
    model = TrainedClassifier(estimator, metadata, cv_result)
    report(1.0, "trained")
    if output is not None:
        model.save(output)
    return model


def load_radiomics_classifier(folder: Path, metadata: dict[str, Any]) -> TrainedClassifier:
    """Load the joblib model of a radiomics classifier folder (checksum verified first)."""
    import joblib

    _check_metadata(folder, metadata)
    weights = verify_weights(folder, metadata)
    warn_on_version_change(metadata, f"classifier {folder}")
    estimator = joblib.load(weights)
    if not isinstance(estimator, TunedClassifier):
        raise ConfigError(f"{weights} does not hold a MultiModalAnalysis classifier.")
    fitted = getattr(estimator, "feature_names_in_", None)
    if fitted is not None and list(map(str, fitted)) != metadata["features"]["input"]:
        raise ConfigError(f"the features listed in {folder / METADATA_FILE} are not those the "
                          "model was fitted on (edited?): use the folder as it was written.")
    return TrainedClassifier(estimator, metadata)


def _check_metadata(folder: Path, metadata: dict[str, Any]) -> None:
    """Refuse a classifier.json whose fields the model needs are missing or malformed (a
    hand-edited or damaged file) with a message, rather than a KeyError later."""

    def strings(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    label = metadata.get("label")
    features = metadata.get("features")
    model = metadata.get("model")
    problems = []
    if not (isinstance(label, dict) and isinstance(label.get("column"), str)
            and isinstance(label.get("classes"), list) and len(label["classes"]) == 2
            and "positive" in label):
        problems.append("'label' (column, two classes, positive)")
    if not (isinstance(features, dict) and strings(features.get("input"))
            and strings(features.get("used"))
            and set(features["used"]) <= set(features["input"])):
        problems.append("'features' (input, and used among them)")
    threshold = model.get("threshold") if isinstance(model, dict) else None
    if not (isinstance(threshold, int | float) and 0.0 <= float(threshold) <= 1.0):
        problems.append("'model.threshold' (a probability)")
    if problems:
        raise ConfigError(
            f"{folder / METADATA_FILE} is damaged: {'; '.join(problems)} missing or "
            "malformed. Use the folder as `mma train-classifier` wrote it, or retrain.")


def load_classifier(path: str | Path):
    """Load a classifier folder written by :func:`train_classifier` (or the deep one).

    Read the pickle caveat in this module's docstring: load only trusted folders.

    Returns:
        A :class:`TrainedClassifier`, or a ``deep.DeepClassifier`` for a deep model.

    Raises:
        ConfigError: no classifier there, a damaged file, or a newer format.
    """
    folder, metadata = read_metadata(path)
    if metadata.get("kind") == "deep":
        from MultiModalAnalysisLib.classification.deep import load_deep_classifier

        return load_deep_classifier(folder, metadata)
    return load_radiomics_classifier(folder, metadata)


def fitted_model(metadata: dict[str, Any]) -> str:
    """What was fitted, e.g. ``SVC (chosen by 'auto', C=0.1, kernel=rbf, 8 features)``:
    the classifier the search chose (``auto`` names none) and its hyper-parameters."""
    params = dict((metadata.get("model") or {}).get("best_params") or {})
    asked = str((metadata.get("settings") or {}).get("classifier", ""))
    chosen = params.pop("classify", None)
    details = [f"{k.split('__')[-1]}={v}" for k, v in params.items()
               if k.startswith("classify__")]
    if "select__n_features" in params:
        details.append(f"{params['select__n_features']} features")
    name = str(chosen) if chosen is not None else asked
    if chosen is not None and asked and asked != name:
        details.insert(0, f"chosen by '{asked}'")
    return name + (f" ({', '.join(details)})" if details else "")


def model_card(metadata: dict[str, Any]) -> str:
    """A short human-readable card for a saved classifier (Markdown)."""
    cohort = metadata["training_cohort"]
    label = metadata["label"]
    lines = [
        f"# Classifier card: {label['column']} ({metadata['kind']})",
        "",
        f"Created {metadata['created']} with MultiModalAnalysis "
        f"{metadata['versions'].get('MultiModalAnalysis')}. For research, not for diagnosis.",
        "",
        "## Predicts",
        f"P({label['column']} = {label['positive']}) per case; predicted {label['positive']} "
        f"when it reaches {metadata['model']['threshold']:.3f}.",
        "",
        "## Model",
        fitted_model(metadata) + ".",
        "",
        "## Training cohort",
        f"{cohort['n_cases']} cases ({cohort['n_positive']} {label['positive']}, "
        f"{cohort['n_negative']} {label['classes'][0]}) from {cohort.get('source')}.",
    ]
    if cohort.get("excluded_cases"):
        lines.append(f"Excluded: {cohort['excluded_cases']}.")
    inputs = metadata.get("inputs")
    if inputs:
        lines += ["", "## Inputs", *[f"- {k}: {v}" for k, v in inputs.items()]]
    features = metadata.get("features")
    if features:
        lines += [
            "", "## Features",
            f"{len(features['input'])} input features; the final model uses "
            f"{len(features['used'])}: {', '.join(features['used'][:20])}"
            f"{' ...' if len(features['used']) > 20 else ''}.",
        ]
    cv = metadata.get("cross_validation")
    lines += ["", "## Validation"]
    if cv:
        lines += [
            f"{cv['validation']}: AUC {cv['auc']:.3f} (95% CI {cv['auc_ci'][0]:.3f}-"
            f"{cv['auc_ci'][1]:.3f}), sensitivity {cv['sensitivity']['mean']:.3f}, "
            f"specificity {cv['specificity']['mean']:.3f}, balanced accuracy "
            f"{cv['balanced_accuracy']['mean']:.3f}.",
            *[f"Note: {n}" for n in cv.get("notes", [])],
        ]
        if cohort["n_cases"] < 100:
            lines.append(
                f"With {cohort['n_cases']} cases the interval is wide: treat the figures "
                "as a feasibility estimate, not as evidence of clinical performance."
            )
    else:
        lines.append("Not cross-validated.")
    lines += ["", "## Settings", "```json"]
    import json

    lines += [json.dumps(metadata.get("settings", {}), indent=2), "```", ""]
    if metadata["kind"] == "radiomics":
        lines += ["## Caveat", PICKLE_CAVEAT, ""]
    return "\n".join(lines)
