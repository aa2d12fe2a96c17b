"""``mma features``: one case, a cohort manifest, settings files and user errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from synthetic import make_image

from MultiModalAnalysisLib.cli import main

PHANTOM = Path(__file__).resolve().parents[1] / "Data" / "ibsi_digital_phantom"


def test_features_of_one_case_make_one_row_named_by_image_and_ibsi_tag(tmp_path):
    out = tmp_path / "features.csv"
    status = main(["-q", "features", "--image", f"phantom={PHANTOM / 'phantom.nii.gz'}",
                   "--mask", str(PHANTOM / "mask.nii.gz"), "--output", str(out)])
    assert status == 0
    table = pd.read_csv(out)
    assert len(table) == 1 and table["case_id"][0] == "ibsi_digital_phantom"
    assert table["phantom_morph_vol_approx"][0] == 592.0  # 74 voxels of 8 mm^3
    assert table["phantom_stat_max"][0] == 6.0
    assert "phantom_cm_joint_max_3D_comb" in table.columns


def test_list_features_prints_exactly_the_tags_an_extraction_makes(tmp_path, capsys):
    out = tmp_path / "features.csv"
    assert main(["-q", "features", "--image", f"phantom={PHANTOM / 'phantom.nii.gz'}",
                 "--mask", str(PHANTOM / "mask.nii.gz"), "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["-q", "features", "--list-features"]) == 0
    listed = capsys.readouterr().out.split()
    computed = [c.removeprefix("phantom_") for c in pd.read_csv(out).columns[1:]]
    assert listed == computed and len(listed) > 400
    # with settings: only the families, aggregation levels and patterns asked for
    settings = tmp_path / "settings.yaml"
    settings.write_text("families: [cm, stat]\ntexture_aggregation: [3D]\n"
                        "features: ['cm_*', 'stat_mean']\nresegmentation_range: [-1000, -900]\n")
    assert main(["-q", "features", "--list-features", "--settings", str(settings)]) == 0
    listed = capsys.readouterr().out.split()
    assert listed[0] == "stat_mean" and len(listed) == 1 + 25 * 2  # 3D_avg, 3D_comb
    assert all(t.startswith("cm_") and "_3D_" in t for t in listed[1:])


def test_label_picks_one_region_of_a_multi_label_mask(tmp_path, capsys):
    mask = sitk.ReadImage(str(PHANTOM / "mask.nii.gz"))
    inside = sitk.GetArrayFromImage(mask) > 0
    labels = np.where(inside, 2, 0).astype(np.uint8)
    labels[tuple(np.argwhere(~inside)[0])] = 5  # a second region beside the phantom's
    multi = sitk.GetImageFromArray(labels)
    multi.CopyInformation(mask)
    sitk.WriteImage(multi, str(tmp_path / "labels.nii.gz"))
    base = ["-q", "features", "--image", f"phantom={PHANTOM / 'phantom.nii.gz'}", "--mask",
            str(tmp_path / "labels.nii.gz")]
    assert main([*base, "--output", str(tmp_path / "refused.csv")]) == 2
    assert "--label N" in capsys.readouterr().err
    assert main([*base, "--label", "3", "--output", str(tmp_path / "none.csv")]) == 2
    assert "no voxel of label 3 (labels present: [2, 5])" in capsys.readouterr().err
    assert main([*base, "--label", "2", "--output", str(tmp_path / "two.csv")]) == 0
    table = pd.read_csv(tmp_path / "two.csv")
    assert table["phantom_morph_vol_approx"][0] == 592.0  # the phantom's own 74 voxels
    assert table["phantom_stat_max"][0] == 6.0


def test_a_modality_named_on_the_command_line_gives_the_manifests_column_names(tmp_path):
    image = tmp_path / "t1.nii.gz"
    image.write_bytes((PHANTOM / "phantom.nii.gz").read_bytes())
    mask = PHANTOM / "mask.nii.gz"
    assert main(["-q", "features", "--image", f"t1={image}", "--mask", str(mask),
                 "--settings", str(_stat_only(tmp_path)), "--output",
                 str(tmp_path / "one.csv")]) == 0
    pd.DataFrame({"case_id": ["p1"], "t1": [str(image)], "mask": [str(mask)]}).to_csv(
        tmp_path / "cases.csv", index=False)
    assert main(["-q", "features", "--manifest", str(tmp_path / "cases.csv"), "--modalities",
                 "t1", "--mask-column", "mask", "--settings", str(_stat_only(tmp_path)),
                 "--output", str(tmp_path / "many.csv")]) == 0
    one, many = pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "many.csv")
    assert "MR_T1_stat_max" in one.columns  # not t1_stat_max
    assert [c for c in one.columns if c != "case_id"] == [
        c for c in many.columns if c != "case_id"]


def _stat_only(folder: Path) -> Path:
    settings = folder / "stat.json"
    settings.write_text(json.dumps({"families": ["stat"]}))
    return settings


def test_features_name_a_bare_image_path_from_its_file_name(tmp_path):
    image = tmp_path / "PET_image.nii.gz"
    image.write_bytes((PHANTOM / "phantom.nii.gz").read_bytes())
    out = tmp_path / "features.csv"
    status = main(["-q", "features", "--image", str(image), "--mask",
                   str(PHANTOM / "mask.nii.gz"), "--output", str(out)])
    assert status == 0
    table = pd.read_csv(out)
    assert table["PET_stat_max"][0] == 6.0
    assert not any(c.startswith("phantom_") for c in table.columns)


def write_case(folder: Path, rng, shift: float) -> None:
    folder.mkdir(parents=True)
    array = rng.normal(100 + shift, 20, (12, 14, 14)).astype(np.float32)
    mask = np.zeros(array.shape, np.uint8)
    mask[3:9, 4:10, 4:10] = 1
    sitk.WriteImage(make_image(array), str(folder / "CT_image.nii.gz"))
    sitk.WriteImage(make_image(array * 0.01), str(folder / "PET_image.nii.gz"))
    sitk.WriteImage(make_image(mask), str(folder / "CT_mask.nii.gz"))


def test_features_over_a_manifest_write_one_row_per_case_with_settings(tmp_path, rng, capsys):
    for number, shift in enumerate((0.0, 50.0)):
        write_case(tmp_path / f"case_{number}", rng, shift)
    manifest = tmp_path / "cases.csv"
    assert main(["manifest", str(tmp_path), "--output", str(manifest)]) == 0
    # outcomes and clinical columns ride along with the features (not as features)
    pd.read_csv(manifest).assign(LungMets=[0, 1], Site=["arm", "thigh"]).to_csv(
        manifest, index=False)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"families": ["stat", "szm"], "texture_aggregation": "3D"}))
    out = tmp_path / "features.csv"
    status = main(["-q", "features", "--manifest", str(manifest), "--mask-column", "CT_mask",
                   "--modalities", "CT,PET", "--settings", str(settings), "--output", str(out)])
    assert status == 0
    table = pd.read_csv(out)
    assert table["case_id"].tolist() == ["case_0", "case_1"]
    assert list(table.columns[1:3]) == ["LungMets", "Site"]
    assert f"2 case(s), {table.shape[1] - 3} features each" in capsys.readouterr().out
    assert table["LungMets"].tolist() == [0, 1] and "CT_mask" not in table.columns
    assert {"CT_stat_mean", "PET_stat_mean", "CT_szm_sze_3D"} <= set(table.columns)
    assert not any(c.startswith("CT_cm_") for c in table.columns)
    assert table["CT_stat_mean"][1] - table["CT_stat_mean"][0] > 40  # the shifted case


def test_an_image_whose_values_do_not_fit_its_name_is_measured_with_a_warning(
    tmp_path, caplog
):
    uptake = make_image(np.random.default_rng(0).gamma(2.0, 1.0, (8, 10, 12)).astype(
        np.float32))  # PET-like values, given as the CT
    sitk.WriteImage(uptake, str(tmp_path / "pet.nii.gz"))
    mask = make_image(np.pad(np.ones((4, 4, 4), np.uint8), 2)[:8, :10, :12])
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    with caplog.at_level("WARNING"):
        status = main(["-q", "features", "--image", f"CT={tmp_path / 'pet.nii.gz'}", "--mask",
                       str(tmp_path / "mask.nii.gz"), "--output", str(tmp_path / "f.csv")])
    assert status == 0 and "do not look like CT in HU" in caplog.text


def test_constant_images_labels_0_and_binary_settings_files_are_refused(tmp_path, capsys):
    constant = make_image(np.full((8, 10, 12), 40.0, np.float32))
    sitk.WriteImage(constant, str(tmp_path / "const.nii.gz"))
    mask = make_image(np.pad(np.ones((4, 4, 4), np.uint8), 2)[:8, :10, :12])
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    status = main(["-q", "features", "--image", f"CT={tmp_path / 'const.nii.gz'}", "--mask",
                   str(tmp_path / "mask.nii.gz"), "--output", str(tmp_path / "f.csv")])
    err = capsys.readouterr().err
    assert status == 2 and "CT is constant (every voxel is 40)" in err
    status = main(["-q", "preprocess", str(tmp_path / "const.nii.gz"), "--modality", "CT",
                   "--output", str(tmp_path / "p.nii.gz")])
    assert status == 2 and "is constant" in capsys.readouterr().err
    case = tmp_path / "cohort" / "P1"  # the same through a manifest
    case.mkdir(parents=True)
    sitk.WriteImage(constant, str(case / "CT_image.nii.gz"))
    sitk.WriteImage(mask, str(case / "CT_mask.nii.gz"))
    assert main(["-q", "manifest", str(tmp_path / "cohort"), "--output",
                 str(tmp_path / "m.csv")]) == 0
    status = main(["-q", "features", "--manifest", str(tmp_path / "m.csv"), "--mask-column",
                   "CT_mask", "--modalities", "CT", "--output", str(tmp_path / "f.csv")])
    assert status == 2 and "case P1: CT is constant" in capsys.readouterr().err
    try:
        status = main(["-q", "features", "--image", f"CT={PHANTOM / 'phantom.nii.gz'}",
                       "--mask", str(PHANTOM / "mask.nii.gz"), "--label", "0", "--output",
                       str(tmp_path / "f.csv")])
    except SystemExit as stop:
        status = stop.code
    assert status == 2 and "argument --label: a whole number >= 1" in capsys.readouterr().err
    status = main(["-q", "features", "--image", f"CT={PHANTOM / 'phantom.nii.gz'}",
                   "--mask", str(PHANTOM / "mask.nii.gz"), "--settings",
                   str(PHANTOM / "mask.nii.gz"), "--output", str(tmp_path / "f.csv")])
    err = capsys.readouterr().err
    assert status == 2 and "is not a text file" in err and "Traceback" not in err
    assert not (tmp_path / "f.csv").exists() and not (tmp_path / "p.nii.gz").exists()


def test_features_cli_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    status = main(["-q", "features", "--image", str(PHANTOM / "phantom.nii.gz"), "--mask",
                   str(PHANTOM / "mask.nii.gz"), "--output", str(tmp_path / "f.csv")])
    assert status == 2
    assert "NAME=PATH" in capsys.readouterr().err  # "phantom" names no modality
    bad = tmp_path / "settings.json"
    bad.write_text(json.dumps({"discretisation_method": "quantiles"}))
    status = main(["-q", "features", "--image", f"p={PHANTOM / 'phantom.nii.gz'}",
                   "--mask", str(PHANTOM / "mask.nii.gz"), "--settings", str(bad),
                   "--output", str(tmp_path / "f.csv")])
    err = capsys.readouterr().err
    assert status == 2 and "quantiles" in err and "Traceback" not in err
    status = main(["-q", "features", "--manifest", str(tmp_path / "none.csv"),
                   "--output", str(tmp_path / "f.csv")])
    assert status == 2
    status = main(["-q", "features", "--image", f"CT={PHANTOM / 'phantom.nii.gz'}",
                   "--image", f"CT={PHANTOM / 'phantom.nii.gz'}", "--mask",
                   str(PHANTOM / "mask.nii.gz"), "--output", str(tmp_path / "f.csv")])
    assert status == 2 and "two images are named CT" in capsys.readouterr().err
    assert not (tmp_path / "f.csv").exists()


def test_cohort_reads_ahead_in_order_and_a_missing_file_names_its_case(tmp_path, rng, caplog):
    """The next cases are read in a background thread: rows must still follow the
    manifest, each with its own case's values, and a file missing in a later case must
    stop the run with that case's error (not hang, not skip it)."""
    from MultiModalAnalysisLib.errors import MMAError
    from MultiModalAnalysisLib.features import extract_cohort_features

    shifts = [0.0, 300.0, 100.0, 400.0, 200.0, 500.0]  # > READ_AHEAD + 1 cases
    for number, shift in enumerate(shifts):
        write_case(tmp_path / f"case_{number}", rng, shift)
    manifest = tmp_path / "cases.csv"
    assert main(["manifest", str(tmp_path), "--output", str(manifest)]) == 0
    settings = {"families": ["stat"]}
    table = extract_cohort_features(manifest, ["CT"], "CT_mask", settings, device="cpu")
    assert table["case_id"].tolist() == [f"case_{n}" for n in range(len(shifts))]
    means = table["CT_stat_mean"].to_numpy()
    assert np.all(np.abs(means - (100 + np.array(shifts))) < 5)

    # a warning about one case says which (it named only "CT's grid")
    mask = sitk.ReadImage(str(tmp_path / "case_3" / "CT_mask.nii.gz"))
    coarse = sitk.Resample(mask, [max(1, n // 2) for n in mask.GetSize()], sitk.Transform(),
                           sitk.sitkNearestNeighbor, mask.GetOrigin(),
                           [2 * v for v in mask.GetSpacing()], mask.GetDirection())
    sitk.WriteImage(coarse, str(tmp_path / "case_3" / "CT_mask.nii.gz"))
    with caplog.at_level("WARNING"):
        extract_cohort_features(manifest, ["CT"], "CT_mask", settings, device="cpu")
    lines = [m for m in caplog.messages if "the mask is not on" in m]
    assert lines and all(m.startswith("case case_3: the mask is not on CT's grid")
                         for m in lines)

    # an empty mask: the message names the case
    empty = sitk.ReadImage(str(tmp_path / "case_2" / "CT_mask.nii.gz")) * 0
    sitk.WriteImage(empty, str(tmp_path / "case_2" / "CT_mask.nii.gz"))
    with pytest.raises(MMAError, match="^case case_2: .*empty"):
        extract_cohort_features(manifest, ["CT"], "CT_mask", settings, device="cpu")

    # a missing file is found before any case is measured (not at its turn, after the
    # cases before it), and the message says how to leave such cases out
    (tmp_path / "case_4" / "CT_mask.nii.gz").unlink()
    with pytest.raises(MMAError, match="1 file.* missing .*case case_4: CT_mask .*"
                       "Nothing was measured.*--skip-failed"):
        extract_cohort_features(manifest, ["CT"], "CT_mask", settings, device="cpu")
    # with on_error="skip" both bad cases are left out (case_4 failing in its turn while
    # the next cases are read ahead)
    table = extract_cohort_features(manifest, ["CT"], "CT_mask", settings, device="cpu",
                                    on_error="skip")
    assert table["case_id"].tolist() == ["case_0", "case_1", "case_3", "case_5"]
    assert set(table.attrs["failed"]) == {"case_2", "case_4"}
    out = tmp_path / "f.csv"
    status = main(["-q", "features", "--manifest", str(manifest), "--mask-column", "CT_mask",
                   "--modalities", "CT", "--skip-failed", "--output", str(out)])
    assert status == 0 and len(pd.read_csv(out)) == 4


def test_a_manifest_column_of_dicom_folders_is_an_image_column(tmp_path, monkeypatch):
    # (a CT column of DICOM series folders was taken for clinical data: train-classifier
    # kept the PET alone, and mma features copied the folder paths into its table)
    from MultiModalAnalysisLib.case import read_manifest
    from MultiModalAnalysisLib.classification.table import image_path_columns

    for case in ("A", "B"):
        (tmp_path / "data" / case / "ct_dicom").mkdir(parents=True)
    pd.DataFrame({"case_id": ["A", "B"], "CT": ["A/ct_dicom", "B/ct_dicom"],
                  "PET": ["A/pet.nii.gz", "B/pet.nii.gz"], "Outcome": ["yes", "no"],
                  "Site": ["arm", "leg"]}).to_csv(tmp_path / "data" / "m.csv", index=False)
    monkeypatch.chdir(tmp_path)  # (relative paths start at the manifest's folder)
    assert image_path_columns(read_manifest(tmp_path / "data" / "m.csv").table) == ["CT",
                                                                                     "PET"]
