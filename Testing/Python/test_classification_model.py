"""Classifier model files and the command line: train -> save -> load -> predict, the
feature-set checks, and `mma train-classifier` / `mma classify` on a feature table."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pandas as pd
import pytest
from synthetic_cohort import feature_cohort, image_cohort

from MultiModalAnalysisLib.classification import (
    CLASSIFIERS,
    SELECTIONS,
    ClassifierSettings,
    load_classifier,
    read_feature_table,
    train_classifier,
)
from MultiModalAnalysisLib.classification.labels import encode_labels
from MultiModalAnalysisLib.classification.table import FeatureTable
from MultiModalAnalysisLib.cli import CLASSIFIER_CHOICES, SELECTION_CHOICES, main
from MultiModalAnalysisLib.errors import ConfigError, FeatureSetError, ManifestError

QUICK = ClassifierSettings(cv_folds=4, cv_repeats=1, n_bootstrap=200, n_features=[3],
                           param_grid={"classify__C": [0.1, 1.0]})


@pytest.fixture(autouse=True)
def _quiet_convergence():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A classifier trained (and cross-validated) on a synthetic cohort, saved once."""
    folder = tmp_path_factory.mktemp("model") / "CLF"
    X, y = feature_cohort(n_cases=24, n_positive=8, n_informative=2, n_noise=12, effect=3.0)
    model = train_classifier(X, y, QUICK, label_column="LungMets", output=folder,
                             source="synthetic")
    return model, folder, X, y


def test_saved_classifier_predicts_exactly_as_before_saving(trained):
    model, folder, X, _ = trained
    loaded = load_classifier(folder)
    np.testing.assert_allclose(loaded.predict_proba(X), model.predict_proba(X), atol=1e-12)
    assert loaded.feature_names == list(X.columns)
    assert loaded.predict_proba(X).shape == (len(X), 2)


def test_model_folder_holds_metadata_card_and_cv_figures(trained):
    model, folder, X, y = trained
    for name in ("classifier.joblib", "classifier.json", "MODEL_CARD.md", "cv_metrics.json",
                 "cv_predictions.csv", "roc_curve.png", "confusion_matrix.png"):
        assert (folder / name).is_file(), name
    meta = json.loads((folder / "classifier.json").read_text())
    assert meta["features"]["input"] == list(X.columns)
    assert set(meta["features"]["used"]) <= set(X.columns) and len(meta["features"]["used"]) == 3
    assert meta["label"] == {"column": "LungMets", "classes": ["0", "1"], "positive": "1"}
    assert meta["training_cohort"]["n_cases"] == 24 and meta["training_cohort"]["n_positive"] == 8
    assert meta["settings"]["classifier"] == "logistic_l2"
    assert {"scikit-learn", "numpy", "python"} <= set(meta["versions"])
    assert meta["cross_validation"]["auc"] >= 0.85
    assert len(meta["model_file"]["sha256"]) == 64 and "pickle" in meta["model_file"]["caveat"]
    card = (folder / "MODEL_CARD.md").read_text()
    assert "AUC" in card and "24 cases" in card


def test_a_damaged_classifier_json_is_refused_with_a_message(trained, tmp_path):
    import shutil

    _, folder, _, _ = trained

    def damaged(edit):
        copy = tmp_path / f"CLF{len(list(tmp_path.iterdir()))}"
        shutil.copytree(folder, copy)
        meta = json.loads((copy / "classifier.json").read_text())
        edit(meta)
        (copy / "classifier.json").write_text(json.dumps(meta))
        return copy

    for edit, problem in (
        (lambda m: m.pop("label"), "'label'"),
        (lambda m: m["features"]["used"].append("ZZZ"), "'features'"),
        (lambda m: m["model"].update(threshold="high"), "'model.threshold'"),
    ):
        with pytest.raises(ConfigError, match=f"is damaged: {problem}"):
            load_classifier(damaged(edit))
    with pytest.raises(ConfigError, match="not those the model was fitted on"):
        load_classifier(damaged(lambda m: m["features"]["input"].reverse()))


def test_retraining_into_a_model_folder_without_cv_removes_the_old_cv_figures(trained, tmp_path):
    import shutil

    _, folder, X, y = trained
    again = tmp_path / "CLF"
    shutil.copytree(folder, again)
    train_classifier(X, y, QUICK, label_column="LungMets", output=again, source="synthetic",
                     evaluate=False)
    assert json.loads((again / "classifier.json").read_text())["cross_validation"] is None
    for name in ("cv_metrics.json", "cv_predictions.csv", "roc_curve.png",
                 "confusion_matrix.png"):
        assert not (again / name).exists(), name
    assert (folder / "cv_metrics.json").is_file()  # (the original is untouched)


def test_a_save_stopped_half_way_leaves_the_model_that_was_there_whole(trained, tmp_path,
                                                                        monkeypatch):
    # (Ctrl-C while the CV figures were drawn left new weights beside the old metadata:
    # the checksum failed and the model that was there no longer loaded)
    import shutil

    from MultiModalAnalysisLib.classification import figures

    model, folder, X, y = trained
    again = tmp_path / "CLF"
    shutil.copytree(folder, again)
    before = {p.name: p.read_bytes() for p in again.iterdir()}
    retrained = train_classifier(X.iloc[:, ::-1], y, QUICK, label_column="LungMets",
                                 source="synthetic")  # another model, its own CV

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(figures, "plot_roc_curves", interrupted)
    with pytest.raises(KeyboardInterrupt):
        retrained.save(again)
    assert {p.name: p.read_bytes() for p in again.iterdir()} == before
    np.testing.assert_allclose(load_classifier(again).predict_proba(X),
                               model.predict_proba(X), atol=1e-12)
    monkeypatch.undo()
    retrained.save(again)  # and a whole save writes every file
    assert {p.name for p in again.iterdir()} == set(before)
    assert load_classifier(again).feature_names == list(X.columns[::-1])


def test_missing_features_the_model_uses_are_named_in_the_error(trained):
    model, folder, X, _ = trained
    loaded = load_classifier(folder)
    used = loaded.used_features[0]
    with pytest.raises(FeatureSetError, match=used):
        loaded.predict_proba(X.drop(columns=[used]))
    with pytest.raises(FeatureSetError, match="DataFrame"):
        loaded.predict_proba(X.to_numpy())


def test_unused_missing_extra_and_reordered_columns_do_not_change_predictions(trained, caplog):
    model, _, X, _ = trained
    unused = [c for c in X.columns if c not in model.used_features]
    shuffled = X[X.columns[::-1]].drop(columns=unused[:2]).assign(Unrelated_column=1.0)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_allclose(model.predict_proba(shuffled), model.predict_proba(X))
    assert "Unrelated_column" in caplog.text


def test_non_numeric_feature_values_are_refused(trained):
    model, _, X, _ = trained
    broken = X.astype(object)
    broken.iloc[0, broken.columns.get_loc(model.used_features[0])] = "n/a"
    with pytest.raises(FeatureSetError, match="non-numeric"):
        model.predict_proba(broken)


def test_the_models_own_label_column_is_no_unknown_feature_but_other_columns_are(
    trained, tmp_path, caplog
):
    model, _, X, y = trained
    table = X.reset_index().assign(LungMets=y)  # a table with the truth, as trained on
    table.to_csv(tmp_path / "with_label.csv", index=False)
    with caplog.at_level("WARNING"):
        predictions = model.predict_manifest(tmp_path / "with_label.csv")
    assert len(predictions) == len(X)
    assert "not trained on" not in caplog.text

    table.assign(Death=1 - y).to_csv(tmp_path / "with_other.csv", index=False)
    caplog.clear()
    with caplog.at_level("WARNING"):
        model.predict_manifest(tmp_path / "with_other.csv")
    assert "1 column(s) the classifier was not trained on, ignored: Death" in caplog.text


def test_a_modified_weights_file_is_detected(trained, tmp_path):
    import shutil

    _, folder, _, _ = trained
    copy = shutil.copytree(folder, tmp_path / "copy")
    with open(copy / "classifier.joblib", "ab") as stream:
        stream.write(b"tampered")
    with pytest.raises(ConfigError, match="checksum"):
        load_classifier(copy)
    with pytest.raises(ConfigError, match="no classifier"):
        load_classifier(tmp_path / "nowhere")


