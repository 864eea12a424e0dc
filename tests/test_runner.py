import collections
import math
import queue
import threading
import time

import pytest

from fastdiff.stream.runner import FrameResult, StreamError, StreamRunner


def f(x):
    """What the fake stream makes of input x."""
    return ("out", x)


class FakeStream:
    """A deterministic stand-in implementing the runner's stream protocol.

    lag: calls between an input going in and its output coming out. frame_buffer: inputs per call.
    skip_calls: call numbers (0-based) the "similarity filter" skips, once there is an output.
    fail_at: call number that raises. gate: an Event every call waits on (a slow stream).
    """

    def __init__(self, lag=0, frame_buffer=1, skip_calls=(), fail_at=None, gate=None):
        self.lag = lag
        self.frame_buffer = frame_buffer
        self.skip_calls = set(skip_calls)
        self.fail_at = fail_at
        self.gate = gate
        self.last_skipped = False
        self.last_tag = None
        self.calls = 0
        self.flushes = 0
        self.returned = []  # what each call returned
        self._pipeline = collections.deque()  # groups of inputs in flight
        self._last_output = None

    def __call__(self, frames, tag=None):
        call = self.calls
        self.calls += 1
        if self.gate is not None:
            assert self.gate.wait(timeout=120)
        if call == self.fail_at:
            raise ValueError(f"boom at call {call}")
        group = [frames] if self.frame_buffer == 1 else list(frames)
        assert len(group) == self.frame_buffer
        self.last_skipped = call in self.skip_calls and self._last_output is not None
        if self.last_skipped:
            out, self.last_tag = self._last_output, tag
        else:
            self._pipeline.append((group, tag))
            out = self.last_tag = None
            if len(self._pipeline) > self.lag:
                done, self.last_tag = self._pipeline.popleft()
                outs = [f(x) for x in done]
                out = outs[0] if self.frame_buffer == 1 else outs
                self._last_output = out
        self.returned.append(out)
        return out

    def flush_tagged(self):
        self.flushes += 1
        outs = [(tag, [f(x) for x in group]) for group, tag in self._pipeline]
        outs = [(tag, o[0] if self.frame_buffer == 1 else o) for tag, o in outs]
        self._pipeline.clear()
        self._last_output = None
        return outs


def collect(runner, timeout=120.0):
    """Every result until the runner is closed and drained (a bounded wait per result)."""
    results = []
    while True:
        try:
            results.append(runner.get(timeout=timeout))
        except EOFError:
            return results


@pytest.mark.parametrize("frame_buffer", [1, 3])
@pytest.mark.parametrize("lag", [0, 1, 3])
def test_results_in_input_order_and_paired(lag, frame_buffer):
    stream = FakeStream(lag=lag, frame_buffer=frame_buffer)
    n = 10  # not a multiple of 3: the last group is padded
    with StreamRunner(stream, max_queue=4) as runner:
        indices = [runner.put(k) for k in range(n)]
    assert indices == list(range(n))
    results = list(runner)
    assert [r.index for r in results] == list(range(n))
    assert [r.image for r in results] == [f(k) for k in range(n)]
    assert not any(r.skipped or r.dropped for r in results)
    groups = math.ceil(n / frame_buffer)
    assert stream.calls == groups
    assert stream.flushes == 1  # once, at close (a no-op when nothing is in flight)
    stats = runner.stats()
    assert (stats.processed, stats.skipped, stats.dropped) == (n, 0, 0)


def test_consumer_on_another_thread_sees_order():
    stream = FakeStream(lag=2)
    runner = StreamRunner(stream, max_queue=2)
    seen = []
    consumer = threading.Thread(target=lambda: seen.extend(r.index for r in runner))
    consumer.start()
    for k in range(30):
        runner.put(k)
    runner.close()
    consumer.join(timeout=120)
    assert seen == list(range(30))


@pytest.mark.parametrize("lag", [0, 1, 3])
def test_skipped_outputs_belong_to_their_own_input(lag):
    skip_calls = {4, 5, 8}
    stream = FakeStream(lag=lag, skip_calls=skip_calls)
    with StreamRunner(stream, max_queue=16) as runner:
        for k in range(12):
            runner.put(k)
    results = collect(runner)
    assert [r.index for r in results] == list(range(12))
    for k, r in enumerate(results):
        assert r.skipped == (k in skip_calls)
        # A skipped frame gets what the stream returned for it (the previous output); others f(k).
        assert r.image == (stream.returned[k] if r.skipped else f(k))
    stats = runner.stats()
    assert (stats.processed, stats.skipped, stats.dropped) == (9, 3, 0)


def test_skipped_group_with_frame_buffer():
    stream = FakeStream(lag=1, frame_buffer=2, skip_calls={2})
    with StreamRunner(stream, max_queue=4) as runner:
        for k in range(8):
            runner.put(k)
    results = collect(runner)
    assert [r.skipped for r in results] == [False] * 4 + [True] * 2 + [False] * 2
    assert [r.image for r in results[4:6]] == stream.returned[2] == [f(0), f(1)]
    assert [r.image for r in results if not r.skipped] == [f(k) for k in (0, 1, 2, 3, 6, 7)]


def test_drop_oldest_delivers_every_index_once():
    gate = threading.Event()
    stream = FakeStream(lag=1, gate=gate)
    runner = StreamRunner(stream, max_queue=2, when_full="drop_oldest")
    n = 20
    for k in range(n):
        assert runner.put(k) == k  # never blocks
    gate.set()
    runner.close()
    results = collect(runner)
    assert [r.index for r in results] == list(range(n))
    dropped = [r for r in results if r.dropped]
    # The worker holds at most one frame and the queue two, so at least 17 of 20 were dropped.
    assert len(dropped) >= n - 3
    assert runner.stats().dropped == len(dropped)
    assert runner.stats().processed == n - len(dropped)
    assert all(r.image is None and not r.skipped for r in dropped)
    assert all(r.image == f(r.index) for r in results if not r.dropped)
    # The newest frames survive: dropping takes the oldest waiting ones.
    assert not results[-1].dropped and not results[-2].dropped


