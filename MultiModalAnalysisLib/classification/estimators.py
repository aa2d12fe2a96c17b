"""The training recipe of a radiomics classifier as scikit-learn estimators.

``build_pipeline`` makes impute -> drop constant -> scale -> (correlation filter) -> select
-> classify; :class:`TunedClassifier` wraps it with the inner-CV hyper-parameter search,
calibration and the decision threshold. The whole recipe is one estimator, so the outer
cross-validation refits all of it (selection and tuning included) on each training fold
only: nothing learnt from a test fold can leak into the figures.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, MetaEstimatorMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.feature_selection import SelectFromModel, SelectKBest, VarianceThreshold
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, ParameterGrid, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import RobustScaler, StandardScaler
from sklearn.svm import SVC
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

from MultiModalAnalysisLib.classification.folds import usable_folds
from MultiModalAnalysisLib.classification.selection import (
    CorrelationFilter,
    MRMRSelector,
    anova_f_scores,
)
from MultiModalAnalysisLib.classification.settings import ClassifierSettings
from MultiModalAnalysisLib.errors import ConfigError

log = logging.getLogger(__name__)

# Small grids on purpose: with tens of patients a large grid only overfits the inner CV.
DEFAULT_GRIDS: dict[str, dict[str, list[Any]]] = {
    "logistic_l2": {"classify__C": [0.01, 0.1, 1.0, 10.0]},
    "logistic_l1": {"classify__C": [0.1, 1.0, 10.0]},
    "svm": {"classify__C": [0.1, 1.0, 10.0], "classify__kernel": ["linear", "rbf"]},
    "random_forest": {"classify__min_samples_leaf": [1, 3]},
    "gradient_boosting": {"classify__learning_rate": [0.1, 0.3]},
}

# The candidates of classifier="auto", tried in the inner loop.
AUTO_CANDIDATES = ("logistic_l2", "logistic_l1", "svm", "random_forest", "gradient_boosting")

# The parameter of each selector that sets how many features it keeps.
_N_FEATURES_PARAM = {
    "univariate": "select__k",
    "l1": "select__max_features",
    "mrmr": "select__n_features",
}


def uses_n_features(selection: str) -> bool:
    """Whether a feature selection picks a number of features (``n_features`` applies):
    ``none`` and ``correlation`` keep every feature they do not filter out."""
    return selection in _N_FEATURES_PARAM


def _inner_has(method: str):
    """For ``available_if``: the wrapper offers ``method`` only when its estimator does
    (calibration picks decision_function over predict_proba when it exists)."""
    return lambda wrapper: hasattr(wrapper.estimator, method)


class RebalancedClassifier(MetaEstimatorMixin, ClassifierMixin, BaseEstimator):
    """Fit ``estimator`` on class-balanced data: minority cases duplicated at random up to
    balance (``"oversample"``), or every case weighted by the inverse frequency of its
    class (``"sample_weight"``, for classifiers without a ``class_weight`` option).

    The rebalancing happens in ``fit`` only, so inside a pipeline it only ever touches
    the training cases of a fold. (scikit-learn pipelines cannot resample; imbalanced-learn
    can, but a dependency for these few lines is not worth it.)
    """

    def __init__(
        self, estimator: BaseEstimator, strategy: str = "oversample", random_state: int = 0
    ) -> None:
        self.estimator = estimator
        self.strategy = strategy
        self.random_state = random_state

    def fit(self, X, y):
        y = np.asarray(y)
        self.classes_, counts = np.unique(y, return_counts=True)
        if self.strategy == "sample_weight":
            weights = compute_sample_weight("balanced", y)
            self.estimator_ = clone(self.estimator).fit(X, y, sample_weight=weights)
            return self
        if self.strategy != "oversample":
            raise ValueError(f"strategy must be 'oversample' or 'sample_weight', got "
                             f"{self.strategy!r}.")
        rng = np.random.default_rng(self.random_state)
        extra = [
            rng.choice(np.flatnonzero(y == c), size=counts.max() - n, replace=True)
            for c, n in zip(self.classes_, counts, strict=True)
        ]
        index = np.concatenate([np.arange(len(y)), *extra]).astype(int)
        rows = X.iloc[index] if hasattr(X, "iloc") else np.asarray(X)[index]
        self.estimator_ = clone(self.estimator).fit(rows, y[index])
        return self

    @available_if(_inner_has("predict_proba"))
    def predict_proba(self, X):
        return self.estimator_.predict_proba(X)

    def predict(self, X):
        return self.estimator_.predict(X)

    @available_if(_inner_has("decision_function"))
    def decision_function(self, X):
        return self.estimator_.decision_function(X)


def make_classifier(settings: ClassifierSettings) -> BaseEstimator:
    """The bare classifier named by ``settings.classifier`` (before oversampling)."""
    weight = settings.class_weight
    seed = settings.random_state
    name = settings.classifier
    if name == "logistic_l2":
        # liblinear: on cohort-sized data it is several times faster than lbfgs.
        return LogisticRegression(C=1.0, l1_ratio=0.0, solver="liblinear", class_weight=weight,
                                  max_iter=5000, random_state=seed)
    if name == "logistic_l1":
        return LogisticRegression(
            C=1.0, l1_ratio=1.0, solver="liblinear", class_weight=weight, max_iter=5000,
            random_state=seed,
        )
    if name == "svm":
        # No probability=True: libsvm's internal Platt scaling (a 5-fold CV of its own) is
        # unstable on a few dozen cases and can even invert the ranking. Probabilities come
        # from the calibration step, or uncalibrated from the decision function (see
        # TunedClassifier.predict_proba).
        return SVC(C=1.0, class_weight=weight, random_state=seed)
    if name == "random_forest":
        return RandomForestClassifier(
            n_estimators=100,
            class_weight="balanced_subsample" if weight else None,
            random_state=seed,
            n_jobs=settings.n_jobs,
        )
    if name == "gradient_boosting":
        # The classic implementation: the histogram one spends ~1 s per fit on threading
        # and binning overhead for a few dozen cases, which hundreds of inner fits cannot
        # afford. Class weights go through RebalancedClassifier (see build_pipeline).
        return GradientBoostingClassifier(
            n_estimators=60, max_depth=2, min_samples_leaf=2, subsample=0.8,
            random_state=seed,
        )
    raise ValueError(f"unknown classifier {name}")  # settings validated the name


def _rebalancing(settings: ClassifierSettings) -> str | None:
    """How the classifier is wrapped for class imbalance (None: not wrapped)."""
    if settings.resampling == "oversample":
        return "oversample"  # the classes are then balanced: no weights needed on top
    if settings.classifier == "gradient_boosting" and settings.class_weight == "balanced":
        return "sample_weight"
    return None


def make_selector(settings: ClassifierSettings) -> BaseEstimator | str:
    """The feature-selection step (``"passthrough"`` for none or correlation only)."""
    k = max(settings.n_features)
    if settings.selection == "univariate":
        return SelectKBest(anova_f_scores, k=k)
    if settings.selection == "l1":
        l1 = LogisticRegression(C=0.5, l1_ratio=1.0, solver="liblinear", max_iter=5000,
                                class_weight=settings.class_weight)
        # threshold=-inf: keep the k largest |coefficients| (never an empty selection).
        return SelectFromModel(l1, threshold=-np.inf, max_features=k)
    if settings.selection == "mrmr":
        return MRMRSelector(n_features=k)
    return "passthrough"


def build_pipeline(settings: ClassifierSettings) -> Pipeline:
    """impute -> drop constant -> scale -> correlation filter -> select -> classify."""
    scaler = {"standard": StandardScaler(), "robust": RobustScaler(), "none": "passthrough"}
    threshold = settings.correlation_threshold
    if settings.selection == "correlation" and threshold is None:
        threshold = 0.9
    if settings.classifier == "auto":
        # A placeholder: the inner search puts each candidate classifier here.
        classifier = classifier_step(replace(settings, classifier=AUTO_CANDIDATES[0]))
    else:
        classifier = classifier_step(settings)
    return Pipeline(
        [
            # keep_empty_features: a column missing in every training case stays (as a
            # constant, dropped next) so the selectors' masks line up with the input columns.
            ("impute", SimpleImputer(strategy=settings.imputation, keep_empty_features=True)),
            ("drop_constant", VarianceThreshold(0.0)),
            ("scale", scaler[settings.scaling]),
            ("filter", CorrelationFilter(threshold) if threshold is not None else "passthrough"),
            ("select", make_selector(settings)),
            ("classify", classifier),
        ]
    )


def classifier_step(settings: ClassifierSettings) -> BaseEstimator:
    """The pipeline's last step: the classifier, wrapped for class imbalance if needed."""
    classifier = make_classifier(settings)
    strategy = _rebalancing(settings)
    if strategy:
        classifier = RebalancedClassifier(classifier, strategy, settings.random_state)
    return classifier


