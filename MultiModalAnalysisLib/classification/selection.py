"""Feature selectors that scikit-learn lacks, as ordinary selector transformers: a
redundancy (correlation) filter and mRMR.

They are written here because scikit-learn has neither, and the packages that do
(``pymrmr``, ``mrmr-selection``) are functions over DataFrames rather than estimators, so
they cannot sit inside a Pipeline and be refitted within each cross-validation fold, which
is the point of having them at all.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectorMixin, f_classif
from sklearn.utils.validation import check_is_fitted, validate_data


def anova_f_scores(X, y) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ANOVA F test of each feature against the class, without the warnings
    it gives for features constant within the classes, which small folds are full of.

    Such a feature scores +inf when it still differs between the classes (its within-class
    variance is 0: it separates them) and 0, p-value 1, when it has no spread at all (0/0
    in scikit-learn, NaN): nothing to tell the classes apart, so never selected first.

    Returns:
        (F statistic, p-value) per feature.
    """
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.filterwarnings("ignore", message=r"Features .* are constant",
                                category=UserWarning)
        f_statistic, p_value = f_classif(X, y)
    undefined = np.isnan(f_statistic)
    f_statistic[undefined] = 0.0
    p_value[undefined] = 1.0
    return f_statistic, p_value


def _standardise(X: np.ndarray) -> np.ndarray:
    centred = X - X.mean(axis=0)
    norm = np.linalg.norm(centred, axis=0)
    return np.divide(centred, norm, out=np.zeros_like(centred), where=norm > 0)


def _ranks(X: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(X, axis=0)


def absolute_correlation(X: np.ndarray, method: str = "spearman") -> np.ndarray:
    """|correlation| between the columns of ``X``; constant columns correlate 0 with all."""
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be 'spearman' or 'pearson', got '{method}'.")
    z = _standardise(_ranks(X) if method == "spearman" else np.asarray(X, float))
    return np.abs(z.T @ z)


class CorrelationFilter(SelectorMixin, BaseEstimator):
    """Drop redundant features: keep a feature only if its absolute correlation with every
    feature kept before it is at most ``threshold``.

    Features are visited from the least to the most redundant (lowest mean absolute
    correlation with the others first), so of a correlated group the member that is least
    tied to the rest of the table survives. Unsupervised: labels are ignored.

    Args:
        threshold: largest absolute correlation allowed between two kept features.
        method: ``"spearman"`` (rank; robust to the skewed radiomics distributions) or
            ``"pearson"``.
    """

    def __init__(self, threshold: float = 0.9, method: str = "spearman") -> None:
        self.threshold = threshold
        self.method = method

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=float)
        corr = absolute_correlation(X, self.method)
        np.fill_diagonal(corr, 0.0)
        order = np.argsort(corr.mean(axis=1), kind="stable")
        kept: list[int] = []
        for j in order:
            if not kept or corr[j, kept].max() <= self.threshold:
                kept.append(int(j))
        self.support_ = np.zeros(X.shape[1], dtype=bool)
        self.support_[kept] = True
        return self

    def _get_support_mask(self) -> np.ndarray:
        check_is_fitted(self, "support_")
        return self.support_


class MRMRSelector(SelectorMixin, BaseEstimator):
    """Minimum-redundancy maximum-relevance selection of ``n_features`` features.

    Greedy (Ding and Peng 2005): first the feature most relevant to the class, then at
    each step the feature maximising relevance minus its mean redundancy with the features
    already chosen (``scheme="difference"``), or relevance divided by it (``"quotient"``).
    Relevance is the absolute point-biserial correlation with the class (a monotone
    function of the ANOVA F statistic) and redundancy the absolute Pearson correlation,
    so both live on [0, 1] and the difference is well scaled. The quotient's denominator
    is floored at 0.1: otherwise a pure-noise feature that happens to be uncorrelated with
    the chosen ones wins by dividing by almost zero.

    Args:
        n_features: how many features to keep (capped at the number available).
        scheme: ``"difference"`` or ``"quotient"``.

    Attributes:
        ranking_: indices of the selected features in the order they were chosen.
        relevance_: the relevance of every feature.
    """

    def __init__(self, n_features: int = 10, scheme: str = "difference") -> None:
        self.n_features = n_features
        self.scheme = scheme

    def fit(self, X, y):
        if self.scheme not in ("quotient", "difference"):
            raise ValueError(f"scheme must be 'quotient' or 'difference', got '{self.scheme}'.")
        X, y = validate_data(self, X, y, dtype=float)
        f_statistic, _ = anova_f_scores(X, y)
        # A negative F comes from rounding only (scikit-learn takes the within-class sum of
        # squares as a difference, which can fall below 0 for a nearly constant feature);
        # left as it is, its relevance is NaN, which np.argmax would choose first. An
        # infinite F (no spread within either class, different between them: the feature
        # separates the classes) is a correlation of 1 with the class.
        f_statistic = np.clip(f_statistic, 0.0, None)
        separating = np.isposinf(f_statistic)
        finite = np.where(separating, 0.0, f_statistic)
        dof = max(X.shape[0] - 2, 1)
        relevance = np.where(separating, 1.0, np.sqrt(finite / (finite + dof)))
        z = _standardise(X)
        n_keep = int(min(max(self.n_features, 1), X.shape[1]))
        chosen = [int(np.argmax(relevance))]
        redundancy_sum = np.abs(z.T @ z[:, chosen[0]])
        available = np.ones(X.shape[1], dtype=bool)
        available[chosen[0]] = False
        while len(chosen) < n_keep:
            redundancy = redundancy_sum / len(chosen)
            if self.scheme == "quotient":
                score = relevance / np.maximum(redundancy, 0.1)
            else:
                score = relevance - redundancy
            score = np.where(available, score, -np.inf)
            best = int(np.argmax(score))
            chosen.append(best)
            available[best] = False
            redundancy_sum += np.abs(z.T @ z[:, best])
        self.ranking_ = np.array(chosen)
        self.relevance_ = relevance
        self.support_ = ~available
        return self

    def _get_support_mask(self) -> np.ndarray:
        check_is_fitted(self, "support_")
        return self.support_
