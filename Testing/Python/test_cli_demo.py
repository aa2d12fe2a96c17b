"""The ``mma`` command line and the end-to-end demo on the bundled patient."""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk

from MultiModalAnalysisLib.cli import main
from MultiModalAnalysisLib.demo import DEMO_STEPS, run_demo


def run_mma(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "MultiModalAnalysisLib", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def test_mma_demo_runs_end_to_end_and_writes_its_outputs(tmp_path):
    out = tmp_path / "demo"
    result = run_mma("demo", "--output-dir", str(out))

    assert result.returncode == 0, result.stderr
    assert "[preprocess]" in result.stdout and "montage" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report["timings_s"]) == {step.name for step in DEMO_STEPS}
    for modality in ("CT", "PET", "MR_T1"):
        volume = sitk.ReadImage(str(out / f"{modality}_preprocessed_on_CT.nii.gz"))
        assert volume.GetSize() == (161, 143, 48)  # every modality on the CT grid
    mr = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "MR_T1_preprocessed_on_CT.nii.gz")))
    assert np.isfinite(mr).all()
    features = (out / "features.csv").read_text().splitlines()
    assert len(features) == 2 and "PET_stat_max" in features[0]  # one row: the tumour
    assert 1.0 < report["facts"]["features"]["SUVmax"] < 100.0
    montage = matplotlib.image.imread(out / "montage.png")
    assert montage.shape[0] > 800 and montage.shape[1] > 800
    assert montage[..., :3].std() > 0.1  # not a blank picture
    # every file written is listed, the registration's too
    for key in ("registration_warped", "registration_metrics", "registration_transform",
                "registration_qc"):
        path = report["outputs"][key]  # (relative to the report's folder)
        assert path.startswith("registration/") and (out / path).is_file()
        assert key in result.stdout
    assert ".partial" not in result.stdout and not (out / ".partial-demo").exists()
    # STS_002 is one of the shipped model's training patients, and the demo says so
    assert "was in its training set" in result.stdout
    assert "training-set figure" in report["facts"]["segmentation"]["note"]


def test_demo_checks_its_case_and_output_folder_before_any_work(tmp_path):
    from MultiModalAnalysisLib.errors import MMAError

    with pytest.raises(MMAError):
        run_demo(tmp_path / "out", tmp_path / "no_such_case", log=None)
    assert not (tmp_path / "out").exists()  # nothing made for a case that is not there
    blocker = tmp_path / "file"
    blocker.write_text("")
    steps = []
    with pytest.raises(MMAError, match="the demo cannot write into"):
        run_demo(blocker / "out", log=None, progress=lambda f, m: steps.append(m))
    assert not steps  # refused before the first step


