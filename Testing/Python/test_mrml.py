"""The MRML bridge against real MRML (slicer-core): volumes, transforms, segmentations, tables.

Geometry is checked the way a user sees it: a physical point must land on the same voxel and
value on both sides, and a transform node set as the moving volume's parent must put the
moving voxels where the engine's own resampling puts them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from synthetic import centred_grid, make_image, physical_points, rotation_direction

from MultiModalAnalysisLib import mrml
from MultiModalAnalysisLib.errors import ConfigError, GeometryError, LabelError, MMAError

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (test extra)")


def smooth_volume(size, spacing, origin, direction) -> sitk.Image:
    """A smooth blob plus a gentle ramp: interpolation errors stay small and measurable."""
    grid = make_image(np.zeros(size[::-1], np.float32), spacing, origin, direction)
    points = physical_points(grid)
    centre = np.array([0.0, 0.0, 40.0])
    blob = np.exp(-np.sum((points - centre) ** 2 / (2 * np.array([15.0, 10.0, 12.0]) ** 2), -1))
    values = 100.0 * blob + 0.3 * points[..., 0]
    return make_image(values.astype(np.float32), spacing, origin, direction)


@pytest.fixture
def moving_image() -> sitk.Image:
    return smooth_volume((40, 36, 20), (1.2, 1.0, 2.5), (-25.0, -20.0, 15.0),
                         rotation_direction((10, 5, -20)))


@pytest.fixture
def fixed_grid(moving_image) -> sitk.Image:
    return centred_grid(moving_image, (30, 30, 24), (1.5, 1.3, 1.8),
                        rotation_direction((-5, 15, 10)))


def voxels_well_inside(fixed: sitk.Image, moving: sitk.Image, transform) -> np.ndarray:
    """Fixed voxels whose mapped point lies at least one voxel inside the moving grid."""
    points = physical_points(fixed).reshape(-1, 3)
    mapped = np.array([transform.TransformPoint(tuple(map(float, p))) for p in points])
    index = np.array([moving.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in mapped])
    inside = np.all((index >= 1) & (index <= np.array(moving.GetSize()) - 2), axis=1)
    return inside.reshape(fixed.GetSize()[::-1])


def on_fixed_grid(image: sitk.Image, fixed: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(
        sitk.Resample(image, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    )


def harden(node) -> None:
    assert slicer.vtkSlicerTransformLogic.hardenTransform(node)
    assert node.GetParentTransformNode() is None


# ---------------------------------------------------------------------------------- volumes


def test_volume_round_trip_keeps_voxels_and_oblique_anisotropic_geometry(mrml_scene,
                                                                         oblique_image):
    node = mrml.volume_node_from_image(oblique_image, mrml_scene, "oblique")
    back = mrml.image_from_volume_node(node)

    assert node.IsA("vtkMRMLScalarVolumeNode") and node.GetDisplayNode() is not None
    assert back.GetSize() == oblique_image.GetSize()
    assert np.allclose(back.GetOrigin(), oblique_image.GetOrigin(), atol=1e-9)
    assert np.allclose(back.GetSpacing(), oblique_image.GetSpacing(), atol=1e-9)
    assert np.allclose(back.GetDirection(), oblique_image.GetDirection(), atol=1e-9)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(oblique_image))


def test_physical_point_lands_on_the_same_voxel_and_value_in_slicer_and_itk(mrml_scene,
                                                                            oblique_image):
    import vtk

    node = mrml.volume_node_from_image(oblique_image, mrml_scene, "oblique")
    slicer_voxels = slicer.util.arrayFromVolume(node)  # Slicer's own accessor, [k, j, i]
    ras_to_ijk = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(ras_to_ijk)
    rng = np.random.default_rng(7)
    for index in rng.integers([0, 0, 0], oblique_image.GetSize(), size=(25, 3)):
        lps = np.array(oblique_image.TransformIndexToPhysicalPoint(index.tolist()))
        # Move off the voxel centre so that a mirrored axis would pick a different voxel.
        lps = lps + 0.2 * np.array(oblique_image.GetSpacing())[0]
        ras = [-lps[0], -lps[1], lps[2], 1.0]
        ijk = np.round(ras_to_ijk.MultiplyPoint(ras)[:3]).astype(int)
        itk_index = oblique_image.TransformPhysicalPointToIndex(lps.tolist())
        assert tuple(ijk) == tuple(itk_index)
        assert slicer_voxels[ijk[2], ijk[1], ijk[0]] == oblique_image[itk_index]


def test_volume_under_linear_parent_transform_is_read_where_slicer_shows_it(mrml_scene,
                                                                            oblique_image):
    shift = sitk.Euler3DTransform((0, 0, 0), 0.2, 0.0, -0.1, (5.0, -3.0, 2.0))
    node = mrml.volume_node_from_image(oblique_image, mrml_scene, "moved")
    parent = mrml.transform_node_from_transform(shift, mrml_scene, "parent")
    node.SetAndObserveTransformNodeID(parent.GetID())

    image = mrml.image_from_volume_node(node)

    # Slicer shows voxel (3, 4, 5) at parent_to_world(ijk_to_ras(3, 4, 5)).
    world = [0.0, 0.0, 0.0]
    ras = mrml._matrix_from_image(oblique_image) @ np.array([3, 4, 5, 1.0])
    parent.GetTransformToParent().TransformPoint(ras[:3].tolist(), world)
    expected_lps = [-world[0], -world[1], world[2]]
    assert np.allclose(image.TransformIndexToPhysicalPoint((3, 4, 5)), expected_lps, atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(oblique_image))


def test_volume_under_nonlinear_parent_transform_is_refused_with_advice(mrml_scene,
                                                                        oblique_image):
    field = sitk.Image(oblique_image.GetSize(), sitk.sitkVectorFloat64)
    field.CopyInformation(oblique_image)
    node = mrml.volume_node_from_image(oblique_image, mrml_scene, "warped")
    warp = mrml.transform_node_from_transform(sitk.DisplacementFieldTransform(field), mrml_scene)
    node.SetAndObserveTransformNodeID(warp.GetID())

    with pytest.raises(GeometryError, match="non-linear transform.*Harden"):
        mrml.image_from_volume_node(node)


def test_label_image_becomes_labelmap_node_and_non_integer_labels_are_refused(mrml_scene):
    labels = make_image(np.arange(60, dtype=np.float32).reshape(3, 4, 5) % 4)
    node = mrml.volume_node_from_image(labels, mrml_scene, "labels", labelmap=True)
    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    back = mrml.image_from_volume_node(node)
    assert back.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))

    with pytest.raises(LabelError, match="non-integer"):
        mrml.volume_node_from_image(labels + 0.5, mrml_scene, "bad", labelmap=True)


def test_vector_image_becomes_vector_volume_with_its_components(mrml_scene, rng):
    array = rng.random((4, 5, 6, 3)).astype(np.float32)
    image = sitk.GetImageFromArray(array, isVector=True)
    node = mrml.volume_node_from_image(image, mrml_scene, "probabilities")
    assert node.IsA("vtkMRMLVectorVolumeNode")
    assert np.array_equal(sitk.GetArrayFromImage(mrml.image_from_volume_node(node)), array)


def test_volume_without_scene_or_image_data_fails_clearly(mrml_scene):
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(Exception, match="holds no image data"):
        mrml.image_from_volume_node(empty)
    slicer.mrmlScene = None
    with pytest.raises(ConfigError, match="scene"):
        mrml.volume_node_from_image(make_image(np.zeros((2, 2, 2), np.float32)))


# ---------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize(
    "transform",
    [
        sitk.Euler3DTransform((0, 0, 40), 0.1, -0.05, 0.15, (3.0, -2.0, 4.0)),
        sitk.AffineTransform(
            [1.05, 0.08, 0.0, -0.04, 0.95, 0.06, 0.02, 0.0, 1.1], (2.0, 1.0, -3.0), (5, -4, 38)
        ),
    ],
    ids=["rigid", "affine"],
)
def test_linear_transform_node_as_parent_puts_moving_voxels_where_the_engine_does(
    mrml_scene, moving_image, fixed_grid, transform
):
    expected = sitk.GetArrayFromImage(
        sitk.Resample(moving_image, fixed_grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    )
    node = mrml.volume_node_from_image(moving_image, mrml_scene, "moving")
    transform_node = mrml.transform_node_from_transform(transform, mrml_scene, "moving to fixed")
    assert transform_node.IsA("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform_node.GetID())
    harden(node)

    hardened = on_fixed_grid(mrml.image_from_volume_node(node), fixed_grid)
    inside = voxels_well_inside(fixed_grid, moving_image, transform)
    assert inside.sum() > 5000
    # A linear transform hardens into the geometry alone: no resampling, no error.
    assert np.abs(hardened - expected)[inside].max() < 1e-3


def test_linear_transform_round_trips_through_a_transform_node(mrml_scene, rng):
    transform = sitk.AffineTransform(
        [0.98, 0.1, 0.02, -0.1, 1.02, 0.05, 0.0, -0.03, 0.9], (4.0, -6.0, 2.5), (10, 20, 30)
    )
    node = mrml.transform_node_from_transform(transform, mrml_scene)
    back = mrml.transform_from_transform_node(node)
    points = rng.uniform(-100, 100, size=(20, 3))
    for point in points:
        assert np.allclose(back.TransformPoint(point.tolist()),
                           transform.TransformPoint(point.tolist()), atol=1e-9)


def wavy_field(reference: sitk.Image) -> sitk.Image:
    """A smooth displacement field (up to 3 mm) on ``reference``'s grid."""
    points = physical_points(reference)
    vectors = np.stack(
        [3 * np.sin(points[..., 1] / 10.0), 2 * np.cos(points[..., 0] / 12.0),
         1.5 * np.sin(points[..., 2] / 8.0)], axis=-1,
    )
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.CopyInformation(reference)
    return field


