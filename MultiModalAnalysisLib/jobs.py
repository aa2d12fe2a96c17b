"""Running long work without freezing a user interface: a worker thread polled by the caller.

A GUI (Slicer's module widget) cannot block on engine work: its event loop must keep
running. :class:`BackgroundJob` runs ``work(progress, cancel)`` in a thread and exposes its
progress, its result or error, and a cancel switch that the caller reads from a timer.
:class:`StepRunner` chains such jobs for steps whose inputs are read and whose outputs are
published on the caller's thread (MRML nodes must only be touched there): each step is a
factory that, when its turn comes, returns an object with ``compute(progress, cancel)`` (run
in the worker) and ``publish(result)`` (run by :meth:`StepRunner.poll`).

Plain ``threading`` is used, not Qt threads, so that this module is testable without Qt;
SimpleITK and torch release the GIL while they compute, so the interface stays responsive.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from MultiModalAnalysisLib.errors import OperationCancelled
from MultiModalAnalysisLib.progress import Progress, ProgressCallback, check_cancel


class BackgroundJob:
    """Runs ``work(progress, cancel)`` in a daemon thread.

    The ``progress`` callback given to ``work`` records the latest fraction and message and
    raises :class:`OperationCancelled` once :meth:`cancel` was called, so any step that
    reports progress stops at its next report even if it does not check ``cancel`` itself.
    """

    def __init__(
        self, work: Callable[[ProgressCallback, threading.Event], Any], name: str = "work"
    ) -> None:
        self.name = name
        self._work = work
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._fraction = 0.0
        self._message = ""
        self._result: Any = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mma-{name}", daemon=True)
        self.started_at: float | None = None
        self.finished_at: float | None = None

    def start(self) -> BackgroundJob:
        self.started_at = time.perf_counter()
        self._thread.start()
        return self

    def _report(self, fraction: float, message: str = "") -> None:
        with self._lock:
            self._fraction = min(max(float(fraction), 0.0), 1.0)
            if message:
                self._message = message
        check_cancel(self._cancel, self.name)

    def _run(self) -> None:
        try:
            self._result = self._work(self._report, self._cancel)
        except BaseException as error:  # handed to the caller's thread by result()
            self._error = error
        finally:
            self.finished_at = time.perf_counter()
            self._done.set()

    def cancel(self) -> None:
        """Ask the work to stop (it stops at its next progress report or cancel check)."""
        self._cancel.set()

    @property
    def cancel_event(self) -> threading.Event:
        return self._cancel

    @property
    def progress(self) -> tuple[float, str]:
        """The latest (fraction, message) the work reported."""
        with self._lock:
            return self._fraction, self._message

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self.done and isinstance(self._error, OperationCancelled)

    @property
    def error(self) -> BaseException | None:
        return self._error if self.done else None

    def wait(self, timeout: float | None = None) -> bool:
        """Block up to ``timeout`` seconds (releasing the GIL to the worker); True when done."""
        return self._done.wait(timeout)

    def result(self) -> Any:
        """The work's return value; re-raises its exception in the caller's thread."""
        if not self.done:
            raise RuntimeError(f"{self.name} is still running.")
        if self._error is not None:
            raise self._error
        return self._result


class Step(Protocol):
    """What a :class:`StepRunner` step factory returns (``nodes.NodeTask`` is one)."""

    name: str

    def compute(self, progress: Progress, cancel: threading.Event | None) -> Any: ...

    def publish(self, result: Any) -> Any: ...


@dataclass
class StepRunner:
    """Runs steps one after the other: engine work in a worker, publishing on the caller.

    Args:
        steps: ``(name, factory)`` pairs; a factory is called on the caller's thread when the
            step's turn comes (so it can read the nodes earlier steps published) and returns a
            :class:`Step`.
        on_published: called as ``on_published(name, published)`` after each step.

    The caller calls :meth:`poll` from its event loop (a timer) until it returns True, then
    reads :attr:`outputs` or :attr:`error`.
    """

    steps: Sequence[tuple[str, Callable[[], Step]]]
    on_published: Callable[[str, Any], None] | None = None
    outputs: dict[str, Any] = field(default_factory=dict, init=False)
    timings: dict[str, float] = field(default_factory=dict, init=False)
    error: BaseException | None = field(default=None, init=False)
    _index: int = field(default=0, init=False)
    _job: BackgroundJob | None = field(default=None, init=False)
    _task: Step | None = field(default=None, init=False)
    _cancelled: bool = field(default=False, init=False)

    @property
    def finished(self) -> bool:
        return self.error is not None or self._index >= len(self.steps)

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, OperationCancelled)

    @property
    def progress(self) -> tuple[float, str]:
        """Overall (fraction, message), each step counting equally."""
        total = max(len(self.steps), 1)
        if self.finished:
            return (1.0 if self.error is None else self._index / total), ""
        fraction, message = self._job.progress if self._job else (0.0, "")
        name = self.steps[self._index][0]
        return (self._index + fraction) / total, f"{name}: {message}" if message else name

    def cancel(self) -> None:
        """Stop the running step and skip the rest."""
        self._cancelled = True
        if self._job is not None:
            self._job.cancel()

    def poll(self, wait: float = 0.0) -> bool:
        """Advance: start the next step, or publish a finished one. True when all are done.

        Args:
            wait: seconds to wait for the running step (the worker runs meanwhile, even where
                the caller's event loop would otherwise hold the GIL).
        """
        if self.finished:
            return True
        try:
            if self._job is None:
                self._start_next()
            elif self._job.wait(wait):
                self._publish_current()
        except BaseException as error:  # reported to the caller through .error
            self.error = error
            self._job = None
        return self.finished

    def _start_next(self) -> None:
        name, factory = self.steps[self._index]
        if self._cancelled:
            raise OperationCancelled(f"{name} was cancelled by the user.")
        self._task = factory()
        task = self._task
        self._job = BackgroundJob(lambda progress, cancel: task.compute(progress, cancel), name)
        if self._cancelled:
            self._job.cancel()
        self._job.start()

    def _publish_current(self) -> None:
        job, task = self._job, self._task
        self._job = None
        value = job.result()  # raises the step's error here, on the caller's thread
        name = self.steps[self._index][0]
        published = task.publish(value)
        self.outputs[name] = published
        self.timings[name] = (job.finished_at or 0.0) - (job.started_at or 0.0)
        self._index += 1
        if self.on_published is not None:
            self.on_published(name, published)

    def run_to_end(self, poll_interval: float = 0.05) -> dict[str, Any]:
        """Poll until done (for scripts and tests); re-raises the first error."""
        while not self.poll(poll_interval):
            pass
        if self.error is not None:
            raise self.error
        return self.outputs
