"""Node-level pipeline on a real MRML scene with the bundled patient (STS_002: CT, PET, MR-T1).

Preprocessing, resampling, classification of a features table and the background step runner
are tested now. Registration, fusion, segmentation and feature extraction call the engine
modules of issues 3-5; their tests skip until those modules are merged, then run as they are.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from MultiModalAnalysisLib import mrml, nodes
from MultiModalAnalysisLib.case import load_case
from MultiModalAnalysisLib.errors import MMAError, OperationCancelled
from MultiModalAnalysisLib.jobs import StepRunner
from MultiModalAnalysisLib.metrics import dice, transform_distance
from MultiModalAnalysisLib.preprocess import apply_modality_preset, resample_to_reference

pytest.importorskip("slicer", reason="needs the slicer-core wheel (test extra)")


@pytest.fixture(scope="module")
def sts002(request):
    """The bundled patient as engine images (loaded once for the module)."""
    from MultiModalAnalysisLib.sample_data import sample_case_dir

    return load_case(sample_case_dir())


@pytest.fixture
def patient(mrml_scene, sts002):
    """The bundled patient's volumes and CT tumour mask as nodes in a fresh scene."""
    volume = {m: mrml.volume_node_from_image(sts002.image(m), mrml_scene, m)
              for m in ("CT", "PET", "MR_T1")}
    volume["tumour"] = mrml.segmentation_node_from_labels(
        sts002.mask("CT_mask"), mrml_scene, names={1: "tumour"}, reference_node=volume["CT"],
        name="expert GTV",
    )
    return volume


def array(node) -> np.ndarray:
    return sitk.GetArrayFromImage(mrml.image_from_volume_node(node))


# ---------------------------------------------------------------------- tested now


def test_preprocess_node_gives_the_engine_preset_result_in_a_new_node(patient, sts002):
    ct = patient["CT"]
    before = array(ct).copy()
    out = nodes.preprocess_volume(ct, "CT")

    assert out is not ct and out.GetName() == "CT preprocessed"
    expected = sitk.GetArrayFromImage(apply_modality_preset(sts002.image("CT"), "CT"))
    assert np.array_equal(array(out), expected)
    assert array(out).min() >= -1024.0  # the CT preset clips air padding
    assert np.array_equal(array(ct), before)  # the input node is untouched


def test_resample_node_puts_pet_on_the_ct_grid_like_the_engine(patient, sts002):
    pet_on_ct = nodes.resample_volume(patient["PET"], patient["CT"])

    image = mrml.image_from_volume_node(pet_on_ct)
    assert image.GetSize() == sts002.image("CT").GetSize()
    assert np.allclose(image.GetOrigin(), sts002.image("CT").GetOrigin(), atol=1e-6)
    expected = resample_to_reference(sts002.image("PET"), sts002.image("CT"))
    assert np.allclose(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(expected))
    # Bright PET uptake sits inside the CT tumour mask on the CT grid.
    tumour = sitk.GetArrayFromImage(sts002.mask("CT_mask")) > 0
    values = sitk.GetArrayFromImage(image)
    assert values[tumour].mean() > 2 * values[~tumour].mean()


def test_resample_through_a_transform_node_and_labelmaps_use_nearest_neighbour(patient,
                                                                                sts002):
    shift = sitk.TranslationTransform(3, (4.0, 0.0, 0.0))
    transform_node = mrml.transform_node_from_transform(shift, patient["CT"].GetScene())
    mask_node = mrml.volume_node_from_image(sts002.mask("CT_mask"), patient["CT"].GetScene(),
                                            "mask", labelmap=True)
    moved = nodes.resample_volume(mask_node, patient["CT"], transform_node=transform_node)

    assert moved.IsA("vtkMRMLLabelMapVolumeNode")
    values = array(moved)
    assert set(np.unique(values)) <= {0, 1}
    expected = resample_to_reference(sts002.mask("CT_mask"), sts002.image("CT"),
                                     transform=shift, is_label=True)
    assert np.array_equal(values, sitk.GetArrayFromImage(expected))