def test_feature_table_leaves_out_text_columns_and_unlabelled_cases(tmp_path):
    table = pd.DataFrame({
        "case_id": ["a", "b", "c", "d"],
        "PET_stat_max": [1.0, 2.0, 3.0, 4.0],
        "CT_stat_mean": [0.1, np.nan, 0.3, 0.4],
        "comment": ["x", "y", "z", "w"],
        "OtherOutcome": [0, 1, 1, 0],
        "LungMets": [0, 1, np.nan, 1],
    })
    path = tmp_path / "features.csv"
    table.to_csv(path, index=False)
    result = read_feature_table(path, "LungMets", exclude=["OtherOutcome"])
    assert list(result.features.columns) == ["PET_stat_max", "CT_stat_mean"]
    assert result.case_ids == ["a", "b", "d"]
    assert result.excluded_cases == {"c": "no LungMets value"}
    assert result.dropped_columns["comment"] == "not numeric"
    assert np.isnan(result.features.loc["b", "CT_stat_mean"])  # imputed later, in the folds
    kept = read_feature_table(path, "LungMets", exclude=["OtherOutcome"],
                              feature_pattern="^PET_")
    assert list(kept.features.columns) == ["PET_stat_max"]
    assert kept.dropped_columns["CT_stat_mean"] == "does not match '^PET_'"
    # A pattern that keeps nothing says so (not "no numeric feature column"), and a broken
    # one is a ConfigError, not a traceback from re.
    with pytest.raises(ConfigError, match="matches none of the 3 candidate"):
        read_feature_table(path, "LungMets", exclude=["OtherOutcome"], feature_pattern="^MR_")
    with pytest.raises(ConfigError, match="not a regular expression"):
        read_feature_table(path, "LungMets", feature_pattern="glcm(")


def test_a_saved_row_number_column_is_left_out_with_a_warning_not_taken_as_a_feature(
        tmp_path, caplog):
    X, y = feature_cohort(n_cases=12, n_positive=4, n_informative=1, n_noise=2)
    table = X.assign(LungMets=y).reset_index().sort_values("LungMets", kind="stable")
    table.reset_index(drop=True).to_csv(tmp_path / "t.csv")  # pandas' default: index=True
    with caplog.at_level(logging.WARNING):
        result = read_feature_table(tmp_path / "t.csv", "LungMets")
    assert list(result.features.columns) == list(X.columns)
    assert "without a header" in result.dropped_columns["Unnamed: 0"]
    assert "left out column(s) without a header, Unnamed: 0" in caplog.text


def test_a_label_column_that_is_no_binary_outcome_is_refused_naming_the_outcome_columns(
    tmp_path, capsys
):
    X, y = feature_cohort(n_cases=12, n_positive=4, n_informative=1, n_noise=3)
    X.assign(LungMets=y).reset_index().to_csv(tmp_path / "features.csv", index=False)
    for column, why in (("case_id", "holds the case ids"),
                        ("CT_noise_0", "holds 12 distinct values"),
                        ("LungMet", "has no label column")):
        status = main(["-q", "train-classifier", "--manifest", str(tmp_path / "features.csv"),
                       "--label-column", column, "--output", str(tmp_path / "CLF"),
                       "--cv", "0"])
        err = capsys.readouterr().err
        assert status == 2, column
        assert f"'{column}'" in err and why in err and "Traceback" not in err
        assert "columns with two values here: LungMets" in err
    # case_id is never a feature: excluding it too is harmless
    status = main(["-q", "train-classifier", "--manifest", str(tmp_path / "features.csv"),
                   "--label-column", "LungMets", "--exclude", "case_id", "--output",
                   str(tmp_path / "CLF"), "--cv", "0", "--n-features", "2"])
    assert status == 0
    assert json.loads((tmp_path / "CLF" / "classifier.json").read_text())["features"][
        "input"] == list(X.columns)


def test_an_image_manifest_refuses_a_bad_label_or_excluded_column_before_reading_images(tmp_path):
    path = tmp_path / "cases.csv"  # the images do not exist: the check comes first
    pd.DataFrame({"case_id": ["a", "b"], "CT": ["a/CT.nii.gz", "b/CT.nii.gz"],
                  "mask": ["a/m.nii.gz", "b/m.nii.gz"], "LungMets": [0, 1]}).to_csv(path)
    with pytest.raises(ManifestError, match="'mask' holds image paths.*LungMets"):
        read_feature_table(path, "mask")
    with pytest.raises(ManifestError, match="'case_id' holds the case ids"):
        read_feature_table(path, "case_id")
    with pytest.raises(ManifestError, match=r"has no column\(s\) Outcome2 to exclude "
                       r"\(columns: .*case_id, CT, mask, LungMets"):
        read_feature_table(path, "LungMets", exclude=["Outcome2"])


