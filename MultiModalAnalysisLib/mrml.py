"""The bridge between Slicer's MRML nodes and the engine's SimpleITK objects.

This is the only module that knows about Slicer. It converts:

- volume nodes <-> ``SimpleITK.Image`` (Slicer is RAS, ITK is LPS: the flip of the first two
  axes happens here and nowhere else);
- transform nodes <-> ``SimpleITK.Transform`` (the engine's transform maps a fixed-image point
  to a moving-image point, which is Slicer's *from parent* direction for a transform node set
  as the moving volume's parent);
- segmentation nodes <-> label images (segment names, colours and standard terminology
  travel through a colour table);
- table nodes <-> ``pandas.DataFrame``.

``slicer``, ``vtk`` and MRML are imported inside the functions, so the engine stays
importable without Slicer; the tests run it against the real MRML of the ``slicer-core``
wheel.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError, GeometryError, LabelError, MMAError
from MultiModalAnalysisLib.images import is_integer_image
from MultiModalAnalysisLib.terminology import GENERAL_ANATOMY_CONTEXT, Term, terminology_for

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    import pandas as pd

# RAS <-> LPS: negate x and y (the matrix is its own inverse).
_FLIP = np.diag([-1.0, -1.0, 1.0])
_FLIP4 = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Segment tag holding the label value a segment came from, so a round trip keeps values.
LABEL_VALUE_TAG = "MultiModalAnalysis.LabelValue"

_LINEAR_TRANSFORMS = {
    sitk.sitkIdentity,
    sitk.sitkTranslation,
    sitk.sitkScale,
    sitk.sitkScaleLogarithmic,
    sitk.sitkEuler,
    sitk.sitkSimilarity,
    sitk.sitkQuaternionRigid,
    sitk.sitkVersor,
    sitk.sitkVersorRigid,
    sitk.sitkScaleSkewVersor,
    sitk.sitkComposeScaleSkewVersor,
    sitk.sitkScaleVersor,
    sitk.sitkAffine,
}

# A qualitative palette (0..1 RGB) for segments with no colour given and no terminology match.
_PALETTE = (
    (0.90, 0.30, 0.24),
    (0.20, 0.60, 0.86),
    (0.18, 0.80, 0.44),
    (0.95, 0.77, 0.06),
    (0.61, 0.35, 0.71),
    (0.90, 0.49, 0.13),
    (0.10, 0.74, 0.61),
    (0.93, 0.44, 0.64),
)


# --------------------------------------------------------------------------------------
# scene and geometry helpers


def _scene(scene: Any | None) -> Any:
    """The scene to add nodes to: ``scene``, else Slicer's ``slicer.mrmlScene``."""
    if scene is not None:
        return scene
    import slicer

    default = getattr(slicer, "mrmlScene", None)
    if default is None:
        raise ConfigError(
            "no MRML scene was given and slicer.mrmlScene is not set: pass scene=... (outside "
            "the Slicer application, create one with slicer.vtkMRMLScene())."
        )
    return default


def _add_node(scene: Any, class_name: str, name: str, default_name: str) -> Any:
    return scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name or default_name))


def _node_ids(scene: Any, class_name: str) -> set[str]:
    return {
        scene.GetNthNodeByClass(i, class_name).GetID()
        for i in range(scene.GetNumberOfNodesByClass(class_name))
    }


def _to_numpy_matrix(vtk_matrix: Any) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


def _to_vtk_matrix(matrix: np.ndarray) -> Any:
    import vtk

    result = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            result.SetElement(i, j, float(matrix[i, j]))
    return result


def _node_label(node: Any) -> str:
    name = node.GetName() if node is not None else None
    return f"'{name}'" if name else "the node"


def _ijk_to_world(node: Any) -> np.ndarray:
    """The volume's IJK -> world RAS matrix, through a linear parent transform if it has one.

    Raises:
        GeometryError: the volume sits under a non-linear (warping) transform.
    """
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    matrix = _to_numpy_matrix(ijk_to_ras)
    parent = node.GetParentTransformNode()
    if parent is None:
        return matrix
    if not parent.IsTransformToWorldLinear():
        raise GeometryError(
            f"volume {_node_label(node)} is under the non-linear transform "
            f"{_node_label(parent)}, which cannot be carried by an image grid. Harden the "
            "transform first (Data module: right-click the volume > Harden transform), or "
            "remove it from the volume."
        )
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    return _to_numpy_matrix(to_world) @ matrix


