"""Synthetic multi-modal cases for the segmentation tests: a CT/PET/MR-like volume triple
with a ball-shaped "tumour" visible in all three, written as an STS-like case folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from synthetic import make_image

SPACING = (2.0, 2.0, 3.0)


def tumour_case(rng, shape=(16, 40, 40), centre=None, radius_mm=16.0, spacing=SPACING):
    """(images by modality, tumour mask): CT (HU), PET (SUV) and MR (arbitrary units).

    The tumour is slightly denser than muscle on CT, hot on PET and bright on MR; a fatty
    rim around a muscle block gives the background some structure.
    """
    z, y, x = np.indices(shape)
    if centre is None:
        centre = [s / 2 + rng.uniform(-2, 2) for s in shape]
    distance = np.sqrt(((x - centre[2]) * spacing[0]) ** 2 + ((y - centre[1]) * spacing[1]) ** 2
                       + ((z - centre[0]) * spacing[2]) ** 2)
    tumour = distance < radius_mm
    muscle = (np.abs(x - shape[2] / 2) < shape[2] * 0.4) & (
        np.abs(y - shape[1] / 2) < shape[1] * 0.4
    )
    ct = np.where(muscle, 45.0, -90.0) + np.where(tumour, 25.0, 0.0) + rng.normal(0, 12, shape)
    pet = np.where(muscle, 1.0, 0.4) + np.where(tumour, 6.0 - distance / radius_mm * 3, 0.0)
    pet = pet + rng.normal(0, 0.3, shape)
    mr = np.where(muscle, 300.0, 900.0) + np.where(tumour, 350.0, 0.0) + rng.normal(0, 40, shape)
    images = {
        name: make_image(array.astype(np.float32), spacing, (-30.0, 12.0, 100.0))
        for name, array in (("CT", ct), ("PET", pet), ("MR_T1", mr))
    }
    mask = make_image(tumour.astype(np.uint8), spacing, (-30.0, 12.0, 100.0))
    return images, mask


def write_cohort(folder: Path, cases: dict[str, tuple[dict, sitk.Image]]) -> Path:
    """Write cases in the STS layout and a manifest (``case_id``, CT, PET, MR_T1, mask)."""
    rows = []
    for case_id, (images, mask) in cases.items():
        case_dir = folder / case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        row = {"case_id": case_id}
        for name, image in images.items():
            sitk.WriteImage(image, str(case_dir / f"{name}_image.nii.gz"))
            row[name] = f"{case_id}/{name}_image.nii.gz"
        sitk.WriteImage(mask, str(case_dir / "CT_mask.nii.gz"))
        row["mask"] = f"{case_id}/CT_mask.nii.gz"
        rows.append(row)
    manifest = folder / "cases.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest
