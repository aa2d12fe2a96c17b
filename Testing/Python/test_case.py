"""Loading a Case from a folder (the STS layout) and from a manifest row."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import make_image

from MultiModalAnalysisLib.case import load_case, manifest_from_folder, read_manifest
from MultiModalAnalysisLib.errors import ManifestError, MissingModalityError
from MultiModalAnalysisLib.io import write_image
from MultiModalAnalysisLib.modalities import canonical_modality, modality_family
from MultiModalAnalysisLib.pipeline import preprocess_case, resample_case_to_reference


def test_modality_names_have_one_canonical_spelling():
    assert canonical_modality("mr-t1") == "MR_T1"
    assert canonical_modality("PT") == "PET"
    assert canonical_modality("t2f") == "FLAIR"
    assert canonical_modality("T1CE") == "MR_T1C"
    assert modality_family("MR_T2") == "MR"
    assert canonical_modality("dwi") == "DWI" and modality_family("dwi") == "OTHER"


def test_sample_case_loads_three_modalities_and_masks(sample_case_path):
    case = load_case(sample_case_path)
    assert case.case_id == "STS_002"
    assert set(case.modalities) == {"CT", "PET", "MR_T1"}
    assert {"CT_mask", "PET_mask", "MR_T1_mask"} <= set(case.masks)
    assert case.image("pt").GetSize() == case.image("PET").GetSize()
    assert case.mask().GetPixelID() == sitk.sitkUInt8
    assert sitk.GetArrayViewFromImage(case.mask("CT_mask")).sum() > 1000


def test_missing_modality_names_the_case_and_what_it_has(sample_case_path):
    case = load_case(sample_case_path, ["CT"], with_masks=False)
    with pytest.raises(MissingModalityError, match=r"STS_002 has no FLAIR image \(it has: CT\)"):
        case.image("flair")
    with pytest.raises(MissingModalityError, match="has no image for MR_T2"):
        load_case(sample_case_path, ["CT", "MR_T2"])


def test_brats_style_file_names_are_recognised(tmp_path, rng):
    for suffix in ("t1n", "t1c", "t2w", "t2f"):
        image = make_image(rng.normal(size=(4, 6, 6)).astype(np.float32))
        write_image(image, tmp_path / f"BraTS-GLI-00001-000-{suffix}.nii.gz")
    case = load_case(tmp_path)
    assert set(case.modalities) == {"MR_T1", "MR_T1C", "MR_T2", "FLAIR"}


def test_case_steps_return_new_cases_and_keep_the_input(sample_case_path):
    case = load_case(sample_case_path, ["CT", "PET"])
    before = sitk.GetArrayFromImage(case.image("CT")).copy()

    on_ct = resample_case_to_reference(preprocess_case(case), "CT")

    assert on_ct is not case
    assert np.array_equal(sitk.GetArrayFromImage(case.image("CT")), before)
    assert on_ct.image("PET").GetSize() == case.image("CT").GetSize()
    assert on_ct.mask("PET_mask").GetSize() == case.image("CT").GetSize()
    # PET and CT masks of this patient coincide: on one grid they overlap almost fully.
    ct_mask = sitk.GetArrayFromImage(on_ct.mask("CT_mask")).astype(bool)
    pet_mask = sitk.GetArrayFromImage(on_ct.mask("PET_mask")).astype(bool)
    dice = 2 * (ct_mask & pet_mask).sum() / (ct_mask.sum() + pet_mask.sum())
    assert dice > 0.9


def copy_cohort(sample_case_path, root, ids):
    for case_id in ids:
        shutil.copytree(sample_case_path, root / "cohort" / case_id)
    (root / "outcomes.csv").write_text(
        "PatientID,LungMets\n" + "\n".join(f"{c},{i % 2}" for i, c in enumerate(ids))
    )


def test_manifest_from_folder_and_loading_rows_with_relative_paths(tmp_path, sample_case_path):
    copy_cohort(sample_case_path, tmp_path, ["P1", "P2"])
    table = manifest_from_folder(tmp_path / "cohort", tmp_path / "outcomes.csv",
                                 relative_to=tmp_path / "lists")
    (tmp_path / "lists").mkdir()
    table.to_csv(tmp_path / "lists" / "cases.csv", index=False)

    manifest = read_manifest(tmp_path / "lists" / "cases.csv")
    case = manifest.load_case("P2", ["CT", "mr_t1"], ["CT_mask"])

    assert table.loc[0, "CT"].startswith("../cohort/P1/")
    assert manifest.case_ids == ["P1", "P2"]
    assert set(case.modalities) == {"CT", "MR_T1"}
    assert case.metadata["LungMets"] == 1
    assert "PET" in case.metadata  # unused columns are kept as metadata
    assert case.mask("CT_mask").GetSize() == case.image("CT").GetSize()
    assert [c.case_id for c in manifest.iter_cases(["PET"])] == ["P1", "P2"]


def test_manifest_errors_name_the_file_and_the_problem(tmp_path, sample_case_path):
    bad = tmp_path / "no_id.csv"
    bad.write_text("patient,CT\nA,a.nii.gz\n")
    with pytest.raises(ManifestError, match="no 'case_id' column"):
        read_manifest(bad)

    dup = tmp_path / "dup.csv"
    dup.write_text("case_id,CT\nA,a.nii.gz\nA,b.nii.gz\n")
    with pytest.raises(ManifestError, match=r"more than once: \['A'\]"):
        read_manifest(dup)

    blank = tmp_path / "blank.csv"
    blank.write_text("case_id,CT\nA,a.nii.gz\n,b.nii.gz\n  ,c.nii.gz\n")
    with pytest.raises(ManifestError, match="no case_id on row\\(s\\) 3, 4"):
        read_manifest(blank)

    ok = tmp_path / "ok.csv"
    ok.write_text(f"case_id,CT\nA,{sample_case_path / 'CT_image.nii.gz'}\nB,\n")
    manifest = read_manifest(ok)
    with pytest.raises(ManifestError, match="no column for modality PET"):
        manifest.load_case("A", ["PET"])
    with pytest.raises(MissingModalityError, match="case B .* has no CT path"):
        manifest.load_case("B", ["CT"])
    with pytest.raises(ManifestError, match="no case 'Z'"):
        manifest.load_case("Z", ["CT"])


def test_manifest_errors_list_the_first_columns_of_a_wide_table_and_count_the_rest(tmp_path):
    # a feature table has about a thousand columns: the error must stay one readable line
    columns = ["case_id", *(f"CT_feature_{i:03d}" for i in range(500))]
    wide = tmp_path / "features.csv"
    wide.write_text(",".join(columns) + "\nA," + ",".join(["1.0"] * 500) + "\n")
    manifest = read_manifest(wide)
    for lookup in (lambda: manifest.column("CT_mask"), lambda: manifest.modality_column("PET")):
        with pytest.raises(ManifestError) as error:
            lookup()
        message = str(error.value)
        assert "CT_feature_018" in message and "CT_feature_019" not in message
        assert "... and 481 more" in message and len(message) < 600

    no_id = tmp_path / "no_id.csv"
    no_id.write_text(",".join(["patient", *columns[1:]]) + "\n")
    with pytest.raises(ManifestError, match="no 'case_id' column.*and 481 more") as error:
        read_manifest(no_id)
    assert len(str(error.value)) < 600


def test_outcomes_join_is_checked_and_keeps_integer_labels(tmp_path, sample_case_path, caplog):
    """Ids that name no case folder are an error (not an empty outcome column); a partial
    join warns and keeps 0/1 as integers; semicolons are read; hidden folders are no cases."""
    copy_cohort(sample_case_path, tmp_path, ["P1", "P2", "P3"])
    (tmp_path / "cohort" / ".cache").mkdir()
    (tmp_path / "cohort" / ".cache" / "CT_image.nii.gz").write_bytes(b"")
    cohort = tmp_path / "cohort"

    (tmp_path / "ids.csv").write_text("PatientID,LungMets\n1,0\n2,1\n")
    with pytest.raises(ManifestError, match="no case id of the outcomes file .* names a case"):
        manifest_from_folder(cohort, tmp_path / "ids.csv")

    (tmp_path / "partial.csv").write_text("PatientID;LungMets\nP1;0\nP3;1\n")
    with caplog.at_level("WARNING"):
        table = manifest_from_folder(cohort, tmp_path / "partial.csv")
    assert table["case_id"].tolist() == ["P1", "P2", "P3"]
    assert "1 of 3 cases have no row" in caplog.text and "P2" in caplog.text
    table.to_csv(tmp_path / "m.csv", index=False)
    assert (tmp_path / "m.csv").read_text().splitlines()[1].endswith(",0")  # not 0.0
    assert table["LungMets"].isna().tolist() == [False, True, False]

    # Zero-padded folder names match the ids as written; a case twice is refused.
    copy_cohort(sample_case_path, tmp_path / "padded", ["001", "002"])
    (tmp_path / "padded.csv").write_text("id,LungMets\n001,0\n002,1\n")
    table = manifest_from_folder(tmp_path / "padded" / "cohort", tmp_path / "padded.csv")
    assert table["LungMets"].tolist() == [0, 1]
    (tmp_path / "twice.csv").write_text("id,LungMets\nP1,0\nP1,1\nP2,0\n")
    with pytest.raises(ManifestError, match="more than one row for case.* P1"):
        manifest_from_folder(cohort, tmp_path / "twice.csv")


def test_two_files_for_one_manifest_column_are_refused_not_one_picked(tmp_path):
    image = make_image(np.zeros((4, 5, 6), np.float32) + np.arange(6, dtype=np.float32))
    case = tmp_path / "cohort" / "P1"
    case.mkdir(parents=True)
    write_image(image, case / "CT_image.nii.gz")
    write_image(image, case / "ct.nii.gz")  # also reads as the CT
    with pytest.raises(ManifestError, match="case P1 has two files for the column CT: "
                                            "CT_image.nii.gz and ct.nii.gz"):
        manifest_from_folder(tmp_path / "cohort")
    (case / "ct.nii.gz").unlink()
    assert manifest_from_folder(tmp_path / "cohort")["CT"].str.endswith(
        "CT_image.nii.gz").all()