def _grid_from_matrix(matrix: np.ndarray, what: str) -> tuple[list, list, list]:
    """(origin, spacing, direction) in LPS from an IJK -> RAS matrix."""
    columns = matrix[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise GeometryError(f"{what} has a zero voxel spacing ({spacing.tolist()}).")
    # A sheared volume (hardened under an affine with shear) keeps non-perpendicular axes:
    # both Slicer and ITK accept any invertible direction matrix, so nothing is resampled.
    direction_ras = columns / spacing
    if abs(np.linalg.det(direction_ras)) < 1e-6:
        raise GeometryError(f"{what} has a degenerate (flat) geometry; check its transform.")
    direction = _FLIP @ direction_ras
    origin = _FLIP @ matrix[:3, 3]
    return origin.tolist(), spacing.tolist(), direction.ravel().tolist()


def _matrix_from_image(image: sitk.Image) -> np.ndarray:
    """The IJK -> RAS matrix of an image's grid."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = _FLIP @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = _FLIP @ np.array(image.GetOrigin(), dtype=float)
    return matrix


# --------------------------------------------------------------------------------------
# volumes


def image_from_volume_node(node: Any) -> sitk.Image:
    """The voxels and geometry of a volume node as a new ``SimpleITK.Image`` (LPS).

    A linear parent transform is applied to the geometry (the image is where the volume is
    shown); a non-linear one is refused with a message saying how to harden it. Scalar,
    labelmap and vector (multi-component) volumes are supported; the node is not modified.

    Raises:
        MMAError: the node holds no image data.
        GeometryError: a non-linear parent transform, or a degenerate geometry.
    """
    from vtk.util.numpy_support import vtk_to_numpy

    if node is None:
        raise MMAError("no volume was selected: choose an input volume.")
    image_data = node.GetImageData()
    scalars = image_data.GetPointData().GetScalars() if image_data is not None else None
    if scalars is None:
        raise MMAError(
            f"volume {_node_label(node)} holds no image data. Load the volume again, or choose "
            "another one."
        )
    dims = image_data.GetDimensions()
    components = image_data.GetNumberOfScalarComponents()
    shape = (dims[2], dims[1], dims[0]) + ((components,) if components > 1 else ())
    # A copy: the image must not share memory with the node, which may change or be deleted.
    array = np.array(vtk_to_numpy(scalars), copy=True).reshape(shape)
    image = sitk.GetImageFromArray(array, isVector=components > 1)
    origin, spacing, direction = _grid_from_matrix(
        _ijk_to_world(node), f"volume {_node_label(node)}"
    )
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def volume_node_from_image(
    image: sitk.Image, scene: Any | None = None, name: str = "", labelmap: bool = False
) -> Any:
    """A new volume node (scalar, labelmap or vector) holding a copy of ``image``.

    Args:
        image: a 3-D image (LPS geometry, as every SimpleITK image).
        scene: the MRML scene (default ``slicer.mrmlScene``).
        name: node name (made unique in the scene).
        labelmap: create a labelmap volume node; the image must hold integer values.

    Returns:
        The node, with display nodes, in the scene.
    """
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    if image.GetDimension() != 3:
        raise MMAError(
            f"only 3-D images can become volume nodes ({name or 'this image'} is "
            f"{image.GetDimension()}-D)."
        )
    scene = _scene(scene)
    components = image.GetNumberOfComponentsPerPixel()
    array = sitk.GetArrayFromImage(image)
    if labelmap:
        if components != 1:
            raise LabelError(f"{name or 'the image'} has {components} components: not a labelmap.")
        array = _as_label_array(array, name or "the image")
        class_name = "vtkMRMLLabelMapVolumeNode"
    else:
        class_name = "vtkMRMLVectorVolumeNode" if components > 1 else "vtkMRMLScalarVolumeNode"

    flat = np.ascontiguousarray(array).reshape(-1, components) if components > 1 else array.ravel()
    vtk_array = numpy_to_vtk(np.ascontiguousarray(flat), deep=True)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(*image.GetSize())
    image_data.GetPointData().SetScalars(vtk_array)

    node = _add_node(scene, class_name, name, "Volume")
    node.SetAndObserveImageData(image_data)
    node.SetIJKToRASMatrix(_to_vtk_matrix(_matrix_from_image(image)))
    node.CreateDefaultDisplayNodes()
    return node


def keep_in_place_under(node: Any, transform_node: Any) -> None:
    """Put a volume node under a linear ``transform_node`` without moving it in the world:
    its own geometry becomes the one the transform carries to where the volume is now.

    Raises:
        GeometryError: ``transform_node`` is not linear.
    """
    import vtk

    if not transform_node.IsTransformToWorldLinear():
        raise GeometryError(
            f"transform {_node_label(transform_node)} is non-linear: a volume cannot be placed "
            "under it without resampling. Harden it first (Data module)."
        )
    to_world = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(to_world)
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    own = np.linalg.inv(_to_numpy_matrix(to_world)) @ _to_numpy_matrix(ijk_to_ras)
    node.SetIJKToRASMatrix(_to_vtk_matrix(own))
    node.SetAndObserveTransformNodeID(transform_node.GetID())


def _as_label_array(array: np.ndarray, what: str) -> np.ndarray:
    """A label array as an integer type Slicer labelmaps use."""
    if np.issubdtype(array.dtype, np.integer):
        values = array
    else:
        if not np.all(np.isfinite(array)) or np.any(np.mod(array, 1) != 0):
            raise LabelError(
                f"{what} holds non-integer values: a labelmap needs whole numbers. Was an "
                "intensity image given as a label image?"
            )
        values = array
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return values.astype(dtype, copy=False)
    raise LabelError(f"{what} holds label values up to {high}: too large for a labelmap.")


# --------------------------------------------------------------------------------------
# transforms


def _is_linear(transform: sitk.Transform) -> bool:
    transform = transform.Downcast()
    kind = transform.GetTransformEnum()
    if kind == sitk.sitkComposite:
        count = transform.GetNumberOfTransforms()
        return all(_is_linear(transform.GetNthTransform(i)) for i in range(count))
    return kind in _LINEAR_TRANSFORMS


def _affine_matrix(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 homogeneous matrix of a linear transform (LPS), read from how it maps points.

    Every linear SimpleITK transform is x -> A x + b, so b = T(0) and column i of A is
    T(e_i) - T(0); this covers all linear types (and composites of them) alike.
    """
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    matrix = np.eye(4)
    for i in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[i] = 1.0
        matrix[:3, i] = np.array(transform.TransformPoint(unit)) - origin
    matrix[:3, 3] = origin
    return matrix


def _displacement_field_of(transform: sitk.Transform, reference: sitk.Image | None) -> sitk.Image:
    """The displacement field (LPS vectors) of a non-linear transform."""
    transform = transform.Downcast()
    if transform.GetTransformEnum() == sitk.sitkDisplacementField and reference is None:
        return transform.GetDisplacementField()
    if reference is None:
        raise ConfigError(
            f"a {transform.GetName()} cannot become a grid transform without a grid to sample "
            "it on: pass reference=<the fixed image>."
        )
    return sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        reference.GetSize(),
        reference.GetOrigin(),
        reference.GetSpacing(),
        reference.GetDirection(),
    )


