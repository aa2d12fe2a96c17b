"""Running SimpleITK filters with the project's progress and cancel conventions."""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Callable

import SimpleITK as sitk

from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel


def execute_filter(
    filter_: sitk.ProcessObject,
    *inputs: sitk.Image,
    what: str,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    event: int = sitk.sitkProgressEvent,
    fraction: Callable[[], float] | None = None,
):
    """``filter_.Execute(*inputs)``, reporting progress and stopping when ``cancel`` is set.

    Many ITK filters ignore ``Abort()``; an exception raised from a command does stop them,
    so the callback raises ``OperationCancelled`` and this function re-raises it cleanly
    (SimpleITK would otherwise print the callback's traceback).

    Args:
        filter_: a configured SimpleITK filter.
        inputs: its inputs.
        what: names the step in progress messages and the cancel message.
        progress: ``progress(fraction, message)`` callback.
        cancel: stops the filter when set.
        event: the event to listen to (progress events by default; iteration events for
            iterative filters such as N4).
        fraction: how far the filter is, read in the callback (``filter_.GetProgress`` by
            default).
    """
    report = as_progress(progress)
    read_fraction = fraction or filter_.GetProgress

    def on_event() -> None:
        report(read_fraction(), what)
        check_cancel(cancel, what)

    filter_.AddCommand(event, on_event)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            result = filter_.Execute(*inputs)
    except RuntimeError:
        # Ctrl-C reaches Python inside the command (wherever it runs, even on its first
        # line); SimpleITK prints that traceback, here captured, and raises a RuntimeError.
        if "KeyboardInterrupt" in captured.getvalue().split():
            raise KeyboardInterrupt from None
        check_cancel(cancel, what)
        raise
    finally:
        filter_.RemoveAllCommands()
    report(1.0, what)
    return result
