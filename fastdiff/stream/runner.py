"""Run a stream on a worker thread behind a bounded input queue, delivering results in input order.

The stream protocol the runner relies on (``fastdiff.Stream`` implements it):

    out = stream(frame, tag=t)    # frame_buffer F == 1: an output, or None while the pipeline fills
    outs = stream(frames, tag=t)  # F > 1: a list of F inputs -> a list of F outputs, or None
    stream(frame(s), tag=t, control_image=c)   # with frames put with their control images (ControlNet)
    stream.last_tag               # the tag of the call whose output(s) the last call returned
    stream.last_skipped           # the last call was skipped: it returned its own input's output
    stream.flush_tagged()         # [(tag, output(s))] of the calls still in flight, oldest first
    stream.frame_buffer           # F

Pairing: each call's tag is its group of (index, time queued) entries, and the stream hands a
group's tag back with its output, so the runner never counts the stream's lag itself. Results
wait in a reorder buffer keyed by index until every earlier index has been delivered.

The stream must have an empty pipeline (freshly prepared or flushed) when handed to the runner,
and only the worker thread may call it while the runner is open.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from typing import Any, Iterator

from ..checks import check_choice, check_int, check_number
from .stats import LatencyWindow

__all__ = ["FrameResult", "RunnerStats", "StreamError", "StreamRunner"]

WHEN_FULL = ("block", "drop_oldest")
LATENCY_WINDOW = 1024  # latency percentiles are over the most recent results, so they track drift


@dataclasses.dataclass(frozen=True)
class FrameResult:
    index: int  # the input's index, as returned by put()
    image: Any  # the stream's output for it; None when dropped
    skipped: bool  # the similarity filter skipped it: image is the previous output
    dropped: bool  # discarded unprocessed from a full queue (when_full="drop_oldest")
    latency_s: float  # put() called -> result ready (for a dropped frame: -> dropped)


@dataclasses.dataclass(frozen=True)
class RunnerStats:
    processed: int  # results ready that went through the pipeline
    skipped: int  # results ready that the stream skipped
    dropped: int  # inputs dropped from a full queue
    frames_per_s: float  # (processed + skipped) / (latest result ready − first put)
    latency_p50_s: float  # over the last LATENCY_WINDOW results, dropped excluded; nan if none
    latency_p95_s: float


class StreamError(RuntimeError):
    """The stream raised in the worker thread; the original exception is the ``__cause__``."""


class StreamRunner:
    """Feed `stream` from a queue on a worker thread; get results back in input order.

    `when_full` says what `put` does when `max_queue` frames wait unprocessed: "block" waits for
    room, "drop_oldest" drops the oldest waiting frame and delivers a ``dropped=True`` result for it.

    With frame_buffer F > 1 the worker hands F queued frames to each stream call. At close a partial
    last group is padded by repeating its last frame; the outputs of the padding are discarded.

    Use as a context manager, or call :meth:`close`: it processes what is queued, drains the frames
    in flight with ``stream.flush()``, and ends the worker. Iterating yields results until the
    runner is closed and every result has been delivered.
    """

    def __init__(self, stream, max_queue: int = 8, when_full: str = "block"):
        frame_buffer = check_int(stream.frame_buffer, "stream.frame_buffer", 1)
        check_int(max_queue, "max_queue", 1)
        if max_queue < frame_buffer:
            raise ValueError(f"max_queue ({max_queue}) must hold a whole group of frame_buffer={frame_buffer} frames")
        self.stream = stream
        self.max_queue = max_queue
        self.when_full = check_choice(when_full, "when_full", WHEN_FULL)
        self._frame_buffer = frame_buffer

        # Everything below is guarded by _changed's lock; every change notifies all waiters.
        self._changed = threading.Condition()
        self._waiting: collections.deque = collections.deque()  # (index, (frame, control), t_put), not yet taken
        self._ready: dict[int, FrameResult] = {}  # reorder buffer
        self._next_index = 0  # index the next put() gets
        self._next_out = 0  # index the next get() delivers
        self._closing = False
        self._error: BaseException | None = None
        self._error_reported = False
        self._counts = {"processed": 0, "skipped": 0, "dropped": 0}
        self._latencies = LatencyWindow(LATENCY_WINDOW)
        self._t_first_put: float | None = None
        self._t_last_ready: float | None = None

        self._worker = threading.Thread(target=self._work, name="fastdiff-stream-runner", daemon=True)
        self._worker.start()

    # --- caller side -------------------------------------------------------------------------

    def put(self, frame, timeout: float | None = None, control_image=None) -> int:
        """Queue `frame`; return its index. Raises queue.Full if "block" waited `timeout` s in vain.
        A ControlNet stream's frame may come with its `control_image` (else the stream's standing
        one); with frame_buffer F > 1, a group's frames all come with one or none do."""
        check_number(timeout, "timeout", 0.0, optional=True)
        t_put = time.perf_counter()
        with self._changed:
            self._raise_if_failed()
            if self._closing:
                raise RuntimeError("put() after close()")
            if self.when_full == "block":
                has_room = self._changed.wait_for(
                    lambda: len(self._waiting) < self.max_queue or self._closing or self._error is not None,
                    timeout,
                )
                self._raise_if_failed()
                if self._closing:
                    raise RuntimeError("put() after close()")
                if not has_room:
                    raise queue.Full(f"put() waited {timeout} s for room in a queue of {self.max_queue}")
            else:
                while len(self._waiting) >= self.max_queue:
                    index, _, t_old = self._waiting.popleft()
                    self._store([FrameResult(index, None, False, True, t_put - t_old)], "dropped", t_put)
            index = self._next_index
            self._next_index += 1
            if self._t_first_put is None:
                self._t_first_put = t_put
            self._waiting.append((index, (frame, control_image), t_put))
            self._changed.notify_all()
            return index

    def get(self, timeout: float | None = None) -> FrameResult:
        """The next result in input order. Raises queue.Empty on timeout, EOFError once closed and drained,
        StreamError once the stream failed and the results finished before that are delivered."""
        check_number(timeout, "timeout", 0.0, optional=True)
        with self._changed:
            ready = self._changed.wait_for(
                lambda: self._next_out in self._ready or self._finished() or self._error is not None, timeout
            )
            if self._next_out in self._ready:
                self._next_out += 1
                return self._ready.pop(self._next_out - 1)
            self._raise_if_failed()
            if ready:
                raise EOFError("the runner is closed and every result has been delivered")
            raise queue.Empty(f"no result within {timeout} s")

    def __iter__(self) -> Iterator[FrameResult]:
        while True:
            try:
                yield self.get()
            except EOFError:
                return

    def close(self) -> None:
        """Process what is queued, flush the pipeline, end the worker. Idempotent.

        Raises StreamError if the stream failed and no earlier call has reported it.
        """
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._worker.join()
        with self._changed:
            self._raise_if_failed(only_once=True)

    def __enter__(self) -> "StreamRunner":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already unwinding: don't mask that exception with the stream's
            self.close()
        except StreamError:
            pass

    def stats(self) -> RunnerStats:
        with self._changed:
            counts = dict(self._counts)
            p50, p95 = self._latencies.percentiles()
            t0, t1 = self._t_first_put, self._t_last_ready
        delivered = counts["processed"] + counts["skipped"]
        fps = delivered / (t1 - t0) if delivered and t1 > t0 else 0.0
        return RunnerStats(**counts, frames_per_s=fps, latency_p50_s=p50, latency_p95_s=p95)

    def _finished(self) -> bool:
        # Once closed no index is added, so having delivered them all means nothing more will come.
        return self._closing and self._next_out == self._next_index

    def _raise_if_failed(self, only_once: bool = False) -> None:
        if self._error is None or (only_once and self._error_reported):
            return
        self._error_reported = True
        lost = f"; inputs {self._next_out} to {self._next_index - 1} get no result" \
            if self._next_out < self._next_index else ""
        raise StreamError(f"the stream raised in the runner's worker: {self._error!r}{lost}") from self._error

    # --- worker side ---------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while (group := self._take_group()) is not None:
                self._run_group(group)
            self._flush()
        except BaseException as error:  # noqa: BLE001 - handed to the caller, who decides
            self._recover_in_flight()
            with self._changed:
                self._error = error
        finally:
            with self._changed:
                self._changed.notify_all()  # wake get() and put() waiting on the error

    def _recover_in_flight(self) -> None:
        """After a failed call, deliver the frames already in the stream's pipeline if it can still
        finish them (a refused frame leaves it as it was): the inputs before the failure aren't lost."""
        try:
            self._flush()
        except Exception:  # noqa: BLE001 - the stream is broken too: the first error is the one reported
            pass

    def _flush(self) -> None:
        """Deliver the frames in the stream's pipeline (``flush_tagged``)."""
        for entries, outs in self.stream.flush_tagged():
            self._deliver(entries, [outs] if self._frame_buffer == 1 else outs, skipped=False)

    def _take_group(self) -> list | None:
        """Wait for F queued frames (fewer only when closing); None when closing with nothing left."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._waiting) >= self._frame_buffer or self._closing)
            if not self._waiting:
                return None
            group = [self._waiting.popleft() for _ in range(min(self._frame_buffer, len(self._waiting)))]
            self._changed.notify_all()  # room for blocked put()s
            return group

    def _run_group(self, group: list) -> None:
        """One stream call for a group of queued frames; its tag is their (index, time queued)
        entries (None marks padding)."""
        frames = [frame for _, (frame, _), _ in group]
        controls = [control for _, (_, control), _ in group]
        entries: list = [(index, t_put) for index, _, t_put in group]
        padding = self._frame_buffer - len(group)
        frames += frames[-1:] * padding
        controls += controls[-1:] * padding
        entries += [None] * padding
        given = [c is not None for c in controls]
        if any(given) and not all(given):
            raise ValueError("control_image: a group of frame_buffer frames come all with a control image or all "
                             "without (the stream's standing one)")
        extra = {} if not any(given) else {"control_image": _per_call(controls, self._frame_buffer)}
        if self._frame_buffer == 1:
            out = self.stream(frames[0], tag=entries, **extra)
            outs = None if out is None else [out]
        else:
            outs = self.stream(frames, tag=entries, **extra)
        if outs is not None:
            self._deliver(self.stream.last_tag, outs, skipped=self.stream.last_skipped)

    def _deliver(self, entries: list, images: list, skipped: bool) -> None:
        if images is None or len(images) != len(entries):
            got = None if images is None else len(images)
            raise RuntimeError(f"stream protocol: expected {len(entries)} outputs, got {got}")
        now = time.perf_counter()
        results = [
            FrameResult(entry[0], image, skipped, False, now - entry[1])
            for entry, image in zip(entries, images)
            if entry is not None  # padding
        ]
        with self._changed:
            self._store(results, "skipped" if skipped else "processed", now)
            self._changed.notify_all()

    def _store(self, results: list, kind: str, now: float) -> None:
        """Put results in the reorder buffer and count them (caller holds the lock)."""
        for result in results:
            self._ready[result.index] = result
        self._counts[kind] += len(results)
        if kind != "dropped" and results:
            self._latencies.extend(result.latency_s for result in results)
            self._t_last_ready = now


def _per_call(controls: list, frame_buffer: int):
    """A call's control image from its frames' own: the one frame's, or with F > 1 the frames'
    images in order — per ControlNet when each frame holds a list of one per net."""
    if frame_buffer == 1:
        return controls[0]
    if isinstance(controls[0], (list, tuple)):
        return [list(per_net) for per_net in zip(*controls)]
    return list(controls)