def _grid_transform_from_field(field: sitk.Image) -> Any:
    """A vtkOrientedGridTransform (RAS) equivalent to an LPS displacement field."""
    import slicer
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    vectors = sitk.GetArrayFromImage(field).astype(np.float64)  # [z, y, x, 3], LPS
    vectors = vectors * np.array([-1.0, -1.0, 1.0])
    grid = vtk.vtkImageData()
    grid.SetDimensions(*field.GetSize())
    grid.SetSpacing(*field.GetSpacing())
    grid.SetOrigin(*(_FLIP @ np.array(field.GetOrigin())).tolist())
    grid.GetPointData().SetScalars(
        numpy_to_vtk(np.ascontiguousarray(vectors.reshape(-1, 3)), deep=True)
    )
    direction = np.eye(4)
    direction[:3, :3] = _FLIP @ np.array(field.GetDirection()).reshape(3, 3)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(_to_vtk_matrix(direction))
    # ITK's displacement-field transform interpolates linearly; match it.
    transform.SetInterpolationModeToLinear()
    return transform


def as_node_transform(transform: sitk.Transform, reference: sitk.Image) -> sitk.Transform:
    """``transform`` as :func:`transform_node_from_transform` would store it, computed ahead
    (no scene needed: it may run in a worker thread): a linear transform as it is, a
    non-linear one as a displacement field sampled on ``reference``'s grid."""
    if _is_linear(transform):
        return transform
    return sitk.DisplacementFieldTransform(_displacement_field_of(transform, reference))