def test_an_image_manifest_without_a_clear_mask_column_says_which_to_choose(tmp_path):
    path = tmp_path / "cases.csv"  # several masks, none named after the image modality
    pd.DataFrame({"case_id": ["a", "b"], "CT": ["a/CT.nii.gz", "b/CT.nii.gz"],
                  "GTV_mask": ["a/m.nii.gz", "b/m.nii.gz"],
                  "PET_mask": ["a/p.nii.gz", "b/p.nii.gz"], "LungMets": [0, 1]}).to_csv(path)
    with pytest.raises(ManifestError, match="one of GTV_mask, PET_mask"):
        read_feature_table(path, "LungMets")


def test_of_several_mask_columns_the_first_modalitys_is_the_default_and_said(tmp_path,
                                                                              caplog):
    from MultiModalAnalysisLib.case import read_manifest
    from MultiModalAnalysisLib.classification.table import default_mask_column

    path = tmp_path / "cases.csv"  # the columns `mma manifest` writes for the STS layout
    pd.DataFrame({"case_id": ["a", "b"], **{
        column: [f"{case}/{column}.nii.gz" for case in "ab"]
        for column in ("CT", "CT_mask", "MR_T1", "MR_T1_mask", "PET", "PET_mask")},
        "LungMets": [0, 1]}).to_csv(path, index=False)
    manifest = read_manifest(path)
    with caplog.at_level("INFO"):
        assert default_mask_column(manifest) == "CT_mask"
    assert "CT_mask" in caplog.text and "--mask-column" in caplog.text
    assert "MR_T1_mask or PET_mask" in caplog.text
    assert default_mask_column(manifest, ["PET", "CT"]) == "PET_mask"
    assert default_mask_column(manifest, ["mr-t1"]) == "MR_T1_mask"


def test_an_image_manifest_with_a_mask_per_modality_computes_features_in_the_first_ones(
    image_manifest, caplog
):
    table = pd.read_csv(image_manifest)
    table["CT_mask"] = table["mask"]
    table["PET_mask"] = table["CT"]  # not a mask at all: using it would fail
    several = image_manifest.parent / "several_masks.csv"  # paths are relative to it
    table.drop(columns="mask").to_csv(several, index=False)
    with caplog.at_level("INFO"):
        result = read_feature_table(several, "LungMets", feature_settings=FEATURE_SETTINGS,
                                    modalities=["CT"], device="cpu")
    assert result.extraction["mask_column"] == "CT_mask"
    reference = read_feature_table(image_manifest, "LungMets", modalities=["CT"],
                                   feature_settings=FEATURE_SETTINGS, device="cpu")
    pd.testing.assert_frame_equal(result.features, reference.features)
    assert "the region of interest is CT_mask" in caplog.text


@pytest.fixture(scope="module")
def image_manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("image_cohort")
    manifest = image_cohort(folder, n_cases=16, n_positive=6, seed=3, label_column="LungMets")
    table = pd.read_csv(manifest)
    table["Death"] = 1 - table["LungMets"]  # another outcome: must never become a feature
    table.to_csv(manifest, index=False)
    return manifest


FEATURE_SETTINGS = {"families": ["stat", "ih"],
                    "discretisation_method": "fixed_bin_number",
                    "discretisation_bin_number": 16}


def test_an_image_manifest_is_turned_into_features_then_classified_alike(image_manifest,
                                                                          tmp_path, caplog):
    table = read_feature_table(image_manifest, "LungMets", feature_settings=FEATURE_SETTINGS,
                               device="cpu")
    assert len(table) == 16 and table.labels.sum() == 6
    columns = list(table.features.columns)
    assert columns and all(c.startswith(("CT_", "PET_")) for c in columns)
    assert "PET_stat_max" in columns and "Death" not in columns
    # the features are the extractor's own values
    from MultiModalAnalysisLib.features import extract_features
    from MultiModalAnalysisLib.io import read_image

    folder = image_manifest.parent
    one = extract_features({"PET": read_image(folder / "case_000/PET.nii.gz")},
                           read_image(folder / "case_000/mask.nii.gz"), FEATURE_SETTINGS,
                           "cpu")
    assert table.features.loc["case_000", "PET_stat_max"] == pytest.approx(one["PET_stat_max"])

    model = train_classifier(table, settings={"classifier": "logistic_l2", "n_features": [2],
                                              "cv_folds": 3, "cv_repeats": 1},
                             evaluate=False, output=tmp_path / "CLF")
    assert model.metadata["extraction"]["modalities"] == ["CT", "PET"]
    assert model.metadata["extraction"]["mask_column"] == "mask"
    loaded = load_classifier(tmp_path / "CLF")
    predictions = loaded.predict_manifest(image_manifest)  # features computed as in training
    labels = pd.read_csv(image_manifest)["LungMets"].to_numpy()
    probability = predictions["probability_1"].to_numpy()
    # the hot PET core makes the classes separable: training-set ranking is near perfect
    assert probability[labels == 1].min() > np.median(probability[labels == 0])
    # A model trained on a bare feature table does not know how its features were made:
    # applied to images it says so, rather than silently computing them some way.
    bare = train_classifier(table.features, table.labels.to_numpy(),
                            settings={"classifier": "logistic_l2", "n_features": [2]},
                            evaluate=False)
    with caplog.at_level("WARNING"):
        bare.predict_manifest(image_manifest, feature_settings=FEATURE_SETTINGS)
    assert "trained on a feature table, which does not record" in caplog.text


