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


def shifted_pet_case(folder: Path, names: dict[str, str], shift: int = 6) -> Path:
    """A CT and a PET (32^3 voxels of 2 mm under one header) whose content lies
    ``2 * shift`` mm apart along x, with a lesion mask drawn on the PET: a moving
    modality's own mask, which must follow the registration. ``names`` maps ``CT``,
    ``PET`` and ``PET_mask`` to file names (without ``.nii.gz``) in ``folder``.
    The lesion: CT 200 HU, PET 8; a second block (CT 400, PET 4) makes the pose unique."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 32
    z, y, x = np.indices((n, n, n))

    def ball(cx):
        return (x - cx) ** 2 + (y - 16) ** 2 + (z - 16) ** 2 <= 9

    body = (abs(x - 16) < 13) & (abs(y - 16) < 13) & (abs(z - 16) < 13)
    ct = np.where(body, 0, -1000).astype(np.int16)
    ct[ball(12)] = 200
    ct[4:8, 20:26, 6:10] = 400
    pet = np.where(np.roll(body, shift, 2), 1.0, 0.0).astype(np.float32)
    pet[ball(12 + shift)] = 8.0
    pet[4:8, 20:26, 6 + shift:10 + shift] = 4.0
    for key, array in (("CT", ct), ("PET", pet),
                       ("PET_mask", ball(12 + shift).astype(np.uint8))):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((2.0, 2.0, 2.0))
        sitk.WriteImage(image, str(folder / f"{names[key]}.nii.gz"))
    return folder


def train_image_classifier(manifest: Path, output: Path, feature_settings: dict,
                           n_features: int = 2) -> Path:
    """A logistic classifier trained from an image manifest's ``mask`` regions (it records
    its feature settings, as ``mma train-classifier --feature-settings`` does)."""
    from MultiModalAnalysisLib.classification import read_feature_table, train_classifier

    table = read_feature_table(manifest, "Outcome", mask_column="mask",
                               feature_settings=feature_settings, device="cpu")
    train_classifier(table, settings={"classifier": "logistic_l2",
                                      "n_features": [n_features], "cv_folds": 2,
                                      "cv_repeats": 1},
                     evaluate=False, output=output)
    return output
