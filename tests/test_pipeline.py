"""pipeline.Pipeline: the three stages overlap, every queue is bounded, order and failures hold.

The stages are real threads around a real FrameSource; the model and the writer are fakes that
block on events, so overlap and bounds are shown by counting, never by timing.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pipeline import Pipeline, Stats, VideoResult, VideoStart, VideoTask, WindowSettings
from streaming_vggt import GeometryConfig, GeometryStage, Sample
from videos import write_mp4
from window import needed_frames, num_windows

TIMEOUT = 60  # seconds: generous, for a loaded machine; nothing waits this long when it works


def fake_sample(window) -> Sample:
    return Sample(
        video=window.video, frame_index=window.window.focal_frame, timestamp=0.0, fps=window.fps,
        dilation=window.dilation, window_frame_indices=list(window.window.frame_indices),
        window_timestamps=list(window.timestamps), world_frame="first", rgb=torch.zeros(2, 2, 3, dtype=torch.uint8),
        depth=torch.ones(2, 2), extrinsic=torch.zeros(3, 4), intrinsic=torch.eye(3),
        window_extrinsics=torch.zeros(1, 3, 4), window_intrinsics=torch.eye(3)[None], points=torch.zeros(5, 6))


class FakeStage:
    """Returns one sample per window; optionally blocks each call until `gate` is set, or fails."""

    def __init__(self, gate: threading.Event | None = None, fail_video: str | None = None, oom_above: int = 0):
        self.gate, self.fail_video, self.oom_above = gate, fail_video, oom_above
        self.calls: list[int] = []  # batch sizes
        self.entered = threading.Event()

    def __call__(self, batch):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(TIMEOUT)
        if self.oom_above and len(batch) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("fake: out of memory")
        if any(w.video == self.fail_video for w in batch):
            raise RuntimeError("fake model failure")
        self.calls.append(len(batch))
        return [fake_sample(w) for w in batch]


class FakeWriter:
    def __init__(self, gate: threading.Event | None = None):
        self.gate = gate
        self.last_focal: dict[str, int] = {}
        self.written: list[tuple[str, int]] = []
        self.events: list = []  # what was written, interleaved with flushes
        self.entered = threading.Event()

    def write(self, sample):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(TIMEOUT)
        self.written.append((sample.video, sample.frame_index))
        self.events.append(("sample", sample.video))

    def flush(self):
        self.events.append(("flush",))

    def close(self):
        self.events.append(("close",))


def run_all(pipeline: Pipeline, videos: list[str]) -> list:
    for v in videos:
        pipeline.submit(VideoTask(v))
    events, results = [], 0
    deadline = time.monotonic() + TIMEOUT
    while results < len(videos):
        assert time.monotonic() < deadline, "pipeline did not finish"
        for e in pipeline.poll(0.2):
            events.append(e)
            results += isinstance(e, VideoResult)
    pipeline.close()
    return events


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def settle(read, seconds: float = 0.5):
    """The value of read() once it has stopped changing for `seconds`."""
    value, since = read(), time.monotonic()
    while time.monotonic() - since < seconds:
        time.sleep(0.02)
        if (now := read()) != value:
            value, since = now, time.monotonic()
    return value


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return str(write_mp4(tmp_path_factory.mktemp("pipeline") / "clip.mp4", num_frames=40, width=64, height=48))


def test_decode_runs_ahead_of_a_busy_model_but_only_so_far(clip, one_torch_thread):
    """While the model is stuck on its first batch, the decode thread keeps going (overlap) and
    stops when the bounded window queue is full (flat memory)."""
    gate = threading.Event()
    stage, writer, stats = FakeStage(gate), FakeWriter(), Stats()
    pipeline = Pipeline(stage, writer, WindowSettings(kernel=3, stride=1), batch_size=2, prefetch_windows=4,
                        stats=stats)
    pipeline.submit(VideoTask(clip))
    assert stage.entered.wait(TIMEOUT)
    decoded = settle(lambda: stats.snapshot().get("windows_decoded", 0))
    # 2 in the model's batch + 4 in the queue + 1 decoded and waiting to be queued
    assert decoded == 2 + 4 + 1
    gate.set()
    pipeline.close()  # finishes what was submitted
    total = num_windows(40, 3, 1, 1)
    assert [f for _, f in writer.written] == [w + 1 for w in range(total)]  # every window once, in order
    assert stats.snapshot()["frames_decoded"] == len(needed_frames(40, 3, 1, 1))


def test_model_runs_ahead_of_a_busy_writer_but_only_so_far(clip, one_torch_thread):
    gate = threading.Event()
    stage, writer, stats = FakeStage(), FakeWriter(gate), Stats()
    pipeline = Pipeline(stage, writer, WindowSettings(kernel=3, stride=1), batch_size=2, prefetch_windows=4,
                        stats=stats)
    pipeline.submit(VideoTask(clip))
    assert writer.entered.wait(TIMEOUT)
    made = settle(lambda: sum(stage.calls))
    # 1 in the writer's hands + 2*B in the sample queue + a batch waiting to be queued (B, minus one
    # of its samples already queued)
    assert 2 * 2 + 1 <= made <= 1 + 2 * 2 + 2
    assert stats.snapshot()["windows_decoded"] <= made + 4 + 1 + 2  # decode is held back in turn
    gate.set()
    while len(writer.written) < num_windows(40, 3, 1, 1):
        pipeline.poll(0.2)
    pipeline.close()


def test_a_lingering_poll_gathers_events_and_a_video_end_cuts_it_short(clip, one_torch_thread):
    """poll(linger=...), as the worker answers the driver through Ray: after the first event it
    waits `linger` for more (one call for many samples, not one per sample); a VideoResult (the
    driver hands out the next video on it) ends the wait at once."""
    gate = threading.Event()
    pipeline = Pipeline(FakeStage(gate), FakeWriter(), WindowSettings(kernel=3, stride=1), batch_size=2)
    pipeline.submit(VideoTask(clip))
    started = time.monotonic()
    events = pipeline.poll(TIMEOUT, linger=0.3)  # the VideoStart, then a full linger: the model is held
    assert time.monotonic() - started >= 0.29 and [type(e) for e in events] == [VideoStart]
    gate.set()
    started = time.monotonic()
    while not isinstance(events[-1], VideoResult):
        events += pipeline.poll(TIMEOUT, linger=TIMEOUT)
    assert time.monotonic() - started < TIMEOUT / 2  # the video's end cut the linger short
    assert events[-1].status == "done"
    assert sum(isinstance(e, tuple) and e[0] == "sample" for e in events) == num_windows(40, 3, 1, 1)
    pipeline.close()


@pytest.mark.parametrize("writer_thread", [True, False])
def test_markers_keep_order_and_results_come_after_their_samples(clip, tmp_path, one_torch_thread,
                                                                 writer_thread):
    other = str(write_mp4(tmp_path / "other.mp4", num_frames=20, width=64, height=48))
    short = str(write_mp4(tmp_path / "short.mp4", num_frames=3, width=64, height=48))
    writer = FakeWriter()
    pipeline = Pipeline(FakeStage(), writer, WindowSettings(kernel=5, stride=3, dilation=2), batch_size=3,
                        writer_thread=writer_thread)
    threads = [t.name for t in pipeline._threads]
    assert threads == (["decode", "model", "write"] if writer_thread else ["decode", "model"])
    events = run_all(pipeline, [clip, short, other])
    results = {e.video: e for e in events if isinstance(e, VideoResult)}
    assert results[clip].status == "done" and results[clip].samples == num_windows(40, 5, 3, 2)
    assert results[other].status == "done" and results[other].samples == num_windows(20, 5, 3, 2)
    assert results[short].status == "no_windows" and results[short].samples == 0
    starts = [e.video for e in events if isinstance(e, VideoStart)]
    assert starts == [clip, short, other]
    # the writer flushed at each video's end, after that video's samples and before the next one's
    flushes = [i for i, e in enumerate(writer.events) if e == ("flush",)]
    assert len(flushes) == 3
    videos_between = [writer.events[i][1] for i in range(flushes[0])]
    assert set(videos_between) == {clip}


class SlowStage(FakeStage):
    def __call__(self, batch):
        time.sleep(0.005)
        return super().__call__(batch)


class ThreadRecordingWriter(FakeWriter):
    def __init__(self):
        super().__init__()
        self.threads: list[str] = []

    def write(self, sample):
        self.threads.append(threading.current_thread().name)
        super().write(sample)


def test_without_a_writer_thread_the_decoder_and_the_model_share_the_writing(clip, one_torch_thread):
    """No writer thread (the CPU default): samples wait in a backlog of at most 2 that the decode
    thread writes after handing over a window (the model is slow here, so it has the time) and the
    model thread writes when the backlog is full or it has no window; all of them, in order."""
    writer, stats = ThreadRecordingWriter(), Stats()
    pipeline = Pipeline(SlowStage(), writer, WindowSettings(kernel=3, stride=1), batch_size=1, prefetch_windows=2,
                        stats=stats, writer_thread=False)
    assert pipeline._samples is None and [t.name for t in pipeline._threads] == ["decode", "model"]
    events = run_all(pipeline, [clip])
    result = next(e for e in events if isinstance(e, VideoResult))
    assert result.status == "done" and result.samples == num_windows(40, 3, 1, 1)
    assert writer.written == [(clip, f) for f in range(1, 39)]
    assert set(writer.threads) <= {"decode", "model"} and "decode" in writer.threads
    assert stats.snapshot()["backlog_writes_by_decoder"] >= 1
    assert not pipeline._backlog


class BuggyWriter(FakeWriter):
    """Raises a bug's error on the first sample that `thread` writes."""

    def __init__(self, thread: str):
        super().__init__()
        self.thread = thread

    def write(self, sample):
        if threading.current_thread().name == self.thread:
            raise ValueError(f"a bug in the writer, met in the {self.thread} thread")
        super().write(sample)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the bug, as expected