def test_step_runner_runs_node_steps_in_the_background_and_publishes_in_order(patient):
    published = []
    runner = StepRunner(
        [
            ("preprocess CT", lambda: nodes.preprocess_task(patient["CT"], "CT")),
            # Built only when its turn comes: it reads the node the first step published.
            ("PET on CT", lambda: nodes.resample_task(patient["PET"],
                                                      runner.outputs["preprocess CT"])),
        ],
        on_published=lambda name, node: published.append((name, node.GetName())),
    )
    outputs = runner.run_to_end()

    assert [name for name, _ in published] == ["preprocess CT", "PET on CT"]
    assert outputs["PET on CT"].GetName() == "PET on CT preprocessed"
    assert runner.progress[0] == 1.0 and set(runner.timings) == {"preprocess CT", "PET on CT"}


def test_cancel_stops_a_running_node_step_and_skips_the_rest(patient):
    started = threading.Event()

    def slow_compute(progress, cancel):
        started.set()
        for i in range(200):
            progress(i / 200, "working")  # raises once cancelled
            time.sleep(0.01)
        return None

    slow = nodes.NodeTask("slow", slow_compute, lambda result: result)
    never = []
    runner = StepRunner([("slow", lambda: slow), ("next", lambda: never.append(1))])
    runner.poll()
    assert started.wait(5)
    runner.cancel()
    start = time.perf_counter()
    while not runner.poll(0.05):
        pass
    assert time.perf_counter() - start < 1.0
    assert runner.cancelled and isinstance(runner.error, OperationCancelled)
    assert never == []


def test_classify_table_adds_prediction_and_probability_per_row(mrml_scene):
    class ThresholdModel:
        """A stand-in with the classifier interface of issue 5."""

        feature_names = ["PET_stat_max"]
        metadata = {"label_column": "LungMets"}

        def predict_proba(self, features):
            p = 1 / (1 + np.exp(-(features["PET_stat_max"].to_numpy() - 5.0)))
            return np.column_stack([1 - p, p])

    table = mrml.table_node_from_dataframe(
        pd.DataFrame({"case_id": ["a", "b"], "segment": ["tumour"] * 2,
                      "PET_stat_max": [2.0, 9.0], "CT_stat_mean": [40.0, 30.0]}),
        mrml_scene, "features",
    )
    result = mrml.dataframe_from_table_node(nodes.classify_table(table, ThresholdModel()))

    assert result["case_id"].tolist() == ["a", "b"]
    assert result["prediction"].tolist() == [0, 1]
    assert result["probability"].tolist() == pytest.approx([1 / (1 + math.e ** 3),
                                                            1 / (1 + math.e ** -4)])
    assert result["label"].tolist() == ["LungMets = 0", "LungMets = 1"]

    # A trained model's own threshold and class names decide, as in mma classify (0.04
    # here: P = 0.047 is "yes", where the argmax said 0).
    class Calibrated(ThresholdModel):
        threshold = 0.04
        class_names = ["no", "yes"]
        metadata = {"label": {"column": "LungMets"}}

    result = mrml.dataframe_from_table_node(nodes.classify_table(table, Calibrated()))
    assert result["prediction"].tolist() == ["yes", "yes"]
    assert result["threshold"].tolist() == [0.04, 0.04]
    assert result["label"].tolist() == ["LungMets = yes", "LungMets = yes"]

    class NeedsMore(ThresholdModel):
        feature_names = ["PET_stat_max", "MR_T1_glcm_contrast"]

    with pytest.raises(MMAError, match="MR_T1_glcm_contrast"):
        nodes.classify_table(table, NeedsMore())


def test_classify_table_tolerates_a_feature_the_trained_model_never_uses(mrml_scene):
    # As mma classify: a feature dropped by the model's selection may be absent; one it uses
    # may not.
    from synthetic_cohort import feature_cohort

    from MultiModalAnalysisLib.classification import ClassifierSettings, train_classifier

    features, labels = feature_cohort(n_cases=24, n_positive=8, n_informative=2, n_noise=6,
                                      effect=3.0)
    model = train_classifier(features, labels, ClassifierSettings(n_features=[3]),
                             label_column="LungMets", evaluate=False)
    unused = next(f for f in model.feature_names if f not in model.used_features)
    table = features.drop(columns=[unused]).head(3)
    result = mrml.dataframe_from_table_node(nodes.classify_table(
        mrml.table_node_from_dataframe(table, mrml_scene, "features"), model))
    assert result["probability"].to_numpy() == pytest.approx(
        model.predict_proba(features.head(3))[:, 1])

    used = features.drop(columns=[model.used_features[0]]).head(3)
    with pytest.raises(MMAError, match=model.used_features[0]):
        nodes.classify_table(mrml.table_node_from_dataframe(used, mrml_scene, "f"), model)


