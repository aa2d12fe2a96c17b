"""Progress reporting and cancellation shared by every long step.

A long step takes ``progress: Callable[[float, str], None] | None`` (fraction in [0, 1] and
a short message) and ``cancel: threading.Event | None``, reports through
:class:`Progress` and calls :func:`check_cancel` between iterations.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from MultiModalAnalysisLib.errors import OperationCancelled

ProgressCallback = Callable[[float, str], None]


def check_cancel(cancel: threading.Event | None, what: str = "the operation") -> None:
    """Raise :class:`OperationCancelled` if ``cancel`` is set.

    Args:
        cancel: the event a user sets to stop the work (``None``: never cancelled).
        what: names the step in the message.
    """
    if cancel is not None and cancel.is_set():
        raise OperationCancelled(f"{what} was cancelled by the user.")


class Progress:
    """Maps a sub-step's own 0..1 progress onto a slice [start, end] of a parent callback.

    Calling it never raises from a missing callback, and fractions are clipped to [0, 1],
    so a step can report unconditionally.
    """

    def __init__(
        self, callback: ProgressCallback | None = None, start: float = 0.0, end: float = 1.0
    ) -> None:
        if isinstance(callback, Progress):
            start, end = callback._map(start), callback._map(end)
            callback = callback.callback
        self.callback = callback
        self.start = float(start)
        self.end = float(end)

    def _map(self, fraction: float) -> float:
        fraction = min(max(float(fraction), 0.0), 1.0)
        return self.start + (self.end - self.start) * fraction

    def __call__(self, fraction: float, message: str = "") -> None:
        if self.callback is not None:
            self.callback(self._map(fraction), message)

    def sub(self, start: float, end: float) -> Progress:
        """A child reporter covering ``[start, end]`` of this one's range."""
        return Progress(self, start, end)


def as_progress(progress: ProgressCallback | Progress | None) -> Progress:
    """Wrap any callback (or ``None``) as a :class:`Progress`."""
    return progress if isinstance(progress, Progress) else Progress(progress)
