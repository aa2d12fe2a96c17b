"""Classical segmentation: multichannel GMM and k-means, thresholds, mask clean-up."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import make_image

from MultiModalAnalysisLib.errors import (
    ConfigError,
    GeometryError,
    MissingModalityError,
    OperationCancelled,
)
from MultiModalAnalysisLib.metrics import dice
from MultiModalAnalysisLib.preprocess import resample_to_spacing
from MultiModalAnalysisLib.segmentation import (
    GaussianMixtureSegmenter,
    KMeansSegmenter,
    clean_labels,
    fill_holes,
    keep_largest_component,
    otsu_threshold,
    range_threshold,
    remove_small_components,
    segment,
    suv_fraction_threshold,
)

SPACING = (1.0, 1.0, 2.0)  # x, y, z


def phantom(rng, noise=15.0):
    """Three tissues in two channels, with Gaussian noise.

    Class 1 (background): A=0, B=0; class 2 (a slab): A=100, B=40; class 3 (a ball inside
    the slab): A=60, B=100. Ordered by B the classes are 1, 2, 3; by A they are 1, 3, 2.
    """
    shape = (20, 48, 48)  # z, y, x
    z, y, x = np.indices(shape)
    truth = np.ones(shape, np.uint8)
    truth[:, 8:40, 6:42] = 2
    ball = ((x - 24) ** 2 + (y - 24) ** 2 + ((z - 10) * 2.0) ** 2) < 12**2
    truth[ball] = 3
    a = np.choose(truth - 1, [0.0, 100.0, 60.0]) + rng.normal(0, noise, shape)
    b = np.choose(truth - 1, [0.0, 40.0, 100.0]) + rng.normal(0, noise, shape)
    images = {
        "MR_T1": make_image(a.astype(np.float32), SPACING, (5.0, -3.0, 10.0)),
        "PET": make_image(b.astype(np.float32), SPACING, (5.0, -3.0, 10.0)),
    }
    return images, make_image(truth, SPACING, (5.0, -3.0, 10.0))


def class_dice(labels: sitk.Image, truth: sitk.Image, k: int) -> float:
    return dice(sitk.Equal(labels, k), sitk.Equal(truth, k))


@pytest.mark.parametrize("segmenter", [GaussianMixtureSegmenter, KMeansSegmenter])
def test_classifiers_recover_the_three_classes_of_a_two_channel_phantom(segmenter, rng):
    images, truth = phantom(rng)
    labels = segmenter(3, order_by="PET", random_state=0).fit_predict(images)
    for k in (1, 2, 3):
        assert class_dice(labels, truth, k) >= 0.95
    # Ordered by MR instead, the slab (highest MR) becomes class 3 and the ball class 2.
    labels = segmenter(3, order_by="MR_T1", random_state=0).fit_predict(images)
    assert dice(sitk.Equal(labels, 3), sitk.Equal(truth, 2)) >= 0.95
    assert dice(sitk.Equal(labels, 2), sitk.Equal(truth, 3)) >= 0.95


def test_an_order_by_channel_that_is_not_given_is_refused_before_the_fit(rng, monkeypatch):
    # (it was refused after the whole fit: 17 s on a patient)
    images, _ = phantom(rng)
    monkeypatch.setattr(GaussianMixtureSegmenter, "_fit_model",
                        lambda self, features: pytest.fail("fitted before the check"))
    with pytest.raises(MissingModalityError):
        GaussianMixtureSegmenter(3, order_by="CT").fit(images)


def test_icm_regularisation_removes_the_salt_and_pepper_of_voxelwise_labels(rng):
    images, truth = phantom(rng, noise=35.0)
    plain = GaussianMixtureSegmenter(3, order_by="PET", regularisation="none").fit_predict(images)
    smooth = GaussianMixtureSegmenter(3, order_by="PET", regularisation="icm", beta=1.5)
    regularised = smooth.fit_predict(images)
    errors_plain = np.count_nonzero(sitk.GetArrayFromImage(plain) != sitk.GetArrayFromImage(truth))
    errors_icm = np.count_nonzero(
        sitk.GetArrayFromImage(regularised) != sitk.GetArrayFromImage(truth)
    )
    assert errors_icm < 0.3 * errors_plain
    assert class_dice(regularised, truth, 3) >= 0.95


def test_posterior_smoothing_also_regularises(rng):
    images, truth = phantom(rng, noise=30.0)
    plain = GaussianMixtureSegmenter(3, order_by="PET", regularisation="none").fit(images)
    smoothed = GaussianMixtureSegmenter(3, order_by="PET", regularisation="smoothing")
    labels = smoothed.fit_predict(images)
    assert class_dice(plain.predict(images), truth, 3) < 0.8  # voxel-wise: noisy
    assert class_dice(labels, truth, 3) >= 0.95


def test_class_order_follows_the_named_channel_and_probabilities_sum_to_one(rng):
    images, truth = phantom(rng)
    model = GaussianMixtureSegmenter(3, order_by="PET").fit(images)
    assert list(model.channels_) == ["MR_T1", "PET"]
    assert np.all(np.diff(model.means_[:, 1]) >= 0)  # PET means ascending
    assert model.means_[2].tolist() == pytest.approx([60, 100], abs=10)
    result = model.segment(images)
    probabilities = sitk.GetArrayFromImage(result.probabilities)  # z, y, x, label
    assert probabilities.shape[-1] == 4  # outside + 3 classes
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-4)
    argmax = probabilities.argmax(axis=-1)
    agreement = np.mean(argmax == sitk.GetArrayFromImage(result.labels))
    assert agreement > 0.99
    # uncertainty: 1 - the largest class probability, highest at the tissue borders
    uncertainty = sitk.GetArrayFromImage(result.uncertainty)
    np.testing.assert_allclose(uncertainty, 1.0 - probabilities[..., 1:].max(axis=-1),
                               atol=1e-5)
    assert uncertainty.max() <= 2 / 3 + 1e-6
    labels = sitk.GetArrayFromImage(result.labels)
    border = labels != np.roll(labels, 1, axis=2)
    assert uncertainty[border].mean() > 3 * uncertainty[~border].mean()


def test_gmm_posteriors_equal_the_fitted_mixtures_own(rng):
    # The posteriors are computed from the mixture's public fitted attributes; they must be
    # the ones scikit-learn's predict_proba gives, including far out in the tails.
    images, _ = phantom(rng)
    model = GaussianMixtureSegmenter(3, order_by="PET", random_state=0).fit(images)
    features = rng.normal(0.0, 3.0, (2000, 2))
    ours = np.exp(model._log_posteriors(features))
    np.testing.assert_allclose(ours, model.model_.predict_proba(features), atol=1e-9)
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, atol=1e-12)


def test_classification_inside_a_mask_labels_only_the_mask(rng):
    images, truth = phantom(rng)
    region = sitk.Cast(sitk.Greater(truth, 1), sitk.sitkUInt8)  # slab + ball
    labels = KMeansSegmenter(2, order_by="PET").fit_predict(images, region)
    array = sitk.GetArrayFromImage(labels)
    assert np.all(array[sitk.GetArrayFromImage(region) == 0] == 0)
    # Inside the region: class 1 is the slab (truth 2), class 2 the ball (truth 3).
    assert dice(sitk.Equal(labels, 1), sitk.Equal(truth, 2)) >= 0.95
    assert dice(sitk.Equal(labels, 2), sitk.Equal(truth, 3)) >= 0.95


def test_images_on_different_grids_are_resampled_onto_the_first(rng):
    images, truth = phantom(rng)
    coarse_pet = resample_to_spacing(images["PET"], (2.0, 2.0, 4.0))
    result = segment({"MR_T1": images["MR_T1"], "PET": coarse_pet}, "gmm", 3, order_by="PET")
    assert result.labels.GetSize() == images["MR_T1"].GetSize()
    assert class_dice(result.labels, truth, 3) >= 0.9


def test_voxels_outside_an_images_field_of_view_are_left_unlabelled(rng, caplog):
    # The PET covers only the upper half (in y) of the MR's grid: resampled onto the MR grid
    # the rest is padding, which must not be classified as if it were tissue.
    images, truth = phantom(rng)
    half = images["PET"][:, 24:, :]
    with caplog.at_level("WARNING"):
        result = segment({"MR_T1": images["MR_T1"], "PET": half}, "gmm", 3, order_by="PET")
    labels = sitk.GetArrayFromImage(result.labels)
    assert not labels[:, :24, :].any()
    assert labels[:, 24:, :].all()
    assert "outside the field of view of PET" in caplog.text
    # Inside the PET's field of view the three classes are still recovered.
    inside = sitk.GetArrayFromImage(truth)[:, 24:, :]
    for k in (1, 2, 3):
        found, wanted = labels[:, 24:, :] == k, inside == k
        assert 2 * (found & wanted).sum() / (found.sum() + wanted.sum()) >= 0.95
    # Outside it, the probabilities say "outside the region".
    outside = sitk.GetArrayFromImage(result.probabilities)[:, :24, :, 0]
    assert np.all(outside == 1.0)
    # A mask lying wholly outside the PET's field of view is refused, not silently emptied.
    mask = sitk.Image(images["MR_T1"].GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(images["MR_T1"])
    mask[:, 2:10, :] = 1
    with pytest.raises(GeometryError, match="field of view"):
        segment({"MR_T1": images["MR_T1"], "PET": half}, "kmeans", 3, mask=mask)


def test_a_given_field_of_view_leaves_the_padding_of_resampled_images_unlabelled(rng, caplog):
    # Images resampled before segmentation (registered volumes) are on one grid already, so
    # segment() cannot see where one is padding: the caller gives that field of view.
    images, truth = phantom(rng)
    covered = sitk.Image(images["MR_T1"].GetSize(), sitk.sitkUInt8)
    covered.CopyInformation(images["MR_T1"])
    covered[:, 24:, :] = 1  # x, y, z: the upper half in y
    with caplog.at_level("WARNING"):
        result = segment(images, "gmm", 3, order_by="PET", field_of_view=covered)
    labels = sitk.GetArrayFromImage(result.labels)
    assert not labels[:, :24, :].any() and labels[:, 24:, :].all()
    assert "outside the field of view of a registered volume" in caplog.text
    inside = sitk.GetArrayFromImage(truth)[:, 24:, :]
    for k in (1, 2, 3):
        found, wanted = labels[:, 24:, :] == k, inside == k
        assert 2 * (found & wanted).sum() / (found.sum() + wanted.sum()) >= 0.95
    # With a mask, the field of view narrows the mask (a threshold too); the field of view
    # may be on another grid.
    mask = sitk.Image(images["MR_T1"].GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(images["MR_T1"])
    mask[:, 16:32, :] = 1
    coarse = resample_to_spacing(covered, (2.0, 2.0, 4.0), is_label=True)
    result = segment(images, "threshold", threshold="range", channel="PET", low=-1e9,
                     mask=mask, field_of_view=coarse)
    labels = sitk.GetArrayFromImage(result.labels)
    assert labels[:, 24:32, :].all() and not labels[:, :24, :].any()
    assert not labels[:, 32:, :].any()
    # A field of view covering the whole grid changes nothing and says nothing.
    caplog.clear()
    whole = sitk.Image(covered) * 0 + 1
    with caplog.at_level("WARNING"):
        same = segment(images, "kmeans", 3, order_by="PET", field_of_view=whole)
    plain = segment(images, "kmeans", 3, order_by="PET")
    assert np.array_equal(sitk.GetArrayFromImage(same.labels),
                          sitk.GetArrayFromImage(plain.labels))
    assert "field of view" not in caplog.text
    # A mask wholly outside the field of view is refused, not silently emptied.
    outside = sitk.Image(mask) * 0
    outside[:, 2:10, :] = 1
    with pytest.raises(GeometryError, match="field of view"):
        segment(images, "kmeans", 3, mask=outside, field_of_view=covered)


def test_more_classes_than_the_region_has_values_and_bad_settings_are_refused(rng):
    images, _ = phantom(rng)
    binary = sitk.Cast(sitk.Greater(images["PET"], 50.0), sitk.sitkFloat32)
    for method in ("kmeans", "gmm"):
        with pytest.raises(ConfigError, match="only 2 distinct value"):
            segment({"PET": binary}, method, 5)
    for options, name in (({"beta": float("nan")}, "beta"),
                          ({"smoothing_mm": float("nan")}, "smoothing_mm"),
                          ({"iterations": -1}, "iterations"), ({"max_samples": 0}, "max_samples"),
                          ({"n_init": 0}, "n_init"), ({"keep_largest": "no"}, "keep_largest")):
        with pytest.raises(ConfigError, match=name):
            segment(images, "kmeans", 3, **options)
    with pytest.raises(ConfigError, match="low must be a finite number"):
        segment(images, "threshold", channel="PET", low=float("nan"))
    as_text = segment(images, "threshold", channel="PET", low="50")  # a number as text
    as_number = segment(images, "threshold", channel="PET", low=50.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(as_text.labels),
                                  sitk.GetArrayFromImage(as_number.labels))


def test_threshold_settings_choose_the_kind_and_settings_it_does_not_use_are_refused():
    pet, _ = pet_with_two_lesions()
    pet_array = sitk.GetArrayFromImage(pet)
    # Bounds alone mean a range threshold, even on PET (whose default is suv_fraction).
    result = segment({"PET": pet}, "threshold", low=7.0)
    assert result.info["threshold"] == "range"
    assert sitk.GetArrayFromImage(result.labels).sum() == (pet_array >= 7.0).sum()
    for options, unused in (({"threshold": "otsu", "fraction": 0.5}, "fraction"),
                            ({"threshold": "suv_fraction", "low": 1.0}, "low"),
                            ({"threshold": "range", "low": 1.0, "fraction": 0.3}, "fraction")):
        with pytest.raises(ConfigError, match=f"does not use {unused}"):
            segment({"PET": pet}, "threshold", **options)


def test_a_threshold_on_another_grid_ignores_the_padding_outside_its_field_of_view(
    rng, caplog
):
    # An MR whose grid reaches past the PET's: the PET's padding (its minimum) would pull an
    # Otsu threshold down into the background; inside its field of view it separates the
    # classes as on its own grid.
    images, _ = phantom(rng)
    pet = images["PET"]
    own = segment({"PET": pet}, "threshold", threshold="otsu").info["threshold_value"]
    wide = sitk.ConstantPad(images["MR_T1"], (0, 60, 0), (0, 60, 0), 0.0)
    with caplog.at_level("WARNING"):
        result = segment({"MR_T1": wide, "PET": pet}, "threshold", threshold="otsu",
                         channel="PET")
    assert "of MR_T1's grid (" in caplog.text and "field of view of PET" in caplog.text
    assert abs(result.info["threshold_value"] - own) < 2.0
    labels = sitk.GetArrayFromImage(result.labels)
    assert not labels[:, :60, :].any() and not labels[:, -60:, :].any()


@pytest.mark.parametrize("stage", ["classifying voxels", "regularising"])
def test_classification_reports_progress_and_stops_when_cancelled(rng, monkeypatch, stage):
    from MultiModalAnalysisLib.segmentation import classical

    monkeypatch.setattr(classical, "VOXELS_PER_BLOCK", 4096)  # the phantom in 12 blocks
    images, _ = phantom(rng)
    cancel = threading.Event()
    seen = []

    def progress(fraction, message):
        seen.append((fraction, message))
        if message.startswith(stage):
            cancel.set()

    with pytest.raises(OperationCancelled):
        segment(images, "gmm", 3, progress=progress, cancel=cancel)
    # Stopped at the first check after the request: one more block at most.
    classified = [f for f, m in seen if m == "classifying voxels"]
    assert len(classified) == (1 if stage == "classifying voxels" else 12)
    assert np.all(np.diff([f for f, _ in seen]) >= 0)
    with pytest.raises(ConfigError, match="whole number"):
        segment(images, "kmeans", 2.5)


def test_predicting_with_other_channels_than_fitted_is_refused(rng):
    images, _ = phantom(rng)
    model = KMeansSegmenter(3).fit(images)
    with pytest.raises(MissingModalityError, match="fitted on MR_T1, PET"):
        model.predict({"PET": images["PET"], "MR_T1": images["MR_T1"]})


def test_segment_refuses_unknown_methods_and_options(rng):
    images, _ = phantom(rng)
    with pytest.raises(ConfigError, match="unknown segmentation method"):
        segment(images, "watershed")
    with pytest.raises(ConfigError, match="does not take the option.*smoothness"):
        segment(images, "gmm", smoothness=3)
    with pytest.raises(MissingModalityError):
        segment({}, "gmm")


def pet_with_two_lesions():
    shape = (30, 40, 40)
    z, y, x = np.indices(shape)
    pet = np.full(shape, 1.0, np.float32)
    big = ((x - 12) ** 2 + (y - 20) ** 2 + (z - 15) ** 2) < 7**2
    small = ((x - 32) ** 2 + (y - 20) ** 2 + (z - 15) ** 2) < 3**2
    pet[big] = 10.0
    pet[(x - 12) ** 2 + (y - 20) ** 2 + (z - 15) ** 2 < 2**2] = 20.0  # the hot core
    pet[small] = 9.0  # above 40 % of SUVmax but not connected to the maximum
    return make_image(pet, (2.0, 2.0, 2.0)), big


def test_suv_fraction_keeps_only_the_component_holding_the_maximum():
    pet, big = pet_with_two_lesions()
    lesion, threshold = suv_fraction_threshold(pet, 0.4)
    assert threshold == pytest.approx(8.0)
    array = sitk.GetArrayFromImage(lesion).astype(bool)
    assert np.array_equal(array, big)  # the small hot ball is not included
    result = segment({"PET": pet}, "threshold")  # PET -> fraction of SUVmax by default
    assert result.info["threshold"] == "suv_fraction"
    assert np.array_equal(sitk.GetArrayFromImage(result.labels).astype(bool), big)


def test_otsu_and_range_thresholds_split_two_intensity_levels():
    pet, big = pet_with_two_lesions()
    mask, value = otsu_threshold(pet)
    assert 1.0 < value < 9.0
    assert sitk.GetArrayFromImage(mask).sum() == big.sum() + np.sum(
        sitk.GetArrayFromImage(pet) == 9.0
    )
    in_range = range_threshold(pet, 8.5, 9.5)
    assert sitk.GetArrayFromImage(in_range).sum() == np.sum(sitk.GetArrayFromImage(pet) == 9.0)
    with pytest.raises(ConfigError):
        range_threshold(pet, 5, 1)


def test_a_threshold_that_selects_nothing_says_so(caplog):
    pet, _ = pet_with_two_lesions()
    with caplog.at_level("WARNING"):
        result = segment({"PET": pet}, "threshold", threshold="range", low=50.0, high=60.0)
    assert not sitk.GetArrayFromImage(result.labels).any()
    assert "selects no voxel" in caplog.text


def test_cleanups_fill_holes_keep_the_largest_and_drop_small_components():
    array = np.zeros((20, 30, 30), np.uint8)
    array[5:15, 5:20, 5:20] = 1
    array[9:11, 11:13, 11:13] = 0  # an enclosed hole of 8 voxels
    array[2:4, 25:27, 25:27] = 1  # a small blob: 8 voxels of 8 mm^3 = 64 mm^3
    mask = make_image(array, (2.0, 2.0, 2.0))
    filled = sitk.GetArrayFromImage(fill_holes(mask))
    assert filled[10, 12, 12] == 1 and filled.sum() == array.sum() + 8
    largest = sitk.GetArrayFromImage(keep_largest_component(mask))
    assert largest[3, 26, 26] == 0 and largest[6, 6, 6] == 1
    kept = sitk.GetArrayFromImage(remove_small_components(mask, 100.0))
    assert kept[3, 26, 26] == 0 and kept.sum() == array.sum() - 8
    kept = sitk.GetArrayFromImage(remove_small_components(mask, 50.0))
    assert kept.sum() == array.sum()


def test_clean_labels_works_per_label_without_eating_other_labels():
    array = np.zeros((10, 20, 20), np.uint8)
    array[2:8, 2:18, 2:18] = 1
    array[4:6, 8:12, 8:12] = 2  # label 2 inside label 1 is not a hole to fill
    array[0, 0, 0] = 1  # a stray voxel of label 1
    labels = make_image(array)
    cleaned = sitk.GetArrayFromImage(clean_labels(labels, keep_largest=True, fill=True))
    assert cleaned[0, 0, 0] == 0
    assert np.all(cleaned[4:6, 8:12, 8:12] == 2)
    assert np.count_nonzero(cleaned == 1) == np.count_nonzero(array == 1) - 1
    with pytest.raises(ConfigError, match="minimum component volume must be 0 mm"):
        clean_labels(labels, min_volume_mm3=-5.0)  # was accepted, and did nothing


def test_saving_leaves_no_earlier_uncertainty_map_beside_new_probabilities(rng, tmp_path,
                                                                            caplog):
    images, _ = phantom(rng)
    first = segment(images, "kmeans", 3).save(tmp_path / "l.nii.gz", tmp_path / "p.nii.gz")
    assert first["uncertainty"].is_file()
    with caplog.at_level("WARNING"):
        second = segment(images, "threshold", channel="PET", low=50.0).save(
            tmp_path / "l.nii.gz", tmp_path / "p.nii.gz")
    assert "uncertainty" not in second and not first["uncertainty"].exists()
    assert "the file there is from before" in caplog.text
    assert "an earlier run's uncertainty map" in caplog.text