def test_displacement_field_becomes_grid_transform_that_hardens_like_the_engine_resamples(
    mrml_scene, moving_image, fixed_grid
):
    transform = sitk.DisplacementFieldTransform(wavy_field(fixed_grid))
    expected = sitk.GetArrayFromImage(
        sitk.Resample(moving_image, fixed_grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    )
    node = mrml.volume_node_from_image(moving_image, mrml_scene, "moving")
    grid_node = mrml.transform_node_from_transform(transform, mrml_scene, "warp")
    assert grid_node.IsA("vtkMRMLGridTransformNode")
    node.SetAndObserveTransformNodeID(grid_node.GetID())
    harden(node)

    hardened = on_fixed_grid(mrml.image_from_volume_node(node), fixed_grid)
    inside = voxels_well_inside(fixed_grid, moving_image, transform)
    error = np.abs(hardened - expected)[inside]
    # Hardening resamples once more (on the moving grid, 2.5 mm slices): interpolation error
    # only, about 1 % of the 100-unit blob at worst. A wrong direction or axis flip gives > 25.
    assert error.max() < 2.0
    assert error.mean() < 0.1


def test_grid_transform_node_round_trips_to_the_same_displacements(mrml_scene, fixed_grid, rng):
    transform = sitk.DisplacementFieldTransform(wavy_field(fixed_grid))
    node = mrml.transform_node_from_transform(transform, mrml_scene)
    back = mrml.transform_from_transform_node(node)
    assert back.GetTransformEnum() == sitk.sitkDisplacementField
    for index in rng.integers(1, np.array(fixed_grid.GetSize()) - 1, size=(20, 3)):
        point = fixed_grid.TransformContinuousIndexToPhysicalPoint((index + 0.3).tolist())
        assert np.allclose(back.TransformPoint(point), transform.TransformPoint(point), atol=1e-6)


def test_bspline_transform_is_sampled_on_the_reference_grid(mrml_scene, fixed_grid, rng):
    bspline = sitk.BSplineTransformInitializer(fixed_grid, [3, 3, 3])
    parameters = rng.normal(0.0, 2.0, len(bspline.GetParameters()))
    bspline.SetParameters(parameters.tolist())
    with pytest.raises(ConfigError, match="reference"):
        mrml.transform_node_from_transform(bspline, mrml_scene)

    node = mrml.transform_node_from_transform(bspline, mrml_scene, reference=fixed_grid)
    back = mrml.transform_from_transform_node(node)
    for index in rng.integers(0, fixed_grid.GetSize(), size=(20, 3)):
        point = fixed_grid.TransformIndexToPhysicalPoint(index.tolist())
        assert np.allclose(back.TransformPoint(point), bspline.TransformPoint(point), atol=1e-6)


def test_inverted_grid_transform_is_sampled_through_slicers_inversion(mrml_scene, fixed_grid):
    forward = sitk.DisplacementFieldTransform(wavy_field(fixed_grid))
    node = mrml.transform_node_from_transform(forward, mrml_scene)
    node.Inverse()  # the grid is now the to-parent transform; from-parent is its inverse
    inverse = mrml.transform_from_transform_node(node)
    assert inverse.GetTransformEnum() == sitk.sitkDisplacementField
    centre = np.array(fixed_grid.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2 for s in fixed_grid.GetSize()]
    ))
    # inverse(forward(p)) == p, to the inversion's and the sampling's tolerance; the forward
    # displacement there is several mm, so reading the grid un-inverted would fail.
    moved = np.array(forward.TransformPoint(centre.tolist()))
    assert np.linalg.norm(moved - centre) > 1.0
    assert np.linalg.norm(np.array(inverse.TransformPoint(moved.tolist())) - centre) < 0.2