def test_demo_can_be_cancelled_between_steps(tmp_path):
    import threading

    from MultiModalAnalysisLib.errors import OperationCancelled

    cancel = threading.Event()

    def cancel_at_first_report(fraction: float, message: str) -> None:
        cancel.set()

    with pytest.raises(OperationCancelled):
        run_demo(tmp_path, progress=cancel_at_first_report, cancel=cancel, log=None)
    assert not (tmp_path / "montage.png").exists()
    # an earlier run's outputs are left whole by a run stopped half-way (it mixed them)
    (tmp_path / "report.json").write_text("an earlier run")
    cancel.clear()
    calls = []

    def cancel_after_the_registration(fraction: float, message: str) -> None:
        calls.append(message)
        if (tmp_path / ".partial-demo" / "registration" / "metrics.json").exists():
            cancel.set()

    with pytest.raises(OperationCancelled):
        run_demo(tmp_path, progress=cancel_after_the_registration, cancel=cancel, log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert (tmp_path / "report.json").read_text() == "an earlier run"


def test_cli_reports_user_errors_in_one_line_with_status_2(tmp_path, capsys):
    status = main(["-q", "preprocess", str(tmp_path / "missing.nii.gz"), "--modality", "CT",
                   "--output", str(tmp_path / "out.nii.gz")])
    err = capsys.readouterr().err
    assert status == 2
    assert "missing.nii.gz: no such file" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("arguments, says", [
    (["manifest", "{tmp}/no_such_folder", "--output", "{tmp}/m.csv"], "does not exist"),
    (["manifest", "{tmp}/file.txt", "--output", "{tmp}/m.csv"], "is not a folder"),
    (["manifest", "{sample}", "--outcomes", "{tmp}/none.csv", "--output", "{tmp}/m.csv"],
     "outcomes file"),
])
def test_cli_manifest_errors_are_one_line_with_status_2(tmp_path, sample_case_path, capsys,
                                                         arguments, says):
    (tmp_path / "file.txt").write_text("x", encoding="utf-8")
    filled = [a.format(tmp=tmp_path, sample=sample_case_path.parent) for a in arguments]
    status = main(["-q", *filled])
    err = capsys.readouterr().err
    assert status == 2 and says in err and "Traceback" not in err
    assert not (tmp_path / "m.csv").exists()


@pytest.mark.parametrize("arguments, says", [
    (["segment", "{img}", "--method", "threshold", "--output", "{img}"], "is also an input"),
    (["preprocess", "{img}", "--modality", "PET", "--output", "{img}"], "is also an input"),
    (["fuse", "{ref}", "{img}", "--method", "maximum", "--output", "{img}"], "is also an input"),
    (["segment", "{img}", "--method", "threshold", "--output", "{tmp}/s.nii.gz",
      "--probabilities", "{tmp}/s.nii.gz"], "name the same file"),
    (["register", "{ref}", "{tmp}/warped.nii.gz", "--transform", "rigid",
      "--output-dir", "{tmp}"], "is also an input"),
    (["segment", "{img}", "--method", "threshold", "--output", "{tmp}"], "is a folder"),
    (["segment", "={img}", "--method", "threshold", "--output", "{tmp}/s.nii.gz"],
     "write NAME=PATH"),
    (["segment", "PET=", "--method", "threshold", "--output", "{tmp}/s.nii.gz"],
     "write NAME=PATH"),
    (["segment", "{img}", "--method", "threshold", "--output", "{tmp}/s.nii.gz",
      "--probabilities", "{tmp}/p.png"], "a volume is written"),
    (["register", "{ref}", "{img}", "--transform", "rigid", "--output-dir", "{img}"],
     "is a file: give a folder"),
])
def test_outputs_never_overwrite_inputs(tmp_path, sample_case_path, capsys, arguments, says):
    image = tmp_path / "PET_image.nii.gz"
    image.write_bytes((sample_case_path / "PET_image.nii.gz").read_bytes())
    (tmp_path / "warped.nii.gz").write_bytes(image.read_bytes())
    before = image.read_bytes()
    filled = [a.format(img=image, tmp=tmp_path, ref=sample_case_path / "CT_image.nii.gz")
              for a in arguments]
    status = main(["-q", *filled])
    err = capsys.readouterr().err
    assert status == 2 and says in err and "Traceback" not in err
    assert image.read_bytes() == before
    assert (tmp_path / "warped.nii.gz").read_bytes() == before
    assert not (tmp_path / "s.nii.gz").exists()


def test_quiet_is_accepted_after_the_command_too(capsys):
    assert main(["info", "-q"]) == 0
    assert "device" in capsys.readouterr().out


def test_cli_preprocess_and_manifest(tmp_path, sample_case_path, capsys, caplog):
    status = main(["-q", "preprocess", str(sample_case_path / "MR_T1_image.nii.gz"),
                   "--modality", "MR_T1", "--reference", str(sample_case_path / "CT_image.nii.gz"),
                   "--output", str(tmp_path / "mr_on_ct.nii.gz")])
    assert status == 0
    mr = sitk.ReadImage(str(tmp_path / "mr_on_ct.nii.gz"))
    assert mr.GetSize() == (161, 143, 48)

    # a mask on another grid (the CT's) is resampled onto the image, as segment does
    status = main(["-q", "preprocess", str(sample_case_path / "MR_T1_image.nii.gz"),
                   "--modality", "MR_T1", "--mask", str(sample_case_path / "CT_mask.nii.gz"),
                   "--output", str(tmp_path / "mr_masked.nii.gz")])
    assert status == 0, capsys.readouterr().err
    assert sitk.ReadImage(str(tmp_path / "mr_masked.nii.gz")).GetSize() == (115, 90, 35)
    assert "resampling it onto the image" in caplog.text

    # What a user may not expect is said: a mask the PET preset does not use, an MR given
    # as CT, a spacing coarser than the image.
    caplog.clear()
    status = main(["-q", "preprocess", str(sample_case_path / "PET_image.nii.gz"),
                   "--modality", "PET", "--mask", str(sample_case_path / "CT_mask.nii.gz"),
                   "--output", str(tmp_path / "pet.nii.gz")])
    assert status == 0 and "--mask is used by the MR presets only" in caplog.text
    status = main(["-q", "preprocess", str(sample_case_path / "MR_T1_image.nii.gz"),
                   "--modality", "CT", "--output", str(tmp_path / "mr_as_ct.nii.gz")])
    assert status == 0 and "do not look like CT in HU" in caplog.text
    status = main(["-q", "preprocess", str(sample_case_path / "CT_image.nii.gz"),
                   "--modality", "CT", "--spacing", "1", "1", "1000",
                   "--output", str(tmp_path / "ct_1000.nii.gz")])
    assert status == 2 and "coarser than the image along axis z" in capsys.readouterr().err
    assert not (tmp_path / "ct_1000.nii.gz").exists()
    for bad in ("0", "-2", "nan"):  # a one-line error, not a traceback from the grid check
        status = main(["-q", "preprocess", str(sample_case_path / "CT_image.nii.gz"),
                       "--modality", "CT", "--spacing", "1", "1", bad,
                       "--output", str(tmp_path / "ct_bad.nii.gz")])
        err = capsys.readouterr().err
        assert status == 2 and "spacing must be positive numbers of mm" in err, err
    # an ignored mask is not read (an empty one used to fail the run it was ignored by)
    empty = sitk.Image(sitk.ReadImage(str(sample_case_path / "CT_mask.nii.gz")))
    empty = sitk.Cast(empty * 0, sitk.sitkUInt8)
    sitk.WriteImage(empty, str(tmp_path / "empty_mask.nii.gz"))
    caplog.clear()
    status = main(["-q", "preprocess", str(sample_case_path / "CT_image.nii.gz"),
                   "--modality", "CT", "--mask", str(tmp_path / "empty_mask.nii.gz"),
                   "--output", str(tmp_path / "ct_masked.nii.gz")])
    assert status == 0 and "ignored for CT" in caplog.text
    # a PET in Bq/ml is said to be far from the SUV the preset keeps
    pet = sitk.ReadImage(str(sample_case_path / "PET_image.nii.gz"), sitk.sitkFloat32) * 5000
    sitk.WriteImage(pet, str(tmp_path / "pet_bqml.nii.gz"))
    status = main(["-q", "preprocess", str(tmp_path / "pet_bqml.nii.gz"), "--modality", "PET",
                   "--output", str(tmp_path / "pet_out.nii.gz")])
    assert status == 0 and "far above SUV" in caplog.text

    status = main(["manifest", str(sample_case_path.parent), "--output",
                   str(tmp_path / "cases.csv")])
    assert status == 0
    assert "STS_002" in (tmp_path / "cases.csv").read_text()


def test_console_script_entry_point_shows_help():
    result = run_mma("--help")
    assert result.returncode == 0
    for command in ("demo", "preprocess", "manifest", "info"):
        assert command in result.stdout


def test_a_wrong_sample_data_folder_is_an_error_not_the_bundled_patient(tmp_path,
                                                                         monkeypatch):
    from MultiModalAnalysisLib.errors import MMAError
    from MultiModalAnalysisLib.sample_data import sample_case_dir

    bundled = sample_case_dir()
    monkeypatch.setenv("MMA_SAMPLE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(MMAError, match="MMA_SAMPLE_DATA is .*nowhere, which holds no CT"):
        sample_case_dir()
    monkeypatch.setenv("MMA_SAMPLE_DATA", str(bundled))
    assert sample_case_dir() == bundled