def test_skip_failed_leaves_out_an_unmeasurable_case_in_training_and_names_it_in_classifying(
    image_manifest, tmp_path, capsys
):
    table = pd.read_csv(image_manifest)
    table.loc[3, "PET"] = "case_003/missing.nii.gz"
    broken = image_manifest.parent / "broken.csv"  # paths are relative to it
    table.to_csv(broken, index=False)
    settings = tmp_path / "features.json"
    settings.write_text(json.dumps(FEATURE_SETTINGS))
    command = ["-q", "train-classifier", "--manifest", str(broken), "--label-column",
               "LungMets", "--cv", "0", "--classifier", "logistic_l2", "--n-features", "2",
               "--feature-settings", str(settings), "--device", "cpu"]
    assert main([*command, "--output", str(tmp_path / "stopped")]) == 2
    assert "case_003" in capsys.readouterr().err
    assert not (tmp_path / "stopped").exists()
    assert main([*command, "--skip-failed", "--output", str(tmp_path / "CLF")]) == 0
    out = capsys.readouterr().out
    assert "15 cases" in out and "1 case(s) that could not be measured: case_003" in out
    excluded = json.loads((tmp_path / "CLF" / "classifier.json").read_text())[
        "training_cohort"]["excluded_cases"]
    assert list(excluded) == ["case_003"] and "missing.nii.gz" in excluded["case_003"]
    predictions = tmp_path / "predictions.csv"
    classify = ["-q", "classify", "--model", str(tmp_path / "CLF"), "--manifest", str(broken),
                "--output", str(predictions)]
    assert main(classify) == 2
    capsys.readouterr()
    assert main([*classify, "--skip-failed"]) == 0
    out = capsys.readouterr().out
    assert "15 cases:" in out and "1 case(s) could not be measured and have no prediction: " \
        "case_003" in out
    written = pd.read_csv(predictions, dtype={"prediction": str}).set_index("case_id")
    assert list(written.index) == table["case_id"].tolist()  # a row per case, in order
    assert "missing.nii.gz" in written.loc["case_003", "error"]
    assert np.isnan(written.loc["case_003", "probability_1"])
    assert written.drop(index="case_003")["error"].isna().all()
    assert set(written.drop(index="case_003")["prediction"]) <= {"0", "1"}


def test_cli_choices_are_the_engine_choices():
    assert CLASSIFIER_CHOICES == CLASSIFIERS and SELECTION_CHOICES == SELECTIONS