def test_non_linear_transform_without_a_grid_needs_a_reference(mrml_scene, fixed_grid):
    import vtk

    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for point, shift in (((0, 0, 0), (2, 0, 0)), ((50, 0, 0), (50, 3, 0)),
                         ((0, 50, 0), (0, 50, 1)), ((0, 0, 50), (1, 1, 50))):
        source.InsertNextPoint(*point)
        target.InsertNextPoint(*shift)
    spline = vtk.vtkThinPlateSplineTransform()
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    spline.SetBasisToR()
    node = mrml_scene.AddNewNodeByClass("vtkMRMLTransformNode", "thin plate")
    node.SetAndObserveTransformFromParent(spline)
    with pytest.raises(ConfigError, match="reference"):
        mrml.transform_from_transform_node(node)
    sampled = mrml.transform_from_transform_node(node, reference=fixed_grid)
    point = fixed_grid.TransformIndexToPhysicalPoint((4, 5, 6))
    ras = spline.TransformPoint([-point[0], -point[1], point[2]])
    assert np.allclose(sampled.TransformPoint(point), [-ras[0], -ras[1], ras[2]], atol=1e-6)


# ------------------------------------------------------------------------------- segmentations


@pytest.fixture
def two_labels() -> sitk.Image:
    array = np.zeros((12, 20, 24), np.uint8)
    array[3:8, 4:10, 5:12] = 2
    array[2:6, 12:18, 14:20] = 5
    return make_image(array, (0.9, 1.2, 2.5), (-10.0, 5.0, 20.0), rotation_direction((10, -20, 30)))


