"""Fusion: a case on one grid through registration transforms, multichannel stacks, and
fused images that keep the reference geometry."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from registration_phantoms import phantom, rigid
from synthetic import make_image

from MultiModalAnalysisLib.case import Case
from MultiModalAnalysisLib.errors import (
    ConfigError,
    ConstantImageError,
    GeometryError,
    MMAError,
)
from MultiModalAnalysisLib.fusion import (
    FUSION_METHODS,
    fuse,
    multichannel_stack,
    resample_case,
    unit_scale,
    vallieres_pet_mr_fusion,
    wavelet_fusion,
)
from MultiModalAnalysisLib.pipeline import resample_case_to_reference
from MultiModalAnalysisLib.registration.perturb import move_image_rigidly


@pytest.fixture(scope="module")
def case() -> Case:
    """CT, and an MR moved away (geometry only) with its mask moved alike."""
    ct = phantom("CT", noise=0.0)
    mr = phantom("MR", noise=0.0)
    mask = sitk.Cast(ct > 60, sitk.sitkUInt8)
    motion = rigid((5.0, -4.0, 8.0), (6.0, -3.0, 4.0))
    return Case("P1", images={"CT": ct, "MR_T1": move_image_rigidly(mr, motion)},
                masks={"CT_mask": mask, "MR_T1_mask": move_image_rigidly(mask, motion)},
                metadata={"motion": motion})


def test_resample_case_brings_a_moved_modality_back_through_its_transform(case):
    motion = case.metadata["motion"]
    truth = motion.GetInverse()  # CT (fixed) point -> moved MR point

    on_ct = resample_case(case, "CT", {"MR_T1": truth})

    assert on_ct.image("MR_T1").GetSize() == case.image("CT").GetSize()
    aligned = sitk.GetArrayFromImage(on_ct.image("MR_T1"))
    reference = sitk.GetArrayFromImage(phantom("MR", noise=0.0))
    inner = np.s_[4:-4, 4:-4, 4:-4]
    assert np.abs(aligned[inner] - reference[inner]).mean() < 3.0
    mask_on_ct = sitk.GetArrayFromImage(on_ct.masks["MR_T1_mask"])
    ct_mask = sitk.GetArrayFromImage(case.masks["CT_mask"])
    dice = 2 * (mask_on_ct & ct_mask).sum() / (mask_on_ct.sum() + ct_mask.sum())
    assert dice > 0.97
    assert case.image("MR_T1") is not on_ct.image("MR_T1")  # the input case is untouched

    # One resampling: the same as resampling the original straight through the transform.
    direct = sitk.Resample(case.image("MR_T1"), case.image("CT"), truth, sitk.sitkLinear,
                           float(sitk.GetArrayViewFromImage(case.image("MR_T1")).min()),
                           sitk.sitkFloat32)
    assert np.allclose(sitk.GetArrayFromImage(direct), aligned)


def test_pipeline_resampling_is_fusion_without_transforms(case):
    a = resample_case_to_reference(case, "CT")
    b = resample_case(case, "CT")
    for name in a.images:
        assert np.array_equal(sitk.GetArrayFromImage(a.images[name]),
                              sitk.GetArrayFromImage(b.images[name]))


def test_multichannel_stack_keeps_order_and_grid(case):
    on_ct = resample_case(case, "CT", {"MR_T1": case.metadata["motion"].GetInverse()})

    stack = multichannel_stack(on_ct, ["MR_T1", "CT"])

    assert stack.GetNumberOfComponentsPerPixel() == 2
    assert stack.GetSize() == case.image("CT").GetSize()
    assert np.allclose(stack.GetOrigin(), case.image("CT").GetOrigin())
    channels = sitk.GetArrayFromImage(stack)
    assert np.allclose(channels[..., 1], sitk.GetArrayFromImage(on_ct.image("CT")))
    with pytest.raises(GeometryError, match="grid"):
        multichannel_stack(case)  # the moved MR is on its own grid


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_every_fused_image_keeps_the_reference_geometry(method):
    ct = phantom("CT")
    mr = phantom("MR", size=(30, 28, 24), spacing=(3.0, 3.0, 3.5))  # another grid

    fused = fuse([ct, mr], method)

    assert fused.GetSize() == ct.GetSize()
    assert np.allclose(fused.GetOrigin(), ct.GetOrigin())
    assert np.allclose(fused.GetSpacing(), ct.GetSpacing())
    assert np.allclose(fused.GetDirection(), ct.GetDirection())
    array = sitk.GetArrayFromImage(fused)
    assert np.isfinite(array).all() and array.std() > 0
    if method == "overlay":
        assert fused.GetNumberOfComponentsPerPixel() == 3
        assert fused.GetPixelID() == sitk.sitkVectorUInt8


def test_fusing_onto_a_grid_as_fine_along_some_axes_smooths_only_the_coarser_ones():
    """A grid that is coarser along z only (CT-like 1 x 1 x 3 mm, image 1 x 1 x 1 mm):
    no smoothing in plane, anti-aliasing along z; and an image whose largest spacing equals
    the reference's (once a crash: a zero Gaussian width)."""
    volume = np.zeros((30, 30, 30), np.float32)
    volume[15, 15, 15] = 1000.0
    fine = make_image(volume, spacing=(1.0, 1.0, 1.0), origin=(-15.0, -15.0, -15.0))
    coarse_z = sitk.Image([30, 30, 10], sitk.sitkFloat32)
    coarse_z.SetSpacing((1.0, 1.0, 3.0))
    coarse_z.SetOrigin((-15.0, -15.0, -15.0))
    coarse_z[0, 0, 0] = 0.5  # (a constant image is refused: fusion scales by the range)

    on_coarse = sitk.GetArrayFromImage(fuse([coarse_z, fine], "maximum"))
    peak = np.unravel_index(np.argmax(on_coarse), on_coarse.shape)
    assert peak[1:] == (15, 15)
    row = on_coarse[peak[0], 15, 13:18]
    assert row[2] > 0 and row[0] == 0 and row[4] == 0  # in plane: a one-voxel point
    assert on_coarse[:, 15, 15].astype(bool).sum() >= 2  # along z: spread by the filter

    coarse = sitk.Image([10, 10, 10], sitk.sitkFloat32)
    coarse.SetSpacing((3.0, 3.0, 3.0))
    coarse.SetOrigin((-15.0, -15.0, -15.0))
    coarse[0, 0, 0] = 0.5
    thick = sitk.Resample(fine, [30, 30, 10], sitk.Transform(), sitk.sitkLinear,
                          fine.GetOrigin(), (1.0, 1.0, 3.0))
    fused = fuse([coarse, thick], "maximum")  # z already as coarse as the reference
    assert np.isfinite(sitk.GetArrayFromImage(fused)).all()