@pytest.mark.parametrize("thread", ["decode", "model"])
def test_a_writer_bug_stops_the_pipeline_whichever_thread_meets_it(clip, one_torch_thread, thread):
    """Without a writer thread the decoder may be the one writing: a bug there must stop the
    pipeline, not be taken for a decoding error of the video it is decoding."""
    pipeline = Pipeline(SlowStage(), BuggyWriter(thread), WindowSettings(kernel=3, stride=1), batch_size=1,
                        prefetch_windows=2, writer_thread=False)
    pipeline.submit(VideoTask(clip))
    events = []
    with pytest.raises(RuntimeError, match=f"pipeline stopped.*a bug in the writer, met in the {thread} thread"):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            events += pipeline.poll(0.2)
    assert not [e for e in events if isinstance(e, VideoResult)]


def test_model_failure_fails_only_its_video(clip, tmp_path, one_torch_thread):
    bad = str(write_mp4(tmp_path / "bad.mp4", num_frames=20, width=64, height=48))
    writer = FakeWriter()
    events = run_all(Pipeline(FakeStage(fail_video=bad), writer, WindowSettings(kernel=3, stride=2), batch_size=2),
                     [bad, clip])
    results = {e.video: e for e in events if isinstance(e, VideoResult)}
    assert results[bad].status == "failed" and "fake model failure" in results[bad].reason
    assert results[clip].status == "done" and results[clip].samples == num_windows(40, 3, 2, 1)
    assert {v for v, _ in writer.written} == {clip}