def transform_node_from_transform(
    transform: sitk.Transform,
    scene: Any | None = None,
    name: str = "",
    reference: sitk.Image | None = None,
) -> Any:
    """A transform node that, set as the moving volume's parent, aligns it with the fixed one.

    ``transform`` follows the engine's (ITK) convention: it maps a point of the fixed image
    to the moving image, in LPS. In Slicer that is the node's *from parent* transform, in RAS.
    Linear transforms (rigid, similarity, affine, composites of them) become a linear
    transform node; displacement fields become a grid transform node; other non-linear
    transforms (B-spline, composites) are sampled into a grid on ``reference``.

    Args:
        transform: fixed point -> moving point (LPS).
        scene: the MRML scene (default ``slicer.mrmlScene``).
        name: node name.
        reference: the fixed image, to sample non-linear transforms that are not already a
            displacement field.
    """
    scene = _scene(scene)
    if _is_linear(transform):
        node = _add_node(scene, "vtkMRMLLinearTransformNode", name, "Transform")
        from_parent = _FLIP4 @ _affine_matrix(transform) @ _FLIP4
        node.SetMatrixTransformFromParent(_to_vtk_matrix(from_parent))
    else:
        field = _displacement_field_of(transform, reference)
        node = _add_node(scene, "vtkMRMLGridTransformNode", name, "Transform")
        node.SetAndObserveTransformFromParent(_grid_transform_from_field(field))
    node.CreateDefaultDisplayNodes()
    return node


def transform_from_transform_node(node: Any, reference: sitk.Image | None = None) -> sitk.Transform:
    """The engine transform (fixed point -> moving point, LPS) of a transform node.

    The node's transform to the world (its parents included) is read in the *from world*
    direction, the one that resamples a child volume into the world. Linear transforms give a
    ``SimpleITK.AffineTransform``. Non-linear ones give a ``DisplacementFieldTransform``
    sampled on ``reference``'s grid, or by default on the node's own displacement grid (for a
    grid transform, sampling at its grid points reproduces it exactly; an inverted grid is
    sampled through Slicer's own inversion).

    Raises:
        ConfigError: a non-linear transform without a grid of its own and no ``reference``.
    """
    import vtk

    if node.IsTransformToWorldLinear():
        from_world = vtk.vtkMatrix4x4()
        node.GetMatrixTransformFromWorld(from_world)
        matrix = _FLIP4 @ _to_numpy_matrix(from_world) @ _FLIP4
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(matrix[:3, :3].ravel().tolist())
        affine.SetTranslation(matrix[:3, 3].tolist())
        return affine

    if reference is None:
        reference = _own_grid(node)
    if reference is None:
        raise ConfigError(
            f"transform {_node_label(node)} is non-linear and has no displacement grid of its "
            "own: pass reference=<an image> to sample it on that image's grid."
        )
    general = vtk.vtkGeneralTransform()
    node.GetTransformFromWorld(general)
    return sitk.DisplacementFieldTransform(_sample_vtk_transform(general, reference))


def _own_grid(node: Any) -> sitk.Image | None:
    """An empty image on the displacement grid of a grid transform node (LPS), if it has one."""
    for transform in (node.GetTransformFromParent(), node.GetTransformToParent()):
        if transform is None or not transform.IsA("vtkOrientedGridTransform"):
            continue
        transform.Update()
        grid = transform.GetDisplacementGrid()
        if grid is None:
            continue
        image = sitk.Image(list(grid.GetDimensions()), sitk.sitkUInt8)
        image.SetSpacing(grid.GetSpacing())
        image.SetOrigin((_FLIP @ np.array(grid.GetOrigin())).tolist())
        direction = _to_numpy_matrix(transform.GetGridDirectionMatrix())[:3, :3]
        image.SetDirection((_FLIP @ direction).ravel().tolist())
        return image
    return None


def _sample_vtk_transform(transform: Any, reference: sitk.Image) -> sitk.Image:
    """Displacement field (LPS) of a RAS vtk transform, sampled at ``reference``'s voxels."""
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

    size = reference.GetSize()
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    index = np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float)
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    points_lps = np.array(reference.GetOrigin()) + (index * reference.GetSpacing()) @ direction.T
    points = vtk.vtkPoints()
    points.SetData(numpy_to_vtk(np.ascontiguousarray(points_lps @ _FLIP), deep=True))
    mapped = vtk.vtkPoints()
    transform.TransformPoints(points, mapped)
    mapped_lps = vtk_to_numpy(mapped.GetData()).astype(np.float64) @ _FLIP
    field = sitk.GetImageFromArray(
        (mapped_lps - points_lps).reshape(size[2], size[1], size[0], 3), isVector=True
    )
    field.CopyInformation(reference)
    return field


# --------------------------------------------------------------------------------------
# segmentations


def _names_by_value(values: Sequence[int], names: Mapping[int, str] | Sequence[str] | None):
    if names is None:
        given: dict[int, str] = {}
    elif isinstance(names, Mapping):
        given = {int(k): str(v) for k, v in names.items()}
    else:
        given = {i + 1: str(v) for i, v in enumerate(names)}
    result, used = {}, set()
    for value in values:
        name = given.get(value) or f"label {value}"
        unique, n = name, 2
        while unique in used:  # segment names must be unique for the round trip
            unique, n = f"{name} {n}", n + 1
        used.add(unique)
        result[value] = unique
    return result


