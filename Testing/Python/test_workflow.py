""""Run all" and "Run batch" of the module, on a real MRML scene with the bundled patient."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from synthetic_cohort import shifted_pet_case

from MultiModalAnalysisLib import mrml
from MultiModalAnalysisLib.case import load_case
from MultiModalAnalysisLib.errors import ConfigError, MMAError
from MultiModalAnalysisLib.jobs import StepRunner
from MultiModalAnalysisLib.sample_data import sample_case_dir
from MultiModalAnalysisLib.workflow import (
    BATCH_FILE_ATTRIBUTE,
    WorkflowSettings,
    batch_task,
    workflow_steps,
)

pytest.importorskip("slicer", reason="needs the slicer-core wheel (test extra)")


@pytest.fixture(scope="module")
def sts002():
    return load_case(sample_case_dir())


@pytest.fixture
def few_features(tmp_path) -> str:
    """Feature settings with three families, to keep the tests short."""
    path = tmp_path / "features.json"
    path.write_text(json.dumps({"families": ["stat", "morph", "cm"]}))
    return str(path)


@pytest.fixture
def inputs(mrml_scene, sts002):
    ct = mrml.volume_node_from_image(sts002.image("CT"), mrml_scene, "CT")
    pet = mrml.volume_node_from_image(sts002.image("PET"), mrml_scene, "PET")
    gtv = mrml.segmentation_node_from_labels(sts002.mask("CT_mask"), mrml_scene,
                                             names={1: "GTV"}, reference_node=ct)
    return [(ct, "CT"), (pet, "PET")], gtv


def test_run_all_preprocess_stage_replaces_each_input_by_its_preprocessed_node(inputs):
    volumes, _ = inputs
    steps, state = workflow_steps(volumes, WorkflowSettings(), stages=("preprocess",))
    assert [name for name, _ in steps] == ["preprocess CT", "preprocess PET"]

    StepRunner(steps).run_to_end()
    assert state.volumes["CT"].GetName() == "CT preprocessed"
    assert state.volumes["PET"].GetName() == "PET preprocessed"
    ct = sitk.GetArrayFromImage(mrml.image_from_volume_node(state.volumes["CT"]))
    assert ct.min() >= -1024.0


def test_run_all_lists_every_stage_in_order_and_skips_what_is_switched_off(inputs, tmp_path):
    volumes, gtv = inputs
    classifier = tmp_path / "model.joblib"
    classifier.write_bytes(b"")
    settings = WorkflowSettings(fusion_method="average", classifier=str(classifier))
    steps, _ = workflow_steps(volumes, settings, mask_node=gtv)
    assert [name for name, _ in steps] == [
        "preprocess CT", "preprocess PET", "register PET", "fuse", "segment", "features",
        "classify",
    ]
    quiet = WorkflowSettings(preprocess=False, registration_type="none", segmentation_method="")
    steps, _ = workflow_steps(volumes, quiet, mask_node=gtv)
    assert [name for name, _ in steps] == ["features"]


def test_a_prediction_refuses_tissue_classes_as_the_region_it_reads(inputs, tmp_path):
    # gmm/kmeans classes together cover the image: the features table would hold one row
    # per class and the prediction would read the first class, not a lesion.
    volumes, gtv = inputs
    classifier = tmp_path / "model.joblib"
    classifier.write_bytes(b"")
    settings = WorkflowSettings(classifier=str(classifier))  # the module's defaults: gmm
    with pytest.raises(ConfigError, match="one region per case.*tissue classes"):
        workflow_steps(volumes, settings)
    # the lesion's contour as the region, or no prediction: accepted
    for accepted in ({"mask_node": gtv}, {"stages": ("segment", "features")}):
        steps, _ = workflow_steps(volumes, settings, **accepted)
        assert steps
    threshold = WorkflowSettings(classifier=str(classifier), segmentation_method="threshold")
    assert workflow_steps(volumes, threshold)[0][-1][0] == "classify"


def test_run_all_refuses_bad_settings_before_any_work(inputs):
    volumes, _ = inputs
    with pytest.raises(ConfigError, match="registration type"):
        workflow_steps(volumes, WorkflowSettings(registration_type="bspline-ish"))
    with pytest.raises(ConfigError, match="needs a model file"):
        workflow_steps(volumes, WorkflowSettings(segmentation_method="model"))
    with pytest.raises(ConfigError, match="does not exist"):
        workflow_steps(volumes, WorkflowSettings(classifier="/no/such/model.joblib"))
    with pytest.raises(ConfigError, match="own modality"):
        workflow_steps([volumes[0], (volumes[1][0], "CT")], WorkflowSettings())
    with pytest.raises(MMAError, match="reference volume"):
        workflow_steps([(None, "CT")], WorkflowSettings())


def test_volumes_of_modality_other_are_named_by_their_node(inputs):
    volumes, _ = inputs
    ct, pet = volumes[0][0], volumes[1][0]
    pet.SetName("DWI b1000")
    ct_copy = mrml.volume_node_from_image(mrml.image_from_volume_node(ct), ct.GetScene(), "x")
    ct_copy.SetName("CT")  # a name that is another volume's modality: told apart
    _, state = workflow_steps([(ct, "CT"), (pet, "other"), (ct_copy, "other")],
                              WorkflowSettings(), stages=("preprocess",))
    assert list(state.volumes) == ["CT", "DWI_B1000", "CT_2"]


def test_registration_by_landmarks_uses_each_volumes_point_list_and_needs_all_of_them(
        inputs, tmp_path):
    volumes, _ = inputs
    scene = volumes[0][0].GetScene()
    points = np.array([[-30.0, 10.0, 5.0], [25.0, -5.0, 0.0], [0.0, 30.0, -10.0],
                       [5.0, 5.0, 25.0]])
    shift = np.array([4.0, -2.0, 3.0])  # the PET shown 4 / -2 / 3 mm away from the CT
    on_ct = mrml.markups_from_points(points, scene, "on CT")
    on_pet = mrml.markups_from_points(points + shift, scene, "on PET")
    settings = WorkflowSettings(preprocess=False, registration_type="landmarks",
                                segmentation_method="")

    with pytest.raises(ConfigError, match="none is chosen for PET"):
        workflow_steps(volumes, settings, stages=("register",), landmarks=[on_ct, None])
    with pytest.raises(ConfigError, match="a batch cannot register by landmarks"):
        batch_task([tmp_path], settings, modalities=["CT", "PET"], scene=scene)

    steps, state = workflow_steps(volumes, settings, stages=("register",),
                                  landmarks=[on_ct, on_pet])
    StepRunner(steps).run_to_end()
    transform = mrml.transform_from_transform_node(state.transforms["PET"])
    assert np.allclose([transform.TransformPoint(tuple(p)) for p in points], points + shift,
                       atol=1e-6)
    assert state.registration_metrics["PET"]["landmark_pairs"] == 4


def test_registering_again_starts_from_the_unregistered_volumes(inputs):
    # Register, then Register again on what the first run left (the module's second click):
    # the second run must register the PET itself, not its warped copy (which gave about
    # the identity and resampled the PET twice).
    volumes, _ = inputs
    scene = volumes[0][0].GetScene()
    points = np.array([[-30.0, 10.0, 5.0], [25.0, -5.0, 0.0], [0.0, 30.0, -10.0],
                       [5.0, 5.0, 25.0]])
    shift = np.array([4.0, -2.0, 3.0])
    marks = [mrml.markups_from_points(points, scene, "on CT"),
             mrml.markups_from_points(points + shift, scene, "on PET")]
    settings = WorkflowSettings(preprocess=False, registration_type="landmarks",
                                segmentation_method="")
    steps, first = workflow_steps(volumes, settings, stages=("register",), landmarks=marks)
    StepRunner(steps).run_to_end()
    assert first.unregistered["PET"] is volumes[1][0]
    assert first.volumes["PET"] is not volumes[1][0]  # the registered copy
    steps, second = workflow_steps(
        [(n, m) for m, n in first.volumes.items()], settings, stages=("register",),
        landmarks=marks, unregistered=[(n, m) for m, n in first.unregistered.items()])
    StepRunner(steps).run_to_end()
    transform = mrml.transform_from_transform_node(second.transforms["PET"])
    assert np.allclose([transform.TransformPoint(tuple(p)) for p in points], points + shift,
                       atol=1e-6)


def test_segmenting_after_a_separate_register_leaves_out_the_registered_padding(mrml_scene):
    # Register, then Segment as a second click (the module carries the volumes, their
    # unregistered inputs and the fields of view): the PET's padding outside its field of
    # view must stay unlabelled, as in one run.
    rng = np.random.default_rng(0)
    ct = sitk.GetImageFromArray(rng.normal(0, 30, (16, 32, 32)).astype(np.float32))
    ct.SetSpacing((2, 2, 2))
    ct[8:24, 8:24, 4:12] = sitk.GetImageFromArray(
        rng.normal(200, 30, (8, 16, 16)).astype(np.float32))
    pet = sitk.GetImageFromArray(rng.normal(2, 0.3, (16, 16, 16)).astype(np.float32))
    pet.SetSpacing((2, 2, 2))
    pet.SetOrigin((16.0, 16.0, 0.0))  # the PET covers the CT's centre only
    inputs = [(mrml.volume_node_from_image(ct, mrml_scene, "CT"), "CT"),
              (mrml.volume_node_from_image(pet, mrml_scene, "PET"), "PET")]
    points = np.array([[20.0, 20, 4], [40, 20, 10], [20, 40, 20], [36, 36, 26]])
    marks = [mrml.markups_from_points(points, mrml_scene, n) for n in ("on CT", "on PET")]
    settings = WorkflowSettings(preprocess=False, registration_type="landmarks",
                                segmentation_method="gmm", segmentation_classes=2,
                                show_3d=False)
    steps, first = workflow_steps(inputs, settings, stages=("register",), landmarks=marks)
    StepRunner(steps).run_to_end()
    steps, second = workflow_steps(
        [(n, m) for m, n in first.volumes.items()], settings, stages=("segment",),
        landmarks=marks, unregistered=[(n, m) for m, n in first.unregistered.items()],
        fields_of_view=first.fields_of_view)
    StepRunner(steps).run_to_end()

    labels = sitk.GetArrayFromImage(mrml.labels_from_segmentation_node(
        second.segmentation.segmentation_node, inputs[0][0]))
    covered = np.zeros(labels.shape, bool)
    covered[:, 8:24, 8:24] = True  # the PET's field of view on the CT grid
    assert not (labels[~covered] > 0).any()
    assert (labels[covered] > 0).mean() > 0.9

    # Preprocess afterwards replaces the registered PET by its unregistered copy: the
    # registration's field of view no longer describes it and is not carried on
    steps, third = workflow_steps(
        [(n, m) for m, n in second.volumes.items()],
        WorkflowSettings(preprocess=True, show_3d=False), stages=("preprocess",),
        unregistered=[(n, m) for m, n in second.unregistered.items()],
        fields_of_view=second.fields_of_view)
    assert "PET" in third.fields_of_view
    StepRunner(steps).run_to_end()
    assert "PET" not in third.fields_of_view


def test_the_segmentation_is_restricted_to_the_chosen_region(inputs):
    volumes, gtv = inputs
    settings = WorkflowSettings(preprocess=False, registration_type="none",
                                segmentation_method="kmeans", segmentation_classes=2,
                                show_3d=False)
    steps, state = workflow_steps(volumes[:1], settings, stages=("segment",),
                                  segmentation_mask=gtv)
    StepRunner(steps).run_to_end()
    ct = volumes[0][0]
    labels = sitk.GetArrayFromImage(
        mrml.labels_from_segmentation_node(state.segmentation.segmentation_node, ct))
    inside = sitk.GetArrayFromImage(mrml.labels_from_segmentation_node(gtv, ct)) > 0
    assert np.array_equal(labels > 0, inside)


def test_features_without_segmentation_or_mask_explain_what_is_missing(inputs):
    volumes, _ = inputs
    settings = WorkflowSettings(preprocess=False, registration_type="none",
                                segmentation_method="")
    steps, _ = workflow_steps(volumes, settings, stages=("features",))
    runner = StepRunner(steps)
    with pytest.raises(MMAError, match="features need a region"):
        runner.run_to_end()


@pytest.mark.slow
def test_run_all_on_the_bundled_patient_registers_segments_and_measures(inputs, few_features):
    for module in ("registration", "segmentation", "features"):
        pytest.importorskip(f"MultiModalAnalysisLib.{module}")
    volumes, gtv = inputs
    settings = WorkflowSettings(preprocess=False, segmentation_method="kmeans", show_3d=False,
                                feature_settings=few_features)
    steps, state = workflow_steps(volumes, settings, mask_node=gtv)
    StepRunner(steps).run_to_end()

    assert state.transforms["PET"].IsA("vtkMRMLLinearTransformNode")
    assert state.segmentation is not None
    frame = mrml.dataframe_from_table_node(state.features)
    assert frame["segment"].tolist() == ["GTV"]
    pet_columns = [c for c in frame.columns if c.startswith("PET_")]
    assert pet_columns and np.isfinite(frame[pet_columns].to_numpy(dtype=float)).any()


def test_batch_predictions_skip_failed_cases_and_follow_the_models_threshold(caplog):
    from MultiModalAnalysisLib.batch import add_predictions as _add_predictions
    from MultiModalAnalysisLib.errors import FeatureSetError

    class Calibrated:
        feature_names = ["PET_stat_max"]
        threshold = 0.3
        class_names = ["no", "yes"]

        def predict_proba(self, features):
            p = features["PET_stat_max"].to_numpy(dtype=float) / 10.0
            return np.column_stack([1 - p, p])

    table = pd.DataFrame({"case_id": ["A", "B", "C"], "PET_stat_max": [3.4, np.nan, 2.0],
                          "error": [np.nan, "B: not an image", np.nan]})
    out = _add_predictions(table, Calibrated())
    # A and C are predicted (0.34 >= 0.3: yes; 0.2: no), B, which failed, is not; one
    # failed case no longer drops every case's prediction.
    assert out["prediction"].tolist()[::2] == ["yes", "no"] and pd.isna(out["prediction"][1])
    # (the column named as mma classify names it: the positive class's)
    assert out["probability_yes"].tolist()[::2] == pytest.approx([0.34, 0.2])
    assert "error" in out.columns and table.columns.tolist() == ["case_id", "PET_stat_max",
                                                                  "error"]  # input kept

    class Broken(Calibrated):
        def predict_proba(self, features):
            raise FeatureSetError("the table lacks PET_stat_max")

    with caplog.at_level("WARNING"):
        out = _add_predictions(table, Broken())
    assert out["PET_stat_max"].tolist()[::2] == [3.4, 2.0]  # the measurements are kept
    assert (out["prediction_error"] == "the table lacks PET_stat_max").all()
    assert "could not be applied" in caplog.text


@pytest.mark.slow
def test_batch_measures_every_case_and_reports_a_broken_one_without_stopping(
    mrml_scene, tmp_path, few_features
):
    broken = tmp_path / "STS_999"
    broken.mkdir()
    (broken / "CT_image.nii.gz").write_bytes(b"not an image")
    settings = WorkflowSettings(preprocess=False, registration_type="none",
                                feature_settings=few_features)
    task = batch_task([sample_case_dir(), broken], settings, modalities=["CT", "PET"],
                      mask_name="CT_mask", scene=mrml_scene, output=tmp_path / "rows.csv")
    node = task.run()
    frame = mrml.dataframe_from_table_node(node)
    assert frame["case_id"].tolist() == ["STS_002", "STS_999"]
    assert frame.loc[0, "error"] == "" and "STS_999" in frame.loc[1, "error"]
    assert any(c.startswith("PET_") for c in frame.columns)
    # the table names the file its rows were written to
    written = Path(node.GetAttribute(BATCH_FILE_ATTRIBUTE))
    assert written == (tmp_path / "rows.csv").resolve()
    assert pd.read_csv(written)["case_id"].tolist() == ["STS_002", "STS_999"]


def test_a_batch_writes_its_rows_as_each_case_is_done(mrml_scene, tmp_path, few_features,
                                                      monkeypatch):
    from MultiModalAnalysisLib import batch
    from MultiModalAnalysisLib.errors import OperationCancelled

    settings = WorkflowSettings(preprocess=False, registration_type="none",
                                feature_settings=few_features)
    original, done = batch.run_case, []

    def cancelled_in_the_second(case, *args, **kwargs):
        if done:
            raise OperationCancelled("the batch was cancelled")
        done.append(case.case_id)
        return original(case, *args, **kwargs)

    monkeypatch.setattr(batch, "run_case", cancelled_in_the_second)
    second = tmp_path / "STS_002_copy"
    second.symlink_to(sample_case_dir(), target_is_directory=True)
    output = tmp_path / "out" / "batch.csv"
    task = batch_task([sample_case_dir(), second], settings, modalities=["CT", "PET"],
                      mask_name="CT_mask", scene=mrml_scene, output=output)
    with pytest.raises(OperationCancelled):
        task.run()
    kept = pd.read_csv(output)  # the first case survived the cancel
    assert kept["case_id"].tolist() == ["STS_002"] and kept.loc[0, "CT_stat_mean"] > 0
    assert json.loads((tmp_path / "out" / "batch.batch.json").read_text())["cases"][
        "STS_002"]["status"] == "measured"


def test_a_batch_measures_a_lesion_not_the_union_of_tissue_classes(mrml_scene, tmp_path):
    settings = WorkflowSettings(preprocess=False, registration_type="none",
                                segmentation_method="kmeans")
    with pytest.raises(ConfigError, match="one region per case"):
        batch_task([sample_case_dir()], settings, modalities=["CT", "PET"], scene=mrml_scene)
    with pytest.raises(ConfigError, match="one region per case"):
        batch_task([sample_case_dir()], WorkflowSettings(segmentation_method=""),
                   modalities=["CT"], scene=mrml_scene)
    with pytest.raises(ConfigError, match="'other' names none"):
        batch_task([sample_case_dir()], WorkflowSettings(), modalities=["CT", "other"],
                   mask_name="CT_mask", scene=mrml_scene)


def test_a_batch_segments_with_the_chosen_model(mrml_scene, tmp_path, sts002):
    model = Path(sample_case_dir()).parents[1] / "Models" / "sts_gtv"
    features = tmp_path / "features.json"
    features.write_text(json.dumps({"families": ["morph"]}))
    settings = WorkflowSettings(preprocess=False, registration_type="none",
                                segmentation_method="model", segmentation_model=str(model),
                                feature_settings=str(features), device="cpu")
    frame = mrml.dataframe_from_table_node(batch_task(
        [sample_case_dir()], settings, modalities=["CT", "PET", "MR_T1"], scene=mrml_scene,
    ).run())
    assert "error" not in frame.columns or frame.loc[0, "error"] == ""
    # the model's tumour, near the expert's GTV (the crop itself is about 3.4 litres)
    gtv = sts002.mask("CT_mask")
    expert = float(sitk.GetArrayViewFromImage(gtv).sum()) * np.prod(gtv.GetSpacing())
    assert 0.6 * expert < frame.loc[0, "CT_morph_vol_approx"] < 1.5 * expert


def test_a_batch_moves_a_moving_modalitys_own_mask_with_its_registration(
    mrml_scene, tmp_path
):
    # The PET's content lies 12 mm along x from the CT's, under the same header; its
    # lesion mask is drawn on the PET. Measured on the CT grid after the registration,
    # the mask must follow the PET (it used to stay where it was drawn: off the lesion).
    folder = shifted_pet_case(tmp_path / "M00", {"CT": "CT_image", "PET": "PET_image",
                                                 "PET_mask": "PET_mask"})
    features = tmp_path / "features.json"
    features.write_text(json.dumps({"families": ["stat"]}))
    settings = WorkflowSettings(preprocess=False, registration_type="rigid",
                                feature_settings=str(features), device="cpu")
    frame = mrml.dataframe_from_table_node(batch_task(
        [folder], settings, modalities=["CT", "PET"], mask_name="PET_mask",
        scene=mrml_scene).run())
    assert "error" not in frame.columns or frame.loc[0, "error"] == ""
    assert frame.loc[0, "CT_stat_mean"] == pytest.approx(200.0, abs=20.0)  # was 1.6
    assert frame.loc[0, "PET_stat_mean"] == pytest.approx(8.0, abs=0.8)  # was 1.06


@pytest.fixture
def image_classifier(tmp_path):
    """Eight synthetic STS-style case folders (CT with metal, PET, CT_mask), a classifier
    trained from their image manifest with its own feature settings, and its training
    table."""
    from MultiModalAnalysisLib.classification import read_feature_table, train_classifier

    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        folder = tmp_path / f"C{i:02d}"
        folder.mkdir()
        ct = rng.normal(40 + 30 * (i % 2), 20, (20, 20, 20)).astype(np.int16)
        ct[:, :, :3] = -1000
        ct[10, 10, 8:12] = 5000  # metal, which the CT preset clips to 3071
        pet = np.abs(rng.normal(1 + 2 * (i % 2), 0.5, (20, 20, 20))).astype(np.float32)
        mask = np.zeros((20, 20, 20), np.uint8)
        mask[6:14, 6:14, 6:14] = 1
        for name, array in (("CT_image", ct), ("PET_image", pet), ("CT_mask", mask)):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((2.0, 2.0, 2.0))
            sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
        rows.append({"case_id": folder.name, "CT": str(folder / "CT_image.nii.gz"),
                     "PET": str(folder / "PET_image.nii.gz"),
                     "CT_mask": str(folder / "CT_mask.nii.gz"), "outcome": i % 2})
    pd.DataFrame(rows).to_csv(tmp_path / "cases.csv", index=False)
    trained_with = {"families": ["stat", "cm"], "discretisation_method": "fixed_bin_number",
                    "discretisation_bin_number": 16}
    table = read_feature_table(tmp_path / "cases.csv", "outcome",
                               feature_settings=trained_with, device="cpu")
    train_classifier(table, settings={"classifier": "logistic_l2", "n_features": [2],
                                      "cv_folds": 2, "cv_repeats": 1},
                     evaluate=False, output=tmp_path / "CLF")
    return tmp_path / "CLF", table


def test_a_batch_measures_as_its_classifier_was_trained_and_refuses_swapped_images(
    mrml_scene, tmp_path, few_features, caplog, image_classifier
):
    classifier, table = image_classifier
    # the module's own settings (preprocessing on, three families at 32 bins) differ
    settings = WorkflowSettings(preprocess=True, registration_type="none",
                                feature_settings=few_features, classifier=str(classifier),
                                device="cpu")
    folders = [tmp_path / "C00", tmp_path / "C01"]
    with caplog.at_level("WARNING"):
        frame = mrml.dataframe_from_table_node(batch_task(
            folders, settings, modalities=["CT", "PET"], mask_name="CT_mask",
            scene=mrml_scene).run())
    assert "with the classifier's feature settings" in caplog.text
    measured = frame.set_index("case_id")
    for case_id in ("C00", "C01"):  # the training table's values, not the module's
        for column in table.features.columns:
            assert measured.loc[case_id, column] == pytest.approx(
                table.features.loc[case_id, column], rel=1e-5), column
    assert measured.loc["C00", "CT_stat_max"] == 5000  # as read, not clipped by the preset
    assert "CT_morph_volume" not in measured.columns  # morph: the module's, not the model's
    # swapped files: refused for that case, as mma classify refuses them
    swapped = tmp_path / "C00"
    ct, pet = swapped / "CT_image.nii.gz", swapped / "PET_image.nii.gz"
    ct.rename(swapped / "tmp.nii.gz")
    pet.rename(ct)
    (swapped / "tmp.nii.gz").rename(pet)
    frame = mrml.dataframe_from_table_node(batch_task(
        folders, settings, modalities=["CT", "PET"], mask_name="CT_mask",
        scene=mrml_scene).run())
    assert "do not look like CT in HU" in frame.loc[0, "error"]
    assert frame.loc[1, "error"] == "" and frame.loc[1, "prediction"] != ""


def test_features_are_measured_with_the_chosen_classifiers_feature_settings(
    mrml_scene, tmp_path, few_features, caplog, image_classifier
):
    classifier, table = image_classifier
    case = load_case(tmp_path / "C01", ["CT", "PET"])
    ct = mrml.volume_node_from_image(case.image("CT"), mrml_scene, "CT")
    pet = mrml.volume_node_from_image(case.image("PET"), mrml_scene, "PET")
    lesion = mrml.segmentation_node_from_labels(case.mask("CT_mask"), mrml_scene,
                                                names={1: "lesion"}, reference_node=ct)
    settings = WorkflowSettings(preprocess=False, feature_settings=few_features,
                                classifier=str(classifier), device="cpu")
    # Run all, and the Features step alone (Classify then reads its table)
    for stages in (("features", "classify"), ("features",)):
        steps, state = workflow_steps([(ct, "CT"), (pet, "PET")], settings, mask_node=lesion,
                                      stages=stages)
        caplog.clear()
        with caplog.at_level("WARNING"):
            StepRunner(steps).run_to_end()
        assert "measures with the classifier's feature settings" in caplog.text
        measured = mrml.dataframe_from_table_node(state.features).iloc[0]
        for column in table.features.columns:  # the training table's values
            assert measured[column] == pytest.approx(table.features.loc["C01", column],
                                                     rel=1e-5), column
        assert "CT_morph_volume" not in measured.index  # morph: the module's families
    caplog.clear()
    steps, state = workflow_steps([(ct, "CT"), (pet, "PET")],
                                  WorkflowSettings(feature_settings=few_features, device="cpu"),
                                  mask_node=lesion, stages=("features",))
    with caplog.at_level("WARNING"):  # no classifier: the module's settings, no word
        StepRunner(steps).run_to_end()
    assert "classifier" not in caplog.text
    assert "CT_morph_volume" in mrml.dataframe_from_table_node(state.features).columns
    steps, _ = workflow_steps([(ct, "CT"), (pet, "PET")],
                              WorkflowSettings(classifier=str(classifier), device="cpu"),
                              mask_node=lesion, stages=("features", "classify"))
    with caplog.at_level("WARNING"):
        StepRunner(steps).run_to_end()
    assert "turn Preprocess off" in caplog.text


def test_a_classifier_trained_from_images_gets_each_volume_on_its_own_grid_after_registering(
    mrml_scene, tmp_path, image_classifier
):
    # The PET lies on a grid twice as coarse, its content 8 mm along x from the CT's. The
    # classifier learnt PET features on the PET's own grid: the Features step measures the
    # PET volume itself, the lesion mapped onto it through the registration (it measured the
    # PET resampled onto the CT grid: energy, a sum over voxels, about 8x too large).
    from MultiModalAnalysisLib.features import extract_features

    classifier, _ = image_classifier
    n, shift = 32, 4
    z, y, x = np.indices((n, n, n))
    rng = np.random.default_rng(3)

    def ball(cx, r2=30):
        return (x - cx) ** 2 + (y - 16) ** 2 + (z - 16) ** 2 <= r2

    body = (abs(x - 16) < 13) & (abs(y - 16) < 13) & (abs(z - 16) < 13)
    ct = np.where(body, 0.0, -1000.0)
    ct[ball(12)] = 200 + rng.normal(0, 30, int(ball(12).sum()))
    ct[4:8, 20:26, 6:10] = 400
    pet = np.where(np.roll(body, shift, 2), 1.0, 0.0)
    pet[ball(12 + shift)] = 8 + rng.normal(0, 2, int(ball(12 + shift).sum()))
    pet[4:8, 20:26, 6 + shift:10 + shift] = 4.0

    def image(array, spacing=2.0):
        result = sitk.GetImageFromArray(array.astype(np.float32))
        result.SetSpacing((spacing,) * 3)
        return result

    pet_image = sitk.Resample(image(pet), [n // 2] * 3, sitk.Transform(), sitk.sitkLinear,
                              (1.0, 1.0, 1.0), (4.0, 4.0, 4.0))
    ct_node = mrml.volume_node_from_image(image(ct), mrml_scene, "CT")
    pet_node = mrml.volume_node_from_image(pet_image, mrml_scene, "PET")
    lesion_image = sitk.Cast(image(ball(12).astype(np.float32)), sitk.sitkUInt8)
    lesion = mrml.segmentation_node_from_labels(lesion_image, mrml_scene,
                                                names={1: "lesion"}, reference_node=ct_node)
    settings = WorkflowSettings(preprocess=False, registration_type="rigid",
                                classifier=str(classifier), device="cpu")
    steps, state = workflow_steps([(ct_node, "CT"), (pet_node, "PET")], settings,
                                  mask_node=lesion, stages=("register", "features"))
    StepRunner(steps).run_to_end()
    measured = mrml.dataframe_from_table_node(state.features).iloc[0]
    trained_with = {"families": ["stat", "cm"], "discretisation_method": "fixed_bin_number",
                    "discretisation_bin_number": 16}
    where_it_is = sitk.Cast(image(ball(12 + shift).astype(np.float32)), sitk.sitkUInt8)
    expected = extract_features({"PET": pet_image}, where_it_is, trained_with, device="cpu")
    on_ct_grid = extract_features(
        {"PET": mrml.image_from_volume_node(state.volumes["PET"])}, lesion_image,
        trained_with, device="cpu")
    assert on_ct_grid["PET_stat_energy"] > 4 * expected["PET_stat_energy"]
    assert measured["PET_stat_energy"] == pytest.approx(expected["PET_stat_energy"], rel=0.15)
    assert measured["PET_stat_mean"] == pytest.approx(expected["PET_stat_mean"], rel=0.05)
