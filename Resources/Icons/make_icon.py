"""Draw the module icon (128x128 PNG): CT, MR-T1 and PET slices of the bundled patient through
the tumour, stacked and overlapping, the PET over the CT at the front.

Run from the repository root: ``.venv/bin/python Resources/Icons/make_icon.py``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

from MultiModalAnalysisLib.case import load_case  # noqa: E402
from MultiModalAnalysisLib.images import mask_centroid  # noqa: E402
from MultiModalAnalysisLib.preprocess import resample_to_reference  # noqa: E402
from MultiModalAnalysisLib.sample_data import sample_case_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = Path(__file__).resolve().parent / "MultiModalAnalysis.png"


def axial_slices() -> dict[str, np.ndarray]:
    """Square axial slices through the tumour centre, every modality on the CT grid, 0..1."""
    case = load_case(sample_case_dir())
    ct = case.image("CT")
    centre = ct.TransformPhysicalPointToIndex(mask_centroid(case.mask("CT_mask")))
    result = {}
    for modality, window in (("CT", (-160, 240)), ("MR_T1", None), ("PET", (0.0, None))):
        image = ct if modality == "CT" else resample_to_reference(case.image(modality), ct)
        plane = sitk.GetArrayFromImage(image)[centre[2]].astype(float)
        half = 44  # about 4 cm around the tumour centre
        cy, cx = centre[1], centre[0]
        cy, cx = np.clip(cy, half, plane.shape[0] - half), np.clip(cx, half, plane.shape[1] - half)
        plane = plane[cy - half:cy + half, cx - half:cx + half]
        low = window[0] if window else np.percentile(plane, 1)
        high = window[1] if window and window[1] is not None else np.percentile(plane, 99.5)
        result[modality] = np.clip((plane - low) / (high - low), 0, 1)
    return result


def draw(slices: dict[str, np.ndarray], path: Path) -> None:
    fig = plt.figure(figsize=(1.28, 1.28), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 128)
    ax.set_ylim(0, 128)
    ax.axis("off")
    fig.patch.set_alpha(0.0)
    size = 78
    # Back to front: MR (top right), CT, then the PET-over-CT fusion (bottom left).
    layers = [
        (46, 46, plt.cm.gray(slices["MR_T1"]), "#5b8def"),
        (25, 25, plt.cm.gray(slices["CT"]), "#bbbbbb"),
    ]
    fused = plt.cm.gray(slices["CT"])
    pet = plt.cm.hot(slices["PET"])
    alpha = (0.75 * slices["PET"] ** 0.7)[..., None]
    fused[..., :3] = (1 - alpha) * fused[..., :3] + alpha * pet[..., :3]
    layers.append((4, 4, fused, "#ff8c1a"))
    for x, y, rgba, edge in layers:
        ax.imshow(rgba, extent=(x, x + size, y, y + size), origin="upper", interpolation="bilinear")
        ax.add_patch(FancyBboxPatch((x, y), size, size, boxstyle="round,pad=0,rounding_size=6",
                                    fill=False, edgecolor=edge, linewidth=2.2))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, transparent=True)
    plt.close(fig)


if __name__ == "__main__":
    draw(axial_slices(), OUTPUT)
    print(f"wrote {OUTPUT}")