def segmentation_node_from_labels(
    labels: sitk.Image,
    scene: Any | None = None,
    names: Mapping[int, str] | Sequence[str] | None = None,
    colors: Mapping[int, Sequence[float]] | None = None,
    reference_node: Any | None = None,
    name: str = "",
    show_3d: bool = False,
) -> Any:
    """A segmentation node with one named, coloured segment per non-zero label value.

    Segment names and colours go through a colour table (that is how Slicer names imported
    segments); a name that matches a standard term (tumour, necrosis, oedema, fat, muscle,
    bone, ...) also gets its SNOMED-CT terminology and, when no colour is given, the standard
    colour.

    Args:
        labels: an integer label image (0 = background).
        scene: the MRML scene (default ``slicer.mrmlScene``).
        names: label value -> segment name (or a list for labels 1, 2, ...); default
            ``"label <value>"``.
        colors: label value -> (r, g, b) in 0..1.
        reference_node: the volume whose geometry the segmentation takes as its reference
            (default: the label image's own grid).
        name: the segmentation node's name.
        show_3d: also build the closed-surface representation (3-D display).
    """
    import slicer

    scene = _scene(scene)
    array = sitk.GetArrayViewFromImage(labels)
    if not is_integer_image(labels) and np.any(np.mod(array, 1) != 0):
        raise LabelError("the label image holds non-integer values: give a label map.")
    values = [int(v) for v in np.unique(array) if v != 0]
    if any(v < 0 for v in values):
        raise LabelError(f"the label image holds negative labels ({min(values)}).")
    segment_names = _names_by_value(values, names)

    color_table = _color_table(scene, segment_names, colors or {}, name)
    labelmap = volume_node_from_image(labels, scene, f"{name or 'labels'} (import)", labelmap=True)
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(color_table.GetID())
    _ensure_conversion_rules()  # a segmentation copies the converters when it is created
    segmentation = _add_node(scene, "vtkMRMLSegmentationNode", name, "Segmentation")
    segmentation.CreateDefaultDisplayNodes()
    # Without a reference volume the label image's own grid is the reference geometry, so
    # the segments come back on it (Slicer would otherwise export them cropped).
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(
        reference_node if reference_node is not None else labelmap)
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmap, segmentation
        )
        if not ok:
            raise MMAError("Slicer could not import the label image into a segmentation.")
        value_of = {n: v for v, n in segment_names.items()}
        segments = segmentation.GetSegmentation()
        for index in range(segments.GetNumberOfSegments()):
            segment = segments.GetNthSegment(index)
            value = value_of.get(segment.GetName())
            if value is None:
                continue
            segment.SetTag(LABEL_VALUE_TAG, str(value))
            term = terminology_for(segment.GetName())
            if term is not None:
                segment.SetTerminology(_terminology_string(term))
    finally:
        _remove_temporary(scene, labelmap)
        scene.RemoveNode(color_table)
    if show_3d:
        segmentation.CreateClosedSurfaceRepresentation()
    return segmentation


def _remove_temporary(scene: Any, node: Any) -> None:
    """Remove a temporary node with the display and storage nodes made for it (removing a
    node leaves them in the scene, which saves them)."""
    own = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    own.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for each in own:
        if each is not None and each.GetScene() is scene:
            scene.RemoveNode(each)


def _ensure_conversion_rules() -> None:
    """Register the labelmap <-> surface converters where no Slicer application did it."""
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        return
    for rule in (
        "vtkBinaryLabelmapToClosedSurfaceConversionRule",
        "vtkClosedSurfaceToBinaryLabelmapConversionRule",
    ):
        factory.RegisterConverterRule(getattr(slicer, rule)())


def _color_table(
    scene: Any, names: Mapping[int, str], colors: Mapping[int, Sequence[float]], name: str
) -> Any:
    table = _add_node(scene, "vtkMRMLColorTableNode", f"{name or 'segmentation'} colours", "Colors")
    table.SetTypeToUser()
    table.SetNumberOfColors(max(names, default=0) + 1)
    table.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for i, (value, segment_name) in enumerate(sorted(names.items())):
        term = terminology_for(segment_name)
        color = colors.get(value) or (term.color if term else None) or _PALETTE[i % len(_PALETTE)]
        table.SetColor(value, segment_name, *(float(c) for c in color[:3]), 1.0)
        if term is not None:
            table.SetTerminology(value, *term.category, *term.type)
    return table


