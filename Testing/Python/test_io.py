"""Reading and writing volumes and DICOM series, and a clear error for every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import make_image, rotation_direction

from MultiModalAnalysisLib.errors import (
    ConstantImageError,
    EmptyImageError,
    GeometryError,
    ImageDimensionError,
    ImageReadError,
    LabelError,
    MMAError,
    NonFiniteImageError,
)
from MultiModalAnalysisLib.images import require_overlap, validate_image, validate_mask
from MultiModalAnalysisLib.io import (
    list_dicom_series,
    read_dicom_series,
    read_image,
    read_mask,
    write_image,
)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_keeps_values_and_oblique_geometry(tmp_path, oblique_image, suffix):
    path = write_image(oblique_image, tmp_path / f"sub/volume{suffix}")
    back = read_image(path)
    assert back.GetSize() == oblique_image.GetSize()
    assert np.allclose(back.GetSpacing(), oblique_image.GetSpacing(), atol=1e-5)
    assert np.allclose(back.GetOrigin(), oblique_image.GetOrigin(), atol=1e-4)
    assert np.allclose(back.GetDirection(), oblique_image.GetDirection(), atol=1e-5)
    assert np.allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(oblique_image))


def write_dicom_series(image: sitk.Image, folder, series_uid: str, description: str,
                       modality: str = "CT", skip: tuple[int, ...] = ()) -> None:
    """Write ``image`` as a DICOM series (one file per slice, leaving out the slices
    ``skip``) with geometry tags."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        if k in skip:
            continue
        slice_ = image[:, :, k]
        origin = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": modality,
            "0008|103e": description,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0032": "\\".join(f"{v:.6f}" for v in origin),
            "0020|0037": "\\".join(f"{v:.6f}" for v in direction[0::3] + direction[1::3]),
            "0020|0013": str(k + 1),
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
            "0028|0030": f"{image.GetSpacing()[1]:.6f}\\{image.GetSpacing()[0]:.6f}",
            "0008|0018": f"{series_uid}.{k + 1}",
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(slice_)


def test_dicom_series_reads_back_with_geometry_and_picks_the_largest_series(tmp_path, rng):
    direction = rotation_direction((0, 0, 15))  # in-plane rotation, slices stacked along z
    big = make_image(rng.integers(-1000, 1000, (9, 20, 24)).astype(np.int16),
                     spacing=(0.7, 0.7, 2.5), origin=(-5.0, 12.0, 40.0), direction=direction)
    small = make_image(rng.integers(-1000, 1000, (4, 20, 24)).astype(np.int16),
                       spacing=(0.7, 0.7, 2.5), origin=(-5.0, 12.0, 90.0), direction=direction)
    write_dicom_series(big, tmp_path, "1.2.826.0.1.3680043.2.1125.2.101", "big")
    write_dicom_series(small, tmp_path, "1.2.826.0.1.3680043.2.1125.2.102", "small")

    series = list_dicom_series(tmp_path)
    chosen = read_image(tmp_path)
    by_uid = read_dicom_series(tmp_path, series_uid="1.2.826.0.1.3680043.2.1125.2.102")

    assert [s.n_slices for s in series] == [9, 4]
    assert series[0].description == "big" and series[0].modality == "CT"
    assert chosen.GetSize() == big.GetSize()
    assert np.allclose(chosen.GetSpacing(), big.GetSpacing(), atol=1e-4)
    assert np.allclose(chosen.GetOrigin(), big.GetOrigin(), atol=1e-3)
    assert np.allclose(chosen.GetDirection(), big.GetDirection(), atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(chosen), sitk.GetArrayFromImage(big))
    assert by_uid.GetSize() == small.GetSize()