def default_param_grid(
    settings: ClassifierSettings,
) -> dict[str, list[Any]] | list[dict[str, list[Any]]]:
    """The hyper-parameter grid searched in the inner loop (classifier + n_features).

    With ``classifier="auto"`` a list of grids, one per candidate classifier: the inner
    loop then chooses the classifier too, so the choice cannot leak into the figures.
    """
    if settings.classifier == "auto":
        grids = []
        for name in AUTO_CANDIDATES:
            candidate = replace(settings, classifier=name)
            grids.append({"classify": [classifier_step(candidate)],
                          **default_param_grid(candidate)})
        return grids
    grid = dict(settings.param_grid or DEFAULT_GRIDS[settings.classifier])
    if _rebalancing(settings):
        # The classifier sits inside RebalancedClassifier: address its parameters there.
        grid = {
            key.replace("classify__", "classify__estimator__", 1): values
            for key, values in grid.items()
        }
    param = _N_FEATURES_PARAM.get(settings.selection)
    if param is not None and param not in grid:
        grid[param] = sorted(set(settings.n_features))
    return grid


def _calibration_increases(calibrated: CalibratedClassifierCV) -> bool:
    """True when the calibration map of a fitted (ensemble=False) calibrated classifier
    increases with the score. A sigmoid is ``expit(-(a * score + b))``: increasing iff
    a < 0. Isotonic maps are non-decreasing by construction; a flat one is refused too."""
    calibrator = calibrated.calibrated_classifiers_[0].calibrators[0]
    if hasattr(calibrator, "a_"):
        return float(calibrator.a_) < 0
    values = np.asarray(getattr(calibrator, "y_thresholds_", [0.0, 1.0]), dtype=float)
    return values.size > 1 and values[-1] > values[0]