def _terminology_string(term: Term) -> str:
    """Slicer's serialised terminology entry for a term of the General Anatomy list."""
    import slicer

    def coded(code: tuple[str, str, str]) -> Any:
        entry = slicer.vtkCodedEntry()
        entry.SetValueSchemeMeaning(code[1], code[0], code[2])
        return entry

    return slicer.vtkMRMLColorNode.GetTerminologyAsString(
        GENERAL_ANATOMY_CONTEXT, coded(term.category), coded(term.type), slicer.vtkCodedEntry()
    )


def segment_names(node: Any) -> dict[int, str]:
    """Label value -> segment name, in the values :func:`labels_from_segmentation_node` uses."""
    segments = node.GetSegmentation()
    values = _segment_values(segments)
    return {
        value: segments.GetNthSegment(index).GetName() for index, value in enumerate(values)
    }


def _segment_values(segments: Any) -> list[int]:
    """The label value of each segment, in order.

    A segment imported by :func:`segmentation_node_from_labels` keeps its value (a tag); any
    other (e.g. drawn in the Segment Editor) takes the smallest value no segment uses. So
    does a segment whose tag an earlier segment already holds (two segments copied in from
    label images that both used 1): each segment has its own value.
    """
    import vtk

    tagged: list[int | None] = []
    for index in range(segments.GetNumberOfSegments()):
        tag = vtk.reference("")
        found = segments.GetNthSegment(index).GetTag(LABEL_VALUE_TAG, tag)
        value = int(str(tag)) if found and str(tag).isdigit() and int(str(tag)) > 0 else None
        tagged.append(None if value in tagged else value)
    used = {v for v in tagged if v is not None}
    values, candidate = [], 1
    for value in tagged:
        if value is None:
            while candidate in used:
                candidate += 1
            value = candidate
            used.add(value)
        values.append(value)
    return values


def labels_from_segmentation_node(node: Any, reference_node: Any | None = None) -> sitk.Image:
    """A label image of every segment of a segmentation node.

    Segments keep the label value they were imported with (see
    :func:`segmentation_node_from_labels`); other segments take the smallest free value (see
    :func:`segment_names`). Where segments overlap, the later one wins.

    Args:
        node: the segmentation node.
        reference_node: the volume whose grid the label image takes (default: the
            segmentation's own reference geometry).
    """
    segments = node.GetSegmentation()
    if segments.GetNumberOfSegments() == 0:
        raise LabelError(f"segmentation {_node_label(node)} has no segments.")
    exported = _export_segments(node, range(segments.GetNumberOfSegments()), reference_node)
    # The export numbers segments 1..N in order; give them back their own values.
    values = _segment_values(segments)
    lookup = np.zeros(len(values) + 1, dtype=np.int64)
    lookup[1:] = values
    array = lookup[sitk.GetArrayViewFromImage(exported).astype(np.int64)]
    result = sitk.GetImageFromArray(_as_label_array(array, "the segmentation"))
    result.CopyInformation(exported)
    return result


def segment_masks(node: Any, reference_node: Any | None = None) -> dict[str, sitk.Image]:
    """Each segment of a segmentation node as its own binary mask (0/1, UInt8), keyed by
    segment ID, on ``reference_node``'s grid (default: the segmentation's reference
    geometry). Unlike :func:`labels_from_segmentation_node`, overlapping segments each keep
    their whole region (a necrosis segment inside a tumour segment leaves the tumour whole).
    """
    segments = node.GetSegmentation()
    masks = {}
    for index in range(segments.GetNumberOfSegments()):
        exported = _export_segments(node, [index], reference_node)
        masks[segments.GetNthSegmentID(index)] = sitk.Cast(exported != 0, sitk.sitkUInt8)
    return masks


def _export_segments(node: Any, indices: Any, reference_node: Any | None) -> sitk.Image:
    """Slicer's labelmap export of the segments at ``indices`` (numbered 1..N in order;
    where they overlap the later one wins), through a temporary labelmap node."""
    import slicer
    import vtk

    scene = node.GetScene()
    segments = node.GetSegmentation()
    ids = vtk.vtkStringArray()
    for index in indices:
        ids.InsertNextValue(segments.GetNthSegmentID(index))
    colour_tables = _node_ids(scene, "vtkMRMLColorTableNode")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export (temporary)")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            node, ids, labelmap, reference_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
        )
        if not ok:
            raise MMAError(f"Slicer could not export segmentation {_node_label(node)}.")
        exported = image_from_volume_node(labelmap)
    finally:
        _remove_temporary(scene, labelmap)
        # The export leaves a colour table behind for the temporary labelmap.
        for node_id in _node_ids(scene, "vtkMRMLColorTableNode") - colour_tables:
            scene.RemoveNode(scene.GetNodeByID(node_id))
    return exported