def test_cli_trains_writes_cv_figures_and_classifies_new_cases(tmp_path, capsys):
    X, y = feature_cohort(n_cases=24, n_positive=8, n_informative=2, n_noise=10, effect=3.0)
    table = X.assign(LungMets=y).reset_index()
    table.iloc[:18].to_csv(tmp_path / "train.csv", index=False)
    table.iloc[18:].to_csv(tmp_path / "new.csv", index=False)
    model = tmp_path / "CLF"
    status = main(["-q", "train-classifier", "--manifest", str(tmp_path / "train.csv"),
                   "--label-column", "LungMets", "--output", str(model), "--cv", "3",
                   "--repeats", "2", "--n-features", "2", "--classifier", "logistic_l1"])
    out = capsys.readouterr().out
    assert status == 0
    assert "AUC" in out and "sensitivity" in out
    figures = json.loads((model / "cv_metrics.json").read_text())
    assert figures["folds"] == 3 and figures["repeats"] == 2 and figures["auc"] >= 0.8

    status = main(["-q", "classify", "--model", str(model), "--manifest",
                   str(tmp_path / "new.csv"), "--output", str(tmp_path / "pred.csv")])
    out = capsys.readouterr().out
    assert status == 0
    predictions = pd.read_csv(tmp_path / "pred.csv", dtype={"case_id": str})
    assert predictions["case_id"].tolist() == table["case_id"].iloc[18:].tolist()
    assert predictions["probability_1"].between(0, 1).all()
    assert set(predictions["prediction"].astype(str)) <= {"0", "1"}
    assert "AUC against LungMets" in out  # the new table carries the label: checked
    assert "in-sample" not in out  # cases the model never saw
    # options for an image manifest are refused with a feature table, not ignored
    status = main(["-q", "classify", "--model", str(model), "--manifest",
                   str(tmp_path / "new.csv"), "--output", str(tmp_path / "pred2.csv"),
                   "--mask-column", "CT_mask", "--skip-failed"])
    err = capsys.readouterr().err
    assert status == 2 and "--skip-failed, --mask-column apply to an image manifest" in err
    # a settings file whose numbers are not numbers: one line, not a traceback
    (tmp_path / "bad.json").write_text('{"cv_folds": "five"}')
    status = main(["-q", "train-classifier", "--manifest", str(tmp_path / "train.csv"),
                   "--label-column", "LungMets", "--output", str(tmp_path / "CLF2"),
                   "--settings", str(tmp_path / "bad.json")])
    err = capsys.readouterr().err
    assert status == 2 and "cv_folds must be a number, not 'five'" in err
    assert not (tmp_path / "pred2.csv").exists() and not (tmp_path / "CLF2").exists()


def test_used_features_that_are_text_or_empty_are_named(trained, tmp_path, caplog):
    model, folder, X, _ = trained
    used = model.used_features[0]
    text = X.reset_index().astype({used: str})
    text[used] = "high"
    text.to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(FeatureSetError, match=rf"{used} \(not numeric\)"):
        model.predict_manifest(tmp_path / "text.csv")

    gaps = X.reset_index()
    gaps[used] = np.nan
    gaps.to_csv(tmp_path / "gaps.csv", index=False)
    with caplog.at_level("WARNING"):
        predictions = model.predict_manifest(tmp_path / "gaps.csv")
    assert len(predictions) == len(X)
    assert "have no value in any case" in caplog.text and used in caplog.text

    partly = X.reset_index().astype({used: object})
    partly.loc[0, used] = "?"
    partly.to_csv(tmp_path / "partly.csv", index=False)
    caplog.clear()
    with caplog.at_level("WARNING"):
        model.predict_manifest(tmp_path / "partly.csv")
    assert "non-numeric values in 1 feature column(s)" in caplog.text