class TunedClassifier(ClassifierMixin, BaseEstimator):
    """A pipeline whose hyper-parameters are chosen by an inner stratified CV, then
    calibrated, with a decision threshold: the complete training recipe as one estimator.

    Fold counts adapt to the data: the inner and calibration CVs use at most as many folds
    as the training set has minority-class cases, so every validation fold holds both
    classes; with fewer than two such cases the first grid point is used untuned and the
    model is left uncalibrated (noted in ``notes_``).

    Args:
        pipeline: the estimator to tune (see :func:`build_pipeline`).
        param_grid: candidates for the inner search (``{}``: nothing to tune).
        inner_folds: folds of the tuning CV (upper bound).
        scoring: scikit-learn scorer used for tuning.
        calibration: ``"sigmoid"``, ``"isotonic"`` or ``"none"``.
        calibration_folds: folds of the calibration CV (upper bound).
        calibration_min_cases: calibrate only when the rarer class has at least this many
            training cases; below, the calibration CV's scores are too noisy to fit a map
            (it would mostly add noise to the probabilities) and the model stays as it is.
        threshold: a probability, or ``"auto"`` (training prevalence when calibrated,
            else 0.5).
        random_state: seed of the inner shuffles.

    Attributes:
        best_params_: the hyper-parameters chosen.
        estimator_: the fitted (calibrated) model.
        threshold_: the decision threshold used by ``predict``.
        notes_: what adapted to the data (fewer folds, no tuning, no calibration).
    """

    def __init__(
        self,
        pipeline: BaseEstimator,
        param_grid: dict[str, list[Any]] | None = None,
        inner_folds: int = 3,
        scoring: str = "roc_auc",
        calibration: str = "sigmoid",
        calibration_folds: int = 3,
        calibration_min_cases: int = 10,
        threshold: float | str = "auto",
        random_state: int = 0,
    ) -> None:
        self.pipeline = pipeline
        self.param_grid = param_grid
        self.inner_folds = inner_folds
        self.scoring = scoring
        self.calibration = calibration
        self.calibration_folds = calibration_folds
        self.calibration_min_cases = calibration_min_cases
        self.threshold = threshold
        self.random_state = random_state

    def fit(self, X, y):
        y = np.asarray(y)
        self.classes_, counts = np.unique(y, return_counts=True)
        if len(self.classes_) != 2:
            raise ValueError(f"TunedClassifier needs two classes, got {self.classes_.tolist()}.")
        minority = int(counts.min())
        self.notes_: list[str] = []
        if hasattr(X, "columns"):
            self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        # Plain arrays inside: the DataFrame checks of every step cost more than the fits
        # themselves on cohort-sized data (hundreds of inner fits per outer fold).
        X = self._as_array(X)
        self.n_features_in_ = X.shape[1]
        self.best_params_ = self._tune(X, y, minority)
        model = clone(self.pipeline).set_params(**self.best_params_)
        folds = usable_folds(self.calibration_folds, minority)
        enough = folds >= 2 and minority >= self.calibration_min_cases
        self.calibrated_ = self.calibration != "none" and enough
        if self.calibration != "none" and not self.calibrated_:
            self.notes_.append(f"not calibrated: only {minority} case(s) of the rarer class "
                               f"(calibration needs {max(self.calibration_min_cases, 2)})")
        if self.calibrated_:
            model = CalibratedClassifierCV(
                model,
                method=self.calibration,
                cv=StratifiedKFold(folds, shuffle=True, random_state=self.random_state),
                ensemble=False,
            )
        self.estimator_ = model.fit(X, y)
        if self.calibrated_ and not _calibration_increases(self.estimator_):
            # On a few dozen cases the calibration CV's scores can anti-correlate with the
            # labels by chance, and the fitted map then inverts the model's ranking. A
            # calibration must increase with the score: otherwise keep the model as it is.
            self.notes_.append("not calibrated: the fitted calibration did not increase with "
                               "the model's score")
            self.estimator_ = self.estimator_.calibrated_classifiers_[0].estimator
            self.calibrated_ = False
        if self.threshold == "auto":
            self.threshold_ = float(np.mean(y == self.classes_[1])) if self.calibrated_ else 0.5
        else:
            self.threshold_ = float(self.threshold)
        return self

    def _tune(self, X, y, minority: int) -> dict[str, Any]:
        candidates = list(ParameterGrid(self.param_grid or {}))
        if len(candidates) <= 1:
            return candidates[0] if candidates else {}
        folds = usable_folds(self.inner_folds, minority)
        if folds < 2:
            self.notes_.append(
                f"hyper-parameters not tuned: only {minority} minority-class case(s); "
                f"used {candidates[0]}"
            )
            return candidates[0]
        if folds < self.inner_folds:
            self.notes_.append(f"inner CV used {folds} folds instead of {self.inner_folds}")
        search = GridSearchCV(
            clone(self.pipeline),
            self.param_grid,
            cv=StratifiedKFold(folds, shuffle=True, random_state=self.random_state),
            scoring=self.scoring,
            refit=False,
            error_score=np.nan,
        )
        search.fit(X, y)
        self.inner_score_ = float(search.best_score_)
        return dict(search.best_params_)

    def _as_array(self, X) -> np.ndarray:
        if hasattr(X, "columns") and hasattr(self, "feature_names_in_"):
            columns = list(X.columns)
            if columns != list(self.feature_names_in_):
                raise ValueError("the feature columns differ from those seen in fit.")
        X = np.array(X, dtype=float)
        # An infinite feature value (e.g. a ratio over an empty bin) is treated as missing
        # and imputed like a NaN, rather than stopping the whole pipeline.
        X[np.isinf(X)] = np.nan
        return X

    def predict_proba(self, X) -> np.ndarray:
        """[P(negative), P(positive)] per case. A model without probabilities (an
        uncalibrated SVM) gives the logistic of its decision function: a score in [0, 1]
        that ranks like the model but is not a calibrated probability."""
        check_is_fitted(self, "estimator_")
        X = self._as_array(X)
        if hasattr(self.estimator_, "predict_proba"):
            return self.estimator_.predict_proba(X)
        positive = 1.0 / (1.0 + np.exp(-self.estimator_.decision_function(X)))
        return np.column_stack([1.0 - positive, positive])

    def predict(self, X) -> np.ndarray:
        positive = self.predict_proba(X)[:, 1] >= self.threshold_
        return self.classes_[positive.astype(int)]

    @property
    def fitted_pipeline_(self) -> Pipeline:
        """The fitted pipeline inside (the one used for predictions, calibrated or not)."""
        check_is_fitted(self, "estimator_")
        if isinstance(self.estimator_, CalibratedClassifierCV):
            return self.estimator_.calibrated_classifiers_[0].estimator
        return self.estimator_