def test_segmentation_has_named_coloured_segments_with_standard_terminology(mrml_scene,
                                                                            two_labels):
    node = mrml.segmentation_node_from_labels(
        two_labels, mrml_scene, names={2: "tumour", 5: "muscle"}, colors={5: (0.0, 0.0, 1.0)},
        name="segmentation", show_3d=True,
    )
    segments = node.GetSegmentation()
    by_name = {segments.GetNthSegment(i).GetName(): segments.GetNthSegment(i)
               for i in range(segments.GetNumberOfSegments())}
    assert set(by_name) == {"tumour", "muscle"}
    # The tumour is a "Mass" (SCT 4147007) with Slicer's recommended colour; muscle keeps the
    # colour it was given.
    assert "SCT^4147007^Mass" in by_name["tumour"].GetTerminology()
    assert np.allclose(by_name["tumour"].GetColor(), (144 / 255, 238 / 255, 144 / 255))
    assert "SCT^71616004^Muscle" in by_name["muscle"].GetTerminology()
    assert np.allclose(by_name["muscle"].GetColor(), (0.0, 0.0, 1.0))
    assert segments.ContainsRepresentation("Closed surface")
    # The temporary labelmap, its display node and the colour table are gone.
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLVolumeDisplayNode") == 0
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == 0