def test_an_unexpected_decode_error_fails_only_its_video(clip, tmp_path, monkeypatch, one_torch_thread):
    import pipeline as pipeline_module

    bad = str(write_mp4(tmp_path / "odd.mp4", num_frames=20, width=64, height=48))
    real_source = pipeline_module.FrameSource

    def source(path, *args, **kwargs):
        if path == bad:
            raise RuntimeError("an error no decoder path expects")
        return real_source(path, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "FrameSource", source)
    writer = FakeWriter()
    events = run_all(Pipeline(FakeStage(), writer, WindowSettings(kernel=3, stride=2), batch_size=2), [bad, clip])
    results = {e.video: e for e in events if isinstance(e, VideoResult)}
    assert results[bad].status == "failed" and results[bad].reason == "RuntimeError: an error no decoder path expects"
    assert results[clip].status == "done" and results[clip].samples == num_windows(40, 3, 2, 1)


def test_out_of_memory_halves_the_batch(clip, one_torch_thread):
    stage, stats = FakeStage(oom_above=2), Stats()
    pipeline = Pipeline(stage, FakeWriter(), WindowSettings(kernel=3, stride=1), batch_size=8, stats=stats)
    events = run_all(pipeline, [clip])
    result = next(e for e in events if isinstance(e, VideoResult))
    assert result.status == "done" and result.samples == num_windows(40, 3, 1, 1)
    assert max(stage.calls) <= 2 and pipeline.batch_size <= 2
    assert stats.snapshot()["oom_batch_halvings"] >= 1