def test_missing_inputs_are_refused_with_a_message(patient):
    with pytest.raises(MMAError, match="no reference volume"):
        nodes.resample_task(patient["PET"], None)
    with pytest.raises(MMAError, match="at least two volumes"):
        nodes.fuse_task([patient["CT"]])


# ---------------------------------------------------- waiting for the engine branches


def moved_rigidly(image: sitk.Image, rigid: sitk.Euler3DTransform) -> sitk.Image:
    """The same voxels, placed where ``rigid`` sends them (geometry only, no resampling)."""
    moved = sitk.Image(image)
    matrix = np.array(rigid.GetMatrix()).reshape(3, 3)
    moved.SetOrigin(rigid.TransformPoint(image.GetOrigin()))
    moved.SetDirection((matrix @ np.array(image.GetDirection()).reshape(3, 3)).ravel().tolist())
    return moved


def known_rigid_move(ct: sitk.Image) -> sitk.Euler3DTransform:
    """About 5 degrees and 8 mm, about the CT's centre: what the registration tests undo."""
    centre = ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()])
    return sitk.Euler3DTransform(centre, 0.05, -0.04, 0.08, (6.0, -4.0, 3.0))


@pytest.mark.slow
def test_register_mr_to_ct_recovers_a_known_rigid_move_and_hardens_onto_the_tumour(
    mrml_scene, sts002
):
    ct = sts002.image("CT")
    truth = known_rigid_move(ct)
    fixed = mrml.volume_node_from_image(ct, mrml_scene, "CT")
    moving = mrml.volume_node_from_image(moved_rigidly(sts002.image("MR_T1"), truth), mrml_scene,
                                         "MR moved")
    mr_mask = mrml.volume_node_from_image(moved_rigidly(sts002.mask("MR_T1_mask"), truth),
                                          mrml_scene, "MR mask moved", labelmap=True)

    result = nodes.register_volumes(fixed, moving, transform="rigid", fixed_modality="CT",
                                    moving_modality="MR_T1")

    recovered = mrml.transform_from_transform_node(result.transform_node)
    tumour = sitk.GetArrayFromImage(sts002.mask("CT_mask")) > 0
    points = [ct.TransformIndexToPhysicalPoint([int(i) for i in idx[::-1]])
              for idx in np.argwhere(tumour)[::50]]
    # The dataset's own MR-CT alignment is off by millimetres (its authors registered the MR),
    # so the reference is the engine's registration of the unmoved MR, moved by the truth.
    from MultiModalAnalysisLib.registration import register
    from MultiModalAnalysisLib.registration.transforms import compose

    unmoved = register(ct, sts002.image("MR_T1"), "rigid", fixed_modality="CT",
                       moving_modality="MR_T1").transform
    error = transform_distance(recovered, compose(truth, unmoved), points)
    assert error.mean() < 1.5, f"mean registration error in the tumour {error.mean():.2f} mm"
    assert transform_distance(recovered, truth, points).mean() < 5.0  # the dataset alignment

    # Hardened in Slicer, the moved MR mask lands back on the CT tumour.
    mr_mask.SetAndObserveTransformNodeID(result.transform_node.GetID())
    import slicer

    assert slicer.vtkSlicerTransformLogic.hardenTransform(mr_mask)
    on_ct = resample_to_reference(mrml.image_from_volume_node(mr_mask), ct, is_label=True)
    assert dice(on_ct, sts002.mask("CT_mask")) > 0.8
    # ... and the moving volume, hardened, matches the engine's warped output.
    moving.SetAndObserveTransformNodeID(result.transform_node.GetID())
    assert slicer.vtkSlicerTransformLogic.hardenTransform(moving)
    hardened = resample_to_reference(mrml.image_from_volume_node(moving), ct, default_value=0.0)
    warped = sitk.GetArrayFromImage(mrml.image_from_volume_node(result.warped_node))
    difference = np.abs(sitk.GetArrayFromImage(hardened) - warped)
    scale = np.percentile(np.abs(warped[tumour]), 99)
    assert np.median(difference[tumour]) < 0.05 * scale
    # Where the warped MR has data is published with it: the hardened MR's own field of
    # view on the CT grid (the MR crop leaves much of the CT crop uncovered).
    covered = sitk.GetArrayFromImage(result.field_of_view) != 0
    expected = sitk.GetArrayFromImage(sitk.Resample(
        sitk.Cast(mrml.image_from_volume_node(moving) * 0 + 1, sitk.sitkUInt8), ct,
        sitk.Transform(), sitk.sitkNearestNeighbor, 0)) != 0
    assert 0.2 < 1 - covered.mean() < 0.9
    assert (covered == expected).mean() > 0.99


