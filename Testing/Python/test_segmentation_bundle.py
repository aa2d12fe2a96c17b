"""MONAI bundles from a local folder: a tiny bundle written by the test, run on an oblique,
anisotropic volume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from synthetic import make_image, physical_points, rotation_direction

from MultiModalAnalysisLib.errors import ConfigError, ModelError
from MultiModalAnalysisLib.metrics import dice
from MultiModalAnalysisLib.segmentation import load_monai_bundle, segment


def write_bundle(folder):
    """A bundle whose "network" labels a voxel when the voxel 3 steps further along the first
    array axis is brighter than 50 (after its own 0..100 -> 0..1 scaling), at 2 mm in RAS
    orientation: the labels are the bright region moved 6 mm back along the image axis
    closest to the patient's right, so a wrong axis order or orientation shows."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    config = {
        "bundle_root": ".",
        "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2,
                        "kernel_size": 7, "padding": 3},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [2.0, 2.0, 2.0]},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 100,
             "b_min": 0.0, "b_max": 1.0, "clip": True},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16],
                    "sw_batch_size": 1},
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    metadata = {"name": "bright spot finder", "network_data_format": {
        "inputs": {"image": {"num_channels": 1}},
        "outputs": {"pred": {"num_channels": 2, "channel_def": {"0": "background",
                                                                 "1": "bright"}}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    network = torch.nn.Conv3d(1, 2, 7, padding=3)
    with torch.no_grad():
        network.weight.zero_()
        network.bias.zero_()
        network.weight[1, 0, 6, 3, 3] = 20.0  # the input 3 voxels on along x (towards R)
        network.bias[1] = -10.0  # logit(bright) - logit(background) = 20 * scaled - 10
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    return folder


def oblique_ball(shift_mm=(0.0, 0.0, 0.0)):
    """An off-centre ball (80) in a background of 20 on a rotated, anisotropic grid, and its
    mask moved by ``shift_mm`` (LPS)."""
    reference = make_image(np.zeros((20, 36, 40), np.float32), (1.2, 1.5, 2.5), (4.0, -8.0, 3.0),
                           rotation_direction((10, -20, 35)))
    points = physical_points(reference)
    centre = reference.TransformContinuousIndexToPhysicalPoint((24.0, 15.0, 9.0))
    ball = np.linalg.norm(points - np.array(centre), axis=-1) < 11.0
    moved = np.linalg.norm(points - np.array(centre) - np.array(shift_mm), axis=-1) < 11.0
    image = make_image(np.where(ball, 80.0, 20.0).astype(np.float32), reference.GetSpacing(),
                       reference.GetOrigin(), reference.GetDirection())
    truth = make_image(moved.astype(np.uint8), reference.GetSpacing(), reference.GetOrigin(),
                       reference.GetDirection())
    return image, truth


def test_a_local_monai_bundle_runs_its_network_on_the_images_grid(tmp_path):
    bundle = load_monai_bundle(write_bundle(tmp_path / "bundle"))
    assert bundle.in_channels == 1 and bundle.label_names == {1: "bright"}
    assert bundle.spacing == [2.0, 2.0, 2.0] and bundle.orientation == "RAS"
    assert bundle.roi_size == [16, 16, 16]
    _, unmoved = oblique_ball()
    # MONAI's Orientationd permutes and flips axes: its first axis is the image axis closest
    # to the patient's right (-x in LPS).
    axes = np.array(sitk.DICOMOrient(unmoved, "RAS").GetDirection()).reshape(3, 3)
    image, truth = oblique_ball(shift_mm=tuple(-6.0 * axes[:, 0]))
    result = segment({"CT": image}, "model", model=tmp_path / "bundle", device="cpu")
    assert result.labels.GetSize() == image.GetSize()
    assert result.labels.GetDirection() == image.GetDirection()
    assert dice(result.labels, truth) >= 0.85
    assert dice(result.labels, unmoved) < 0.75
    assert result.label_names == {1: "bright"}
    probabilities = sitk.GetArrayFromImage(result.probabilities)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-4)


def test_clean_up_settings_apply_to_a_bundles_labels_and_model_only_settings_are_refused(
    tmp_path
):
    folder = write_bundle(tmp_path / "bundle")
    image, _ = oblique_ball()
    plain = segment({"CT": image}, "model", model=folder, device="cpu")
    assert sitk.GetArrayFromImage(plain.labels).any()
    removed = segment({"CT": image}, "model", model=folder, device="cpu",
                      min_volume_mm3=1e9)
    assert not sitk.GetArrayFromImage(removed.labels).any()
    assert removed.info["cleanup"] == {"min_volume_mm3": 1e9}
    for options in ({"mc_samples": 2}, {"presets_applied": True}):
        with pytest.raises(ConfigError, match="applies to this project's models only"):
            segment({"CT": image}, "model", model=folder, device="cpu", **options)


def test_bundle_problems_are_reported_clearly(tmp_path):
    folder = write_bundle(tmp_path / "bundle")
    image, _ = oblique_ball()
    with pytest.raises(ModelError, match="takes 1 input image"):
        segment({"CT": image, "PET": image}, "model", model=folder, device="cpu")
    (folder / "models" / "model.pt").unlink()
    with pytest.raises(ModelError, match="no weights"):
        load_monai_bundle(folder)
    torch.save(torch.nn.Conv3d(1, 3, 1).state_dict(), folder / "models" / "model.pt")
    with pytest.raises(ModelError, match="do not fit"):
        load_monai_bundle(folder)
    with pytest.raises(ModelError, match="not a MONAI bundle"):
        load_monai_bundle(tmp_path)
    (folder / "models" / "model.pt").write_bytes(b"damaged")
    with pytest.raises(ModelError, match="cannot be read as plain tensors") as raised:
        load_monai_bundle(folder)
    assert "weights_only" not in str(raised.value)


def test_bundle_settings_given_by_reference_are_resolved_and_damaged_configs_refused(tmp_path):
    folder = write_bundle(tmp_path / "bundle")
    config_path = folder / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["pixdim"], config["roi"] = [2.0, 2.0, 2.0], [16, 16, 16]
    config["preprocessing"]["transforms"][3]["pixdim"] = "@pixdim"
    config["inferer"]["roi_size"] = "@roi"
    config_path.write_text(json.dumps(config))
    bundle = load_monai_bundle(folder)
    assert bundle.spacing == [2.0, 2.0, 2.0] and bundle.roi_size == [16, 16, 16]
    config["inferer"]["roi_size"] = "@nowhere"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="could not read 'inferer#roi_size'"):
        load_monai_bundle(folder)
    config_path.write_text(json.dumps(config)[:-20])
    with pytest.raises(ModelError, match="cannot read the bundle config .*inference.json"):
        load_monai_bundle(folder)
    config_path.write_text("{}")
    (folder / "configs" / "metadata.json").write_text("{oops")
    with pytest.raises(ModelError, match="cannot read the bundle metadata"):
        load_monai_bundle(folder)


def edit_config(folder, change):
    """Rewrite a bundle's inference.json through ``change(config)`` (which edits it in place)."""
    path = folder / "configs" / "inference.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    return folder


def test_preprocessing_given_by_reference_is_applied_as_when_written_out(tmp_path, caplog):
    image, _ = oblique_ball()
    plain = segment({"CT": image}, "model", model=write_bundle(tmp_path / "plain"),
                    device="cpu")

    def by_reference(reference):
        def change(config):
            config["preprocessing_transforms"] = config["preprocessing"]["transforms"]
            config["preprocessing"]["transforms"] = reference
        return change

    for i, reference in enumerate(("$@preprocessing_transforms", "@preprocessing_transforms")):
        folder = edit_config(write_bundle(tmp_path / f"by_reference{i}"), by_reference(reference))
        bundle = load_monai_bundle(folder)
        assert bundle.spacing == [2.0, 2.0, 2.0] and bundle.orientation == "RAS"
        assert bundle.intensity is not None
        result = segment({"CT": image}, "model", model=bundle, device="cpu")
        assert np.array_equal(sitk.GetArrayFromImage(result.labels),
                              sitk.GetArrayFromImage(plain.labels))

    def built_in_code(config):
        config["preprocessing"] = "$monai.transforms.Compose([])"

    folder = edit_config(write_bundle(tmp_path / "code"), built_in_code)
    with caplog.at_level("WARNING"):
        bundle = load_monai_bundle(folder)
    assert bundle.spacing is None and bundle.intensity is None
    assert "preprocessing could not be read" in caplog.text
    assert "none of it is applied" in caplog.text


def sliding_window_calls(monkeypatch):
    """The calls of MONAI's sliding window, recorded: its arguments by name, ``inputs`` as a
    ``[channel, x, y, z]`` array."""
    import inspect

    import monai.inferers

    calls = []
    original = monai.inferers.sliding_window_inference

    def recording(*args, **kwargs):
        call = dict(inspect.signature(original).bind(*args, **kwargs).arguments)
        calls.append({**call, "inputs": call["inputs"][0].detach().cpu().numpy()})
        return original(*args, **kwargs)

    monkeypatch.setattr(monai.inferers, "sliding_window_inference", recording)
    return calls


def test_a_sagittally_stored_image_gives_the_network_the_same_input_as_the_axial_one(
    tmp_path, monkeypatch
):
    # Anisotropic pixdim: applied along the image's stored axes instead of the oriented
    # ones, the network would get another grid for each storage order.
    def anisotropic(config):
        config["preprocessing"]["transforms"][3]["pixdim"] = [1.5, 2.0, 3.0]

    folder = edit_config(write_bundle(tmp_path / "bundle"), anisotropic)
    calls = sliding_window_calls(monkeypatch)
    axial, _ = oblique_ball()
    stored_otherwise = sitk.PermuteAxes(axial, [2, 0, 1])  # the same image, axes z, x, y
    results = [segment({"CT": image}, "model", model=folder, device="cpu")
               for image in (axial, stored_otherwise)]
    seen = [call["inputs"] for call in calls]
    assert seen[0].shape == seen[1].shape
    assert np.abs(seen[0] - seen[1]).max() < 1e-4
    spaced_along_oriented_axes = np.array(
        sitk.DICOMOrient(axial, "RAS").GetSize()) * np.array(
        sitk.DICOMOrient(axial, "RAS").GetSpacing()) / np.array([1.5, 2.0, 3.0])
    np.testing.assert_allclose(seen[0].shape[1:], spaced_along_oriented_axes, atol=1.0)
    back = sitk.PermuteAxes(results[1].labels, [1, 2, 0])
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(results[0].labels))