# --------------------------------------------------------------------------------------
# markups (landmarks)

_POSITION_DEFINED = 2  # vtkMRMLMarkupsNode.PositionDefined (Undefined 0, Preview 1, Missing 3)


def _control_points(node: Any) -> list[tuple[str, np.ndarray | None]]:
    """``(label, world LPS point)`` of every control point of a markups node, the point
    ``None`` where it is not placed (a preview, or marked "missing").

    Raises:
        ConfigError: ``node`` is not a markups node.
    """
    if node is None or not node.IsA("vtkMRMLMarkupsNode"):
        raise ConfigError(
            f"{_node_label(node)} is not a markups node: choose point landmarks (a Markups "
            "point list)."
        )
    points = []
    for index in range(node.GetNumberOfControlPoints()):
        point = None
        if node.GetNthControlPointPositionStatus(index) == _POSITION_DEFINED:
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(index, position)
            point = _FLIP @ np.array(position, dtype=float)
        points.append((node.GetNthControlPointLabel(index), point))
    return points


def points_from_markups(node: Any) -> tuple[np.ndarray, list[str]]:
    """The placed control points of a markups node, in world LPS mm, and their labels.

    World coordinates: through the markups node's parent transforms, so a point sits where
    Slicer shows it (the same space as :func:`image_from_volume_node`'s geometry). Points
    not placed (a preview, or marked "missing": not visible in this image) are left out.

    Returns:
        ``(points, labels)``: an (N, 3) array and N labels.

    Raises:
        ConfigError: ``node`` is not a markups node.
        MMAError: it holds no placed point.
    """
    placed = [(label, point) for label, point in _placed(node) if point is not None]
    return np.array([point for _, point in placed]), [label for label, _ in placed]


def _placed(node: Any) -> list[tuple[str, np.ndarray | None]]:
    """:func:`_control_points`, refusing a list without any placed point."""
    points = _control_points(node)
    if all(point is None for _, point in points):
        raise MMAError(
            f"the landmarks {_node_label(node)} hold no placed point: click the points in the "
            "views (Markups module), or choose another point list."
        )
    return points


def landmark_pairs(fixed_node: Any, moving_node: Any) -> tuple[np.ndarray, np.ndarray]:
    """Paired landmarks (fixed LPS points, moving LPS points) from two markups nodes.

    Points pair up by label when the two lists share labels (points renamed after the
    anatomy: "carina", "L1"; case and surrounding spaces are ignored); the shared labels
    must then be all of them. Lists with Slicer's own labels ("F-1" and "F_1-1") pair in
    order. Two lists renamed after the anatomy that share no label are refused, not paired
    in an order that may differ. A point marked missing in either list drops its pair.

    Raises:
        ConfigError, MMAError: not markups, no placed points, labels that do not match, or
            lists of different lengths.
    """
    lists = [_placed(node) for node in (fixed_node, moving_node)]
    names = (_node_label(fixed_node), _node_label(moving_node))
    labels = [[label.strip() for label, _ in points] for points in lists]
    keys = [[label.casefold() for label in each] for each in labels]
    unique = all(len(set(each)) == len(each) for each in keys)
    shared = set(keys[0]) & set(keys[1])
    if not shared and not any(_slicers_own_labels(each) for each in labels):
        raise MMAError(
            f"the landmarks {names[0]} and {names[1]} are labelled after the anatomy but "
            f"share no label ({', '.join(labels[0][:3])} / {', '.join(labels[1][:3])}): give "
            "each anatomical point the same label in both lists, or keep Slicer's own labels "
            "to pair them in the order they were clicked."
        )
    if unique and shared:
        only = [[label for label, key in zip(each, each_keys, strict=True) if key not in shared]
                for each, each_keys in zip(labels, keys, strict=True)]
        if only[0] or only[1]:
            raise MMAError(
                f"the landmarks {names[0]} and {names[1]} pair up by their labels, but "
                + "; ".join(
                    f"{', '.join(each)} {'is' if len(each) == 1 else 'are'} only in {name}"
                    for each, name in zip(only, names, strict=True) if each)
                + ". Give each anatomical point the same label in both lists (or mark it "
                "missing where it is not visible)."
            )
        moving_by_key = {key: point for key, (_, point) in zip(keys[1], lists[1], strict=True)}
        pairs = [(point, moving_by_key[key])
                 for key, (_, point) in zip(keys[0], lists[0], strict=True)]
    else:
        if len(lists[0]) != len(lists[1]):
            raise MMAError(
                f"the landmarks {names[0]} hold {len(lists[0])} points and {names[1]} "
                f"{len(lists[1])}: click the same anatomical points in both, in the same "
                "order (or give them the same labels; mark a point missing where it is not "
                "visible)."
            )
        pairs = [(f, m) for (_, f), (_, m) in zip(lists[0], lists[1], strict=True)]
    pairs = [(f, m) for f, m in pairs if f is not None and m is not None]
    if not pairs:
        raise MMAError(f"no landmark is placed in both {names[0]} and {names[1]}.")
    return np.array([f for f, _ in pairs]), np.array([m for _, m in pairs])