class ConstantModel:
    def __call__(self, frames):
        B, S, _, H, W = frames.shape
        intrinsic = torch.tensor([[W, 0, W / 2], [0, W, H / 2], [0, 0, 1]], dtype=torch.float32)
        extrinsic = torch.cat([torch.eye(3), torch.zeros(3, 1)], dim=1)
        return {"depth": torch.ones(B, S, H, W), "depth_conf": torch.rand(B, S, H, W) + 1,
                "extrinsic": extrinsic.expand(B, S, 3, 4), "intrinsic": intrinsic.expand(B, S, 3, 3)}


def test_stage_seconds_land_in_the_pipeline_counters(clip, one_torch_thread):
    """The counters the worker logs and benchmark.py reads: one Stats for all three threads."""
    stats = Stats()
    stage = GeometryStage(ConstantModel(), "cpu", GeometryConfig(max_points=100))
    pipeline = Pipeline(stage, FakeWriter(), WindowSettings(kernel=3, stride=2), batch_size=4, stats=stats)
    assert [t.name for t in pipeline._threads] == ["decode", "model"]  # a CPU stage: no writer thread
    run_all(pipeline, [clip])
    counts = stats.snapshot()
    windows = num_windows(40, 3, 2, 1)
    assert counts["windows_decoded"] == counts["samples_written"] == windows
    assert counts["points_written"] == 100 * windows  # capped by max_points
    for key in ("decode_seconds", "decode_cpu_seconds", "model_seconds", "forward_seconds", "postprocess_seconds",
                "write_seconds"):
        assert counts[key] > 0, key
    assert counts["forward_seconds"] + counts["postprocess_seconds"] <= counts["model_seconds"] * 1.01 + 1e-3
    assert counts["decode_cpu_seconds"] <= counts["decode_seconds"] * 1.01 + 1e-3  # CPU time within wall time


# ----------------------------------------------------------------------------- GPU faults and full batches


def test_batches_span_videos_and_results_follow_their_last_sample(clip, tmp_path, one_torch_thread):
    """Windows of consecutive videos share batches (all full but the last); each video's samples
    stay in order, and its result (and the writer's flush) comes right after its last sample."""
    other = str(write_mp4(tmp_path / "other.mp4", num_frames=21, width=64, height=48))
    stage, writer = FakeStage(), FakeWriter()
    events = run_all(Pipeline(stage, writer, WindowSettings(kernel=3, stride=2), batch_size=4), [clip, other])
    total = num_windows(40, 3, 2, 1) + num_windows(21, 3, 2, 1)  # 19 + 10
    assert sum(stage.calls) == total and stage.calls[:-1] == [4] * (len(stage.calls) - 1)
    assert num_windows(40, 3, 2, 1) % 4 != 0  # so one batch holds windows of both videos
    for video in (clip, other):
        focals = [f for v, f in writer.written if v == video]
        assert focals == sorted(focals) and len(focals) == num_windows(40 if video == clip else 21, 3, 2, 1)
    first_flush = writer.events.index(("flush",))
    assert {e[1] for e in writer.events[:first_flush]} == {clip}
    assert {e[1] for e in writer.events[first_flush + 1:] if e[0] == "sample"} == {other}
    results = [e for e in events if isinstance(e, VideoResult)]
    assert [(r.video, r.status, r.samples) for r in results] == [(clip, "done", 19), (other, "done", 10)]


def test_out_of_memory_retries_outside_the_except_block_and_grows_back(clip, one_torch_thread):
    """The retry must not run while the failed attempt's traceback (and its tensors) is alive."""
    import sys

    class Stage(FakeStage):
        def __call__(self, batch):
            assert sys.exc_info() == (None, None, None), "retried inside the except block"
            return super().__call__(batch)

    stage, stats = Stage(oom_above=2), Stats()
    pipeline = Pipeline(stage, FakeWriter(), WindowSettings(kernel=3, stride=1), batch_size=8, stats=stats,
                        grow_after=3)
    result = next(e for e in run_all(pipeline, [clip]) if isinstance(e, VideoResult))
    assert result.status == "done" and result.samples == num_windows(40, 3, 1, 1)
    counts = stats.snapshot()
    assert counts["batch_growths"] >= 1 and counts["oom_batch_halvings"] >= 3  # 8 -> 4 -> 2, grew, halved again
    assert max(stage.calls) == 2


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
])
def test_allocation_failures_count_as_out_of_memory(error):
    from pipeline import classify_error

    assert classify_error(error) == "oom"