def test_segmenting_registered_volumes_leaves_out_where_one_has_no_data(patient, sts002):
    # A registered volume is padded where it does not reach: given its field of view, the
    # segmentation leaves that part unlabelled instead of classifying the padding.
    ct = sts002.image("CT")
    covered = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    covered.CopyInformation(ct)
    half = ct.GetSize()[0] // 2
    covered[:half, :, :] = 1
    result = nodes.segment_volumes({"CT": patient["CT"], "PET": patient["PET"]},
                                   method="threshold", show_3d=False, field_of_view=covered)
    labels = sitk.GetArrayFromImage(
        mrml.labels_from_segmentation_node(result.segmentation_node, patient["CT"]))
    unrestricted = nodes.segment_volumes({"CT": patient["CT"], "PET": patient["PET"]},
                                         method="threshold", show_3d=False)
    whole = sitk.GetArrayFromImage(
        mrml.labels_from_segmentation_node(unrestricted.segmentation_node, patient["CT"]))
    assert whole[:, :, half:].any(), "the test needs a lesion in the uncovered half"
    assert not labels[:, :, half:].any()
    assert np.array_equal(labels[:, :, :half] != 0, whole[:, :, :half] != 0)

def test_fuse_nodes_on_the_first_volume_grid(patient):
    fused = nodes.fuse_volumes([patient["CT"], patient["PET"]], method="average")
    image = mrml.image_from_volume_node(fused)
    assert image.GetSize() == mrml.image_from_volume_node(patient["CT"]).GetSize()
    assert np.isfinite(sitk.GetArrayFromImage(image)).all()


@pytest.mark.slow
def test_segment_nodes_gives_named_segments_on_the_reference_grid(patient):
    result = nodes.segment_volumes({"CT": patient["CT"], "PET": patient["PET"]}, method="kmeans",
                                   classes=3, mask_node=None, show_3d=False)

    names = set(mrml.segment_names(result.segmentation_node).values())
    assert names, "the segmentation has no segment"
    assert names <= set(result.label_names.values()) | {f"label {v}" for v in range(1, 10)}
    labels = mrml.labels_from_segmentation_node(result.segmentation_node, patient["CT"])
    assert labels.GetSize() == mrml.image_from_volume_node(patient["CT"]).GetSize()
    assert len(np.unique(sitk.GetArrayFromImage(labels))) >= 3  # background + >= 2 classes


@pytest.mark.slow
def test_features_of_the_tumour_segment_go_to_a_table_node_like_the_engine(patient, sts002):
    from MultiModalAnalysisLib.features import extract_features

    settings = {"families": ["stat", "morph", "cm"]}  # a texture family, and test time kept short
    table = nodes.extract_features_to_table({"CT": patient["CT"], "PET": patient["PET"]},
                                            patient["tumour"], case_id="STS_002",
                                            settings=settings)
    frame = mrml.dataframe_from_table_node(table)
    assert frame["case_id"].tolist() == ["STS_002"] and frame["segment"].tolist() == ["tumour"]
    ct = sts002.image("CT")
    expected = extract_features(
        {"CT": ct, "PET": resample_to_reference(sts002.image("PET"), ct)},
        sitk.Cast(sts002.mask("CT_mask") > 0, sitk.sitkUInt8), settings=settings,
    )
    assert len(expected) > 10
    assert any(name.startswith("PET_cm_") for name in expected)
    for name, value in expected.items():
        assert frame[name].iloc[0] == pytest.approx(value, rel=1e-5, abs=1e-8, nan_ok=True), name


