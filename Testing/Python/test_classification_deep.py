"""The deep classifier: ROI crops around the lesion, a small MONAI network trained on a
synthetic cohort whose class is visible in the images, its model folder and the CLI."""

from __future__ import annotations

import json
import threading

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from synthetic_cohort import image_cohort, lesion_case

from MultiModalAnalysisLib.classification import load_classifier
from MultiModalAnalysisLib.classification.crops import CropSettings, crop_grid, roi_crop
from MultiModalAnalysisLib.classification.deep import CropClassifier, train_deep_classifier
from MultiModalAnalysisLib.cli import main
from MultiModalAnalysisLib.errors import (
    EmptyImageError,
    FeatureSetError,
    OperationCancelled,
    UnitsError,
)
from MultiModalAnalysisLib.metrics import roc_auc
from MultiModalAnalysisLib.preprocess import resample_to_spacing

torch.set_num_threads(2)
NETWORK = {"epochs": 15, "batch_size": 8, "learning_rate": 3e-3}
CROP = CropSettings(size=16, margin_mm=4.0)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    return image_cohort(root / "train", 16, 8, seed=1), image_cohort(root / "test", 12, 6, seed=2)


@pytest.fixture(scope="module")
def deep_model(cohorts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("deep_model") / "CLF"
    model = train_deep_classifier(cohorts[0], "Outcome", ["CT", "PET"], "mask", crop=CROP,
                                  network=NETWORK, device="cpu", output=folder)
    return model, folder


def test_roi_crop_is_a_cube_around_the_lesion_with_the_mask_last():
    ct, pet, mask = lesion_case(True, np.random.default_rng(0))
    crop = roi_crop({"CT": ct, "PET": pet}, mask, CropSettings(size=20, margin_mm=3.0))
    assert crop.shape == (3, 20, 20, 20) and crop.dtype == np.float32
    lesion = crop[2] > 0
    assert 0.05 < lesion.mean() < 0.6  # the lesion fills a good part of the crop
    centre = np.array(np.nonzero(lesion)).mean(axis=1)
    np.testing.assert_allclose(centre, [9.5, 9.5, 9.5], atol=1.5)
    assert crop[1][lesion].mean() > crop[1][~lesion].mean() + 2  # PET is hot in the lesion


def test_roi_crop_grid_is_isotropic_and_covers_the_box_plus_margin():
    _, pet, mask = lesion_case(False, np.random.default_rng(3))
    grid = crop_grid(pet, mask, CropSettings(size=16, margin_mm=5.0))
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    extent = np.array(stats.GetBoundingBox(1)[3:]) * np.array(mask.GetSpacing())
    assert len(set(grid.GetSpacing())) == 1
    assert grid.GetSpacing()[0] * 16 >= extent.max() + 2 * 5.0 - 1e-6


def test_roi_crop_of_images_on_different_grids_agrees(rng):
    ct, pet, mask = lesion_case(True, rng)
    coarse_pet = resample_to_spacing(pet, 2.0)  # PET on its own, coarser grid
    same = roi_crop({"CT": ct, "PET": pet}, mask, CROP)
    mixed = roi_crop({"CT": ct, "PET": coarse_pet}, mask, CROP)
    assert np.corrcoef(same[1].ravel(), mixed[1].ravel())[0, 1] > 0.8
    with pytest.raises(EmptyImageError):
        roi_crop({"CT": ct}, sitk.Image(mask.GetSize(), sitk.sitkUInt8), CROP)


def test_deep_classifier_learns_the_visible_class_and_generalises(deep_model, cohorts):
    model, _ = deep_model
    losses = model.metadata["model"]["loss_history"]
    assert losses[-1] < 0.6 * losses[0]
    predictions = model.predict_manifest(cohorts[1])
    truth = pd.read_csv(cohorts[1])["Outcome"].to_numpy()
    assert roc_auc(truth, predictions["probability_1"].to_numpy()) >= 0.9


def test_deep_model_folder_round_trip_gives_identical_probabilities(deep_model, cohorts):
    model, folder = deep_model
    meta = json.loads((folder / "classifier.json").read_text())
    assert meta["kind"] == "deep" and meta["inputs"]["modalities"] == ["CT", "PET"]
    assert meta["inputs"]["channels"] == ["CT", "PET", "mask"]
    assert meta["inputs"]["crop"]["size"] == 16 and {"torch", "monai"} <= set(meta["versions"])
    loaded = load_classifier(folder)
    # The model was trained on the CPU; the loaded one runs on "auto", a GPU where there is
    # one, whose (TF32) convolutions differ in the fourth decimal (7.7e-5 seen on an H100).
    import torch

    tolerance = 1e-3 if torch.cuda.is_available() else 1e-6
    np.testing.assert_allclose(loaded.predict_manifest(cohorts[1])["probability_1"],
                               model.predict_manifest(cohorts[1])["probability_1"],
                               atol=tolerance)


def test_deep_classifier_names_a_missing_modality(deep_model):
    model, _ = deep_model
    ct, pet, mask = lesion_case(False, np.random.default_rng(5))
    with pytest.raises(FeatureSetError, match="PET"):
        model.predict_images({"CT": ct}, mask)
    probabilities = model.predict_images({"ct": ct, "pet": pet}, mask)
    assert probabilities.shape == (2,) and probabilities.sum() == pytest.approx(1.0)
    # swapped inputs are refused, not classified on the wrong scale
    with pytest.raises(UnitsError,
                       match="the image given as CT: values .* do not look like CT in HU"):
        model.predict_images({"CT": pet, "PET": ct}, mask)


def test_deep_training_can_be_cancelled():
    crops = np.random.default_rng(0).normal(size=(6, 2, 16, 16, 16)).astype(np.float32)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(OperationCancelled):
        CropClassifier(epochs=2, device="cpu").fit(crops, [0, 1] * 3, cancel=cancel)


def test_cli_trains_and_applies_a_deep_classifier(cohorts, tmp_path, capsys):
    model = tmp_path / "DEEP"
    status = main(["-q", "train-classifier", "--kind", "deep", "--manifest", str(cohorts[0]),
                   "--label-column", "Outcome", "--modalities", "CT,PET", "--mask-column",
                   "mask", "--epochs", "2", "--crop-size", "16", "--device", "cpu",
                   "--cv", "2", "--output", str(model)])
    assert status == 0, capsys.readouterr().err
    figures = json.loads((model / "cv_metrics.json").read_text())
    assert figures["folds"] == 2 and figures["n_cases"] == 16
    assert figures["validation"].startswith("repeated stratified cross-validation")
    status = main(["-q", "classify", "--model", str(model), "--manifest", str(cohorts[1]),
                   "--output", str(tmp_path / "pred.csv")])
    assert status == 0
    assert len(pd.read_csv(tmp_path / "pred.csv")) == 12