def test_block_applies_backpressure():
    gate = threading.Event()
    stream = FakeStream(gate=gate)
    runner = StreamRunner(stream, max_queue=2, when_full="block")
    accepted = 0
    with pytest.raises(queue.Full, match="waited"):
        for k in range(10):
            runner.put(k, timeout=0.05)
            accepted += 1
    assert accepted <= 3  # two queued, at most one held by the (stuck) worker

    blocked = threading.Thread(target=runner.put, args=(accepted,))
    blocked.start()
    blocked.join(timeout=0.1)
    assert blocked.is_alive()  # still waiting for room
    gate.set()
    blocked.join(timeout=60)
    assert not blocked.is_alive()
    runner.close()
    results = collect(runner)
    assert [r.image for r in results] == [f(k) for k in range(accepted + 1)]
    assert runner.stats().dropped == 0


def test_stream_exception_propagates_after_the_frames_before_it_and_stops_the_runner():
    stream = FakeStream(lag=1, fail_at=3)
    runner = StreamRunner(stream, max_queue=16)
    for k in range(6):
        runner.put(k)
    got = []
    with pytest.raises(StreamError) as raised:
        for _ in range(6):
            got.append(runner.get(timeout=60))
    # inputs 0 and 1 came out of calls 1 and 2, input 2 was in flight and is flushed: none lost
    assert [(r.index, r.image) for r in got] == [(k, f(k)) for k in range(3)]
    assert isinstance(raised.value.__cause__, ValueError)
    assert "boom at call 3" in str(raised.value.__cause__)
    assert "inputs 3 to 5 get no result" in str(raised.value)   # the ones lost are named
    with pytest.raises(StreamError):
        runner.put(99)
    runner.close()  # already reported: closes quietly
    runner.close()
    assert stream.calls == 4  # the runner stopped at the failure


def test_bad_timeouts_and_a_stream_without_frames_are_named():
    runner = StreamRunner(FakeStream())
    for bad in (float("nan"), -1.0, "1"):
        with pytest.raises(ValueError, match="timeout"):
            runner.get(timeout=bad)
        with pytest.raises(ValueError, match="timeout"):
            runner.put(0, timeout=bad)
    runner.close()
    for frame_buffer in (0, 2.7):
        with pytest.raises(ValueError, match="frame_buffer"):
            StreamRunner(FakeStream(frame_buffer=frame_buffer))


def test_unreported_exception_is_raised_by_close():
    runner = StreamRunner(FakeStream(fail_at=0))
    runner.put(0)
    with pytest.raises(StreamError) as raised:
        runner.close()
    assert isinstance(raised.value.__cause__, ValueError)
    runner.close()  # idempotent once reported


def test_context_manager_does_not_mask_the_callers_exception():
    with pytest.raises(KeyError):
        with StreamRunner(FakeStream(fail_at=0)) as runner:
            runner.put(0)
            raise KeyError("caller")


def test_close_drains_frames_in_flight_with_flush():
    stream = FakeStream(lag=3)
    runner = StreamRunner(stream, max_queue=8)
    for k in range(5):
        runner.put(k)
    assert [runner.get(timeout=60).image for _ in range(2)] == [f(0), f(1)]
    with pytest.raises(queue.Empty):
        runner.get(timeout=0.05)  # frames 2, 3, 4 are in the pipeline until flushed
    assert stream.flushes == 0
    runner.close()
    assert stream.flushes == 1
    assert [r.image for r in collect(runner)] == [f(2), f(3), f(4)]
    with pytest.raises(EOFError):
        runner.get()


def test_close_is_idempotent_and_put_after_close_raises():
    runner = StreamRunner(FakeStream())
    runner.close()
    runner.close()
    with pytest.raises(RuntimeError, match="close"):
        runner.put(0)
    assert list(runner) == []


def test_stats_are_sane():
    stream = FakeStream(lag=1, skip_calls={3, 4})
    with StreamRunner(stream) as runner:
        for k in range(10):
            runner.put(k)
            time.sleep(0.001)
    results = collect(runner)
    stats = runner.stats()
    assert (stats.processed, stats.skipped, stats.dropped) == (8, 2, 0)
    assert stats.frames_per_s > 0
    assert 0 < stats.latency_p50_s <= stats.latency_p95_s
    assert all(r.latency_s > 0 for r in results)
    assert isinstance(results[0], FrameResult)


def test_stats_before_any_frame():
    runner = StreamRunner(FakeStream())
    stats = runner.stats()
    assert (stats.processed, stats.skipped, stats.dropped, stats.frames_per_s) == (0, 0, 0, 0.0)
    assert math.isnan(stats.latency_p50_s)
    runner.close()


@pytest.mark.parametrize("max_queue", [0, -1, 1.5, "8", True])
def test_bad_max_queue(max_queue):
    with pytest.raises(ValueError, match="max_queue"):
        StreamRunner(FakeStream(), max_queue=max_queue)


def test_max_queue_must_hold_a_group():
    with pytest.raises(ValueError, match="max_queue"):
        StreamRunner(FakeStream(frame_buffer=4), max_queue=3)


def test_bad_when_full():
    with pytest.raises(ValueError, match="when_full"):
        StreamRunner(FakeStream(), when_full="drop_newest")