def test_each_segment_is_measured_whole_when_segments_overlap_or_share_a_label_value(
        mrml_scene):
    # A tumour segment, and a necrosis segment inside it copied in from another label image
    # that also used value 1 (as when the expert GTV is copied into the workflow's
    # segmentation). Each row must measure its own whole region.
    shape = (20, 30, 30)
    rng = np.random.default_rng(0)
    ct = mrml.volume_node_from_image(
        sitk.GetImageFromArray(rng.normal(100, 10, shape).astype(np.float32)), mrml_scene, "CT")
    tumour = np.zeros(shape, np.uint8)
    tumour[4:16, 5:25, 5:25] = 1
    necrosis = np.zeros(shape, np.uint8)
    necrosis[8:12, 12:18, 12:18] = 1
    node = mrml.segmentation_node_from_labels(sitk.GetImageFromArray(tumour), mrml_scene,
                                              names={1: "tumour"}, reference_node=ct)
    other = mrml.segmentation_node_from_labels(sitk.GetImageFromArray(necrosis), mrml_scene,
                                               names={1: "necrosis"}, reference_node=ct)
    node.GetSegmentation().CopySegmentFromSegmentation(
        other.GetSegmentation(), other.GetSegmentation().GetNthSegmentID(0))
    mrml_scene.RemoveNode(other)
    assert sorted(mrml.segment_names(node).values()) == ["necrosis", "tumour"]  # both kept
    frame = mrml.dataframe_from_table_node(nodes.extract_features_to_table(
        {"CT": ct}, node, settings={"families": ["morph"]}))
    volumes = dict(zip(frame["segment"], frame["CT_morph_vol_approx"], strict=True))
    assert volumes == {"tumour": float(tumour.sum()), "necrosis": float(necrosis.sum())}


def test_a_segmentation_of_several_segments_as_a_mask_is_their_union(mrml_scene, caplog):
    rng = np.random.default_rng(1)
    values = rng.normal(100, 20, (20, 40, 40)).astype(np.float32)
    values[5:15, 10:20, 10:20] += 200
    volume = mrml.volume_node_from_image(sitk.GetImageFromArray(values), mrml_scene, "CT")
    regions = np.zeros(values.shape, np.uint8)
    regions[2:18, 5:30, 5:30] = 1
    regions[8:12, 12:18, 12:18] = 2
    mask = mrml.segmentation_node_from_labels(sitk.GetImageFromArray(regions), mrml_scene,
                                              names={1: "body", 2: "core"}, reference_node=volume)
    with caplog.at_level("INFO"):
        result = nodes.segment_volumes({"CT": volume}, method="kmeans", classes=2,
                                       mask_node=mask, show_3d=False)
    assert "union of the 2 segments" in caplog.text and "body, core" in caplog.text
    labels = sitk.GetArrayFromImage(
        mrml.labels_from_segmentation_node(result.segmentation_node, volume))
    assert np.array_equal(labels > 0, regions > 0)  # all of both segments, nothing else
    registered = nodes.register_volumes(volume, volume, transform="rigid", fixed_mask_node=mask)
    assert registered.metrics["runtime_s"] > 0


# ---------------------------------------------------------------------- landmarks


def tumour_landmarks(ct: sitk.Image, mask: sitk.Image, count: int = 5) -> np.ndarray:
    """``count`` LPS points spread over the tumour (what a clinician might click)."""
    index = np.argwhere(sitk.GetArrayFromImage(mask) > 0)
    chosen = index[np.linspace(0, len(index) - 1, count).astype(int)]
    return np.array([ct.TransformIndexToPhysicalPoint([int(i) for i in idx[::-1]])
                     for idx in chosen])


def _shown_5_mm_right(scene, scale: float, names: tuple[str, str]):
    """(image, fixed node, moving node, parent): one noise image as two volumes, the moving
    one shown 5 mm to the right by a parent transform."""
    import vtk

    image = sitk.GetImageFromArray(np.random.default_rng(2).normal(0, scale, (12, 16, 20)))
    image.SetSpacing((1.5, 1.0, 2.0))
    fixed = mrml.volume_node_from_image(image, scene, names[0])
    moving = mrml.volume_node_from_image(image, scene, names[1])
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "5 mm right")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 5.0)  # RAS: +x is right
    shift.SetMatrixTransformToParent(matrix)
    moving.SetAndObserveTransformNodeID(shift.GetID())
    return image, fixed, moving, shift


