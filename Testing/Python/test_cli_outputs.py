"""What the ``mma`` command refuses to write, before it does any work: inputs reached
through a manifest, a model folder or a scanned case folder, tables under image names, and
places it cannot write into."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import make_image

from MultiModalAnalysisLib.cli import main


def _cohort(folder):
    """Two cases in the STS layout and their manifest, written by ``mma manifest``."""
    rng = np.random.default_rng(3)
    for case in ("A", "B"):
        (folder / "cases" / case).mkdir(parents=True)
        ct = make_image(rng.normal(0, 200, (8, 12, 12)).astype(np.float32))
        sitk.WriteImage(ct, str(folder / "cases" / case / "CT_image.nii.gz"))
        mask = make_image(np.pad(np.ones((4, 6, 6), np.uint8), ((2, 2), (3, 3), (3, 3))))
        sitk.WriteImage(mask, str(folder / "cases" / case / "CT_mask.nii.gz"))
    assert main(["-q", "manifest", str(folder / "cases"), "--output",
                 str(folder / "cases.csv")]) == 0
    return folder / "cases.csv"


def _refused(capsys, argv, message):
    status = main(["-q", *argv])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_outputs_never_replace_inputs_reached_indirectly(tmp_path, capsys):
    manifest = _cohort(tmp_path)
    image = tmp_path / "cases" / "B" / "CT_image.nii.gz"
    before = image.read_bytes()
    # a file the manifest lists (here as a training command's output)
    _refused(capsys, ["train-classifier", "--manifest", str(manifest), "--label-column", "x",
                      "--output", str(image)], f"is also an input (listed in {manifest})")
    # an image of the case folder being scanned
    _refused(capsys, ["manifest", str(tmp_path / "cases"), "--output",
                      str(tmp_path / "cases" / "B" / "CT_image.nii.gz")], "end the name in .csv")
    # a file of the model folder a command reads
    model = tmp_path / "model"
    model.mkdir()
    (model / "cv_predictions.csv").write_text("case_id,probability\n")
    _refused(capsys, ["classify", "--model", str(model), "--manifest", str(manifest),
                      "--output", str(model / "cv_predictions.csv")], "is also an input (in ")
    assert (model / "cv_predictions.csv").read_text() == "case_id,probability\n"
    # a table under an image's name (pandas would gzip a CSV into it)
    _refused(capsys, ["features", "--manifest", str(manifest), "--modalities", "CT",
                      "--mask-column", "CT_mask", "--output", str(image)],
             "a table is written; end the name in .csv")
    assert image.read_bytes() == before


def test_data_files_hard_links_and_inputs_inside_a_model_folder_are_never_replaced(
    tmp_path, capsys
):
    manifest = _cohort(tmp_path)
    # a data file of the folder being scanned (an outcomes table), though not an image
    outcomes = tmp_path / "cases" / "outcomes.csv"
    outcomes.write_text("PatientID,LungMets\nA,0\nB,1\n")
    _refused(capsys, ["manifest", str(tmp_path / "cases"), "--output", str(outcomes)],
             "is also an input (in ")
    assert outcomes.read_text() == "PatientID,LungMets\nA,0\nB,1\n"
    outcomes.write_text("case_id,LungMets\nA,0\nB,1\n")  # headed like a manifest, no paths
    _refused(capsys, ["manifest", str(tmp_path / "cases"), "--output", str(outcomes)],
             "is also an input (in ")
    # ... while a manifest written there before is replaced, as any output is
    assert main(["-q", "manifest", str(tmp_path / "cases"), "--output",
                 str(tmp_path / "cases" / "cases.csv")]) == 0
    assert main(["-q", "manifest", str(tmp_path / "cases"), "--output",
                 str(tmp_path / "cases" / "cases.csv")]) == 0
    # a hard link to an input is the input under another name
    image = tmp_path / "cases" / "A" / "CT_image.nii.gz"
    before = image.read_bytes()
    (tmp_path / "link.nii.gz").hardlink_to(image)
    _refused(capsys, ["preprocess", str(image), "--modality", "CT", "--output",
                      str(tmp_path / "link.nii.gz")], "is also an input (the same file as ")
    assert image.read_bytes() == before
    # an input inside the model folder a training command writes (its files are replaced)
    model = tmp_path / "model"
    model.mkdir()
    table = model / "table.csv"
    table.write_bytes(manifest.read_bytes())
    _refused(capsys, ["train-classifier", "--manifest", str(table), "--label-column", "x",
                      "--output", str(model)], "the model folder holds an input")
    assert table.read_bytes() == manifest.read_bytes()


def test_a_model_output_that_is_a_file_or_reads_like_one_is_refused_before_training(
    tmp_path, capsys
):
    manifest = _cohort(tmp_path)
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me")
    for command in ("train-segmentation", "train-classifier"):
        settings = (["--modalities", "CT", "--label-column", "CT_mask"]
                    if command == "train-segmentation" else ["--label-column", "x"])
        _refused(capsys, [command, "--manifest", str(manifest), *settings, "--output",
                          str(taken)], "is a file: the model is written as a folder")
        _refused(capsys, [command, "--manifest", str(manifest), *settings, "--output",
                          str(tmp_path / "model.nii.gz")], "reads like an image or table file")
    assert taken.read_text() == "keep me"
    assert not (tmp_path / "model.nii.gz").exists()


def test_an_output_where_nothing_can_be_written_is_refused_before_the_work(tmp_path, capsys):
    manifest = _cohort(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _refused(capsys, ["features", "--manifest", str(manifest), "--modalities", "CT",
                      "--mask-column", "CT_mask", "--output", str(blocker / "f.csv")],
             "is a file, not a folder")


def test_preprocess_reads_its_reference_before_the_presets_work(tmp_path, capsys,
                                                                monkeypatch):
    # (a missing or distant --reference was said after N4 had run: 8 s on a small MR)
    from MultiModalAnalysisLib import preprocess

    ramp = np.arange(512, dtype=np.float32).reshape(8, 8, 8)
    image = tmp_path / "mr.nii.gz"
    sitk.WriteImage(make_image(ramp), str(image))
    far = make_image(ramp)
    far.SetOrigin((500.0, 0.0, 0.0))
    sitk.WriteImage(far, str(tmp_path / "far.nii.gz"))
    monkeypatch.setattr(preprocess, "apply_modality_preset",
                        lambda *a, **k: pytest.fail("the preset ran first"))
    for reference, message in ((tmp_path / "nothere.nii.gz", "nothere.nii.gz"),
                               (tmp_path / "far.nii.gz", "do not overlap")):
        _refused(capsys, ["preprocess", str(image), "--modality", "MR_T1", "--reference",
                          str(reference), "--output", str(tmp_path / "o.nii.gz")], message)
