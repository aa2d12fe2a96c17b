"""Torch device policy, in one place.

``device="auto"`` picks CUDA when a GPU is usable, else the CPU. A CUDA out-of-memory error
during a step is retried on the CPU with a logged warning, never a crash.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, TypeVar

from MultiModalAnalysisLib.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
T = TypeVar("T")
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` (or a ``torch.device``) into a device.

    Raises:
        ConfigError: an unknown name, or CUDA asked for explicitly where there is none.
    """
    import torch

    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device '{device}' was requested but no CUDA GPU is available to PyTorch "
                f"(torch {torch.__version__}). Use device 'auto' or 'cpu' (--device auto)."
            )
        return torch.device(name)
    raise ConfigError(f"unknown device '{device}': use one of {', '.join(DEVICE_CHOICES)}.")


def describe_device(device: str | torch.device = "auto") -> str:
    """A human-readable name for the device ``device`` resolves to (for logs and the UI)."""
    import torch

    resolved = resolve_device(device)
    if resolved.type == "cuda":
        index = resolved.index if resolved.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"CUDA GPU {index}: {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return "CPU"


def is_cuda_oom(error: BaseException) -> bool:
    """True for a CUDA out-of-memory error, whichever way torch raised it."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "CUDA out of memory" in str(error)


def run_with_device_fallback(
    step: Callable[[torch.device], T], device: str | torch.device = "auto", what: str = "step"
) -> T:
    """Run ``step(device)``; on CUDA out-of-memory, warn and run ``step(cpu)`` instead.

    Args:
        step: the work, given the device to run on; it must not keep state across calls.
        device: the requested device (see :func:`resolve_device`).
        what: names the step in the warning.
    """
    import torch

    resolved = resolve_device(device)
    try:
        return step(resolved)
    except Exception as error:
        if resolved.type != "cuda" or not is_cuda_oom(error):
            raise
        log.warning("%s ran out of GPU memory on %s; retrying on the CPU.", what, resolved)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return step(torch.device("cpu"))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision that networks run in on ``device``: bfloat16 on a CUDA GPU
    that supports it, else float16 on CUDA, and None (full float32) on the CPU.

    bfloat16 keeps float32's exponent range. float16 tops out at 65504: in the first GPU
    training of the sarcoma model, activations outgrew it on three folds of five, every
    later step was skipped and the kept network answered NaN.
    """
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``, or no autocast where it is None."""
    import torch

    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def worker_threads(limit: int = 4) -> int:
    """Threads for work split between Python threads: one per core, up to ``limit``
    (numpy, scipy, torch and SimpleITK release the interpreter lock in their compiled
    loops, so two cores roughly halve the time of such work)."""
    return max(1, min(os.cpu_count() or 1, limit))


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """Run torch's CPU work on at most ``count`` intra-op threads, restoring the setting
    afterwards (a process-wide setting: other threads of the process see it too).

    For work on tensors of up to a few hundred thousand elements, torch's intra-op threads
    gain little wall time and their spinning costs CPU time: see the callers for what was
    measured.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(count, previous)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