def test_the_transform_of_a_volume_with_a_parent_transform_replaces_that_parent(mrml_scene):
    # The moving volume is the fixed one shown 5 mm to the right by a parent transform; the
    # landmarks are clicked where each volume is shown. The published transform, set as the
    # moving volume's parent in place of the old one, must show it on the fixed volume.
    image, fixed, moving, _ = _shown_5_mm_right(mrml_scene, 1.0, ("fixed", "moving"))
    points = np.array([[0.0, 0.0, 0.0], [20.0, 0.0, 5.0], [0.0, 12.0, 10.0], [8.0, 4.0, 20.0]])
    on_fixed = mrml.markups_from_points(points, mrml_scene, "on fixed")
    on_moving = mrml.markups_from_points(points - [5.0, 0.0, 0.0], mrml_scene, "on moving")
    result = nodes.register_volumes(fixed, moving, transform="landmarks",
                                    fixed_landmarks_node=on_fixed,
                                    moving_landmarks_node=on_moving)
    moving.SetAndObserveTransformNodeID(result.transform_node.GetID())
    shown = mrml.image_from_volume_node(moving)
    assert np.allclose(shown.GetOrigin(), image.GetOrigin(), atol=1e-6)
    assert np.allclose(shown.GetDirection(), image.GetDirection(), atol=1e-9)


def test_the_transform_of_a_preprocessed_copy_also_replaces_the_inputs_parent(mrml_scene):
    # As above, through the preprocessed copy of the moving volume (Run all's default):
    # the copy stays under the input's parent, so the published transform replaces it too.
    image, fixed, moving, shift = _shown_5_mm_right(mrml_scene, 100.0, ("CT", "PET"))
    copy = nodes.preprocess_volume(moving, "PET")
    assert copy.GetParentTransformNode() is shift
    assert np.allclose(mrml.image_from_volume_node(copy).GetOrigin(),
                       mrml.image_from_volume_node(moving).GetOrigin(), atol=1e-9)

    points = np.array([[0.0, 0.0, 0.0], [20.0, 0.0, 5.0], [0.0, 12.0, 10.0], [8.0, 4.0, 20.0]])
    result = nodes.register_volumes(
        fixed, copy, transform="landmarks",
        fixed_landmarks_node=mrml.markups_from_points(points, mrml_scene, "on CT"),
        moving_landmarks_node=mrml.markups_from_points(points - [5.0, 0, 0], mrml_scene, "on PET"))
    moving.SetAndObserveTransformNodeID(result.transform_node.GetID())
    assert np.allclose(mrml.image_from_volume_node(moving).GetOrigin(), image.GetOrigin(),
                       atol=1e-6)


def test_a_parent_transform_changed_while_registering_does_not_shift_the_result(mrml_scene):
    # The moving image is read where its parent shows it when the task is built; the parent
    # undone by the published transform must be that one, not one nudged meanwhile.
    import vtk

    image = sitk.GetImageFromArray(np.random.default_rng(2).normal(0, 1, (12, 16, 20)))
    fixed = mrml.volume_node_from_image(image, mrml_scene, "fixed")
    moving = mrml.volume_node_from_image(image, mrml_scene, "moving")
    shift = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "manual")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 5.0)
    shift.SetMatrixTransformToParent(matrix)
    moving.SetAndObserveTransformNodeID(shift.GetID())
    points = np.array([[0.0, 0.0, 0.0], [20.0, 0.0, 5.0], [0.0, 12.0, 10.0], [8.0, 4.0, 20.0]])
    task = nodes.register_task(
        fixed, moving, transform="landmarks",
        fixed_landmarks_node=mrml.markups_from_points(points, mrml_scene, "f"),
        moving_landmarks_node=mrml.markups_from_points(points - [5.0, 0, 0], mrml_scene, "m"))
    result = task.compute(None, None)
    matrix.SetElement(0, 3, 7.0)  # the user moves the slider while the worker runs
    shift.SetMatrixTransformToParent(matrix)
    out = task.publish(result)
    moving.SetAndObserveTransformNodeID(out.transform_node.GetID())
    assert np.allclose(mrml.image_from_volume_node(moving).GetOrigin(), image.GetOrigin(),
                       atol=1e-6)