def test_labels_round_trip_through_a_segmentation_keeping_values_and_grid(mrml_scene,
                                                                          two_labels):
    reference = mrml.volume_node_from_image(sitk.Cast(two_labels, sitk.sitkFloat32), mrml_scene)
    node = mrml.segmentation_node_from_labels(two_labels, mrml_scene, names=["a", "b", "c"],
                                              reference_node=reference)
    assert mrml.segment_names(node) == {2: "b", 5: "label 5"}

    for back in (mrml.labels_from_segmentation_node(node, reference),
                 mrml.labels_from_segmentation_node(node)):
        assert back.GetSize() == two_labels.GetSize()
        assert np.allclose(back.GetDirection(), two_labels.GetDirection(), atol=1e-6)
        assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(two_labels))
    mrml.segment_masks(node, reference)
    # Nothing of the temporary export labelmaps is left (the reference's own display node is)
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == 0
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeDisplayNode") == 0
    # Without a reference volume the labels come back on their own grid too, not on a grid
    # cropped to the segments.
    alone = mrml.segmentation_node_from_labels(two_labels, mrml_scene)
    back = mrml.labels_from_segmentation_node(alone)
    assert back.GetSize() == two_labels.GetSize()
    assert np.allclose(back.GetOrigin(), two_labels.GetOrigin(), atol=1e-4)
    assert np.allclose(back.GetDirection(), two_labels.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(two_labels))


def test_segment_drawn_in_slicer_gets_the_smallest_free_label_value(mrml_scene, two_labels):
    node = mrml.segmentation_node_from_labels(two_labels, mrml_scene)
    segments = node.GetSegmentation()
    segments.AddEmptySegment("drawn", "drawn")
    segments.AddEmptySegment("also drawn", "also drawn")
    assert mrml.segment_names(node) == {2: "label 2", 5: "label 5", 1: "drawn", 3: "also drawn"}


# ---------------------------------------------------------------------------------- tables


def test_table_node_round_trips_a_dataframe_with_numbers_text_and_index(mrml_scene):
    features = pd.DataFrame(
        {"CT_firstorder_mean": [41.5, -3.25], "voxels": [120, 95], "tumour": [True, False],
         "modality": ["CT", "PET"]},
        index=pd.Index(["STS_002", "STS_003"], name="case_id"),
    )
    node = mrml.table_node_from_dataframe(features, mrml_scene, "features")
    assert node.GetNumberOfRows() == 2 and node.GetNumberOfColumns() == 5
    assert node.GetColumnName(0) == "case_id"
    assert node.GetCellText(1, 1) == "-3.25"
    back = mrml.dataframe_from_table_node(node)
    assert back["case_id"].tolist() == ["STS_002", "STS_003"]
    assert back["CT_firstorder_mean"].tolist() == [41.5, -3.25]
    assert back["voxels"].tolist() == [120, 95]
    assert back["tumour"].tolist() == [1, 0]
    assert back["modality"].tolist() == ["CT", "PET"]


