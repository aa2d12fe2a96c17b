"""``mma batch``: the whole pipeline over a cohort manifest, a row per case, written as it
goes, resumable, with a record of its settings beside it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from synthetic_cohort import image_cohort, shifted_pet_case, train_image_classifier

from MultiModalAnalysisLib import batch
from MultiModalAnalysisLib.cli import main


@pytest.fixture
def cohort(tmp_path) -> Path:
    return image_cohort(tmp_path / "cohort", n_cases=5, n_positive=2)


@pytest.fixture
def stat_only(tmp_path) -> Path:
    path = tmp_path / "stat.json"
    path.write_text(json.dumps({"families": ["stat"]}))
    return path


def run(manifest: Path, output: Path, settings: Path, *extra: str) -> int:
    return main(["-q", "batch", "--manifest", str(manifest), "--modalities", "CT,PET",
                 "--mask-column", "mask", "--registration", "none", "--settings",
                 str(settings), "--output", str(output), *extra])


def test_batch_writes_a_row_per_case_as_mma_features_measures_it(cohort, stat_only,
                                                                 tmp_path):
    from MultiModalAnalysisLib.features import extract_cohort_features

    output = tmp_path / "rows.csv"
    assert run(cohort, output, stat_only, "--no-preprocess") == 0
    table = pd.read_csv(output, dtype={"case_id": str})
    manifest = pd.read_csv(cohort)
    assert table["case_id"].tolist() == manifest["case_id"].tolist()
    # the outcome follows case_id (the table goes to train-classifier), then the features
    assert table.columns[1] == "Outcome"
    assert table["Outcome"].tolist() == manifest["Outcome"].tolist()
    expected = extract_cohort_features(cohort, ["CT", "PET"], "mask", stat_only,
                                       device="cpu").set_index("case_id")
    measured = table.set_index("case_id")[expected.columns]
    np.testing.assert_allclose(measured.to_numpy(float), expected.to_numpy(float),
                               rtol=1e-6)
    record = json.loads(batch.record_path(output).read_text())
    assert record["description"]["settings"]["preprocess"] is False
    assert [c["status"] for c in record["cases"].values()] == ["measured"] * 5
    # with the presets, the CT values are those of the clipped, preprocessed image
    assert run(cohort, tmp_path / "pre.csv", stat_only) == 0
    assert "CT_stat_mean" in pd.read_csv(tmp_path / "pre.csv").columns


def test_an_interrupted_batch_keeps_its_rows_and_resume_measures_only_the_others(
    cohort, stat_only, tmp_path, monkeypatch, capsys
):
    reference = tmp_path / "whole.csv"
    assert run(cohort, reference, stat_only) == 0
    output = tmp_path / "rows.csv"
    measured: list[str] = []
    original = batch.run_case

    def interrupted(case, *args, **kwargs):
        if len(measured) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the third case
        measured.append(case.case_id)
        return original(case, *args, **kwargs)

    monkeypatch.setattr(batch, "run_case", interrupted)
    assert run(cohort, output, stat_only) == 130
    kept = pd.read_csv(output, dtype={"case_id": str})
    assert kept["case_id"].tolist() == measured  # nothing measured was lost

    resumed: list[str] = []

    def counting(case, *args, **kwargs):
        resumed.append(case.case_id)
        return original(case, *args, **kwargs)

    monkeypatch.setattr(batch, "run_case", counting)
    assert run(cohort, output, stat_only, "--resume") == 0
    assert "2 of 5 cases were measured before" in capsys.readouterr().out
    assert resumed == ["case_002", "case_003", "case_004"]
    pd.testing.assert_frame_equal(pd.read_csv(output), pd.read_csv(reference))
    # once everything is measured, --resume measures nothing
    resumed.clear()
    assert run(cohort, output, stat_only, "--resume") == 0
    assert resumed == []
    # the same settings under another name are the same settings
    copy = tmp_path / "copy.json"
    copy.write_bytes(stat_only.read_bytes())
    assert run(cohort, output, copy, "--resume") == 0
    assert resumed == []
    # ... but a case whose file was rewritten since is measured again
    pet = cohort.parent / "case_003" / "PET.nii.gz"
    image = sitk.ReadImage(str(pet))
    sitk.WriteImage(image * 2.0, str(pet))
    assert run(cohort, output, stat_only, "--resume") == 0
    assert resumed == ["case_003"]
    table = pd.read_csv(output).set_index("case_id")
    assert table.loc["case_003", "PET_stat_mean"] == pytest.approx(
        2 * pd.read_csv(reference).set_index("case_id").loc["case_003", "PET_stat_mean"],
        rel=1e-5)


def test_resume_refuses_rows_measured_with_other_settings_or_without_a_record(
    cohort, stat_only, tmp_path, capsys
):
    output = tmp_path / "rows.csv"
    assert run(cohort, output, stat_only) == 0
    capsys.readouterr()
    assert run(cohort, output, stat_only, "--resume", "--no-preprocess") == 2
    error = capsys.readouterr().err
    assert "settings.preprocess" in error and "True then, False now" in error
    # the same settings file, edited: other rows
    stat_only.write_text(json.dumps({"families": ["stat"], "intensity_rounding": True}))
    assert run(cohort, output, stat_only, "--resume") == 2
    assert "settings.feature_settings: the file's content changed" in capsys.readouterr().err
    batch.record_path(output).unlink()
    assert run(cohort, output, stat_only, "--resume") == 2
    assert "rows.batch.json" in capsys.readouterr().err


def test_a_models_fingerprint_follows_the_model_not_its_card(tmp_path):
    # a retrained model refuses a --resume; an edited model card or figure does not
    folder = tmp_path / "CLF"
    folder.mkdir()
    (folder / "classifier.joblib").write_bytes(b"weights")
    (folder / "MODEL_CARD.md").write_text("card")
    before = batch._fingerprint(folder)
    (folder / "MODEL_CARD.md").write_text("card, with a typo fixed")
    (folder / "roc_curve.png").write_bytes(b"figure")
    assert batch._fingerprint(folder) == before
    (folder / "classifier.joblib").write_bytes(b"weights, retrained")
    assert batch._fingerprint(folder) != before


def test_a_failing_case_stops_the_batch_or_with_skip_failed_gets_its_error(
    cohort, stat_only, tmp_path, capsys
):
    (cohort.parent / "case_002" / "PET.nii.gz").write_bytes(b"not an image")
    output = tmp_path / "rows.csv"
    assert run(cohort, output, stat_only) == 2
    error = capsys.readouterr().err
    assert "case_002" in error and "--resume" in error
    table = pd.read_csv(output, dtype={"case_id": str}, keep_default_na=False)
    assert table["case_id"].tolist() == ["case_000", "case_001", "case_002"]
    assert table["error"].tolist()[:2] == ["", ""] and "case_002" in table["error"][2]

    # an earlier batch's table is not replaced unless asked
    assert run(cohort, output, stat_only, "--skip-failed") == 2
    assert "--resume goes on with it, --overwrite starts again" in capsys.readouterr().err
    assert run(cohort, output, stat_only, "--skip-failed", "--overwrite") == 1  # (partial)
    assert "4 of 5 cases measured; 1 failed: case_002" in capsys.readouterr().out
    table = pd.read_csv(output, dtype={"case_id": str}, keep_default_na=False)
    assert len(table) == 5 and table.loc[2, "CT_stat_mean"] == ""
    assert np.isfinite(table.drop(index=2)["CT_stat_mean"].astype(float)).all()
    record = json.loads(batch.record_path(output).read_text())
    assert record["cases"]["case_002"]["status"] == "failed"


def test_batch_predictions_equal_mma_classify(cohort, tmp_path, monkeypatch):
    train_image_classifier(cohort, tmp_path / "CLF", {
        "families": ["stat"], "discretisation_method": "fixed_bin_number",
        "discretisation_bin_number": 16})
    assert main(["-q", "classify", "--model", str(tmp_path / "CLF"), "--manifest",
                 str(cohort), "--mask-column", "mask", "--output",
                 str(tmp_path / "classify.csv")]) == 0
    output = tmp_path / "rows.csv"
    # (preprocessing on: the classifier, trained from images, measures them as read)
    argv = ["-q", "batch", "--manifest", str(cohort), "--modalities", "CT,PET",
            "--mask-column", "mask", "--registration", "none", "--classifier",
            str(tmp_path / "CLF"), "--device", "cpu", "--output", str(output)]
    original, measured = batch.run_case, []

    def interrupted(case, *args, **kwargs):
        if len(measured) == 2:
            raise KeyboardInterrupt
        measured.append(case.case_id)
        return original(case, *args, **kwargs)

    monkeypatch.setattr(batch, "run_case", interrupted)
    assert main(argv) == 130
    expected = pd.read_csv(tmp_path / "classify.csv", dtype={"case_id": str})
    # (the column named as mma classify names it)
    probability = [c for c in expected.columns if c.startswith("probability")][0]
    partial = pd.read_csv(output)
    assert len(partial) == 2 and partial[probability].notna().all()  # predicted as measured
    monkeypatch.setattr(batch, "run_case", original)
    assert main([*argv, "--resume"]) == 0
    rows = pd.read_csv(output, dtype={"case_id": str})
    np.testing.assert_allclose(rows[probability], expected[probability], rtol=1e-6)
    assert rows["prediction"].tolist() == expected["prediction"].tolist()
    assert len(set(rows["prediction"])) == 2


def test_a_classifier_trained_from_images_on_their_own_grids_gets_its_features(tmp_path):
    # PET on a grid twice as coarse as the CT's, as in a PET/CT: a classifier trained from
    # images measured each on its own grid (the mask resampled onto the PET's), and so must
    # the batch, registered or not (it measured the PET resampled onto the CT grid: PET
    # energy 22x off on the STS patients, and predictions flipped).
    from MultiModalAnalysisLib.features import extract_cohort_features

    manifest = image_cohort(tmp_path / "cohort", n_cases=6, n_positive=3)
    for folder in sorted((tmp_path / "cohort").glob("case_*")):
        pet = sitk.ReadImage(str(folder / "PET.nii.gz"))
        coarse = sitk.Resample(pet, [s // 2 for s in pet.GetSize()], sitk.Transform(),
                               sitk.sitkLinear, pet.GetOrigin(),
                               [2 * s for s in pet.GetSpacing()], pet.GetDirection())
        sitk.WriteImage(coarse, str(folder / "PET.nii.gz"))
        # the lesion drawn on the PET, on its grid too
        mask = sitk.ReadImage(str(folder / "mask.nii.gz"))
        sitk.WriteImage(sitk.Resample(mask, coarse, sitk.Transform(), sitk.sitkNearestNeighbor),
                        str(folder / "PET_mask.nii.gz"))
    table = pd.read_csv(manifest)
    table["PET_mask"] = table["case_id"] + "/PET_mask.nii.gz"
    table.to_csv(manifest, index=False)
    trained_with = {"families": ["stat", "cm"], "texture_aggregation": ["3D"],
                    "discretisation_method": "fixed_bin_number",
                    "discretisation_bin_number": 16}
    train_image_classifier(manifest, tmp_path / "CLF", trained_with, n_features=3)
    assert main(["-q", "classify", "--model", str(tmp_path / "CLF"), "--manifest",
                 str(manifest), "--mask-column", "mask", "--output",
                 str(tmp_path / "classify.csv")]) == 0
    expected = pd.read_csv(tmp_path / "classify.csv", dtype={"case_id": str})
    probability = [c for c in expected.columns if c.startswith("probability")][0]
    features = extract_cohort_features(manifest, ["CT", "PET"], "mask", trained_with,
                                       device="cpu").set_index("case_id")
    output = tmp_path / "rows.csv"
    assert main(["-q", "batch", "--manifest", str(manifest), "--modalities", "CT,PET",
                 "--mask-column", "mask", "--registration", "none", "--classifier",
                 str(tmp_path / "CLF"), "--device", "cpu", "--output", str(output)]) == 0
    rows = pd.read_csv(output, dtype={"case_id": str}).set_index("case_id")
    np.testing.assert_allclose(rows[probability], expected[probability].to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(rows[features.columns].to_numpy(float),
                               features.to_numpy(float), rtol=1e-9)
    # the PET's own mask: taken onto the CT as mma classify takes it (it went through the
    # CT grid by nearest neighbour first: CT mean 57.47 against 56.48 on STS_002)
    assert main(["-q", "classify", "--model", str(tmp_path / "CLF"), "--manifest",
                 str(manifest), "--mask-column", "PET_mask", "--output",
                 str(tmp_path / "classify_pet.csv")]) == 0
    assert main(["-q", "batch", "--manifest", str(manifest), "--modalities", "CT,PET",
                 "--mask-column", "PET_mask", "--registration", "none", "--classifier",
                 str(tmp_path / "CLF"), "--device", "cpu", "--output",
                 str(tmp_path / "pet_mask.csv")]) == 0
    expected = pd.read_csv(tmp_path / "classify_pet.csv", dtype={"case_id": str})
    rows = pd.read_csv(tmp_path / "pet_mask.csv", dtype={"case_id": str})
    np.testing.assert_allclose(rows[probability], expected[probability], rtol=1e-9)
    # a deformable registration cannot map the region back onto each image exactly
    assert main(["-q", "batch", "--manifest", str(manifest), "--modalities", "CT,PET",
                 "--mask-column", "mask", "--registration", "deformable", "--classifier",
                 str(tmp_path / "CLF"), "--output", str(tmp_path / "deformable.csv")]) == 2
    assert not (tmp_path / "deformable.csv").exists()


def test_as_trained_maps_the_region_onto_a_registered_image_through_the_inverse():
    from MultiModalAnalysisLib.case import Case
    from MultiModalAnalysisLib.features import extract_features
    from MultiModalAnalysisLib.workflow import WorkflowSettings

    n = 32
    z, y, x = np.indices((n, n, n))
    rng = np.random.default_rng(0)

    def ball(cx):
        return ((x - cx) ** 2 + (y - 16) ** 2 + (z - 16) ** 2 <= 25).astype(np.uint8)

    def image(array, spacing):
        result = sitk.GetImageFromArray(array)
        result.SetSpacing(spacing)
        return result

    ct = image(rng.normal(0, 50, (n, n, n)).astype(np.float32), (2.0, 2.0, 2.0))
    pet_array = rng.gamma(2.0, 1.0, (n // 2,) * 3).astype(np.float32)
    pet = image(pet_array, (4.0, 4.0, 4.0))  # its own, coarser grid
    region = image(ball(12), (2.0, 2.0, 2.0))  # the lesion on the CT grid
    shift = sitk.TranslationTransform(3, (8.0, 0.0, 0.0))  # CT point -> PET point
    case = Case("C")
    case.images = {"CT": ct, "PET": pet}
    settings = {"families": ["stat"], "roi_interpolation_method": "nearest"}
    values = batch._as_trained(case, ["CT", "PET"], region, {"PET": shift},
                               {"feature_settings": settings},
                               WorkflowSettings(device="cpu"), None)
    # the same lesion drawn where it lies in the PET: 8 mm further along x
    on_pet = sitk.Resample(image(ball(16), (2.0, 2.0, 2.0)), pet, sitk.Transform(),
                           sitk.sitkNearestNeighbor)
    expected = extract_features({"PET": pet}, on_pet, settings, device="cpu")
    assert values["PET_stat_mean"] == pytest.approx(expected["PET_stat_mean"], rel=1e-9)
    unmoved = extract_features({"PET": pet}, region, settings, device="cpu")
    assert values["PET_stat_mean"] != pytest.approx(unmoved["PET_stat_mean"], rel=1e-3)
    assert values["CT_stat_mean"] == pytest.approx(
        extract_features({"CT": ct}, region, settings, device="cpu")["CT_stat_mean"])


def test_batch_saves_each_cases_registration_and_region(tmp_path):
    # The PET's content lies 12 mm along x from the CT's, under the same header; its
    # lesion mask is drawn on the PET and must follow the registration onto the CT grid.
    shifted_pet_case(tmp_path / "M00", {"CT": "CT", "PET": "PET", "PET_mask": "PET_mask"})
    manifest = tmp_path / "cases.csv"
    pd.DataFrame([{"case_id": "M00", "CT": "M00/CT.nii.gz", "PET": "M00/PET.nii.gz",
                   "PET_mask": "M00/PET_mask.nii.gz"}]).to_csv(manifest, index=False)
    settings = tmp_path / "stat.json"
    settings.write_text(json.dumps({"families": ["stat"]}))
    output = tmp_path / "rows.csv"
    assert main(["-q", "batch", "--manifest", str(manifest), "--modalities", "CT,PET",
                 "--mask-column", "PET_mask", "--no-preprocess", "--settings",
                 str(settings), "--save-dir", str(tmp_path / "saved"), "--device", "cpu",
                 "--output", str(output)]) == 0
    row = pd.read_csv(output).iloc[0]
    assert row["CT_stat_mean"] == pytest.approx(200.0, abs=20.0)
    assert row["PET_stat_mean"] == pytest.approx(8.0, abs=0.8)
    saved = tmp_path / "saved" / "M00"
    transform = sitk.ReadTransform(str(saved / "PET_registration" / "transform.tfm"))
    assert transform.TransformPoint((0.0, 0.0, 0.0))[0] == pytest.approx(12.0, abs=1.0)
    region = sitk.GetArrayFromImage(sitk.ReadImage(str(saved / "region.nii.gz")))
    z, y, x = np.indices(region.shape)
    lesion_on_ct = (x - 12) ** 2 + (y - 16) ** 2 + (z - 16) ** 2 <= 9
    assert (region == lesion_on_ct).mean() > 0.99  # the mask, moved onto the CT's lesion
    assert (saved / "PET_registration" / "qc.png").stat().st_size > 0
    assert sitk.ReadImage(str(saved / "PET_registration" / "warped.nii.gz")).GetSize() == (
        32, 32, 32)
    record = json.loads(batch.record_path(output).read_text())
    assert "metric_after" in record["cases"]["M00"]["registration"]["PET"]


@pytest.mark.parametrize("options, message", [
    (["--mask-column", "mask", "--segmentation", "threshold"], "not both"),
    ([], "say what to measure"),
    (["--segmentation", "threshold", "--model", "m.pt"], "goes with --segmentation model"),
    (["--mask-column", "mask", "--modalities", "CT,CT"], "CT twice"),
    (["--mask-column", "nope"], "no column 'nope'"),
    (["--segmentation", "threshold", "--modalities", "CT"], "add PET to the modalities"),
    (["--mask-column", "mask", "--output", "rows.nii.gz"], "end the name in .csv"),
])
def test_batch_refuses_what_cannot_work_before_any_case(cohort, tmp_path, capsys, options,
                                                        message):
    arguments = {"--modalities": "CT,PET", "--output": str(tmp_path / "rows.csv")}
    for flag in ("--modalities", "--output"):
        if flag in options:
            at = options.index(flag)
            arguments[flag] = options[at + 1]
            options = options[:at] + options[at + 2:]
    argv = ["batch", "--manifest", str(cohort), *[x for pair in arguments.items()
                                                   for x in pair], *options]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "rows.csv").exists()


def test_a_classifier_trained_on_a_table_is_used_with_a_warning_about_its_settings(
    cohort, stat_only, tmp_path, caplog
):
    from MultiModalAnalysisLib.classification import read_feature_table, train_classifier
    from MultiModalAnalysisLib.features import extract_cohort_features

    features = extract_cohort_features(cohort, ["CT", "PET"], "mask", stat_only,
                                       device="cpu")
    features["Outcome"] = pd.read_csv(cohort)["Outcome"].to_numpy()
    features.to_csv(tmp_path / "features.csv", index=False)
    train_classifier(read_feature_table(tmp_path / "features.csv", "Outcome"),
                     settings={"classifier": "logistic_l2", "n_features": [2],
                               "cv_folds": 2, "cv_repeats": 1},
                     evaluate=False, output=tmp_path / "CLF")
    output = tmp_path / "rows.csv"
    with caplog.at_level("WARNING"):
        assert run(cohort, output, stat_only, "--no-preprocess", "--classifier",
                   str(tmp_path / "CLF")) == 0
    assert "does not record how its features were computed" in caplog.text
    assert str(stat_only) in caplog.text
    rows = pd.read_csv(output)
    # named as mma classify names it
    assert rows["probability_1"].between(0, 1).all() and len(rows) == 5
    # settings other than those beside the classifier: said once (it was said twice)
    (tmp_path / "CLF" / "feature_settings.json").write_text(
        json.dumps({"families": ["stat", "cm"]}))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert run(cohort, tmp_path / "other.csv", stat_only, "--no-preprocess",
                   "--classifier", str(tmp_path / "CLF")) == 0
    assert caplog.text.count("differ from those the classifier's features were") == 1


def test_batch_with_the_shipped_classifiers_settings_measures_as_the_demo(tmp_path):
    from MultiModalAnalysisLib.case import load_case
    from MultiModalAnalysisLib.classification import load_classifier
    from MultiModalAnalysisLib.classification.shipped import shipped_classifier_dir
    from MultiModalAnalysisLib.demo import REFERENCE, TUMOUR_MASK, demo_feature_settings
    from MultiModalAnalysisLib.features import extract_features, load_settings
    from MultiModalAnalysisLib.pipeline import preprocess_case, resample_case_to_reference
    from MultiModalAnalysisLib.sample_data import sample_case_dir

    folder = shipped_classifier_dir()
    # the settings file beside the shipped classifier is the demo's, which trained it
    assert load_settings(folder / "feature_settings.json") == demo_feature_settings()
    case_dir = Path(sample_case_dir())
    manifest = tmp_path / "one.csv"
    pd.DataFrame([{"case_id": "STS_002", "CT": case_dir / "CT_image.nii.gz",
                   "PET": case_dir / "PET_image.nii.gz",
                   "MR_T1": case_dir / "MR_T1_image.nii.gz",
                   "CT_mask": case_dir / "CT_mask.nii.gz"}]).to_csv(manifest, index=False)
    output = tmp_path / "rows.csv"
    # (no --settings: those in the classifier's folder, which computed its features)
    assert main(["-q", "batch", "--manifest", str(manifest), "--modalities", "CT,PET,MR_T1",
                 "--mask-column", "CT_mask", "--registration", "none", "--classifier",
                 str(folder), "--device", "cpu", "--output", str(output)]) == 0
    record = json.loads(batch.record_path(output).read_text())
    assert record["description"]["settings"]["feature_settings"].endswith(
        "feature_settings.json")
    row = pd.read_csv(output).iloc[0]
    # the demo's way: presets, resampled onto the CT grid, measured in CT_mask
    on_grid = resample_case_to_reference(
        preprocess_case(load_case(case_dir, ["CT", "PET", "MR_T1"])), REFERENCE)
    demo = extract_features({m: on_grid.image(m) for m in ("CT", "PET", "MR_T1")},
                            on_grid.mask(TUMOUR_MASK), demo_feature_settings(), device="cpu")
    assert len(demo) == 645
    for name, value in demo.items():
        assert row[name] == pytest.approx(value, rel=1e-9, nan_ok=True), name
    classifier = load_classifier(folder)
    expected = classifier.predict_proba(pd.DataFrame([demo])[classifier.feature_names])[0, 1]
    assert row["probability_1"] == pytest.approx(expected, rel=1e-9)


def test_save_dir_never_holds_the_data_and_case_ids_keep_their_own_folders(cohort, stat_only,
                                                                           tmp_path, capsys):
    before = (cohort.parent / "case_000" / "mask.nii.gz").read_bytes()
    assert run(cohort, tmp_path / "rows.csv", stat_only, "--save-dir",
               str(cohort.parent)) == 2
    assert "holds files the manifest reads" in capsys.readouterr().err
    assert (cohort.parent / "case_000" / "mask.nii.gz").read_bytes() == before
    assert run(cohort, tmp_path / "rows.csv", stat_only, "--save-dir",
               str(tmp_path / "rows.csv")) == 2
    assert "name the same path" in capsys.readouterr().err
    # an existing file that is no batch table is not replaced unless asked
    other = tmp_path / "other.csv"
    other.write_text("case_id,x\nA,1\n")
    assert run(cohort, other, stat_only) == 2
    assert "--overwrite replaces it" in capsys.readouterr().err
    assert other.read_text() == "case_id,x\nA,1\n"
    names = {batch._safe_name(c) for c in ("A/1", "A_1", "A 1", "..", "")}
    assert len(names) == 5 and "A_1" in names
    assert all("/" not in n and not n.startswith(".") and n for n in names)


def test_what_cannot_fit_is_refused_before_any_case_is_measured(cohort, stat_only, tmp_path,
                                                                capsys, monkeypatch):
    from MultiModalAnalysisLib.classification import read_feature_table, train_classifier
    from MultiModalAnalysisLib.features import extract_cohort_features

    def never(*args, **kwargs):
        raise AssertionError("a case was measured")

    monkeypatch.setattr(batch, "run_case", never)
    # the shipped model reads MR_T1 too
    model = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "sts_gtv"
    assert main(["-q", "batch", "--manifest", str(cohort), "--modalities", "CT,PET",
                 "--segmentation", "model", "--model", str(model), "--output",
                 str(tmp_path / "a.csv")]) == 2
    assert "add MR_T1 to the batch's modalities" in capsys.readouterr().err
    # a classifier of morphology features, with stat-only settings
    settings = tmp_path / "morph.json"
    settings.write_text(json.dumps({"families": ["morph", "stat"]}))
    features = extract_cohort_features(cohort, ["CT", "PET"], "mask", settings, device="cpu")
    features = features[["case_id", "CT_morph_volume", "CT_morph_sphericity",
                         "PET_stat_mean"]]
    features["Outcome"] = pd.read_csv(cohort)["Outcome"].to_numpy()
    features.to_csv(tmp_path / "features.csv", index=False)
    train_classifier(read_feature_table(tmp_path / "features.csv", "Outcome"),
                     settings={"classifier": "logistic_l2", "cv_folds": 2, "cv_repeats": 1},
                     evaluate=False, output=tmp_path / "CLF")
    assert run(cohort, tmp_path / "b.csv", stat_only, "--classifier",
               str(tmp_path / "CLF")) == 2
    assert "would not compute" in capsys.readouterr().err
    assert not (tmp_path / "a.csv").exists() and not (tmp_path / "b.csv").exists()


def test_each_cases_warnings_and_region_are_in_the_record(cohort, stat_only, tmp_path):
    # case_001's mask shrunk to 8 voxels: measured, with a warning kept in the record
    path = cohort.parent / "case_001" / "mask.nii.gz"
    mask = sitk.ReadImage(str(path))
    array = np.zeros(sitk.GetArrayViewFromImage(mask).shape, np.uint8)
    array[10:12, 14:16, 14:16] = 1
    small = sitk.GetImageFromArray(array)
    small.CopyInformation(mask)
    sitk.WriteImage(small, str(path))
    output = tmp_path / "rows.csv"
    assert run(cohort, output, stat_only) == 0
    record = json.loads(batch.record_path(output).read_text())
    case = record["cases"]["case_001"]
    assert case["region"]["voxels"] == 8
    assert any(w.startswith("case case_001: the region measured has 8 voxel(s)")
               for w in case["warnings"])  # (named once)
    assert record["cases"]["case_000"]["region"]["voxels"] > 100
    stages = record["cases"]["case_000"]["stages"]
    assert set(stages) == {"read", "preprocess", "register", "mask", "features"}
    assert sum(stages.values()) == pytest.approx(record["cases"]["case_000"]["seconds"],
                                                 abs=0.05)
    assert record["command"].startswith("mma -q batch --manifest ")  # as typed


def test_a_mask_mostly_outside_a_modalitys_field_of_view_fails_its_case(tmp_path):
    # The PET covers only x < 32 mm of the CT; the lesion lies mostly beyond: its PET
    # features would describe the padding.
    n = 32
    z, y, x = np.indices((n, n, n))
    folder = tmp_path / "P"
    folder.mkdir()
    rng = np.random.default_rng(1)
    ct = rng.normal(40, 10, (n, n, n)).astype(np.float32)
    ct[:, :, 0] = -1000
    pet = rng.gamma(2.0, 1.0, (n, n, n // 2)).astype(np.float32)
    outside = ((x - 22) ** 2 + (y - 16) ** 2 + (z - 16) ** 2 <= 16).astype(np.uint8)
    inside = ((x - 8) ** 2 + (y - 16) ** 2 + (z - 16) ** 2 <= 16).astype(np.uint8)
    rows = []
    for case_id, mask in (("OUT", outside), ("IN", inside)):
        for name, array in (("CT", ct), ("PET", pet), ("mask", mask)):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((2.0, 2.0, 2.0))
            sitk.WriteImage(image, str(folder / f"{case_id}_{name}.nii.gz"))
        rows.append({"case_id": case_id, "CT": f"P/{case_id}_CT.nii.gz",
                     "PET": f"P/{case_id}_PET.nii.gz", "mask": f"P/{case_id}_mask.nii.gz"})
    manifest = tmp_path / "cases.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    settings = tmp_path / "stat.json"
    settings.write_text(json.dumps({"families": ["stat"]}))
    output = tmp_path / "rows.csv"
    assert run(manifest, output, settings, "--skip-failed") == 1
    table = pd.read_csv(output, keep_default_na=False).set_index("case_id")
    assert "lie outside a registered volume's field of view" in table.loc["OUT", "error"]
    assert table.loc["IN", "error"] == "" and float(table.loc["IN", "PET_stat_mean"]) > 0