def test_simple_fusions_combine_the_scaled_images_as_documented():
    ct, mr = phantom("CT"), phantom("MR")
    a = unit_scale(sitk.GetArrayFromImage(ct))
    b = unit_scale(sitk.GetArrayFromImage(mr))

    assert np.allclose(sitk.GetArrayFromImage(fuse([ct, mr], "average", weights=[3, 1])),
                       0.75 * a + 0.25 * b, atol=1e-5)
    assert np.allclose(sitk.GetArrayFromImage(fuse([ct, mr], "maximum")), np.maximum(a, b),
                       atol=1e-6)
    board = sitk.GetArrayFromImage(fuse([ct, mr], "checkerboard", square_mm=10.0))
    from_a = np.isclose(board, a, atol=1e-6)
    assert 0.35 < from_a.mean() < 0.65 and np.isclose(board[~from_a], b[~from_a]).all()
    # A Laplacian pyramid collapses back to the image when fusing it with itself.
    same = sitk.GetArrayFromImage(fuse([ct, ct], "laplacian", levels=3))
    assert np.allclose(same, a, atol=1e-4)


def test_wavelet_fusion_is_the_weighted_sum_of_the_scaled_volumes_without_outlier_cut():
    pet, mr = phantom("CT", seed=1), phantom("MR", seed=2)
    a = sitk.GetArrayFromImage(pet).astype(float)
    b = sitk.GetArrayFromImage(mr).astype(float)
    a = (a - a.min()) / (a.max() - a.min()) * 255
    b = (b - b.min()) / (b.max() - b.min()) * 255

    fused = sitk.GetArrayFromImage(wavelet_fusion(pet, mr, weight_b=0.25, outlier_sd=None))

    expected = 0.75 * a + 0.25 * b  # the DWT is linear and reconstructs exactly
    expected = (expected - expected.min()) / (expected.max() - expected.min()) * 255
    assert np.allclose(fused, expected, atol=0.05)
    only_a = sitk.GetArrayFromImage(wavelet_fusion(pet, mr, weight_b=0.0))
    assert np.allclose(only_a, a, atol=0.05)