def test_table_node_keeps_missing_values_and_large_integers_and_refuses_twice_named_columns(
    mrml_scene,
):
    table = pd.DataFrame({
        "count": pd.array([3, None, 5], dtype="Int64"),
        "flag": pd.array([True, None, False], dtype="boolean"),
        "huge": np.array([1, 2, 2**63 + 2**12], dtype=np.uint64),
        "note": ["a", None, pd.NA],
    })
    back = mrml.dataframe_from_table_node(mrml.table_node_from_dataframe(table, mrml_scene))
    assert back["count"].iloc[0] == 3 and np.isnan(back["count"].iloc[1])
    assert back["flag"].iloc[0] == 1 and np.isnan(back["flag"].iloc[1])
    assert back["huge"].iloc[2] == pytest.approx(2.0**63, rel=1e-12)  # not a negative number
    assert back["note"].tolist() == ["a", "", ""]
    twice = pd.DataFrame([[1, 2]], columns=["a", "a"])
    with pytest.raises(ConfigError, match="names the column.* a more than once"):
        mrml.table_node_from_dataframe(twice, mrml_scene)


# ---------------------------------------------------------------------------------- markups


def _click(node, ras, label=None):
    """A control point placed at world RAS ``ras`` (as a click in a view places it)."""
    index = node.AddControlPointWorld([float(v) for v in ras], label or "")
    return index


def test_landmark_clicked_on_a_voxel_in_slicer_is_that_voxels_point_in_the_engine(
        mrml_scene, oblique_image):
    # The volume sits under a linear transform (as after a registration), and the point list
    # under another one: the click happens in world coordinates, where Slicer shows both.
    volume = mrml.volume_node_from_image(oblique_image, mrml_scene, "moved")
    parent = mrml.transform_node_from_transform(
        sitk.Euler3DTransform((0, 0, 0), 0.2, 0.0, -0.1, (5.0, -3.0, 2.0)), mrml_scene, "p")
    volume.SetAndObserveTransformNodeID(parent.GetID())
    image = mrml.image_from_volume_node(volume)
    voxels = [(3, 4, 5), (10, 2, 7), (0, 0, 0)]
    shown = []
    for ijk in voxels:
        ras = mrml._matrix_from_image(oblique_image) @ np.array([*ijk, 1.0])
        world = [0.0, 0.0, 0.0]
        parent.GetTransformToParent().TransformPoint(ras[:3].tolist(), world)
        shown.append(world)
    landmarks = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
    markups_parent = mrml.transform_node_from_transform(
        sitk.TranslationTransform(3, (4.0, 1.0, -2.0)), mrml_scene, "markups parent")
    landmarks.SetAndObserveTransformNodeID(markups_parent.GetID())
    for world in shown:
        _click(landmarks, world)

    points, labels = mrml.points_from_markups(landmarks)

    assert labels == ["clicks-1", "clicks-2", "clicks-3"]
    for point, ijk in zip(points, voxels, strict=True):
        assert np.allclose(image.TransformPhysicalPointToContinuousIndex(point), ijk, atol=1e-6)