def test_a_registration_resamples_in_the_worker_and_its_publish_only_adds_nodes(
        mrml_scene, monkeypatch):
    # publish() runs on Slicer's main thread: the warped volume, the field of view and the
    # sampling of a deformable transform onto a grid must all happen in compute().
    from unittest import mock

    from MultiModalAnalysisLib.registration import RegistrationResult

    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 50, (10, 16, 20)))
    fixed = mrml.volume_node_from_image(image, mrml_scene, "CT")
    moving = mrml.volume_node_from_image(image, mrml_scene, "MR")
    field = sitk.Image((8, 8, 6), sitk.sitkVectorFloat64)
    field.SetSpacing((3.0, 3.0, 3.0))
    deformable = sitk.CompositeTransform(
        [sitk.Euler3DTransform((10, 8, 5), 0.02, 0, 0.03, (2, 1, 0)),
         sitk.DisplacementFieldTransform(field)])
    monkeypatch.setattr(nodes, "_landmark_registration", lambda f, m, *_: (
        lambda progress, cancel: RegistrationResult(deformable, {}, f, m)))
    points = np.array([[0.0, 0, 0], [10, 0, 2], [0, 12, 4], [6, 4, 8]])
    task = nodes.register_task(
        fixed, moving, transform="landmarks",
        fixed_landmarks_node=mrml.markups_from_points(points, mrml_scene, "a"),
        moving_landmarks_node=mrml.markups_from_points(points, mrml_scene, "b"))
    result = task.compute(None, None)

    refused = AssertionError("engine work in publish()")
    with mock.patch.object(sitk, "Resample", side_effect=refused), \
            mock.patch.object(sitk, "TransformToDisplacementField", side_effect=refused):
        out = task.publish(result)
    assert out.transform_node.IsA("vtkMRMLGridTransformNode")
    assert mrml.image_from_volume_node(out.warped_node).GetSize() == image.GetSize()
    assert out.field_of_view.GetSize() == image.GetSize()


def test_landmarks_alone_register_a_moved_volume_and_others_start_an_intensity_registration(
        mrml_scene, sts002):
    ct = sts002.image("CT")
    truth = known_rigid_move(ct)
    fixed = mrml.volume_node_from_image(ct, mrml_scene, "CT")
    moving = mrml.volume_node_from_image(moved_rigidly(sts002.image("PET"), truth), mrml_scene,
                                         "PET moved")
    points = tumour_landmarks(ct, sts002.mask("CT_mask"))
    on_ct = mrml.markups_from_points(points, mrml_scene, "on CT")
    # Clicked on the moved PET: where the moved volume shows the same anatomy.
    on_pet = mrml.markups_from_points([truth.TransformPoint(tuple(p)) for p in points],
                                      mrml_scene, "on PET")

    alone = nodes.register_volumes(fixed, moving, transform="landmarks",
                                   fixed_landmarks_node=on_ct, moving_landmarks_node=on_pet)

    recovered = mrml.transform_from_transform_node(alone.transform_node)
    assert transform_distance(recovered, truth, points).max() < 1e-3
    assert alone.metrics["transform_type"] == "landmarks (rigid)"
    assert alone.metrics["landmark_pairs"] == 5
    assert alone.metrics["landmark_residual_mm_max"] < 1e-3
    assert mrml.image_from_volume_node(alone.warped_node).GetSize() == ct.GetSize()

    # The same points start a rigid intensity registration and measure it.
    refined = nodes.register_volumes(fixed, moving, transform="rigid", fixed_modality="CT",
                                     moving_modality="PET", fixed_landmarks_node=on_ct,
                                     moving_landmarks_node=on_pet)
    assert refined.metrics["landmark_pairs"] == 5
    # PET and CT share the scanner's alignment: the refined result stays within the few mm
    # by which the mutual-information optimum sits off it on these crops (docs/benchmarks.md).
    assert refined.metrics["tre_mm_median"] < 10.0
    error = transform_distance(mrml.transform_from_transform_node(refined.transform_node),
                               truth, points)
    assert np.median(error) == pytest.approx(refined.metrics["tre_mm_median"], abs=1e-2)


def test_landmarks_on_one_volume_only_or_missing_for_a_landmark_registration_are_refused(
        patient):
    points = np.array([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0], [0.0, 20.0, 5.0]])
    on_ct = mrml.markups_from_points(points, patient["CT"].GetScene(), "on CT")
    with pytest.raises(MMAError, match="given on the fixed volume only"):
        nodes.register_task(patient["CT"], patient["PET"], fixed_landmarks_node=on_ct)
    with pytest.raises(MMAError, match="needs point lists on both volumes"):
        nodes.register_task(patient["CT"], patient["PET"], transform="landmarks")
    on_line = mrml.markups_from_points(points * [1, 0, 0], patient["CT"].GetScene(), "line")
    with pytest.raises(MMAError, match="lie on one line"):
        nodes.register_task(patient["CT"], patient["PET"], transform="landmarks",
                            fixed_landmarks_node=on_ct, moving_landmarks_node=on_line)