def test_vallieres_fusion_uses_the_tumour_statistics_and_keeps_the_pet_grid():
    pet = phantom("CT", size=(24, 22, 20), spacing=(4.0, 4.0, 4.0), seed=3)
    mr = phantom("MR", seed=4)
    tumour = sitk.Cast(pet > 60, sitk.sitkUInt8)

    fused = vallieres_pet_mr_fusion(pet, mr, tumour, mr_weight=1 / 3)

    assert fused.GetSize() == pet.GetSize()
    values = sitk.GetArrayFromImage(fused)[sitk.GetArrayFromImage(tumour) > 0]
    assert values.std() > 1.0 and values.min() >= 0.0 and values.max() <= 255.0
    again = vallieres_pet_mr_fusion(pet, mr, tumour, mr_weight=1 / 3)
    assert np.array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(fused))


def test_fusion_refuses_unknown_methods_and_bad_options():
    ct, mr = phantom("CT"), phantom("MR")
    with pytest.raises(ConfigError, match="unknown fusion method"):
        fuse([ct, mr], "pca")
    with pytest.raises(ConfigError, match="exactly two"):
        fuse([ct, mr, ct], "wavelet")
    with pytest.raises(ConfigError, match="weight_b"):
        wavelet_fusion(ct, mr, weight_b=1.5)
    with pytest.raises(ConfigError, match="wavelet"):
        wavelet_fusion(ct, mr, wavelet="mexh")
    with pytest.raises(ConfigError, match="unknown option"):
        fuse([ct, mr], "maximum", weights=[1, 2])
    with pytest.raises(ConfigError, match="at least two"):
        fuse([ct], "average")
    with pytest.raises(ConfigError, match="square size must be a positive length"):
        fuse([ct, mr], "checkerboard", square_mm=0)
    with pytest.raises(ConfigError, match="one weight per image: 2 images, 1 weight"):
        fuse([ct, mr], "average", weights=[1.0])
    # Huge weights are relative weights like any others (no overflow to an empty image).
    assert np.allclose(sitk.GetArrayFromImage(fuse([ct, mr], "average", weights=[1e308, 1e308])),
                       sitk.GetArrayFromImage(fuse([ct, mr], "average")), atol=1e-6)
    flat = sitk.Image(mr.GetSize(), sitk.sitkFloat32)
    flat.CopyInformation(mr)
    with pytest.raises(MMAError, match="flat.nii.gz"):  # messages name the file given
        fuse([ct, flat], "average", names=["ct.nii.gz", "flat.nii.gz"])
    for setting in ({"alpha": 1.5}, {"alpha": float("nan")}, {"threshold": -0.1}):
        with pytest.raises(ConfigError, match="must be from 0 to 1"):
            fuse([ct, mr], "overlay", **setting)
    with pytest.raises(ConfigError, match="1 or more levels"):
        fuse([ct, mr], "laplacian", levels=0)
    with pytest.raises(ConfigError, match=r"supports at most \d level\(s\) of the 'sym8'"):
        fuse([ct, mr], "wavelet", level=50)
    blank = sitk.Image(ct.GetSize(), sitk.sitkFloat32)
    blank.CopyInformation(ct)
    with pytest.raises(ConstantImageError, match="image 2 is constant"):
        fuse([ct, blank], "average")  # each image is scaled by its own range: none here


def test_a_mask_follows_the_transform_of_the_modality_it_is_named_after():
    from MultiModalAnalysisLib.fusion import mask_transform

    pet, t1 = sitk.TranslationTransform(3, (1.0, 0, 0)), sitk.TranslationTransform(3)
    transforms = {"PET": pet, "MR_T1": t1}
    assert mask_transform("PET_mask", transforms) is pet
    for name in ("MR_T1_mask", "T1_mask", "t1_mask", "mr-t1_label"):
        assert mask_transform(name, transforms) is t1, name
    assert mask_transform("CT_mask", transforms) is None  # the reference's own
    assert mask_transform("mask", transforms) is None