def test_of_several_dicom_series_the_expected_modality_is_read_else_the_choice_is_said(
        tmp_path, rng, caplog):
    ct = make_image(rng.integers(-1000, 1000, (4, 8, 8)).astype(np.int16))
    pet = make_image(rng.integers(0, 1000, (6, 8, 8)).astype(np.int16))
    write_dicom_series(ct, tmp_path, "1.2.826.0.1.3680043.2.1125.2.301", "CT", "CT")
    write_dicom_series(pet, tmp_path, "1.2.826.0.1.3680043.2.1125.2.302", "PET", "PT")
    with caplog.at_level("INFO"):
        assert read_image(tmp_path, modality="CT").GetSize() == ct.GetSize()
        assert read_image(tmp_path, modality="PET").GetSize() == pet.GetSize()
        assert "the only one of modality CT (of 2)" in caplog.text
        assert "WARNING" not in caplog.text
        caplog.clear()
        assert read_image(tmp_path).GetSize() == pet.GetSize()  # the largest, said
    assert "holds 2 DICOM series" in caplog.text and ".302 (PT, PET, 6 slices)" in caplog.text
    assert "series_uid=" in caplog.text
    # no series of the modality asked for: an error, not a CT processed as an MR
    with pytest.raises(ImageReadError, match=r"no DICOM series of modality MR \(MR_T1 was "
                       r"asked for\).*\.301 \(CT, CT, 4 slices\).*Check the folder"):
        read_image(tmp_path, modality="MR_T1")
    only_ct = tmp_path / "ct_only"
    write_dicom_series(ct, only_ct, "1.2.826.0.1.3680043.2.1125.2.303", "CT", "CT")
    with pytest.raises(ImageReadError, match="no DICOM series of modality PT"):
        read_image(only_ct, modality="PET")  # one series, of another modality
    assert read_image(only_ct, modality="CT").GetSize() == ct.GetSize()


def test_a_dicom_series_with_a_missing_slice_is_refused(tmp_path, rng):
    # Read as one grid, every slice after the gap would sit a slice too high.
    image = make_image(rng.integers(0, 1000, (7, 8, 8)).astype(np.int16), spacing=(1, 1, 2))
    write_dicom_series(image, tmp_path / "gap", "1.2.826.0.1.3680043.2.1125.2.401", "s",
                       skip=(3,))
    with pytest.raises(ImageReadError, match=r"not evenly spaced \(gaps from 2.00 to 4.00 mm"):
        read_image(tmp_path / "gap")
    write_dicom_series(image, tmp_path / "whole", "1.2.826.0.1.3680043.2.1125.2.402", "s")
    assert read_image(tmp_path / "whole").GetSize() == image.GetSize()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_truncated_nifti_is_refused_not_filled_with_zeros(tmp_path, rng, suffix):
    import gzip

    image = make_image(rng.normal(0, 1, (20, 24, 28)).astype(np.float32))
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(image, str(whole))
    data = whole.read_bytes()
    (tmp_path / f"half{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"half.* is truncated: its header announces"
                       r".*holds (about )?\d+ \((4[5-9]|5\d) %\)"):  # about half
        read_image(tmp_path / f"half{suffix}")
    assert read_image(whole).GetSize() == image.GetSize()
    if suffix == ".nii.gz":  # a file of two gzip members (the trailer holds the last's size)
        raw = gzip.decompress(data)
        two = tmp_path / "two_members.nii.gz"
        two.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
        assert np.array_equal(sitk.GetArrayFromImage(read_image(two)),
                              sitk.GetArrayFromImage(image))


def test_dicom_unknown_series_uid_lists_what_is_there(tmp_path, rng):
    image = make_image(rng.integers(0, 100, (3, 8, 8)).astype(np.int16))
    write_dicom_series(image, tmp_path, "1.2.826.0.1.3680043.2.1125.2.201", "only")
    with pytest.raises(ImageReadError, match=r"no DICOM series with UID 9\.9.*\.201 \(3 slices\)"):
        read_dicom_series(tmp_path, series_uid="9.9")


def test_folder_without_dicom_is_a_clear_error(tmp_path, capfd):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageReadError, match="holds no DICOM series"):
        read_image(tmp_path)
    assert "No Series were found" not in capfd.readouterr().err  # ITK's own line, hidden
    assert sitk.ProcessObject.GetGlobalWarningDisplay()  # and ITK's warnings are back on


# --- bad inputs: one test each ---------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ImageReadError, match="ct_scan.nii.gz: no such file"):
        read_image(tmp_path / "ct_scan.nii.gz")


def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"this is not a NIfTI file" * 10)
    with pytest.raises(ImageReadError, match="broken.nii.gz could not be read"):
        read_image(path)


