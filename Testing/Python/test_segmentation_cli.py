"""``mma segment`` and ``mma train-segmentation``."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from segmentation_phantoms import tumour_case, write_cohort

from MultiModalAnalysisLib.cli import main
from MultiModalAnalysisLib.metrics import dice


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(11)
    case = tumour_case(rng)
    return folder, write_cohort(folder, {"case1": case}), case


def test_mma_segment_gmm_writes_labels_and_probabilities(cohort, capsys):
    folder, _, (images, mask) = cohort
    case = folder / "case1"
    status = main(["-q", "segment", f"CT={case / 'CT_image.nii.gz'}",
                   f"PET={case / 'PET_image.nii.gz'}", "--method", "gmm", "--classes", "3",
                   "--order-by", "PET", "--output", str(folder / "gmm.nii.gz"),
                   "--probabilities", str(folder / "gmm_p.nii.gz")])
    assert status == 0, capsys.readouterr().err
    labels = sitk.ReadImage(str(folder / "gmm.nii.gz"))
    assert set(np.unique(sitk.GetArrayFromImage(labels))) == {1, 2, 3}
    assert dice(sitk.Equal(labels, 3), mask) >= 0.8  # the hottest class is the tumour
    assert sitk.ReadImage(str(folder / "gmm_p.nii.gz")).GetNumberOfComponentsPerPixel() == 4
    assert "label 3 (class 3)" in capsys.readouterr().out


def test_mma_segment_threshold_names_images_from_their_file_names(cohort, capsys):
    folder, _, (images, mask) = cohort
    status = main(["-q", "segment", str(folder / "case1" / "PET_image.nii.gz"), "--method",
                   "threshold", "--output", str(folder / "pet40.nii.gz"), "--fill-holes"])
    assert status == 0, capsys.readouterr().err
    labels = sitk.ReadImage(str(folder / "pet40.nii.gz"))
    assert dice(labels, mask) > 0.5  # 40 % of SUVmax: the hot core of the tumour
    assert "PET >= 40% of its maximum" in capsys.readouterr().out


def test_mma_train_segmentation_then_segment_with_the_model(cohort, capsys):
    folder, manifest, (images, mask) = cohort
    threads = torch.get_num_threads()
    (folder / "model").mkdir()  # an existing (here empty) model folder is written into
    status = main(["-q", "train-segmentation", "--manifest", str(manifest), "--modalities",
                   "CT,PET,MR_T1", "--label-column", "mask", "--output", str(folder / "model"),
                   "--epochs", "2", "--iterations-per-epoch", "3", "--spacing", "2", "2", "3",
                   "--patch-size", "32", "32", "16", "--device", "cpu", "--threads", "1"])
    torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert status == 0
    assert "trained 2 epochs" in out and (folder / "model" / "model.pt").is_file()

    case = folder / "case1"
    # Bare paths, not in the model's order: named from their file names.
    status = main(["-q", "segment", str(case / "MR_T1_image.nii.gz"), str(case / "CT_image.nii.gz"),
                   str(case / "PET_image.nii.gz"), "--method", "model", "--model",
                   str(folder / "model"), "--output", str(folder / "seg.nii.gz"),
                   "--probabilities", str(folder / "p.nii.gz"), "--device", "cpu"])
    assert status == 0, capsys.readouterr().err
    labels = sitk.ReadImage(str(folder / "seg.nii.gz"))
    assert labels.GetSize() == images["MR_T1"].GetSize()  # the first image's grid
    assert (folder / "p_uncertainty.nii.gz").is_file()

    # Names that the file names do not tell are taken in the model's order.
    for name in ("CT", "PET", "MR_T1"):
        sitk.WriteImage(images[name], str(folder / f"scan_{name.lower()}_x.nii.gz"))
    status = main(["-q", "segment", *(str(folder / f"scan_{n}_x.nii.gz") for n in
                                      ("ct", "pet", "mr_t1")), "--method", "model", "--model",
                   str(folder / "model"), "--output", str(folder / "seg2.nii.gz"), "--no-tta"])
    assert status == 0, capsys.readouterr().err

    # Swapped inputs: the model refuses them instead of segmenting nonsense.
    status = main(["-q", "segment", f"CT={case / 'PET_image.nii.gz'}",
                   f"PET={case / 'CT_image.nii.gz'}", f"MR_T1={case / 'MR_T1_image.nii.gz'}",
                   "--method", "model", "--model", str(folder / "model"), "--output",
                   str(folder / "swapped.nii.gz")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "do not look like CT in HU" in err and "go below 0, unlike PET" in err
    assert not (folder / "swapped.nii.gz").exists()


def test_mma_segment_user_errors_are_one_line_with_status_2(cohort, capsys):
    folder, _, _ = cohort
    case = folder / "case1"
    status = main(["-q", "segment", str(case / "CT_image.nii.gz"), "--method", "model",
                   "--output", str(folder / "x.nii.gz")])
    err = capsys.readouterr().err
    assert status == 2 and "needs a model" in err and "Traceback" not in err
    status = main(["-q", "segment", str(case / "CT_image.nii.gz"), "--method", "gmm",
                   "--order-by", "PET", "--output", str(folder / "x.nii.gz")])
    err = capsys.readouterr().err
    assert status == 2 and "no image named PET" in err
    status = main(["-q", "segment", str(case / "PET_image.nii.gz"), "--method", "threshold",
                   "--threshold", "otsu", "--fraction", "0.5", "--output",
                   str(folder / "x.nii.gz")])
    err = capsys.readouterr().err
    assert status == 2 and "otsu threshold does not use fraction" in err
    # An option the method does not use is refused, not ignored.
    for method, options, unused in (
        ("gmm", ["--model", str(folder / "nowhere")], "--model"),
        ("gmm", ["--no-tta", "--device", "cpu"], "--no-tta, --device"),
        ("threshold", ["--classes", "5"], "--classes"),
        ("gmm", ["--low", "3", "--channel", "PET"], "--channel, --low"),
        ("threshold", ["--order-by", "PET"], "--order-by"),
    ):
        status = main(["-q", "segment", str(case / "PET_image.nii.gz"), "--method", method,
                       *options, "--output", str(folder / "x.nii.gz")])
        err = capsys.readouterr().err
        assert status == 2 and f"--method {method} does not use {unused}" in err, err
    # Numbers are checked as typed: NaN would give an empty label map.
    for option, value in (("--low", "nan"), ("--fraction", "1.5"), ("--min-volume", "-1")):
        try:
            status = main(["-q", "segment", str(case / "PET_image.nii.gz"), "--method",
                           "threshold", option, value, "--output", str(folder / "x.nii.gz")])
        except SystemExit as stop:
            status = stop.code
        assert status == 2 and f"argument {option}: a " in capsys.readouterr().err
    assert not (folder / "x.nii.gz").exists()


def test_mma_segment_resamples_a_mask_on_another_grid_and_says_so(cohort, capsys, caplog):
    folder, _, (images, mask) = cohort
    case = folder / "case1"
    coarse = sitk.Resample(mask, [s // 2 for s in mask.GetSize()], sitk.Transform(),
                           sitk.sitkNearestNeighbor, mask.GetOrigin(),
                           [2 * s for s in mask.GetSpacing()], mask.GetDirection())
    sitk.WriteImage(coarse, str(folder / "coarse_mask.nii.gz"))
    with caplog.at_level("WARNING"):
        status = main(["-q", "segment", str(case / "PET_image.nii.gz"), "--method",
                       "threshold", "--mask", str(folder / "coarse_mask.nii.gz"), "--output",
                       str(folder / "masked.nii.gz")])
    assert status == 0, capsys.readouterr().err
    assert "coarse_mask.nii.gz is not on the image's grid (size (20, 20, 8) vs (40, 40, 16), " \
        "spacing (4, 4, 6) vs (2, 2, 3))" in caplog.text
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "masked.nii.gz")))
    on_grid = sitk.Resample(coarse, mask, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    assert labels.any() and not labels[sitk.GetArrayFromImage(on_grid) == 0].any()


@pytest.mark.parametrize("options, message", [
    (["--patch-size", "40", "40", "20"], "each a multiple of 8"),
    (["--patch-size", "512", "512", "256"], "more than twice the largest training case"),
    (["--threads", "-1"], "--threads must be 1 or more"),
    (["--learning-rate", "-1"], "must be 0 or more"),
    (["--iterations-per-epoch", "0"], "iterations_per_epoch must be at least 1"),
    (["--validation-fraction", "1.5"], "from 0 to below 1"),
])
def test_mma_train_segmentation_refuses_bad_settings_before_training(cohort, capsys, options,
                                                                     message):
    folder, manifest, _ = cohort
    threads = torch.get_num_threads()
    status = main(["-q", "train-segmentation", "--manifest", str(manifest), "--modalities",
                   "CT,PET", "--label-column", "mask", "--output", str(folder / "bad"),
                   "--epochs", "1", "--device", "cpu", *options])
    torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err, err
    assert not (folder / "bad").exists()
