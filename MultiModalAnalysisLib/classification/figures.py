"""ROC curves and confusion matrices of a cross-validation, as PNG files (matplotlib Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc_curves(
    labels: np.ndarray,
    probabilities: np.ndarray,
    path: str | Path,
    *,
    auc: float | None = None,
    auc_ci: tuple[float, float] | None = None,
    title: str = "",
) -> Path:
    """One thin ROC curve per CV repeat, their vertical mean, and the chance diagonal.

    Args:
        labels: 0/1 per case.
        probabilities: [repeat, case] out-of-fold probabilities (or one row).
        path: the PNG to write.
        auc, auc_ci: shown in the legend when given.
    """
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    probabilities = np.atleast_2d(probabilities)
    grid = np.linspace(0.0, 1.0, 201)
    tprs = []
    fig, ax = plt.subplots(figsize=(5.2, 5.0), dpi=120)
    for i, scores in enumerate(probabilities):
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, color="0.6", lw=0.8, alpha=0.6,
                label="each CV repeat" if i == 0 else None)
        tprs.append(np.interp(grid, fpr, tpr))
    mean_tpr = np.mean(tprs, axis=0)
    mean_tpr[0] = 0.0
    label = "mean over repeats"
    if auc is not None:
        label += f" (AUC {auc:.2f}"
        label += f", 95% CI {auc_ci[0]:.2f}-{auc_ci[1]:.2f})" if auc_ci else ")"
    ax.plot(grid, mean_tpr, color="tab:blue", lw=2.2, label=label)
    ax.plot([0, 1], [0, 1], ls="--", color="tab:red", lw=1, label="chance")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity",
           ylabel="sensitivity", title=title or "ROC curve (out-of-fold predictions)")
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path, plt)


def plot_confusion_matrix(
    matrix: np.ndarray, class_names: Sequence[str], path: str | Path, *, title: str = ""
) -> Path:
    """A 2x2 confusion matrix (rows: true class, columns: predicted), counts annotated."""
    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(4.4, 4.0), dpi=120)
    ax.imshow(matrix, cmap="Blues", vmin=0)
    integer = np.allclose(matrix, np.round(matrix))
    for (i, j), value in np.ndenumerate(matrix):
        text = f"{value:.0f}" if integer else f"{value:.1f}"
        colour = "white" if value > matrix.max() / 2 else "black"
        ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=14)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, [f"predicted {c}" for c in class_names])
    ax.set_yticks(ticks, [f"true {c}" for c in class_names])
    ax.set_title(title or "Confusion matrix (mean per CV repeat)", fontsize=10)
    return _save(fig, path, plt)


def _save(fig, path: str | Path, plt) -> Path:
    """Lay out, write (creating the folder) and close a figure; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
