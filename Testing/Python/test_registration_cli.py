"""``mma register`` and ``mma fuse`` as the design document's contract describes them."""

from __future__ import annotations

import json
import threading

import numpy as np
import SimpleITK as sitk
from registration_phantoms import (
    inner_points,
    phantom,
    record_scoring_threads,
    registration_error,
    rigid,
)

from MultiModalAnalysisLib.cli import _modality_from_name, main
from MultiModalAnalysisLib.registration.perturb import inverse_map_points


def test_mma_register_rigid_writes_warped_transform_metrics_and_qc(tmp_path, capsys,
                                                                    monkeypatch):
    motion = rigid((6.0, -4.0, 9.0), (8.0, -6.0, 5.0))
    sitk.WriteImage(phantom("CT"), str(tmp_path / "CT_image.nii.gz"))
    sitk.WriteImage(phantom("MR", transform=motion, seed=3), str(tmp_path / "MR_T1_image.nii.gz"))
    out = tmp_path / "out"
    scored_on = record_scoring_threads(monkeypatch)

    status = main(["-q", "register", str(tmp_path / "CT_image.nii.gz"),
                   str(tmp_path / "MR_T1_image.nii.gz"), "--transform", "rigid",
                   "--output-dir", str(out), "--metric", "auto", "--device", "cpu",
                   "--threads", "1"])

    assert status == 0
    assert set(scored_on) == {threading.current_thread().name}  # --threads 1: no pool
    assert "rigid registration of MR_T1_image.nii.gz" in capsys.readouterr().out
    for name in ("warped.nii.gz", "transform.tfm", "metrics.json", "qc.png"):
        assert (out / name).is_file(), name
    transform = sitk.ReadTransform(str(out / "transform.tfm"))
    points = inner_points()
    errors = registration_error(transform, inverse_map_points(motion, points), points)
    assert np.median(errors) < 1.0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["runtime_s"] > 0
    assert metrics["metric"] == "negative Mattes mutual information"  # CT vs MR_T1 by name


def test_mma_register_deformable_reports_jacobian_and_folding(tmp_path):
    sitk.WriteImage(phantom("CT"), str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(phantom("CT", seed=5), str(tmp_path / "moving.nii.gz"))
    mask = sitk.Cast(phantom("CT", noise=0.0) > 30, sitk.sitkUInt8)
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "out"
    out.mkdir()  # holding an earlier rigid run's transform and QC figure
    for stale in ("transform.tfm", "qc.png"):
        (out / stale).write_text("an earlier run")

    status = main(["-q", "register", str(tmp_path / "fixed.nii.gz"),
                   str(tmp_path / "moving.nii.gz"), "--transform", "deformable",
                   "--output-dir", str(out), "--fixed-mask", str(tmp_path / "mask.nii.gz"),
                   "--metric", "mi", "--device", "cpu", "--no-qc", "--mask-margin", "4"])

    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"runtime_s", "jacobian_min", "jacobian_max", "folding_percent"} <= set(metrics)
    assert metrics["mask_margin_mm"] == {"fixed": 4.0}
    assert metrics["folding_percent"] < 0.1
    transform = sitk.ReadTransform(str(out / "transform.h5"))
    assert not transform.IsLinear()
    assert not (out / "qc.png").exists()  # not asked for, and the earlier one removed
    assert not (out / "transform.tfm").exists()  # only this run's transform is left


