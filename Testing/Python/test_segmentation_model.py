"""Deep segmentation: training on a manifest, the model file, inference with uncertainty."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from segmentation_phantoms import tumour_case, write_cohort

from MultiModalAnalysisLib.errors import (
    ConfigError,
    MissingModalityError,
    ModelError,
    OperationCancelled,
)
from MultiModalAnalysisLib.metrics import dice
from MultiModalAnalysisLib.segmentation import (
    SegmentationModel,
    load_segmentation_model,
    segment,
    train_segmentation,
)

MODALITIES = ["CT", "PET", "MR_T1"]
# Small, fast settings: the phantom is 80 x 80 x 48 mm.
QUICK = {"spacing": (2.0, 2.0, 3.0), "patch_size": (32, 32, 16), "iterations_per_epoch": 10,
         "learning_rate": 3e-3, "device": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny networks run fastest on one thread (and a busy machine does not stall them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def phantom():
    return tumour_case(np.random.default_rng(7))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom):
    """A model trained on one synthetic case (and the seconds it took)."""
    folder = tmp_path_factory.mktemp("cohort")
    manifest = write_cohort(folder, {"case1": phantom})
    start = time.perf_counter()
    result = train_segmentation(manifest, MODALITIES, "mask", folder / "model", epochs=6,
                                patience=None, **QUICK)
    return result, time.perf_counter() - start, folder


def test_training_overfits_one_synthetic_case_to_dice_above_0_9_within_a_minute(
    trained, phantom
):
    result, seconds, _ = trained
    images, mask = phantom
    assert seconds < 60
    assert result.best_validation_dice >= 0.9  # on the model grid, validated on itself
    labels = segment(images, "model", model=result.path, device="cpu").labels
    assert labels.GetSize() == images["CT"].GetSize()  # back on the first image's grid
    assert dice(labels, mask) >= 0.9


def test_model_file_round_trip_keeps_weights_and_metadata(trained, phantom, tmp_path):
    result, _, folder = trained
    loaded = load_segmentation_model(folder / "model")
    assert loaded.modalities == MODALITIES
    assert loaded.spacing == [2.0, 2.0, 3.0]
    assert loaded.patch_size == [32, 32, 16]
    assert loaded.label_names == {1: "tumour"}
    assert set(loaded.normalisations) == set(MODALITIES)
    training = loaded.metadata["training"]
    assert training["cases"] == ["case1"] and training["validation_dice"] >= 0.9
    assert {"torch", "monai", "SimpleITK"} <= set(loaded.metadata["versions"])
    readable = json.loads((folder / "model" / "metadata.json").read_text())
    assert readable["modalities"] == MODALITIES
    for name, value in result.model.network.state_dict().items():
        assert torch.equal(value.cpu(), loaded.network.state_dict()[name])

    # A single .pt file works as well as a folder.
    single = loaded.save(tmp_path / "copy.pt")
    images, _ = phantom
    a = segment(images, "model", model=single, device="cpu", tta=False)
    b = segment(images, "model", model=loaded, device="cpu", tta=False)
    np.testing.assert_allclose(sitk.GetArrayFromImage(a.probabilities),
                               sitk.GetArrayFromImage(b.probabilities), atol=1e-6)


def test_inputs_that_do_not_match_the_model_are_refused_clearly(trained, phantom, tmp_path):
    _, _, folder = trained
    images, _ = phantom
    with pytest.raises(MissingModalityError, match=r"needs CT, PET, MR_T1.*MR_T1 is missing"):
        segment({"CT": images["CT"], "PET": images["PET"]}, "model", model=folder / "model")
    # Any spelling of a modality is accepted, and the order of the mapping does not matter.
    reordered = {"mr-t1": images["MR_T1"], "ct": images["CT"], "pt": images["PET"]}
    result = segment(reordered, "model", model=folder / "model", device="cpu", tta=False)
    assert result.labels.GetSize() == images["MR_T1"].GetSize()
    # An MR given as the PET (and the PET as the MR) has values far above SUV: refused,
    # where the network would answer with confidence; so is a PET in Bq/ml.
    swapped = {"CT": images["CT"], "PET": images["MR_T1"], "MR_T1": images["PET"]}
    assert np.percentile(sitk.GetArrayViewFromImage(images["MR_T1"]), 99) > 100
    with pytest.raises(ModelError, match="PET: values .* far above SUV"):
        segment(swapped, "model", model=folder / "model", device="cpu")
    becquerel = {**images, "PET": sitk.Clamp(images["PET"], lowerBound=0.0) * 5000.0}
    with pytest.raises(ModelError, match="far above SUV"):
        segment(becquerel, "model", model=folder / "model", device="cpu")

    with pytest.raises(ModelError, match="no segmentation model"):
        load_segmentation_model(tmp_path / "nothing")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="is not a segmentation model file") as raised:
        load_segmentation_model(tmp_path / "junk.pt")
    assert "weights_only" not in str(raised.value)  # no advice to run a foreign file's code
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ModelError, match="is not a segmentation model file") as raised:
        load_segmentation_model(tmp_path / "random.pt")
    assert "weights_only" not in str(raised.value) and "\n" not in str(raised.value)
    payload = torch.load(folder / "model" / "model.pt", weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(ModelError, match="newer"):
        load_segmentation_model(tmp_path / "future.pt")
    payload["format_version"] = 1
    for key, value in (("modalities", None), ("patch_size", [32, 0, 16]),
                       ("label_names", {})):
        damaged = {**payload, "metadata": {**payload["metadata"], key: value}}
        if value is None:
            del damaged["metadata"][key]
        torch.save(damaged, tmp_path / "damaged.pt")
        with pytest.raises(ModelError, match=f"metadata .* is damaged: '{key}' should be"):
            load_segmentation_model(tmp_path / "damaged.pt")
    payload["metadata"]["network"]["kwargs"]["channels"] = [8, 16, 32, 64]
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(ModelError, match="do not fit"):
        load_segmentation_model(tmp_path / "mismatch.pt")


def test_tta_gives_probabilities_and_an_uncertainty_map_on_the_reference_grid(
    trained, phantom, tmp_path
):
    _, _, folder = trained
    images, mask = phantom
    result = segment(images, "model", model=folder / "model", device="cpu")
    probabilities = sitk.GetArrayFromImage(result.probabilities)
    assert probabilities.shape == (*mask.GetSize()[::-1], 2)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-4)
    uncertainty = sitk.GetArrayFromImage(result.uncertainty)
    assert uncertainty.shape == probabilities.shape[:-1]
    edge = sitk.GetArrayFromImage(sitk.BinaryContour(mask)) > 0
    far = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        mask, insideIsPositive=False, useImageSpacing=True, squaredDistance=False)) > 12
    assert uncertainty[edge].mean() > uncertainty[far].mean()  # unsure at the border only
    written = result.save(tmp_path / "seg.nii.gz", tmp_path / "p.nii.gz")
    assert written["uncertainty"].name == "p_uncertainty.nii.gz"
    mc = segment(images, "model", model=folder / "model", device="cpu", mc_samples=3)
    assert mc.uncertainty is not None and mc.info["mc_samples"] == 3


def test_a_mask_restricts_the_models_labels_and_classical_options_are_refused(
    trained, phantom
):
    _, _, folder = trained
    images, mask = phantom
    whole = sitk.GetArrayFromImage(
        segment(images, "model", model=folder / "model", device="cpu", tta=False).labels)
    # A box over one half of the tumour (in x): the labels stay inside it, and inside it
    # they are what the model finds without the box.
    box = sitk.Image(mask.GetSize(), sitk.sitkUInt8)
    box.CopyInformation(mask)
    found = np.argwhere(whole)
    middle = int(np.median(found[:, 2]))
    box[:middle, :, :] = 1
    result = segment(images, "model", model=folder / "model", device="cpu", tta=False,
                     mask=box)
    labels = sitk.GetArrayFromImage(result.labels)
    inside = sitk.GetArrayFromImage(box) != 0
    assert labels.any() and not labels[~inside].any()
    assert whole[~inside].sum() > 0.25 * whole.sum()  # the box did cut the tumour
    np.testing.assert_array_equal(labels[inside], whole[inside])
    background = sitk.GetArrayFromImage(result.probabilities)[..., 0]
    assert np.all(background[~inside] == 1.0)
    assert result.info["masked"]
    # the uncertainty map agrees: certain outside the region (it was highest there)
    flipped = segment(images, "model", model=folder / "model", device="cpu", mask=box)
    uncertainty = sitk.GetArrayFromImage(flipped.uncertainty)
    assert not uncertainty[~inside].any() and uncertainty[inside].any()
    with pytest.raises(ConfigError, match="does not take the option.*regularisation"):
        segment(images, "model", model=folder / "model", device="cpu", regularisation="icm")


def test_a_single_slice_input_is_refused_naming_it(trained, phantom):
    # a one-slice CT made the grid, and the MR was blamed (its N4 on that one slice)
    from MultiModalAnalysisLib.errors import ImageDimensionError

    _, _, folder = trained
    images, _ = phantom
    one_slice = dict(images, CT=images["CT"][:, :, 10:11])
    with pytest.raises(ImageDimensionError, match="CT is a single slice"):
        segment(one_slice, "model", model=folder / "model", device="cpu", tta=False)


def test_a_model_that_labels_nothing_says_so(trained, phantom, caplog):
    # (it wrote an empty label map without a word, where the threshold method warns)
    _, _, folder = trained
    images, mask = phantom
    away = sitk.Image(mask.GetSize(), sitk.sitkUInt8)
    away.CopyInformation(mask)
    away[:2, :2, :] = 1  # a corner of the field, far from the tumour
    with caplog.at_level("WARNING"):
        result = segment(images, "model", model=folder / "model", device="cpu", tta=False,
                         mask=away)
    assert not sitk.GetArrayFromImage(result.labels).any()
    assert "labels no voxel inside the mask: the label map is empty" in caplog.text


def test_training_is_reproducible_with_a_seed(tmp_path, phantom):
    manifest = write_cohort(tmp_path, {"case1": phantom})
    settings = {**QUICK, "iterations_per_epoch": 3, "epochs": 1, "validation_cases": []}
    a = train_segmentation(manifest, MODALITIES, "mask", None, seed=3, **settings)
    b = train_segmentation(manifest, MODALITIES, "mask", None, seed=3, **settings)
    c = train_segmentation(manifest, MODALITIES, "mask", None, seed=4, **settings)
    weights = [r.model.network.state_dict() for r in (a, b, c)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_training_with_worker_processes_is_reproducible_and_uses_them(tmp_path, phantom):
    # two cases, so that each pass over them hands a batch to each of two workers
    manifest = write_cohort(tmp_path, {"case1": phantom, "case2": phantom})
    settings = {**QUICK, "iterations_per_epoch": 3, "epochs": 1, "validation_cases": [],
                "seed": 3}
    runs = {n: train_segmentation(manifest, MODALITIES, "mask", None, workers=n, **settings)
            for n in (0, 1, 2)}
    again = train_segmentation(manifest, MODALITIES, "mask", None, workers=2, **settings)
    weights = {n: r.model.network.state_dict() for n, r in runs.items()}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(weights[2], again.model.network.state_dict())
    # one worker draws the random numbers the training process would have drawn ...
    assert same(weights[0], weights[1])
    # ... two draw their own: the option is not silently ignored
    assert not same(weights[0], weights[2])
    assert runs[2].model.metadata["training"]["workers"] == 2
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="workers must be a whole number"):
            train_segmentation(manifest, MODALITIES, "mask", None, workers=bad, **settings)


def test_training_keeps_the_best_epoch_stops_early_and_can_be_cancelled(tmp_path):
    rng = np.random.default_rng(3)
    cases = {f"case{i}": tumour_case(rng) for i in range(3)}
    manifest = write_cohort(tmp_path, cases)
    messages = []
    result = train_segmentation(
        manifest, MODALITIES, "mask", tmp_path / "model", epochs=4, patience=None,
        validation_cases=["case2"], progress=lambda f, m: messages.append(m),
        **{**QUICK, "iterations_per_epoch": 3},
    )
    dices = [h["validation_dice"] for h in result.history]
    assert len(dices) == 4
    assert result.best_validation_dice == pytest.approx(max(dices), abs=1e-5)
    assert result.best_epoch == 1 + int(np.argmax(dices))
    saved = load_segmentation_model(tmp_path / "model").metadata["training"]
    assert saved["epoch_kept"] == result.best_epoch and saved["validation_cases"] == ["case2"]
    assert any("validation Dice" in m for m in messages)

    # A learning rate of 0 never improves on the first epoch: stop after `patience` more.
    frozen = train_segmentation(
        manifest, MODALITIES, "mask", None, epochs=30, patience=2, validation_cases=["case2"],
        **{**QUICK, "iterations_per_epoch": 1, "learning_rate": 0.0},
    )
    assert len(frozen.history) == 3 and frozen.best_epoch == 1

    cancel = threading.Event()

    def cancel_after_first_epoch(fraction: float, message: str) -> None:
        if message.startswith("epoch 1/"):
            cancel.set()

    with pytest.raises(OperationCancelled):
        train_segmentation(manifest, MODALITIES, "mask", tmp_path / "cancelled", epochs=5,
                           validation_cases=["case2"], progress=cancel_after_first_epoch,
                           cancel=cancel, **{**QUICK, "iterations_per_epoch": 2})
    assert isinstance(load_segmentation_model(tmp_path / "cancelled"), SegmentationModel)


def test_training_that_runs_out_of_gpu_memory_restarts_on_the_cpu(tmp_path, phantom,
                                                                   monkeypatch, caplog):
    """Putting the network on the GPU runs out of memory (simulated, GPU or not: "cuda" is
    granted where there is none); the training must start again on the CPU and give the
    CPU result."""
    from MultiModalAnalysisLib import device as device_module
    from MultiModalAnalysisLib.segmentation import train as train_module

    real_resolve, real_build = device_module.resolve_device, train_module.build_network
    monkeypatch.setattr(device_module, "resolve_device", lambda d="auto": torch.device(
        "cuda") if str(d) == "cuda" else real_resolve(d))

    def build_network(*args, **kwargs):
        network = real_build(*args, **kwargs)
        to = network.to

        def to_device(device, *more, **options):
            if torch.device(device).type == "cuda":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
            return to(device, *more, **options)

        network.to = to_device
        return network

    monkeypatch.setattr(train_module, "build_network", build_network)
    manifest = write_cohort(tmp_path, {"case1": phantom})
    settings = {**QUICK, "iterations_per_epoch": 2, "epochs": 1, "validation_cases": []}
    settings.pop("device")
    with caplog.at_level("WARNING"):
        fallback = train_segmentation(manifest, MODALITIES, "mask", None, seed=3,
                                      device="cuda", **settings)
    assert "retrying on the CPU" in caplog.text
    assert fallback.model.metadata["training"]["device"] == "cpu"
    cpu = train_segmentation(manifest, MODALITIES, "mask", None, seed=3, device="cpu",
                             **settings)
    weights = [r.model.network.state_dict() for r in (fallback, cpu)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


class _SometimesNaN:
    """DiceCELoss whose value is NaN on the steps ``nan_steps`` says (counted from 0)."""

    def __init__(self, loss_class, nan_steps):
        self.loss = loss_class(to_onehot_y=True, softmax=True)
        self.nan_steps, self.calls = nan_steps, 0

    def __call__(self, output, target):
        value = self.loss(output, target)
        nan = self.nan_steps(self.calls)
        self.calls += 1
        return value * float("nan") if nan else value


def test_training_leaves_out_steps_whose_loss_is_not_finite(tmp_path, phantom, monkeypatch):
    """A step on a NaN loss would make every weight NaN (what float16 overflow did on a GPU);
    such steps are skipped and counted, and a training that keeps diverging stops clearly."""
    import monai.losses

    from MultiModalAnalysisLib.errors import TrainingError
    from MultiModalAnalysisLib.segmentation import train as train_module

    manifest = write_cohort(tmp_path, {"case1": phantom})
    settings = {**QUICK, "iterations_per_epoch": 6, "epochs": 1, "validation_cases": []}
    real = monai.losses.DiceCELoss
    monkeypatch.setattr(monai.losses, "DiceCELoss",
                        lambda **kw: _SometimesNaN(real, lambda step: step % 3 == 1))
    result = train_segmentation(manifest, MODALITIES, "mask", None, **settings)
    training = result.model.metadata["training"]
    assert training["skipped_steps"] == 2 and training["precision"] == "float32"
    assert all(torch.isfinite(w).all() for w in result.model.network.state_dict().values())
    assert np.isfinite(result.history[0]["loss"])

    monkeypatch.setattr(train_module, "MAX_SKIPPED_STEPS", 3)
    monkeypatch.setattr(monai.losses, "DiceCELoss",
                        lambda **kw: _SometimesNaN(real, lambda step: True))
    with pytest.raises(TrainingError, match="not finite in 4 steps"):
        train_segmentation(manifest, MODALITIES, "mask", None, **settings)


def test_a_reduced_precision_pass_that_overflows_is_run_again_in_float32(monkeypatch, caplog):
    """On a GPU, networks run in bfloat16 (float16 where there is no bfloat16); a pass whose
    output is not finite is recomputed in float32 rather than returned as NaN. Here the CPU
    stands in for the GPU, with autocast to bfloat16, and a layer overflows in it."""
    from MultiModalAnalysisLib.device import autocast_dtype
    from MultiModalAnalysisLib.segmentation import inference

    class OverflowsInBfloat16(torch.nn.Module):
        def forward(self, x):
            return x * float("inf") if x.dtype == torch.bfloat16 else x

    network = torch.nn.Sequential(torch.nn.Conv3d(2, 2, 1), OverflowsInBfloat16())
    channels = np.random.default_rng(0).normal(size=(2, 8, 16, 16)).astype(np.float32)
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None  # the CPU itself stays in float32
    expected, _ = inference.predict_probabilities(network, channels, (8, 16, 16), cpu)
    monkeypatch.setattr(inference, "autocast_dtype", lambda device: torch.bfloat16)
    with caplog.at_level("WARNING"):
        found, _ = inference.predict_probabilities(network, channels, (8, 16, 16), cpu,
                                                   flips=((), (4,)))
    assert "run again in float32" in caplog.text
    assert np.isfinite(found).all()
    np.testing.assert_allclose(found, expected, atol=1e-6)


def test_a_model_leaves_unlabelled_where_an_input_has_no_data(trained, phantom, caplog):
    # A PET that covers only part of the CT's grid: the network sees padding beyond it, and
    # the labels there would be a guess from two of three inputs.
    _, _, folder = trained
    images, _ = phantom
    whole = sitk.GetArrayFromImage(
        segment(images, "model", model=folder / "model", device="cpu", tta=False).labels)
    middle = int(np.median(np.argwhere(whole)[:, 2]))
    cut = dict(images, PET=images["PET"][middle:, :, :])  # x from the tumour's middle on
    with caplog.at_level("WARNING"):
        result = segment(cut, "model", model=folder / "model", device="cpu", tta=False)
    labels = sitk.GetArrayFromImage(result.labels)
    assert whole[:, :, :middle].any(), "the cut must go through the tumour"
    assert not labels[:, :, :middle].any()
    assert labels[:, :, middle:].any()
    assert "outside the field of view of PET" in caplog.text


def test_the_users_clean_up_settings_override_the_models_one_by_one(trained, phantom):
    _, _, folder = trained
    images, _ = phantom
    stored = load_segmentation_model(folder / "model").postprocess
    assert stored == {"keep_largest": True, "fill_holes": True}
    result = segment(images, "model", model=folder / "model", device="cpu", tta=False,
                     min_volume_mm3=5.0)
    assert result.info["cleanup"] == {**stored, "min_volume_mm3": 5.0}
    result = segment(images, "model", model=folder / "model", device="cpu", tta=False,
                     keep_largest=False)
    assert result.info["cleanup"] == {"keep_largest": False, "fill_holes": True}
    for options, name in (({"keep_largest": "no"}, "keep_largest"),
                          ({"overlap": 1.5}, "overlap"), ({"mc_samples": -3}, "mc_samples"),
                          ({"min_volume_mm3": float("nan")}, "min_volume_mm3")):
        with pytest.raises(ConfigError, match=name):
            segment(images, "model", model=folder / "model", device="cpu", **options)


def test_an_input_named_by_its_family_stands_for_the_models_modality(trained, phantom, caplog):
    # mr.nii.gz is named MR; the model takes MR_T1, its only MR input.
    _, _, folder = trained
    images, _ = phantom
    named = {"CT": images["CT"], "PET": images["PET"], "MR": images["MR_T1"]}
    with caplog.at_level("WARNING"):
        result = segment(named, "model", model=folder / "model", device="cpu", tta=False)
    plain = segment(images, "model", model=folder / "model", device="cpu", tta=False)
    assert "the input MR is taken as its MR_T1" in caplog.text
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labels),
                                  sitk.GetArrayFromImage(plain.labels))
    # a name that says another sequence is not taken for the T1 (it was, with a warning)
    for other in ("FLAIR", "MR_T2", "T1c"):
        named = {"CT": images["CT"], "PET": images["PET"], other: images["MR_T1"]}
        with pytest.raises(MissingModalityError, match="another sequence than the model"):
            segment(named, "model", model=folder / "model", device="cpu", tta=False)


def test_a_model_trained_with_another_preset_is_warned_about(trained, phantom, caplog):
    from MultiModalAnalysisLib.preprocess import preset_for
    from MultiModalAnalysisLib.segmentation.model_file import load_segmentation_model

    _, _, folder = trained
    images, _ = phantom
    model = load_segmentation_model(folder / "model")
    assert model.metadata["presets"]["MR_T1"] == preset_for("MR_T1").describe()
    with caplog.at_level("WARNING"):
        segment(images, "model", model=model, device="cpu", tta=False)
    assert "preprocessed as" not in caplog.text
    model.metadata["presets"]["MR_T1"] = "N4 bias-field correction, z-score in the body"
    with caplog.at_level("WARNING"):
        segment(images, "model", model=model, device="cpu", tta=False)
    assert ("MR_T1: this model was trained on images preprocessed as 'N4 bias-field "
            "correction, z-score in the body'") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # the caller preprocessed them: nothing to compare
        segment(images, "model", model=model, device="cpu", tta=False, presets_applied=True)
    assert "preprocessed as" not in caplog.text


def test_label_values_become_consecutive_model_labels(tmp_path, phantom):
    # A label map holding 2 and 5 (no 1, 3, 4): two labels, not five with three that never
    # occur (whose Dice would score 1 and inflate the validation Dice).
    images, mask = phantom
    array = sitk.GetArrayFromImage(mask)
    split = np.where(array == 0, 0, 2).astype(np.uint8)
    right = split[:, :, array.shape[2] // 2:]  # a view: the tumour's right half becomes 5
    right[right != 0] = 5
    labels = sitk.GetImageFromArray(split)
    labels.CopyInformation(mask)
    manifest = write_cohort(tmp_path, {"case1": (images, labels)})
    result = train_segmentation(manifest, MODALITIES, "mask", tmp_path / "model", epochs=1,
                                patience=None, **dict(QUICK, iterations_per_epoch=1))
    model = load_segmentation_model(result.path)
    assert model.label_names == {1: "label 2", 2: "label 5"}
    assert model.metadata["label_values_in_training"] == {"2": 1, "5": 2}
    # ... and its label maps hold 2 and 5 again, as the user's own maps do (it wrote 1, 2)
    from MultiModalAnalysisLib.segmentation.inference import _as_training_values

    learnt = sitk.GetImageFromArray(np.array([[[0, 1, 2, 1]]], np.uint8))
    written, names, _, values = _as_training_values(learnt, model)
    assert sitk.GetArrayFromImage(written).ravel().tolist() == [0, 2, 5, 2]
    assert names == {2: "label 2", 5: "label 5"} and values == {0: 0, 1: 2, 2: 5}
    result = segment(images, "model", model=model, device="cpu", tta=False)
    assert set(np.unique(sitk.GetArrayFromImage(result.labels))) <= {0, 2, 5}
    assert result.label_names == {2: "label 2", 5: "label 5"}
    assert result.info["label_values"] == {0: 0, 1: 2, 2: 5}
    with pytest.raises(ConfigError, match="more than once"):
        train_segmentation(manifest, ["CT", "ct"], "mask", tmp_path / "twice", epochs=1,
                           **QUICK)


def test_the_training_cache_prepares_a_case_anew_when_a_preset_changes(tmp_path, phantom,
                                                                         monkeypatch):
    # (the key left the presets out: an MR preset changed, and the cache kept serving
    # the MR prepared with the old one)
    from MultiModalAnalysisLib.preprocess import presets
    from MultiModalAnalysisLib.segmentation.model_inputs import default_normalisation
    from MultiModalAnalysisLib.segmentation.training_data import as_manifest, load_training_case

    manifest = as_manifest(write_cohort(tmp_path, {"case1": phantom}))
    arguments = (manifest, "case1", MODALITIES, "mask", [4.0, 4.0, 6.0],
                 {m: default_normalisation(m) for m in MODALITIES}, [1])
    load_training_case(*arguments, cache_dir=tmp_path / "cache")
    load_training_case(*arguments, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the same settings: reused
    monkeypatch.setattr(presets.ModalityPreset, "describe", lambda self: "another preset")
    load_training_case(*arguments, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2  # prepared anew


def test_validation_dice_scores_only_the_labels_present():
    from MultiModalAnalysisLib.segmentation.train import _dice_per_label

    truth = np.zeros((4, 4, 4), np.uint8)
    truth[:2] = 1
    predicted = truth.copy()
    predicted[0] = 0  # label 1: Dice 2*16/(16+32) = 2/3
    assert _dice_per_label(predicted, truth, 3) == pytest.approx(2 / 3)  # labels 2, 3 absent
    predicted[3] = 2  # a label absent from the truth: Dice 0 for it
    assert _dice_per_label(predicted, truth, 3) == pytest.approx(1 / 3)
    assert _dice_per_label(np.zeros_like(truth), np.zeros_like(truth), 2) == 1.0