def nested_spheres():
    """A 0..3 image: whole (1) around core (2) around enhancing (3) spheres, off-centre, and
    the voxel count of each value."""
    z, y, x = np.mgrid[:24, :24, :24]
    distance = np.sqrt((z - 11) ** 2 + (y - 12) ** 2 + (x - 13) ** 2)
    values = (distance < 9).astype(np.float32) + (distance < 6) + (distance < 3)
    image = make_image(values, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), rotation_direction((0, 0, 0)))
    return image, {v: int((values == v).sum()) for v in (1, 2, 3)}


def write_multi_label_bundle(folder, threshold=0.5):
    """A BraTS-like bundle: three sigmoid channels, tumour core (> 1.5), whole tumour (> 0.5)
    and enhancing tumour (> 2.5) of the input, in BraTS's channel order."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    config = {
        "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 3,
                        "kernel_size": 1},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [24, 24, 24]},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": threshold},
        ]},
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    metadata = {"name": "nested", "network_data_format": {
        "inputs": {"image": {"num_channels": 1}},
        "outputs": {"pred": {"num_channels": 3, "channel_def": {
            "0": "Tumor core", "1": "Whole tumor", "2": "Enhancing tumor"}}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    network = torch.nn.Conv3d(1, 3, 1)
    with torch.no_grad():
        network.weight.fill_(10.0)
        network.bias.copy_(torch.tensor([-15.0, -5.0, -25.0]))
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    return folder


def test_a_sigmoid_bundles_channels_are_labels_of_their_own_nested_ones_flattened(
    tmp_path, caplog
):
    image, counts = nested_spheres()
    bundle = load_monai_bundle(write_multi_label_bundle(tmp_path / "bundle", threshold=0.6))
    assert bundle.multi_label and bundle.threshold == 0.6
    assert bundle.label_names == {1: "Tumor core", 2: "Whole tumor", 3: "Enhancing tumor"}
    with caplog.at_level("WARNING"):
        result = segment({"MR": image}, "model", model=bundle, device="cpu")
        segment({"MR": image}, "model", model=bundle, device="cpu")
    labels = sitk.GetArrayFromImage(result.labels)
    # Channel 0 is a label, not the background; each voxel takes the smallest region's.
    assert int((labels == 3).sum()) == counts[3]  # enhancing
    assert int((labels == 1).sum()) == counts[2]  # core less enhancing
    assert int((labels == 2).sum()) == counts[1]  # whole less core
    assert result.label_names == bundle.label_names
    assert result.info["output"] == "multi-label sigmoid"
    probabilities = sitk.GetArrayFromImage(result.probabilities)
    assert probabilities.shape[-1] == 3
    assert probabilities[labels == 3].sum(axis=-1).min() > 2.9  # three independent ones
    assert caplog.text.count("smallest region") == 1
    assert "Enhancing tumor, Tumor core, Whole tumor" in caplog.text


def write_two_channel_bundle(folder):
    """A bundle taking T1c then FLAIR that labels where its first channel is brighter."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    config = {"network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 2,
                              "out_channels": 2, "kernel_size": 1}}
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    metadata = {"name": "two channels", "network_data_format": {
        "inputs": {"image": {"num_channels": 2, "channel_def": {"1": "FLAIR", "0": "T1c"}}},
        "outputs": {"pred": {"num_channels": 2, "channel_def": {"0": "background",
                                                                 "1": "brighter in T1c"}}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    network = torch.nn.Conv3d(2, 2, 1)
    with torch.no_grad():
        network.weight.zero_()
        network.bias.zero_()
        network.weight[1, 0], network.weight[1, 1] = 20.0, -20.0
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    return folder


def test_input_images_are_fed_in_the_bundles_channel_order_told_by_their_names(
    tmp_path, caplog
):
    nested, _ = nested_spheres()
    bright = sitk.Cast(sitk.Greater(nested, 1.5), sitk.sitkFloat32) * 2.0 + 1.0  # 3 in, 1 out
    flat = sitk.Cast(nested * 0.0 + 2.0, sitk.sitkFloat32)
    inside = sitk.GetArrayFromImage(bright) > 2
    bundle = load_monai_bundle(write_two_channel_bundle(tmp_path / "bundle"))
    assert bundle.input_names == ["T1c", "FLAIR"]

    def labels(images):
        result = segment(images, "model", model=bundle, device="cpu")
        return sitk.GetArrayFromImage(result.labels) == 1, result

    assert np.array_equal(labels({"T1c": bright, "FLAIR": flat})[0], inside)
    with caplog.at_level("INFO", logger="MultiModalAnalysisLib.segmentation.bundle"):
        reordered, result = labels({"flair": flat, "t1ce": bright})
    assert np.array_equal(reordered, inside)
    assert result.info["inputs"] == ["t1ce", "flair"]
    assert "fed as t1ce, flair" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        as_given, _ = labels({"first": flat, "second": bright})
    assert np.array_equal(as_given, ~inside)  # unknown names: the order given, warned about
    assert "in the order T1c, FLAIR" in caplog.text
    with pytest.raises(ModelError, match="order T1c, FLAIR.*given are T1c, PD: PD matches none"):
        labels({"T1c": bright, "PD": flat})


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_torchscript_only_bundle_and_one_with_its_own_code_are_built(tmp_path):
    import sys

    image, _ = oblique_ball()
    plain = segment({"CT": image}, "model", model=write_bundle(tmp_path / "plain"),
                    device="cpu")
    expected = sitk.GetArrayFromImage(plain.labels)

    only = edit_config(write_bundle(tmp_path / "torchscript"),
                       lambda config: config.pop("network_def"))
    network = torch.nn.Conv3d(1, 2, 7, padding=3)
    network.load_state_dict(torch.load(only / "models" / "model.pt"))
    torch.jit.script(network).save(str(only / "models" / "model.ts"))
    (only / "models" / "model.pt").unlink()
    result = segment({"CT": image}, "model", model=only, device="cpu")
    assert np.array_equal(sitk.GetArrayFromImage(result.labels), expected)

    # Two bundles with code of the same module names: each is built from its own.
    for name, out_channels in (("own_code", 2), ("other_code", 3)):
        folder = edit_config(write_bundle(tmp_path / name), lambda config: config.update(
            network_def={"_target_": "scripts.net.Net"}))
        (folder / "scripts").mkdir()
        (folder / "scripts" / "__init__.py").write_text("")
        (folder / "scripts" / "net.py").write_text(
            "import torch\n\n\nclass Net(torch.nn.Conv3d):\n    def __init__(self):\n"
            f"        super().__init__(1, {out_channels}, 7, padding=3)\n")
        if out_channels == 3:
            torch.save(torch.nn.Conv3d(1, 3, 7, padding=3).state_dict(),
                       folder / "models" / "model.pt")
        bundle = load_monai_bundle(folder)
        assert bundle.network.out_channels == out_channels
        assert str(folder) not in sys.path and "scripts.net" not in sys.modules
    result = segment({"CT": image}, "model", model=tmp_path / "own_code", device="cpu")
    assert np.array_equal(sitk.GetArrayFromImage(result.labels), expected)

    (only / "models" / "model.ts").unlink()
    with pytest.raises(ModelError, match="no 'network_def'.*no TorchScript models/model.ts"):
        load_monai_bundle(only)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_without_metadata_the_input_channels_are_those_of_the_network(tmp_path):
    folder = write_two_channel_bundle(tmp_path / "bundle")
    (folder / "configs" / "metadata.json").unlink()
    bundle = load_monai_bundle(folder)
    assert bundle.in_channels == 2
    nested, _ = nested_spheres()
    result = segment({"A": nested, "B": nested * 0.0 + 1.5}, "model", model=bundle,
                     device="cpu")
    assert sitk.GetArrayFromImage(result.labels).any()
    # A network without an in_channels of its own: its first convolution's, in TorchScript too.
    network = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 1), torch.nn.Conv3d(4, 2, 1))
    edit_config(folder, lambda config: config.pop("network_def"))
    (folder / "models" / "model.pt").unlink()
    torch.jit.script(network).save(str(folder / "models" / "model.ts"))
    assert load_monai_bundle(folder).in_channels == 2


def test_a_2d_bundle_is_refused_as_such(tmp_path):
    def two_d_window(config):
        config["inferer"]["roi_size"] = [16, 16]

    with pytest.raises(ModelError, match="2-D bundle .*roi_size has 2 numbers.*not supported"):
        load_monai_bundle(edit_config(write_bundle(tmp_path / "window"), two_d_window))

    def two_d_network(config):
        config["network_def"]["_target_"] = "torch.nn.Conv2d"
        config.pop("inferer")

    folder = edit_config(write_bundle(tmp_path / "network"), two_d_network)
    torch.save(torch.nn.Conv2d(1, 2, 7, padding=3).state_dict(), folder / "models" / "model.pt")
    with pytest.raises(ModelError, match="2-D bundle .*first layer is a Conv2d.*not supported"):
        load_monai_bundle(folder)


def test_the_bundles_own_sliding_window_settings_are_used(tmp_path, monkeypatch):
    image, _ = oblique_ball()
    calls = sliding_window_calls(monkeypatch)

    def inferer_says(config):
        config["inferer"].update(overlap=0.25, sw_batch_size=3, mode="constant")

    folder = edit_config(write_bundle(tmp_path / "bundle"), inferer_says)
    result = segment({"CT": image}, "model", model=folder, device="cpu", overlap=0.7)
    assert (calls[-1]["overlap"], calls[-1]["sw_batch_size"], calls[-1]["mode"]) == (
        0.25, 3, "constant")
    assert result.info["overlap"] == 0.25 and result.info["mode"] == "constant"
    silent = write_bundle(tmp_path / "silent")  # gives roi_size and sw_batch_size only
    segment({"CT": image}, "model", model=silent, device="cpu", overlap=0.7)
    assert (calls[-1]["overlap"], calls[-1]["sw_batch_size"]) == (0.7, 1)

    edit_config(folder, lambda config: config["inferer"].update(mode="blend"))
    with pytest.raises(ModelError, match="'inferer#mode' of .* should be 'constant' or "):
        load_monai_bundle(folder)