def selected_features(model: TunedClassifier, names: list[str]) -> list[str]:
    """The input features that reach the classifier of a fitted :class:`TunedClassifier`,
    in input order (``names``: the input column names)."""
    pipeline = model.fitted_pipeline_
    keep = np.ones(len(names), dtype=bool)
    for _, step in pipeline.steps[:-1]:
        if hasattr(step, "get_support"):
            keep[keep] = step.get_support()
    return [name for name, k in zip(names, keep, strict=True) if k]


def build_model(settings: ClassifierSettings) -> TunedClassifier:
    """The complete recipe named by ``settings``: pipeline, grid, tuning, calibration.

    Raises:
        ConfigError: a ``param_grid`` key that is no parameter of the pipeline.
    """
    pipeline = build_pipeline(settings)
    grid = default_param_grid(settings)
    if settings.param_grid:
        known = pipeline.get_params()
        unknown = sorted(key for key in grid if key not in known)
        if unknown:
            tunable = sorted(k for k in known if k.startswith("classify__")
                             and "__" not in k[len("classify__"):])
            raise ConfigError(
                f"param_grid: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} "
                f"not a parameter of the {settings.classifier} pipeline (its classifier's "
                f"are {', '.join(tunable)}).")
    return TunedClassifier(
        pipeline,
        param_grid=grid,
        inner_folds=settings.inner_folds,
        scoring=settings.scoring,
        calibration=settings.calibration,
        calibration_folds=settings.calibration_folds,
        calibration_min_cases=settings.calibration_min_cases,
        threshold=settings.threshold,
        random_state=settings.random_state,
    )


def describe_param(value: Any) -> Any:
    """A JSON-friendly view of a hyper-parameter value (an estimator becomes its name)."""
    if isinstance(value, RebalancedClassifier):
        return f"{type(value.estimator).__name__} ({value.strategy})"
    if hasattr(value, "get_params"):
        return type(value).__name__
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return repr(value)