def _slicers_own_labels(labels: Sequence[str]) -> bool:
    """Whether a list's labels are Slicer's own: one name and a number ("F-1", "F-2", ...;
    empty labels too). Anatomical labels such as "C-7", "T-4", "L-1" have several names."""
    names = set()
    for label in labels:
        if not label:
            continue
        match = re.fullmatch(r"(.*)-\d+", label)
        if match is None:
            return False
        names.add(match.group(1))
    return len(names) <= 1


def markups_from_points(points: Any, scene: Any | None = None, name: str = "",
                        labels: Sequence[str] | None = None) -> Any:
    """A new point list (markups fiducial node) holding LPS ``points`` (N x 3, mm)."""
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    if labels is not None and len(labels) != len(points):
        raise ConfigError(f"{len(labels)} labels for {len(points)} points.")
    node = _add_node(_scene(scene), "vtkMRMLMarkupsFiducialNode", name, "Landmarks")
    for index, point in enumerate(points):
        label = labels[index] if labels is not None else ""
        node.AddControlPoint((_FLIP @ point).tolist(), label)
    return node


# --------------------------------------------------------------------------------------
# tables


def table_node_from_dataframe(df: pd.DataFrame, scene: Any | None = None, name: str = "") -> Any:
    """A table node with one column per DataFrame column (a named or non-default index first).

    Numbers become numeric columns (booleans 0/1); an integer or boolean column with
    missing values (pandas' ``Int64``/``boolean``), or with values beyond 64-bit signed
    integers, becomes a float column (missing: NaN). Everything else is text, where a
    missing value is an empty string (VTK text columns have no "missing").

    Raises:
        ConfigError: two columns have the same name (a table node's columns are found by
            name).
    """
    import pandas as pd
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    scene = _scene(scene)
    if df.index.name is not None or not isinstance(df.index, pd.RangeIndex):
        df = df.reset_index()
    names = [str(column) for column in df.columns]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(
            f"the table names the column(s) {', '.join(twice)} more than once (the index "
            "counts as a column): give each column its own name."
        )
    node = _add_node(scene, "vtkMRMLTableNode", name, "Table")
    table = node.GetTable()
    for position, column in enumerate(df.columns):
        series = df.iloc[:, position]
        numeric = pd.api.types.is_bool_dtype(series) or pd.api.types.is_integer_dtype(series)
        if numeric and (series.isna().any() or (
                pd.api.types.is_unsigned_integer_dtype(series)
                and len(series) and series.max() > np.iinfo(np.int64).max)):
            array = numpy_to_vtk(
                series.astype("float64").to_numpy(dtype=np.float64, na_value=np.nan),
                deep=True)
        elif pd.api.types.is_bool_dtype(series):
            array = numpy_to_vtk(series.to_numpy(dtype=np.int32), deep=True)
        elif pd.api.types.is_integer_dtype(series):
            array = numpy_to_vtk(series.to_numpy(dtype=np.int64), deep=True)
        elif pd.api.types.is_float_dtype(series):
            array = numpy_to_vtk(
                series.to_numpy(dtype=np.float64, na_value=np.nan), deep=True)
        else:
            array = vtk.vtkStringArray()
            for value in series:
                array.InsertNextValue("" if _is_missing(value) else str(value))
        array.SetName(str(column))
        table.AddColumn(array)
    node.Modified()
    return node


def _is_missing(value: Any) -> bool:
    """None, NaN, pandas' NA or NaT (a scalar that means "no value")."""
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or array in a cell: a value
        return False


def dataframe_from_table_node(node: Any) -> pd.DataFrame:
    """The columns of a table node as a DataFrame (numbers as numbers, text as text)."""
    import pandas as pd
    from vtk.util.numpy_support import vtk_to_numpy

    table = node.GetTable()
    data = {}
    for index in range(table.GetNumberOfColumns()):
        column = table.GetColumn(index)
        if column.IsA("vtkStringArray"):
            data[column.GetName()] = [column.GetValue(i) for i in range(column.GetNumberOfValues())]
        else:
            data[column.GetName()] = vtk_to_numpy(column).copy()
    return pd.DataFrame(data)