@pytest.mark.parametrize("error, kind", [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "fatal"),
    (RuntimeError("CUDA error: uncorrectable ECC error encountered"), "fatal"),
    (RuntimeError("CUDA error: unspecified launch failure"), "fatal"),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`"), "fatal"),
    (RuntimeError("shape '[2, 3]' is invalid for input of size 5"), "error"),
    (ValueError("a bad video"), "error"),
])
def test_other_cuda_errors_are_fatal_to_the_worker(error, kind):
    from pipeline import classify_error

    assert classify_error(error) == kind


class PoisonedStage(FakeStage):
    """Works for its first `good` calls, then fails like a poisoned CUDA context, every call."""

    def __init__(self, good: int, error: str = "CUDA error: an illegal memory access was encountered"):
        super().__init__()
        self.good, self.error, self.attempts = good, error, 0

    def __call__(self, batch):
        self.attempts += 1
        if self.attempts > self.good:
            raise RuntimeError(self.error)
        return super().__call__(batch)


@pytest.mark.parametrize("writer_thread", [True, False])
def test_a_broken_device_ends_the_worker_after_committing_what_came_before(clip, one_torch_thread,
                                                                           writer_thread):
    """A poisoned context (or a model that fails on everything) must not fail the videos it is
    handed: what was done is committed, the fault handler runs (the worker exits there), and no
    video is reported failed."""
    error = "CUDA error: an illegal memory access was encountered"
    faults: list[str] = []
    stage, writer, stats = PoisonedStage(good=2, error=error), FakeWriter(), Stats()
    pipeline = Pipeline(stage, writer, WindowSettings(kernel=3, stride=1), batch_size=2, stats=stats,
                        on_device_fault=faults.append, writer_thread=writer_thread)
    pipeline.submit(VideoTask(clip))
    events = []
    with pytest.raises(RuntimeError, match="pipeline stopped"):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            events += pipeline.poll(0.2)
    assert len(faults) == 1 and (error in faults[0])
    assert writer.written == [(clip, f) for f in (1, 2, 3, 4)]  # the two good batches, committed
    assert writer.events[-1] == ("flush",)
    assert not [e for e in events if isinstance(e, VideoResult)]  # nothing reported failed
    assert stats.snapshot()["device_faults"] == 1
    with pytest.raises(RuntimeError, match="DeviceFault"):
        pipeline.close()


def test_one_bad_window_in_a_shared_batch_fails_only_its_video(clip, tmp_path, one_torch_thread):
    bad = str(write_mp4(tmp_path / "bad.mp4", num_frames=9, width=64, height=48))
    writer = FakeWriter()
    events = run_all(Pipeline(FakeStage(fail_video=bad), writer, WindowSettings(kernel=3, stride=2), batch_size=4),
                     [clip, bad])
    results = {e.video: e for e in events if isinstance(e, VideoResult)}
    assert results[bad].status == "failed" and results[clip].status == "done"
    assert results[clip].samples == num_windows(40, 3, 2, 1)


@pytest.mark.parametrize("writer_thread", [True, False])
def test_a_model_failing_every_call_ends_the_worker_before_failing_the_queue(clip, tmp_path, one_torch_thread,
                                                                             writer_thread):
    """Plain errors on every call: the first video is failed (a bad video looks the same), the
    next failure, on another video, shows the worker is broken: it ends instead of failing more."""
    others = [str(write_mp4(tmp_path / f"v{i}.mp4", num_frames=12, width=64, height=48)) for i in range(3)]
    faults: list[str] = []
    pipeline = Pipeline(PoisonedStage(good=0, error="no kernel image for this device"), FakeWriter(),
                        WindowSettings(kernel=3, stride=1), batch_size=2, on_device_fault=faults.append,
                        writer_thread=writer_thread)
    for video in [clip, *others]:
        pipeline.submit(VideoTask(video))
    events = []
    with pytest.raises(RuntimeError, match="pipeline stopped"):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            events += pipeline.poll(0.2)
    failed = [e.video for e in events if isinstance(e, VideoResult) and e.status == "failed"]
    assert failed == [clip] and len(faults) == 1
    with pytest.raises(RuntimeError):
        pipeline.close()