def test_cli_refuses_a_table_without_the_model_features_in_one_line(trained, tmp_path, capsys):
    _, folder, X, _ = trained
    X.drop(columns=X.columns[:4]).reset_index().to_csv(tmp_path / "partial.csv", index=False)
    status = main(["-q", "classify", "--model", str(folder), "--manifest",
                   str(tmp_path / "partial.csv"), "--output", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert status == 2
    assert "lacks" in err and "Traceback" not in err


def test_demo_classify_step_reports_the_probability_and_the_out_of_fold_one(
    trained, tmp_path, monkeypatch
):
    from MultiModalAnalysisLib import demo
    from MultiModalAnalysisLib.case import Case
    from MultiModalAnalysisLib.classification import shipped
    from MultiModalAnalysisLib.progress import Progress

    _, folder, X, _ = trained
    training_case = X.index[3]
    features_csv = tmp_path / "features.csv"
    X.iloc[[3]].reset_index().to_csv(features_csv, index=False)
    state = demo.DemoState(tmp_path, tmp_path, fused=Case(training_case),
                           outputs={"features": features_csv})

    monkeypatch.setattr(shipped, "shipped_classifier_dir", lambda: None)
    assert demo._classify(state, Progress(), None).startswith("skipped")

    monkeypatch.setattr(shipped, "shipped_classifier_dir", lambda: folder)
    summary = demo._classify(state, Progress(), None)
    facts = state.facts["classification"]
    assert 0.0 <= facts["probability"] <= 1.0
    assert f"{facts['probability']:.2f}" in summary and "in-sample" in summary
    oof = pd.read_csv(folder / "cv_predictions.csv").set_index("case_id")
    assert facts["out_of_fold_probability"] == pytest.approx(
        oof.loc[training_case, "probability_mean"])


def test_cli_trains_from_an_image_manifest_and_classifies_it(image_manifest, tmp_path, capsys):
    settings = tmp_path / "features.json"
    settings.write_text(json.dumps(FEATURE_SETTINGS))
    model = tmp_path / "CLF"
    status = main(["-q", "train-classifier", "--manifest", str(image_manifest),
                   "--label-column", "LungMets", "--output", str(model), "--cv", "3",
                   "--repeats", "1", "--n-features", "2", "--classifier", "logistic_l2",
                   "--feature-settings", str(settings), "--modalities", "PET",
                   "--mask-column", "mask", "--device", "cpu"])
    out = capsys.readouterr().out
    assert status == 0 and "16 cases" in out
    assert json.loads((model / "classifier.json").read_text())["extraction"]["modalities"] == [
        "PET"]
    status = main(["-q", "classify", "--model", str(model), "--manifest", str(image_manifest),
                   "--output", str(tmp_path / "pred.csv")])
    out = capsys.readouterr().out
    assert status == 0 and "AUC against LungMets" in out
    # the training cases themselves: an in-sample figure, said to be one
    assert "(in-sample: 16 of them were training cases" in out
    assert "its cross-validated AUC is" in out
    # scores that were not calibrated are not called risks
    calibrated = json.loads((model / "classifier.json").read_text())["model"]["calibrated"]
    assert ("not calibrated" in out) == (calibrated is False)
    # CT and PET columns swapped: refused, not classified on the wrong scales
    swapped = image_manifest.parent / "swapped.csv"
    pd.read_csv(image_manifest).rename(columns={"CT": "PET", "PET": "CT"}).to_csv(
        swapped, index=False)
    status = main(["-q", "classify", "--model", str(model), "--manifest", str(swapped),
                   "--output", str(tmp_path / "swapped_pred.csv")])
    err = capsys.readouterr().err
    assert status == 2 and "swapped?" in err
    assert "the image given as PET: values -150..400 go below 0" in err
    assert len(pd.read_csv(tmp_path / "pred.csv")) == 16

    # a manifest whose ROI column has another name: classify --mask-column says which
    renamed = image_manifest.parent / "renamed_mask_column.csv"  # paths are relative to it
    pd.read_csv(image_manifest).rename(columns={"mask": "GTV_mask"}).to_csv(renamed,
                                                                            index=False)
    status = main(["-q", "classify", "--model", str(model), "--manifest", str(renamed),
                   "--output", str(tmp_path / "pred2.csv")])
    assert status == 2 and "no column 'mask'" in capsys.readouterr().err
    status = main(["-q", "classify", "--model", str(model), "--manifest", str(renamed),
                   "--mask-column", "GTV_mask", "--output", str(tmp_path / "pred2.csv")])
    assert status == 0
    assert np.allclose(pd.read_csv(tmp_path / "pred2.csv").iloc[:, 1],
                       pd.read_csv(tmp_path / "pred.csv").iloc[:, 1])


def test_classifier_settings_that_would_fail_inside_scikit_learn_are_refused_up_front():
    from MultiModalAnalysisLib.classification.estimators import build_model

    for values, message in (({"scoring": "auc"}, "unknown scoring 'auc'"),
                            ({"param_grid": [1, 2]}, "param_grid must map"),
                            ({"param_grid": {"classify__C": 1}}, "param_grid must map"),
                            ({"n_jobs": 1.5}, "n_jobs must be a whole number")):
        with pytest.raises(ConfigError, match=message):
            ClassifierSettings(**values)
    with pytest.raises(ConfigError, match="C is not a parameter of the logistic_l2 pipeline"):
        build_model(ClassifierSettings(classifier="logistic_l2", param_grid={"C": [1, 10]}))
    build_model(ClassifierSettings(classifier="logistic_l2", param_grid={"classify__C": [1]}))


def test_text_labels_name_the_classes_in_the_cross_validation_and_an_odd_pair_is_said(caplog):
    X, y = feature_cohort(n_cases=16, n_positive=6, n_informative=2, n_noise=4, effect=3.0)
    labels = np.where(y == 1, "Lung mets", "No mets")
    with caplog.at_level(logging.WARNING):
        model = train_classifier(X, labels, QUICK, label_column="Outcome",
                                 positive_label="Lung mets")
    assert "positive class is taken to be" not in caplog.text
    assert model.cv_result.class_names == ["No mets", "Lung mets"]
    assert "positive = 'Lung mets'" in model.cv_result.describe()
    with caplog.at_level(logging.WARNING):
        encode_labels(labels)  # sorted, "No mets" would be the positive class: said
    assert "the positive class is taken to be 'No mets'" in caplog.text


def test_a_case_missing_a_used_feature_is_named_and_stale_files_are_cleared(trained, tmp_path,
                                                                           caplog):
    model, _, X, _ = trained
    table = X.copy()
    table.loc[table.index[2], model.used_features[0]] = np.nan
    with caplog.at_level(logging.WARNING):
        predictions = model.predict_table(FeatureTable(table, source="new.csv"))
    assert len(predictions) == len(table)
    assert f"case {table.index[2]} has no value for 1 of the" in caplog.text
    assert caplog.text.count("has no value for") == 1
    # a model saved without cross-validation, into a folder where another model was
    folder = tmp_path / "CLF"
    folder.mkdir()
    for stale in ("network.pt", "cv_metrics.json", "roc_curve.png"):
        (folder / stale).write_text("from before")
    train_classifier(X, _labels(X, trained), QUICK, evaluate=False, output=folder)
    assert not any((folder / s).exists() for s in ("network.pt", "cv_metrics.json",
                                                   "roc_curve.png"))
    assert (folder / "classifier.joblib").is_file()


def _labels(X, trained):
    return pd.Series(trained[3], index=X.index)


def test_train_classifier_refuses_options_of_the_other_kind_and_bad_counts(tmp_path, capsys):
    X, y = feature_cohort(n_cases=12, n_positive=4, n_informative=1, n_noise=3)
    X.assign(LungMets=y).reset_index().to_csv(tmp_path / "t.csv", index=False)
    base = ["-q", "train-classifier", "--manifest", str(tmp_path / "t.csv"), "--label-column",
            "LungMets", "--output", str(tmp_path / "CLF")]
    for extra, message in (
        (["--kind", "deep", "--classifier", "svm", "--modalities", "CT"],
         "--kind deep does not use --classifier"),
        (["--epochs", "3", "--crop-size", "16"],
         "--kind radiomics does not use --epochs, --crop-size"),
        (["--cv", "1"], "--cv 1: give 2 or more folds"),
        (["--kind", "deep", "--modalities", "CT"], "holds no image paths"),
        (["--positive-label", "7"], "positive label '7' is not one of"),
        (["--selection", "none", "--n-features", "5"],
         "--selection none does not use --n-features"),
        (["--selection", "correlation", "--n-features", "5"],
         "--selection correlation does not use --n-features"),
    ):
        status = main([*base, *extra])
        err = capsys.readouterr().err
        assert status == 2 and message in err and "Traceback" not in err, err
    try:
        status = main([*base, "--kind", "deep", "--epochs", "0"])
    except SystemExit as stop:
        status = stop.code
    assert status == 2 and "argument --epochs: a whole number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "CLF").exists()


def test_labels_indexed_by_case_id_are_matched_to_the_features_whatever_their_order():
    from MultiModalAnalysisLib.classification import evaluate_cv

    X, y = feature_cohort(n_cases=24, n_positive=10, n_informative=1, n_noise=2, effect=4.0)
    labels = pd.Series(y, index=X.index).sort_values(kind="stable")  # other order
    settings = ClassifierSettings(selection="none", cv_folds=3, cv_repeats=1, n_bootstrap=100)
    assert evaluate_cv(X, labels, settings).auc > 0.9
    by_id = train_classifier(X, labels, settings, evaluate=False)
    by_row = train_classifier(X, y, settings, evaluate=False)
    np.testing.assert_allclose(by_id.predict_proba(X), by_row.predict_proba(X))
    # plain values still pair by position
    assert evaluate_cv(X, list(y), settings).auc > 0.9
    with pytest.raises(ConfigError, match=r"1 case\(s\) with features have no label: "
                       r"case_003; 1 labelled case\(s\) have no features: case_999"):
        train_classifier(X, labels.rename({"case_003": "case_999"}), settings, evaluate=False)


def test_the_card_and_the_cli_name_the_classifier_auto_chose():
    # (with --classifier auto, only classifier.json's best_params said it was an SVC)
    from MultiModalAnalysisLib.classification.model import fitted_model

    metadata = {"settings": {"classifier": "auto"}, "model": {"best_params": {
        "classify": "SVC", "classify__C": 0.1, "classify__kernel": "rbf",
        "select__n_features": 8}}}
    assert fitted_model(metadata) == "SVC (chosen by 'auto', C=0.1, kernel=rbf, 8 features)"
    metadata = {"settings": {"classifier": "logistic_l2"},
                "model": {"best_params": {"classify__C": 1.0}}}
    assert fitted_model(metadata) == "logistic_l2 (C=1.0)"
