"""Device policy (auto, explicit, CUDA out-of-memory fallback) and progress reporting."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from MultiModalAnalysisLib.device import resolve_device, run_with_device_fallback
from MultiModalAnalysisLib.errors import ConfigError, OperationCancelled
from MultiModalAnalysisLib.progress import Progress, check_cancel


def test_auto_picks_cuda_only_when_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("CPU").type == "cpu"


def test_unknown_or_unavailable_device_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is available"):
            resolve_device("cuda")


def test_cuda_out_of_memory_is_retried_on_the_cpu_with_a_warning(caplog):
    seen = []

    def step(device: torch.device) -> str:
        seen.append(device.type)
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 40 GiB")
        return "done on " + device.type

    with caplog.at_level(logging.WARNING):
        result = run_with_device_fallback(step, torch.device("cuda"), what="deformable step")

    assert result == "done on cpu"
    assert seen == ["cuda", "cpu"]
    assert "deformable step ran out of GPU memory" in caplog.text


def test_other_errors_are_not_swallowed_by_the_fallback():
    def step(device: torch.device) -> None:
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        run_with_device_fallback(step, torch.device("cuda"))


def test_progress_sub_ranges_map_onto_the_parent():
    seen = []
    parent = Progress(lambda f, m: seen.append((round(f, 3), m)))
    child = parent.sub(0.5, 1.0).sub(0.0, 0.5)
    child(0.0, "a")
    child(1.0, "b")
    child(2.0, "clipped")
    assert seen == [(0.5, "a"), (0.75, "b"), (0.75, "clipped")]
    Progress(None)(0.3, "no callback is fine")


def test_check_cancel_raises_only_once_set():
    event = threading.Event()
    check_cancel(event, "training")
    check_cancel(None, "training")
    event.set()
    with pytest.raises(OperationCancelled, match="training was cancelled"):
        check_cancel(event, "training")


def test_ctrl_c_inside_an_itk_filter_stops_it_as_an_interrupt_not_an_error():
    # Ctrl-C reaches Python in the filter's progress callback; SimpleITK wraps an exception
    # raised there in a RuntimeError, which the CLI would print as a crash (exit 1) instead
    # of "interrupted" (exit 130).
    import numpy as np
    import SimpleITK as sitk

    from MultiModalAnalysisLib.filters import execute_filter

    image = sitk.GetImageFromArray(np.random.default_rng(0).random((24, 24, 24)).astype(
        np.float32))
    smoothing = sitk.CurvatureFlowImageFilter()
    smoothing.SetNumberOfIterations(20)

    def interrupt(fraction, message):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute_filter(smoothing, image, what="smoothing", progress=interrupt)