def test_4d_image_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "dynamic_pet.nii.gz"
    sitk.WriteImage(sitk.Image([6, 6, 5, 3], sitk.sitkFloat32), str(path))
    with pytest.raises(ImageDimensionError, match=r"dynamic_pet.nii.gz is 4-D.*time series"):
        read_image(path)


def test_vector_image_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "rgb_overlay.mha"
    sitk.WriteImage(sitk.Image([6, 6, 5], sitk.sitkVectorUInt8, 3), str(path))
    with pytest.raises(ImageDimensionError, match=r"rgb_overlay.mha has 3 components"):
        read_image(path)


def test_2d_image_is_refused():
    with pytest.raises(ImageDimensionError, match=r"MR is 2-D.*single slice"):
        validate_image(sitk.Image([20, 20], sitk.sitkFloat32), "MR")


@pytest.mark.parametrize("suffix, dtype", [
    (".mha", np.float32), (".nii.gz", np.float32), (".nii", np.float64)])
def test_nan_is_refused_unless_a_nan_policy_is_given(tmp_path, suffix, dtype):
    """Also for NIfTI, whose ITK reader turns NaN into 0 (the file is checked directly)."""
    array = np.arange(1, 4 * 5 * 6 + 1, dtype=dtype).reshape(4, 5, 6)
    array[1, 2, 3] = np.nan
    array[2, 2, 2] = np.inf
    path = write_image(make_image(array), tmp_path / f"pet{suffix}")

    with pytest.raises(NonFiniteImageError, match=rf"pet{suffix} holds 2 NaN or infinite"):
        read_image(path)
    zeroed = sitk.GetArrayFromImage(read_image(path, nan_policy="zero"))
    floored = sitk.GetArrayFromImage(read_image(path, nan_policy="minimum"))
    assert zeroed[1, 2, 3] == 0 and zeroed[2, 2, 2] == 0
    assert floored[1, 2, 3] == 1.0 and np.isfinite(floored).all()  # min finite value is 1
    assert zeroed[3, 4, 5] == array[3, 4, 5]
    assert zeroed.dtype == dtype


def test_constant_image_is_refused_where_contrast_is_needed():
    flat = make_image(np.full((4, 5, 6), 12.0, np.float32))
    validate_image(flat, "CT")  # fine where contrast is not needed
    with pytest.raises(ConstantImageError, match="CT is constant"):
        validate_image(flat, "CT", require_contrast=True)


def test_empty_mask_is_refused(tmp_path):
    path = write_image(make_image(np.zeros((4, 5, 6), np.uint8)), tmp_path / "gtv.nii.gz")
    with pytest.raises(EmptyImageError, match="gtv.nii.gz is empty"):
        read_mask(path)


def test_empty_image_is_refused():
    with pytest.raises(EmptyImageError, match="no voxels"):
        validate_image(sitk.Image([0, 5, 5], sitk.sitkFloat32), "T2")


def test_multi_label_mask_is_refused_as_wrong_label_values():
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 1:3, 1:3] = 1
    labels[2, 2:4, 2:4] = 2
    with pytest.raises(LabelError, match="2 different labels"):
        validate_mask(make_image(labels), "tumour mask")


def test_intensity_image_given_as_mask_is_refused():
    values = np.linspace(0, 1, 4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    with pytest.raises(LabelError, match="non-integer values"):
        validate_mask(make_image(values), "mask")


def test_mask_on_another_grid_is_refused_with_advice(oblique_image):
    mask = make_image(np.ones((3, 3, 3), np.uint8))
    with pytest.raises(GeometryError, match="not on the image's grid.*Resample"):
        validate_mask(mask, "mask", reference=oblique_image)


def test_non_overlapping_images_are_refused():
    a = make_image(np.ones((4, 4, 4), np.float32))
    b = make_image(np.ones((4, 4, 4), np.float32), origin=(0.0, 0.0, 300.0))
    with pytest.raises(GeometryError, match="PET and CT do not overlap"):
        require_overlap(b, a, "PET", "CT")


def test_write_refuses_an_unknown_suffix(tmp_path, oblique_image):
    with pytest.raises(MMAError, match="use one of the suffixes"):
        write_image(oblique_image, tmp_path / "volume.png")
