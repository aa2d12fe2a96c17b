"""Feature settings (files, checks) and what extract_features does with bad input."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import make_image

from MultiModalAnalysisLib.errors import ConfigError, EmptyImageError, GeometryError, LabelError
from MultiModalAnalysisLib.features import (
    FeatureSettings,
    UndefinedFeatureWarning,
    extract_features,
    load_settings,
)


@pytest.fixture
def lesion(rng):
    """A textured 16^3 volume with a 6x8x8 box lesion, 1 x 1 x 2 mm voxels."""
    array = rng.normal(50, 15, (16, 16, 16)).astype(np.float32)
    mask = np.zeros(array.shape, np.uint8)
    mask[5:11, 4:12, 4:12] = 1
    return make_image(array, (1.0, 1.0, 2.0)), make_image(mask, (1.0, 1.0, 2.0))


FAST = {"families": ["morph", "stat", "cm"], "texture_aggregation": ["3D"]}


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_settings_file_round_trip_keeps_every_value(tmp_path, suffix):
    settings = FeatureSettings(
        new_spacing=(1.0, 1.0, 1.0), resegmentation_range=(-100, None),
        resegmentation_outlier_sigma=3.0, discretisation_method="fixed_bin_size",
        discretisation_bin_width=12.5, texture_aggregation=("3D",), families=("stat", "cm"),
        features=("cm_*_3D_avg",), mask_grid_mismatch="error",
    )  # fmt: skip
    path = settings.save(tmp_path / f"settings{suffix}")
    loaded = load_settings(path)
    assert loaded == settings
    assert loaded.texture.lower_bound == -100.0  # fixed bin size starts at the range's low end


def test_settings_file_with_a_subset_keeps_the_other_defaults(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"discretisation_bin_number": 64}))
    loaded = load_settings(path)
    assert loaded.discretisation_bin_number == 64
    assert loaded.texture_aggregation == ("2D", "2.5D", "3D")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"bin_count": 3}, "unknown feature setting"),
        ({"discretisation_method": "equal_width"}, "not one of"),
        ({"discretisation_bin_number": 0}, "whole number from 1 to 1024"),
        ({"discretisation_bin_number": 32.7}, "whole number from 1 to 1024"),
        ({"discretisation_bin_number": True}, "must be a number"),
        ({"discretisation_bin_number": 5000}, "whole number from 1 to 1024"),
        ({"discretisation_bin_width": float("nan")}, "positive, finite number"),
        ({"discretisation_bin_width": float("inf")}, "positive, finite number"),
        ({"resegmentation_range": [100, -100]}, "empty"),
        ({"resegmentation_range": [float("nan"), 100]}, "NaN"),
        ({"families": ["glcm"]}, "not one of"),
        ({"new_spacing": [1, 2]}, "three"),
        ({"new_spacing": float("nan")}, "three"),
        ({"glcm_distance": 1.5}, "glcm_distance must be a whole number"),
    ],
)
def test_bad_settings_are_refused_with_a_message_naming_them(values, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(values)


def test_settings_that_the_image_makes_unusable_are_refused_before_the_matrices():
    """A bin width far finer than the intensities (a PET-sized bin on a CT) would make the
    texture matrices exhaust the memory; a lower bound above the ROI leaves no bin."""
    import numpy as np
    import SimpleITK as sitk

    from MultiModalAnalysisLib.features import extract_features

    values = np.random.default_rng(0).normal(0, 300, (12, 16, 16)).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    mask = sitk.GetImageFromArray(np.pad(np.ones((8, 10, 10), np.uint8), ((2, 2), (3, 3), (3, 3))))
    fine = {"discretisation_method": "fixed_bin_size", "discretisation_bin_width": 0.1,
            "families": ["cm"]}
    with pytest.raises(ConfigError, match="makes .* grey levels, more than the 1024"):
        extract_features({"CT": image}, mask, settings=fine)
    above = {"discretisation_method": "fixed_bin_size", "discretisation_bin_width": 25,
             "discretisation_lower_bound": 5000, "families": ["cm"]}
    with pytest.raises(ConfigError, match="lower bound 5000 is above the highest intensity"):
        extract_features({"CT": image}, mask, settings=above)
    with pytest.raises(ConfigError, match="new_spacing .* more than the 1e\\+09"):
        extract_features({"CT": image}, mask, settings={"new_spacing": 0.001,
                                                        "families": ["stat"]})
    # A thousand levels work, in memory of the matrix's size (the one-hot sums took Ng^3).
    many = {"discretisation_bin_number": 1000, "families": ["cm"], "texture_aggregation": ["3D"]}
    values = extract_features({"CT": image}, mask, settings=many)
    glcm = [v for k, v in values.items() if k.startswith("CT_cm_")]
    assert len(glcm) > 20 and np.isfinite(glcm).all()


def test_unparsable_settings_file_is_a_config_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="could not be parsed"):
        load_settings(path)


def test_feature_and_classifier_settings_files_share_one_reader(tmp_path):
    """JSON and YAML for both; a file that holds no object, or is missing, is refused with
    a message naming what the settings are for."""
    from MultiModalAnalysisLib.classification.settings import load_settings as classifier_settings

    (tmp_path / "c.yaml").write_text("classifier: random_forest\nn_features: [2, 4]\n")
    settings = classifier_settings(tmp_path / "c.yaml")
    assert settings.classifier == "random_forest" and list(settings.n_features) == [2, 4]
    (tmp_path / "f.yml").write_text("families: [stat]\n")
    assert load_settings(tmp_path / "f.yml").families == ("stat",)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="classifier settings file .* must hold a JSON object"):
        classifier_settings(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="feature settings file .* must hold a JSON object"):
        load_settings(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="classifier settings file .* does not exist"):
        classifier_settings(tmp_path / "none.json")


def test_features_are_named_image_then_ibsi_tag_for_each_image(lesion):
    image, mask = lesion
    values = extract_features({"CT": image, "PET": image}, mask, FAST, device="cpu")
    assert values["CT_stat_max"] == values["PET_stat_max"]
    assert "MR_T1_cm_joint_max_3D_comb" not in values
    assert {"CT_cm_joint_max_3D_comb", "PET_cm_joint_max_3D_avg"} <= values.keys()
    assert all(np.isfinite(v) for v in values.values())


def test_feature_selection_reports_only_the_requested_tags(lesion):
    image, mask = lesion
    settings = {"features": ["stat_max", "cm_*_3D_avg"], "texture_aggregation": ["3D"]}
    values = extract_features({"CT": image}, mask, settings, device="cpu")
    assert values.keys() == {"CT_stat_max"} | {k for k in values if k.endswith("_3D_avg")}
    assert len(values) == 1 + 25


def test_a_feature_pattern_that_selects_nothing_is_an_error_not_an_empty_table(lesion):
    image, mask = lesion
    settings = {"families": ["stat"], "features": ["stat_mean", "stat_nonexistent", "cm_*"]}
    with pytest.raises(ConfigError, match=r"'stat_nonexistent', 'cm_\*' match\(es\) no"):
        extract_features({"CT": image}, mask, settings, device="cpu")


def test_empty_mask_is_refused(lesion):
    image, mask = lesion
    with pytest.raises(EmptyImageError, match="empty"):
        extract_features({"CT": image}, mask * 0, FAST, device="cpu")


def test_mask_outside_the_image_is_refused(lesion):
    image, mask = lesion
    far = sitk.Image(mask)
    far.SetOrigin((500.0, 500.0, 500.0))
    with pytest.raises(EmptyImageError, match="outside"):
        extract_features({"CT": image}, far, FAST, device="cpu")


def test_multi_label_mask_is_refused(lesion):
    image, mask = lesion
    with pytest.raises(LabelError, match="labels"):
        extract_features({"CT": image}, mask + (mask > 2) + sitk.Cast(image > 60, sitk.sitkUInt8),
                         FAST, device="cpu")


def test_mask_on_another_grid_is_resampled_with_a_warning(lesion, caplog):
    image, mask = lesion
    fine = sitk.Resample(mask, [32, 32, 32], sitk.Transform(), sitk.sitkNearestNeighbor,
                         (-0.25, -0.25, -0.5), (0.5, 0.5, 1.0), mask.GetDirection())
    with caplog.at_level(logging.WARNING):
        resampled = extract_features({"CT": image}, fine, FAST, device="cpu")
    assert "not on CT's grid" in caplog.text
    same = extract_features({"CT": image}, mask, FAST, device="cpu")
    assert resampled["CT_morph_vol_approx"] == pytest.approx(same["CT_morph_vol_approx"])
    assert resampled["CT_stat_mean"] == pytest.approx(same["CT_stat_mean"])


def test_a_mask_partly_outside_the_image_is_measured_inside_with_a_warning(caplog):
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(100, 20, (20, 20, 20)))
    cube = np.zeros((40, 40, 40), np.uint8)
    cube[12:28, 12:28, 12:28] = 1  # 16^3 voxels, 7/8 of them beyond the 20^3 image
    with caplog.at_level(logging.WARNING):
        features = extract_features({"CT": image}, sitk.GetImageFromArray(cube),
                                    {"families": ["morph"]}, device="cpu")
    assert "3584 of the 4096 voxels of the mask (88 %) lie outside CT's field of view" \
        in caplog.text
    assert features["CT_morph_vol_approx"] == pytest.approx(512.0)  # the 8^3 inside
    caplog.clear()
    inside = sitk.GetImageFromArray(cube[10:30, 10:30, 10:30])
    inside.SetOrigin((0.5, 0.0, 0.0))  # another grid, wholly inside the image
    with caplog.at_level(logging.WARNING):
        extract_features({"CT": image}, inside, {"families": ["stat"]}, device="cpu")
    assert "not on CT's grid" in caplog.text and "outside" not in caplog.text


def test_mask_on_another_grid_can_be_refused(lesion):
    image, mask = lesion
    shifted = sitk.Image(mask)
    shifted.SetOrigin((0.5, 0.0, 0.0))
    with pytest.raises(GeometryError, match="grid"):
        extract_features({"CT": image}, shifted, {**FAST, "mask_grid_mismatch": "error"}, "cpu")


def test_single_voxel_lesion_gives_nan_texture_with_a_warning_not_a_crash(lesion):
    image, mask = lesion
    single = make_image(np.zeros((16, 16, 16), np.uint8), (1.0, 1.0, 2.0))
    single[8, 8, 8] = 1
    with pytest.warns(UndefinedFeatureWarning, match="single voxel"):
        values = extract_features({"CT": image}, single, device="cpu")
    assert values["CT_morph_vol_approx"] == pytest.approx(2.0)
    assert values["CT_stat_mean"] == pytest.approx(image[8, 8, 8])
    assert math.isnan(values["CT_cm_joint_max_3D_avg"])
    assert math.isnan(values["CT_morph_pca_elongation"])
    assert values["CT_rlm_sre_3D_avg"] == 1.0  # one run of length 1 in each direction


def test_resegmentation_range_that_leaves_nothing_is_refused(lesion):
    image, mask = lesion
    with pytest.raises(EmptyImageError, match="re-segmentation"):
        extract_features({"CT": image}, mask, {**FAST, "resegmentation_range": [1000, None]})


def test_resegmentation_and_resampling_change_the_region_as_expected(lesion):
    image, mask = lesion
    cut = extract_features({"CT": image}, mask, {**FAST, "resegmentation_range": [40, 60]})
    assert cut["CT_stat_min"] >= 40 and cut["CT_stat_max"] <= 60
    plain = extract_features({"CT": image}, mask, FAST)
    assert cut["CT_morph_vol_approx"] == plain["CT_morph_vol_approx"]  # the shape is kept
    iso = extract_features({"CT": image}, mask, {**FAST, "new_spacing": [1.0, 1.0, 1.0]})
    assert iso["CT_morph_vol_approx"] == pytest.approx(plain["CT_morph_vol_approx"], rel=0.05)


def test_cancel_stops_feature_extraction(lesion):
    import threading

    from MultiModalAnalysisLib.errors import OperationCancelled

    image, mask = lesion
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(OperationCancelled):
        extract_features({"CT": image}, mask, FAST, cancel=cancel)


def test_families_in_parallel_threads_give_the_sequential_values(lesion):
    image, mask = lesion
    sequential = extract_features({"CT": image}, mask, device="cpu", workers=1)
    parallel = extract_features({"CT": image}, mask, device="cpu", workers=3)
    assert list(parallel) == list(sequential)  # same order: IBSI's family order
    assert all(parallel[k] == pytest.approx(sequential[k], nan_ok=True) for k in sequential)


def test_one_name_where_a_list_is_expected_is_that_one_item():
    settings = FeatureSettings(texture_aggregation="3D", families="stat")
    assert settings.texture_aggregation == ("3D",) and settings.families == ("stat",)
    assert settings == FeatureSettings.from_dict({"texture_aggregation": "3D",
                                                  "families": "stat"})


def test_switches_written_as_text_and_empty_lists_are_refused(tmp_path):
    # "false" as text would read as true: rounding on, non-standard features kept
    for values, message in (({"intensity_rounding": "false"}, "intensity_rounding must be True"),
                            ({"non_standard_features": "no"}, "non_standard_features must be"),
                            ({"families": []}, "families is empty"),
                            ({"texture_aggregation": []}, "texture_aggregation is empty")):
        with pytest.raises(ConfigError, match=message):
            load_settings(values)
    assert load_settings({"intensity_rounding": True}).intensity_rounding is True
    broken = tmp_path / "s.yaml"
    broken.write_text("discretisation_method: [fixed\n")
    with pytest.raises(ConfigError, match="could not be parsed") as raised:
        load_settings(broken)
    assert "\n" not in str(raised.value)  # one line, not YAML's caret diagram


def test_per_image_settings_measure_each_image_as_its_own_settings_do(lesion, rng):
    ct, mask = lesion
    pet = sitk.Abs(ct) / 20.0  # SUV-sized values on the same grid
    ct_own = {"discretisation_method": "fixed_bin_size", "discretisation_bin_width": 25.0}
    pet_own = {"discretisation_method": "fixed_bin_size", "discretisation_bin_width": 0.5}
    together = extract_features(
        {"CT": ct, "PET": pet}, mask,
        {**FAST, "per_image": {"ct": ct_own, "PT": pet_own}}, device="cpu")
    alone = extract_features({"CT": ct}, mask, {**FAST, **ct_own}, device="cpu")
    alone |= extract_features({"PET": pet}, mask, {**FAST, **pet_own}, device="cpu")
    assert together.keys() == alone.keys()
    assert all(together[k] == pytest.approx(alone[k], nan_ok=True) for k in alone)
    # one bin width for both (the shared default, 32 bins) gives other texture values
    shared = extract_features({"CT": ct, "PET": pet}, mask, FAST, device="cpu")
    assert shared["PET_cm_joint_entr_3D_avg"] != pytest.approx(
        together["PET_cm_joint_entr_3D_avg"], rel=1e-3)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_per_image_settings_round_trip_under_the_canonical_names(tmp_path, suffix):
    settings = FeatureSettings(texture_aggregation=("3D",), per_image={
        "t1": {"discretisation_bin_number": 16},
        "pet": {"discretisation_method": "fixed_bin_size", "discretisation_bin_width": 0.5,
                "texture_aggregation": ("2D",)}})
    assert set(settings.per_image) == {"MR_T1", "PET"}
    loaded = load_settings(settings.save(tmp_path / f"settings{suffix}"))
    assert loaded == settings
    assert loaded.for_image("PET").texture.bin_width == 0.5
    assert loaded.for_image("PET").texture_aggregation == ("2D",)
    assert loaded.for_image("MR-T1").texture.bin_number == 16
    assert loaded.for_image("CT") == loaded  # no settings of its own
    assert "per_image" not in FeatureSettings().to_dict()  # files as before


@pytest.mark.parametrize("per_image, message", [
    ({"PET": {"bin_width": 0.5}}, "per_image PET: unknown feature setting"),
    ({"PET": {"discretisation_bin_width": -1}}, "per_image PET: discretisation_bin_width"),
    ({"PET": 0.5}, "give a mapping"),
    ({"PET": {}, "pt": {}}, "names PET twice"),
    ({"CT": {"per_image": {}}}, "unknown feature setting"),
    (["CT"], "must map image names"),
])
def test_bad_per_image_settings_are_refused_naming_the_image(per_image, message):
    with pytest.raises(ConfigError, match=message):
        load_settings({"per_image": per_image})


def test_a_per_image_name_that_is_no_image_and_no_modality_is_warned_about(lesion, caplog):
    ct, mask = lesion
    with caplog.at_level(logging.WARNING):
        extract_features({"CT": ct}, mask, {**FAST, "per_image": {
            "fusd": {"discretisation_bin_number": 8}, "PET": {}}}, device="cpu")
    assert "per_image FUSD names none of the images" in caplog.text
    assert "PET" not in caplog.text  # a modality absent here is no typo


def test_per_image_names_are_checked_once_against_every_image_on_their_own_grids(lesion,
                                                                               caplog):
    # each image measured on its own grid: the names are checked against all the images
    # (a section naming the second image was taken for a typo while the first was measured)
    from MultiModalAnalysisLib.features import extract_on_own_grids

    ct, mask = lesion
    with caplog.at_level(logging.WARNING):
        values = extract_on_own_grids({"CT": ct, "fused": ct}, mask, settings={
            **FAST, "per_image": {"fused": {"discretisation_bin_number": 8},
                                  "fusd": {"discretisation_bin_number": 8}}}, device="cpu")
    assert caplog.text.count("names none of the images") == 1
    assert "per_image FUSD names none" in caplog.text
    joint_max = [k.removeprefix("CT_") for k in values if k.startswith("CT_cm_joint_max")]
    assert values[f"CT_{joint_max[0]}"] != values[f"fused_{joint_max[0]}"]  # its own bins


def test_a_setting_the_discretisation_method_leaves_unused_is_warned_about(caplog, tmp_path):
    with caplog.at_level(logging.WARNING):
        load_settings({"per_image": {"PET": {"discretisation_bin_width": 0.5}}})
    assert "per_image PET: discretisation_bin_width not used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_settings({"discretisation_bin_number": 64, "discretisation_method":
                       "fixed_bin_size", "discretisation_bin_width": 10.0})
    assert "discretisation_bin_number not used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a saved file holds every default: no word
        load_settings(FeatureSettings(per_image={"PET": {
            "discretisation_method": "fixed_bin_size",
            "discretisation_bin_width": 0.5}}).save(tmp_path / "s.json"))
        load_settings({"ih_discretisation_method": "fixed_bin_size",
                       "discretisation_bin_width": 5.0})  # (the histogram takes it)
    assert "not used" not in caplog.text