def test_landmarks_pair_by_label_or_in_order_and_skip_points_marked_missing(mrml_scene):
    lps = np.array([[1.0, 2.0, 3.0], [10.0, -4.0, 7.0], [-6.0, 5.0, 0.0], [3.0, 3.0, 9.0]])
    fixed = mrml.markups_from_points(lps, mrml_scene, "on CT",
                                     labels=["carina", "L1", "tip", "knee"])
    # The same anatomy clicked in another order on the moving volume: pairs by label.
    moving = mrml.markups_from_points(lps[[2, 0, 3, 1]] + 100.0, mrml_scene, "on MR",
                                      labels=["tip", "carina", "knee", "L1"])
    f, m = mrml.landmark_pairs(fixed, moving)
    assert np.allclose(m - f, 100.0)
    assert np.allclose(f, lps)
    moving.SetNthControlPointPositionMissing(0)  # "tip" is not visible on the moving volume
    f, m = mrml.landmark_pairs(fixed, moving)
    assert np.allclose(m - f, 100.0)
    assert np.allclose(f, lps[[0, 1, 3]])

    # Slicer's own labels ("A-1", "B-1"): in order; a point marked missing drops its pair.
    a = mrml.markups_from_points(lps, mrml_scene, "A")
    b = mrml.markups_from_points(lps + 100.0, mrml_scene, "B")
    b.SetNthControlPointPositionMissing(1)
    f, m = mrml.landmark_pairs(a, b)
    assert len(f) == 3 and np.allclose(m - f, 100.0)
    assert np.allclose(f, lps[[0, 2, 3]])


def test_landmark_labels_pair_whatever_their_case_and_spaces_and_never_fall_back_to_order(
        mrml_scene):
    lps = np.array([[0.0, 0, 0], [50, 0, 0], [0, 60, 0], [0, 0, 70]])
    fixed = mrml.markups_from_points(lps, mrml_scene, "on CT",
                                     labels=["carina", "L1", "tip", "sternum"])
    # the same anatomy clicked in another order, typed with capitals and a stray space
    moving = mrml.markups_from_points(lps[[2, 0, 3, 1]] + 5.0, mrml_scene, "on MR",
                                      labels=["Tip", "Carina", "Sternum", "L1 "])
    f, m = mrml.landmark_pairs(fixed, moving)
    assert np.allclose(m - f, 5.0)
    # labelled after the anatomy on both sides but sharing none: refused, not paired in order
    other = mrml.markups_from_points(lps + 5.0, mrml_scene, "on PET",
                                     labels=["apex", "hilum", "dome", "spine"])
    with pytest.raises(MMAError, match="share no label"):
        mrml.landmark_pairs(fixed, other)
    # vertebrae written "C-7" look like Slicer's "F-7" one by one, but not as a list
    spine = mrml.markups_from_points(lps, mrml_scene, "spine on CT",
                                     labels=["C-7", "T-4", "L-1", "S-1"])
    typed = mrml.markups_from_points(lps[[2, 0, 3, 1]] + 5.0, mrml_scene, "spine on MR",
                                     labels=["L1", "C7", "S1", "T4"])
    with pytest.raises(MMAError, match="share no label"):
        mrml.landmark_pairs(spine, typed)


def test_landmarks_that_cannot_pair_are_refused_with_what_to_do(mrml_scene, oblique_image):
    lps = np.array([[1.0, 2.0, 3.0], [10.0, -4.0, 7.0], [-6.0, 5.0, 0.0]])
    fixed = mrml.markups_from_points(lps, mrml_scene, "F", labels=["carina", "L1", "tip"])
    renamed = mrml.markups_from_points(lps, mrml_scene, "M", labels=["carina", "L2", "tip"])
    with pytest.raises(MMAError, match=r"L1 is only in 'F'; L2 is only in 'M'"):
        mrml.landmark_pairs(fixed, renamed)
    shorter = mrml.markups_from_points(lps[:2], mrml_scene, "G")
    with pytest.raises(MMAError, match="hold 3 points and 'G' 2"):
        mrml.landmark_pairs(mrml.markups_from_points(lps, mrml_scene, "H"), shorter)
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "nothing")
    with pytest.raises(MMAError, match="'nothing' hold no placed point"):
        mrml.points_from_markups(empty)
    volume = mrml.volume_node_from_image(oblique_image, mrml_scene, "a volume")
    with pytest.raises(ConfigError, match="'a volume' is not a markups node"):
        mrml.points_from_markups(volume)