def test_mma_register_refuses_a_2d_image_in_one_line(tmp_path, capsys):
    sitk.WriteImage(phantom("CT"), str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(sitk.Image([20, 20], sitk.sitkFloat32) + 1, str(tmp_path / "slice.nii.gz"))

    status = main(["-q", "register", str(tmp_path / "fixed.nii.gz"),
                   str(tmp_path / "slice.nii.gz"), "--transform", "rigid", "--output-dir",
                   str(tmp_path / "out")])

    err = capsys.readouterr().err
    assert status == 2
    assert "2-D" in err and "Traceback" not in err


def test_images_that_start_far_apart_register_and_the_folder_holds_only_this_run(
        tmp_path, capsys):
    # The search brings a moving image placed 2 m away back; the QC's "before" panel, with
    # nothing to overlap, shows the fill instead of failing the command after the other
    # outputs were written (beside an earlier run's QC figure).
    sitk.WriteImage(phantom("CT"), str(tmp_path / "CT_image.nii.gz"))
    far = phantom("MR", seed=3)
    far.SetOrigin([value + 2000.0 for value in far.GetOrigin()])
    sitk.WriteImage(far, str(tmp_path / "MR_T1_image.nii.gz"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "qc.png").write_text("an earlier run")
    status = main(["-q", "register", str(tmp_path / "CT_image.nii.gz"),
                   str(tmp_path / "MR_T1_image.nii.gz"), "--transform", "rigid",
                   "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert status == 0
    assert ": no overlap at the start -> -" in printed  # not "None -> -0.43"
    assert (out / "qc.png").read_bytes()[:4] == b"\x89PNG"
    shift = np.array(sitk.ReadTransform(str(out / "transform.tfm")).TransformPoint(
        phantom("CT").TransformContinuousIndexToPhysicalPoint([10, 10, 10])))
    expected = np.array(far.TransformContinuousIndexToPhysicalPoint([10, 10, 10]))
    assert np.linalg.norm(shift - expected) < 1.5


def test_mma_register_options_are_checked_and_named_as_typed(tmp_path, capsys):
    sitk.WriteImage(phantom("CT"), str(tmp_path / "fixed.nii.gz"))
    base = ["-q", "register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "fixed.nii.gz"),
            "--transform", "rigid", "--output-dir", str(tmp_path / "out")]
    for option, value in (("--mask-margin", "-1"), ("--threads", "0")):
        try:
            main([*base, option, value])
        except SystemExit as stop:
            assert stop.code == 2
        assert f"argument {option}: a " in capsys.readouterr().err
    assert main([*base, "--initial-transform", str(tmp_path / "none.tfm")]) == 2
    assert "no such file" in capsys.readouterr().err
    # options of the deformable stage alone are refused elsewhere, by name, before any work
    for options, says in ((["--metric", "mind"], "--metric mind (a deformable"),
                          (["--backend", "bspline", "--metric", "mind"],
                           "--backend bspline, --metric mind (a deformable, torch-backend "
                           "metric): only the deformable stage uses these; a rigid registration "
                           "would ignore them")):
        assert main([*base, *options]) == 2
        err = capsys.readouterr().err
        assert says in err and "rigid registration would ignore" in err
    affine = [*base[:-4], "--transform", "affine", "--output-dir", str(tmp_path / "out")]
    assert main([*affine, "--backend", "torch"]) == 2
    assert "an affine registration would ignore it. Leave it out" in capsys.readouterr().err
    deformable = [*base[:-4], "--transform", "deformable", "--output-dir", str(tmp_path / "o")]
    assert main([*deformable, "--metric", "mind", "--backend", "bspline"]) == 2
    assert "torch backend only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_mma_fuse_refuses_options_its_method_would_ignore(tmp_path, capsys):
    ct, mr = phantom("CT"), phantom("MR")
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(mr, str(tmp_path / "mr.nii.gz"))
    base = ["fuse", str(tmp_path / "ct.nii.gz"), str(tmp_path / "mr.nii.gz"),
            "--output", str(tmp_path / "f.nii.gz")]
    # --weight (wavelet's) where --weights (average's) was meant: refused, not an
    # unweighted average
    assert main([*base, "--method", "average", "--square-mm", "5", "--weight", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "--method average does not use --square-mm (checkerboard), --weight (wavelet)" in err
    assert "average fusion takes --weights" in err
    assert main([*base, "--method", "maximum", "--level", "2"]) == 2
    assert "maximum fusion takes no option" in capsys.readouterr().err
    assert not (tmp_path / "f.nii.gz").exists()
    assert main([*base, "--method", "average", "--weights", "1", "3"]) == 0
    assert (tmp_path / "f.nii.gz").exists()


def test_mma_fuse_writes_a_fused_image_on_the_reference_grid(tmp_path):
    ct, mr = phantom("CT"), phantom("MR", size=(30, 28, 24), spacing=(3.0, 3.0, 3.5))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(mr, str(tmp_path / "mr.nii.gz"))

    for method, extra in (("wavelet", ["--weight", "0.25"]), ("average", ["--weights", "1", "3"]),
                          ("overlay", [])):
        output = tmp_path / f"{method}.nii.gz"
        status = main(["-q", "fuse", str(tmp_path / "ct.nii.gz"), str(tmp_path / "mr.nii.gz"),
                       "--method", method, "--output", str(output), *extra])
        assert status == 0
        fused = sitk.ReadImage(str(output))
        assert fused.GetSize() == ct.GetSize()
        assert np.allclose(fused.GetOrigin(), ct.GetOrigin())


def test_modality_is_read_from_sts_style_file_names(tmp_path):
    assert _modality_from_name(tmp_path / "PET_image.nii.gz") == "PET"
    assert _modality_from_name(tmp_path / "MR_T1_image.nii.gz") == "MR_T1"
    assert _modality_from_name(tmp_path / "scan_0001.nii.gz") is None


def test_cli_choices_are_the_engine_choices():
    from MultiModalAnalysisLib import cli
    from MultiModalAnalysisLib.fusion import FUSION_METHODS
    from MultiModalAnalysisLib.registration import BACKENDS, METRICS, TRANSFORM_TYPES

    assert cli.TRANSFORM_CHOICES == TRANSFORM_TYPES and cli.METRIC_CHOICES == METRICS
    assert cli.BACKEND_CHOICES == BACKENDS and cli.FUSION_CHOICES == FUSION_METHODS


def test_building_the_parser_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from MultiModalAnalysisLib.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def test_device_is_ignored_for_a_rigid_registration_as_the_warning_says(tmp_path, capsys,
                                                                         monkeypatch):
    # (--device cuda on a machine without a GPU: "ignored", then refused for it)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sitk.WriteImage(phantom("CT"), str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(phantom("CT", seed=5), str(tmp_path / "moving.nii.gz"))
    status = main(["-q", "register", str(tmp_path / "fixed.nii.gz"),
                   str(tmp_path / "moving.nii.gz"), "--transform", "rigid", "--device", "cuda",
                   "--output-dir", str(tmp_path / "out"), "--no-qc"])
    assert status == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "transform.tfm").is_file()
