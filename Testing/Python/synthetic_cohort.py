"""Synthetic cohorts for the classification tests: feature tables with a known amount of
signal, and small image cohorts (CT-like + PET-like volumes with a lesion mask) where the
class is visible in the lesion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk


def feature_cohort(
    n_cases: int = 20,
    n_positive: int = 5,
    n_informative: int = 2,
    n_noise: int = 30,
    effect: float = 2.5,
    seed: int = 0,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Gaussian features indexed by case id; the first ``n_informative`` are shifted by
    ``effect`` standard deviations in the positive cases, the rest are pure noise."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_positive), np.zeros(n_cases - n_positive)].astype(int)
    labels = rng.permutation(labels)
    values = rng.normal(size=(n_cases, n_informative + n_noise))
    values[:, :n_informative] += effect * labels[:, None]
    columns = [f"PET_informative_{i}" for i in range(n_informative)]
    columns += [f"CT_noise_{i}" for i in range(n_noise)]
    index = pd.Index([f"case_{i:03d}" for i in range(n_cases)], name="case_id")
    return pd.DataFrame(values, columns=columns, index=index), labels


def lesion_case(positive: bool, rng: np.random.Generator, size: int = 28):
    """(CT, PET, mask) of one synthetic patient: a spherical lesion at a random place and
    radius; positive lesions carry a hot core on PET and a dark rim on CT."""
    shape = (20, size, size)
    centre = np.array(shape) / 2 + rng.uniform(-3, 3, size=3) * np.array([0.5, 1, 1])
    radius = rng.uniform(4.0, 6.5)
    z, y, x = np.indices(shape)
    distance = np.sqrt(((z - centre[0]) * 1.6) ** 2 + (y - centre[1]) ** 2
                       + (x - centre[2]) ** 2)
    mask = (distance <= radius).astype(np.uint8)
    ct = rng.normal(40.0, 12.0, shape)
    ct[:, 0, :], ct[:, -1, :] = -150.0, 400.0  # fat and bone at the edge, as a CT in HU has
    pet = rng.gamma(2.0, 0.5, shape)
    pet[mask > 0] += 2.0
    if positive:
        pet[distance <= radius / 2] += 4.0
        ct[(distance > radius * 0.6) & (mask > 0)] -= 30.0
    images = []
    for array, spacing in ((ct.astype(np.float32), (1.0, 1.0, 1.6)),
                           (pet.astype(np.float32), (1.0, 1.0, 1.6)),
                           (mask, (1.0, 1.0, 1.6))):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        image.SetOrigin((-14.0, -14.0, -16.0))
        images.append(image)
    return tuple(images)


def image_cohort(folder: Path, n_cases: int, n_positive: int, seed: int = 0,
                 label_column: str = "Outcome") -> Path:
    """Write an image cohort (case folders + manifest.csv with CT, PET, mask, label)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.r_[np.ones(n_positive), np.zeros(n_cases - n_positive)])
    rows = []
    for i, label in enumerate(labels.astype(int)):
        case_dir = folder / f"case_{i:03d}"
        case_dir.mkdir(parents=True, exist_ok=True)
        ct, pet, mask = lesion_case(bool(label), rng)
        row = {"case_id": f"case_{i:03d}"}
        for name, image in (("CT", ct), ("PET", pet), ("mask", mask)):
            sitk.WriteImage(image, str(case_dir / f"{name}.nii.gz"))
            row[name] = f"{case_dir.name}/{name}.nii.gz"
        row[label_column] = int(label)
        rows.append(row)
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest
