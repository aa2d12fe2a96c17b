"""Classification machinery: metrics, feature selectors, the training recipe and the
repeated stratified nested cross-validation on synthetic cohorts with known signal."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.naive_bayes import GaussianNB
from sklearn.utils.estimator_checks import check_estimator
from synthetic_cohort import feature_cohort

from MultiModalAnalysisLib.classification import (
    ClassifierSettings,
    CorrelationFilter,
    MRMRSelector,
    RebalancedClassifier,
    TunedClassifier,
    build_model,
    build_pipeline,
    encode_labels,
    evaluate_cv,
)
from MultiModalAnalysisLib.classification.estimators import default_param_grid
from MultiModalAnalysisLib.classification.selection import anova_f_scores
from MultiModalAnalysisLib.classification.settings import load_settings
from MultiModalAnalysisLib.errors import ConfigError
from MultiModalAnalysisLib.metrics import (
    binary_classification_metrics,
    bootstrap_auc,
    confusion_counts,
    roc_auc,
)

FAST = {"cv_repeats": 2, "n_bootstrap": 500}


@pytest.fixture(autouse=True)
def _quiet_convergence():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=RuntimeWarning)
        yield


# --- metrics -----------------------------------------------------------------------------


def test_roc_auc_matches_scikit_learn_with_ties_and_along_leading_axes(rng):
    labels = rng.integers(0, 2, 40)
    scores = np.round(rng.normal(size=(3, 40)) + labels, 1)  # rounding makes ties
    batched = roc_auc(labels, scores)
    assert batched.shape == (3,)
    for row, auc in zip(scores, batched, strict=True):
        assert auc == pytest.approx(roc_auc_score(labels, row), abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.zeros(5), np.arange(5))


def test_bootstrap_interval_brackets_the_auc_and_narrows_with_more_cases(rng):
    def interval(n):
        labels = np.r_[np.ones(n // 4), np.zeros(n - n // 4)].astype(int)
        scores = labels + rng.normal(scale=1.2, size=n)
        lower, upper, replicates = bootstrap_auc(labels, scores, n_bootstrap=1000)
        assert lower <= roc_auc(labels, scores) <= upper
        assert replicates.shape == (1000,)
        return upper - lower

    small, large = interval(20), interval(400)
    assert small > 0.25  # 20 patients: a wide interval, as it should be
    assert large < small / 3


def test_threshold_metrics_from_a_known_confusion_matrix():
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    predicted = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]  # TP 3, FN 1, FP 1, TN 5
    assert confusion_counts(labels, predicted) == {"tn": 5, "fp": 1, "fn": 1, "tp": 3}
    metrics = binary_classification_metrics(labels, predicted)
    assert metrics["sensitivity"] == pytest.approx(0.75)
    assert metrics["specificity"] == pytest.approx(5 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx((0.75 + 5 / 6) / 2)
    assert metrics["f1"] == pytest.approx(0.75)


def test_labels_of_any_two_values_encode_with_the_larger_as_positive():
    assert encode_labels(["no", "yes", "no"])[0].tolist() == [0, 1, 0]
    encoded, names = encode_labels([0.0, 1.0, 1.0])
    assert encoded.tolist() == [0, 1, 1] and names == ["0", "1"]
    assert encode_labels(["M1", "M0"], positive_label="M0")[0].tolist() == [0, 1]
    with pytest.raises(ConfigError, match="exactly two"):
        encode_labels([0, 1, 2])
    with pytest.raises(ConfigError, match="no label"):
        encode_labels([0, 1, np.nan])
    # text read from a CSV with gaps ("1.0") is the same label as 1
    encoded, names = encode_labels(["0.0", "1", 1.0, 0])
    assert encoded.tolist() == [0, 1, 1, 0] and names == ["0", "1"]


# --- feature selection ---------------------------------------------------------------------


def _redundant_table(rng, n=60):
    y = np.r_[np.ones(n // 2), np.zeros(n - n // 2)].astype(int)
    strong = y * 2.0 + rng.normal(size=n)
    twin = strong + rng.normal(scale=0.05, size=n)  # a near copy: redundant
    second = y * 1.2 + rng.normal(size=n)  # weaker but independent information
    noise = rng.normal(size=(n, 6))
    return np.column_stack([strong, twin, second, noise]), y


def test_mrmr_skips_a_redundant_copy_that_univariate_selection_takes(rng):
    X, y = _redundant_table(rng)
    univariate = SelectKBest(f_classif, k=2).fit(X, y).get_support(indices=True)
    mrmr = MRMRSelector(n_features=2).fit(X, y)
    quotient = MRMRSelector(n_features=2, scheme="quotient").fit(X, y)
    assert set(univariate) == {0, 1}  # the two copies of the strongest feature
    for selector in (mrmr, quotient):
        chosen = set(selector.get_support(indices=True))
        assert chosen in ({0, 2}, {1, 2})  # one twin, plus the independent information
    assert mrmr.ranking_[0] in (0, 1)  # most relevant first
    assert MRMRSelector(n_features=50).fit(X, y).get_support().sum() == X.shape[1]


def _scoring_warnings(caught) -> list[str]:
    words = ("are constant", "divide", "invalid value")
    return [str(w.message) for w in caught if any(word in str(w.message) for word in words)]


@pytest.mark.parametrize("selection", ["univariate", "mrmr"])
def test_feature_scoring_in_small_folds_is_silent_about_features_constant_within_a_class(
    rng, selection
):
    # 8 cases and two-valued features: in a 4-case inner fold many are constant within
    # each class, which scikit-learn's F test reports once per fit
    y = np.r_[np.ones(4), np.zeros(4)].astype(int)
    X = pd.DataFrame(np.column_stack([y + rng.normal(scale=0.3, size=8),
                                      rng.integers(0, 2, size=(8, 12)).astype(float)]))
    settings = ClassifierSettings(selection=selection, n_features=[2], cv_repeats=2,
                                  n_bootstrap=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate_cv(X, y, settings)
    assert _scoring_warnings(caught) == []
    assert np.isfinite(result.auc) and result.confusion_matrix.sum() == pytest.approx(8)


def test_anova_scores_of_constant_features_are_zero_and_of_class_constant_ones_infinite():
    y = np.array([0, 0, 0, 1, 1, 1])
    X = np.column_stack([np.full(6, 3.0),  # no spread at all: 0/0 in scikit-learn
                         [1.0, 1.0, 1.0, 2.0, 2.0, 2.0],  # constant within each class
                         [0.1, 0.5, 0.3, 0.9, 1.4, 1.1]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f_statistic, p_value = anova_f_scores(X, y)
        support = SelectKBest(anova_f_scores, k=2).fit(X, y).get_support(indices=True)
    assert _scoring_warnings(caught) == []
    assert f_statistic[0] == 0.0 and p_value[0] == 1.0
    assert np.isposinf(f_statistic[1]) and p_value[1] == 0.0
    assert f_statistic[2] == pytest.approx(f_classif(X[:, 2:], y)[0][0])
    assert set(support) == {1, 2}  # the featureless column is never among the best


def test_mrmr_never_ranks_a_nearly_constant_feature_first_by_a_rounding_nan():
    y = np.r_[np.zeros(4), np.ones(4)].astype(int)
    for seed in range(200):  # a column whose F rounds below 0: its relevance was NaN
        noise = 0.1 + 1e-15 * np.random.default_rng(seed).integers(0, 3, size=8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if f_classif(noise[:, None], y)[0][0] < 0:
                break
    else:
        pytest.skip("scikit-learn's F test no longer rounds below 0 here")
    informative = y + np.linspace(-0.3, 0.3, 8)
    selector = MRMRSelector(n_features=1).fit(np.column_stack([noise, informative]), y)
    assert np.isfinite(selector.relevance_).all()
    assert selector.ranking_.tolist() == [1]


def test_correlation_filter_keeps_one_feature_of_each_correlated_group(rng):
    X, y = _redundant_table(rng)
    kept = CorrelationFilter(threshold=0.9).fit(X).get_support(indices=True)
    assert len(set(kept) & {0, 1}) == 1  # exactly one of the twins
    assert {2, 3, 4, 5, 6, 7, 8} <= set(kept)  # the independent ones all stay


@pytest.mark.parametrize("selector", [MRMRSelector(n_features=3), CorrelationFilter(0.8)],
                         ids=["mrmr", "correlation_filter"])
def test_selectors_pass_scikit_learn_estimator_checks(selector):
    check_estimator(selector)


def test_rebalancing_shows_the_classifier_equal_class_totals():
    X = np.arange(20, dtype=float).reshape(-1, 1)
    y = np.r_[np.ones(4), np.zeros(16)].astype(int)
    for strategy in ("oversample", "sample_weight"):
        fitted = RebalancedClassifier(GaussianNB(), strategy).fit(X, y)
        totals = fitted.estimator_.class_count_
        assert totals[0] == pytest.approx(totals[1]), strategy


# --- the training recipe -------------------------------------------------------------------


def test_calibration_brings_balanced_weights_back_to_the_true_prevalence(rng):
    n = 2400
    y = (rng.random(n) < 0.2).astype(int)
    X = pd.DataFrame(rng.normal(size=(n, 4)) + y[:, None] * [1.0, 0.5, 0, 0])
    train, test = np.arange(1200), np.arange(1200, n)  # large: stable prevalences

    def mean_probability(calibration):
        settings = ClassifierSettings(selection="none", calibration=calibration)
        model = build_model(settings).fit(X.iloc[train], y[train])
        return model.predict_proba(X.iloc[test])[:, 1].mean(), model

    uncalibrated, _ = mean_probability("none")
    calibrated, model = mean_probability("sigmoid")
    prevalence = y[test].mean()
    assert uncalibrated > prevalence + 0.15  # class weights inflate the probabilities
    assert abs(calibrated - prevalence) < 0.05
    assert model.threshold_ == pytest.approx(y[train].mean())  # "auto": the prevalence


def test_a_calibration_that_would_invert_the_ranking_is_refused(rng):
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.pipeline import Pipeline

    class Contrary(ClassifierMixin, BaseEstimator):
        """Scores that fall as the positive class becomes likelier."""

        def fit(self, X, y):
            self.classes_ = np.unique(y)
            return self

        def decision_function(self, X):
            return -np.asarray(X)[:, 0]

        def predict(self, X):
            return self.classes_[(self.decision_function(X) > 0).astype(int)]

    X = pd.DataFrame(rng.normal(size=(60, 2)))
    y = (X[0] > 0).astype(int).to_numpy()
    model = TunedClassifier(Pipeline([("classify", Contrary())]), calibration="sigmoid",
                            calibration_min_cases=2).fit(X, y)
    assert not model.calibrated_
    assert any("did not increase" in note for note in model.notes_)
    assert roc_auc(y, model.predict_proba(X)[:, 1]) == 0.0  # its own ranking, kept as is


def test_missing_and_infinite_feature_values_are_imputed_inside_the_model(rng):
    X, y = feature_cohort(n_cases=30, n_positive=10, n_noise=4, effect=3.0)
    X.iloc[0, 0], X.iloc[1, 1], X.iloc[2, 2] = np.nan, np.inf, -np.inf
    X["CT_all_missing"] = np.nan
    model = build_model(ClassifierSettings(selection="none")).fit(X, y)
    probabilities = model.predict_proba(X)[:, 1]
    assert np.isfinite(probabilities).all()
    assert roc_auc(y, probabilities) > 0.9


def test_auto_lets_the_inner_loop_choose_the_classifier_itself():
    settings = ClassifierSettings(classifier="auto", n_features=[3])
    grids = default_param_grid(settings)
    kinds = [type(grid["classify"][0]).__name__ for grid in grids]
    assert kinds == ["LogisticRegression", "LogisticRegression", "SVC",
                     "RandomForestClassifier", "RebalancedClassifier"]
    assert all(grid["select__n_features"] == [3] for grid in grids)
    # A circle: only the RBF SVM can separate it, and the inner search must find that.
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.uniform(-1, 1, size=(80, 2)))
    y = (np.hypot(X[0], X[1]) < 0.6).astype(int).to_numpy()
    svm_grid = {**grids[2], "classify__kernel": ["rbf"], "classify__C": [10.0]}
    model = TunedClassifier(build_pipeline(settings), [grids[0], svm_grid],
                            calibration="none").fit(X, y)
    assert type(model.best_params_["classify"]).__name__ == "SVC"
    with pytest.raises(ConfigError, match="auto"):
        ClassifierSettings(classifier="auto", param_grid={"classify__C": [1.0]})


def test_tuning_and_calibration_adapt_to_a_training_set_with_one_positive(rng):
    X = pd.DataFrame(rng.normal(size=(12, 5)))
    y = np.r_[1, np.zeros(11)].astype(int)
    model = build_model(ClassifierSettings(selection="univariate")).fit(X, y)
    assert not model.calibrated_
    assert any("not tuned" in note for note in model.notes_)
    assert model.predict_proba(X).shape == (12, 2)


# --- nested cross-validation -------------------------------------------------------------


@pytest.mark.parametrize("classifier", ["logistic_l2", "logistic_l1", "svm",
                                        "gradient_boosting"])
def test_nested_cv_finds_the_signal_in_a_tiny_separable_cohort(classifier):
    X, y = feature_cohort(n_cases=20, n_positive=5, n_informative=2, n_noise=20, effect=4.0)
    trees = classifier == "gradient_boosting"  # slower to fit: one repeat, one size
    settings = ClassifierSettings(classifier=classifier, n_bootstrap=500,
                                  cv_repeats=1 if trees else 2,
                                  n_features=[3] if trees else [3, 5, 10])
    result = evaluate_cv(X, y, settings)
    assert result.auc >= 0.9, result.describe()
    assert result.auc_ci[0] >= 0.7
    assert result.metrics["balanced_accuracy"]["mean"] >= 0.75
    assert result.confusion_matrix.sum() == pytest.approx(20)
    # An informative feature reaches the classifier in every outer fold (mRMR may drop
    # the second as redundant: both correlate through the label); noise far less often.
    frequency = result.summary()["feature_selection_frequency"]
    assert max(frequency["PET_informative_0"], frequency["PET_informative_1"]) == 1.0
    noise = [frequency.get(f"CT_noise_{i}", 0.0) for i in range(20)]
    assert np.mean(noise) <= 0.5, frequency


def test_nested_cv_with_a_random_forest_and_oversampling_finds_the_signal():
    X, y = feature_cohort(n_cases=20, n_positive=5, n_informative=2, n_noise=10, effect=4.0)
    settings = ClassifierSettings(classifier="random_forest", resampling="oversample",
                                  n_features=[3], param_grid={"classify__max_depth": [3]},
                                  cv_repeats=1, n_bootstrap=500)
    assert evaluate_cv(X, y, settings).auc >= 0.9


def test_nested_cv_on_permuted_labels_gives_chance_auc():
    X, y = feature_cohort(n_cases=60, n_positive=20, n_informative=3, n_noise=20, effect=3.0)
    settings = {**FAST, "n_features": [5], "param_grid": {"classify__C": [0.1, 1.0]}}
    aucs = [
        evaluate_cv(X, np.random.default_rng(seed).permutation(y),
                    ClassifierSettings(**settings, random_state=seed)).auc
        for seed in range(4)
    ]
    assert 0.3 <= np.mean(aucs) <= 0.7, aucs
    assert evaluate_cv(X, y, ClassifierSettings(**settings)).auc >= 0.9  # true labels


def test_selection_inside_the_folds_does_not_inflate_auc_on_pure_noise():
    X, y = feature_cohort(n_cases=24, n_positive=8, n_informative=0, n_noise=300, seed=3)
    settings = ClassifierSettings(selection="univariate", n_features=[5], **FAST)
    honest = evaluate_cv(X, y, settings).auc
    # The classic mistake, for contrast: select on all cases, then cross-validate.
    leaky_columns = SelectKBest(f_classif, k=5).fit(X, y).get_support()
    leaky_scores = cross_val_predict(
        LogisticRegression(class_weight="balanced"), X.loc[:, leaky_columns], y,
        cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba",
    )[:, 1]
    assert roc_auc(y, leaky_scores) > 0.85  # leakage fabricates a "signature" from noise
    assert 0.25 <= honest <= 0.75


def test_tiny_cohort_folds_shrink_so_every_test_fold_holds_a_positive():
    X, y = feature_cohort(n_cases=20, n_positive=3, n_noise=5, effect=3.0)
    result = evaluate_cv(X, y, ClassifierSettings(cv_folds=5, cv_repeats=1, n_bootstrap=200,
                                                  selection="none"))
    assert result.folds == 3
    assert any("only 3 cases" in note for note in result.notes)
    with pytest.raises(ConfigError, match="at least 2"):
        evaluate_cv(X, np.r_[1, np.zeros(19)].astype(int), ClassifierSettings(**FAST))


def test_cv_result_is_written_as_json_csv_and_figures(tmp_path):
    import matplotlib.image

    X, y = feature_cohort(n_cases=20, n_positive=5, n_noise=5, effect=2.0)
    result = evaluate_cv(X, y, ClassifierSettings(cv_repeats=2, n_bootstrap=200,
                                                  selection="none",
                                                  param_grid={"classify__C": [1.0]}))
    paths = result.save(tmp_path)
    summary = json.loads(paths["cv_metrics"].read_text())
    assert summary["auc"] == pytest.approx(result.auc, abs=1e-4)
    assert summary["auc_ci"][0] <= summary["auc"] <= summary["auc_ci"][1]
    assert {"sensitivity", "specificity", "balanced_accuracy", "f1"} <= set(summary)
    predictions = pd.read_csv(paths["cv_predictions"])
    assert len(predictions) == 20 and predictions["probability_mean"].between(0, 1).all()
    for name in ("roc_curve", "confusion_matrix"):
        picture = matplotlib.image.imread(paths[name])
        assert picture.shape[0] > 300 and picture[..., :3].std() > 0.05


def test_cross_validation_reports_progress_and_can_be_cancelled():
    import threading

    from MultiModalAnalysisLib.errors import OperationCancelled

    X, y = feature_cohort(n_cases=20, n_positive=5, n_noise=3)
    settings = ClassifierSettings(cv_repeats=2, n_bootstrap=200, selection="none",
                                  param_grid={"classify__C": [1.0]})
    reports: list[float] = []
    evaluate_cv(X, y, settings, progress=lambda f, m: reports.append(f))
    assert len(reports) == 10 and reports[-1] == pytest.approx(1.0)
    assert reports == sorted(reports)
    cancel = threading.Event()

    def cancel_after_two_folds(fraction: float, message: str) -> None:
        if fraction >= 0.2:
            cancel.set()

    with pytest.raises(OperationCancelled):
        evaluate_cv(X, y, settings, progress=cancel_after_two_folds, cancel=cancel)


def test_an_estimator_is_refitted_on_each_training_fold_only():
    X, y = feature_cohort(n_cases=20, n_positive=5, n_noise=3)
    seen: list[int] = []

    class Recorder(LogisticRegression):
        def fit(self, X, y, sample_weight=None):
            seen.append(len(y))
            return super().fit(X, y, sample_weight)

    evaluate_cv(X, y, ClassifierSettings(cv_folds=5, cv_repeats=1, n_bootstrap=200),
                estimator=clone(Recorder()))
    assert seen == [16] * 5


def test_mrmr_ranks_a_feature_that_separates_the_classes_first():
    # Constant within each class and different between them: F is infinite, the feature
    # correlates perfectly with the class. Its relevance used to be mapped to 0.
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    separating = np.where(y == 1, 2.0, 1.0)
    informative = y + np.array([0.3, -0.2, 0.1, -0.4, 0.2, -0.3, 0.4, -0.1])
    X = np.column_stack([informative, separating])
    selector = MRMRSelector(n_features=2).fit(X, y)
    assert selector.relevance_[1] == 1.0
    assert 0.0 < selector.relevance_[0] < 1.0
    assert selector.ranking_.tolist() == [1, 0]


def test_a_settings_file_giving_n_features_to_a_selection_without_it_is_refused(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text('{"selection": "none", "n_features": [3]}')
    with pytest.raises(ConfigError, match="selection none does not use n_features"):
        load_settings(path)
    with pytest.raises(ConfigError, match="selection correlation does not use n_features"):
        load_settings({"selection": "correlation", "n_features": [2, 4]})
    # a saved model's settings carry the default n_features whatever the selection
    saved = ClassifierSettings(selection="none").to_dict()
    assert load_settings(saved).selection == "none"
    assert load_settings({"selection": "mrmr", "n_features": [3]}).n_features == [3]
