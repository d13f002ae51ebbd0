"""One worker's pipeline: three stages that overlap, joined by bounded queues.

    tasks --[decode thread]--> windows --[model thread]--> samples --[writer thread]--> files
          FrameSource           bounded   GeometryStage,    bounded   ShardedWriter
          (decode + resize)               B per forward               (encode + commit)

The decode thread runs ahead by at most `prefetch_windows` windows, across the end of one video
into the next, so the model never waits for a video to open. Markers (VideoStart / VideoEnd) travel
through the same queues as the data, so a video's end reaches the writer after its last sample.
Memory is flat: every queue is bounded and frames travel as uint8. When the model runs on the
CPU there is no writer thread: samples wait in a short backlog that the decode and model threads
write in turn, whichever has the time (see Pipeline's `writer_thread`).
"""

from __future__ import annotations

import collections
import gc
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from frames import DecodeError, FrameSource, WindowFrames
from sharded_writer import ShardedWriter
from sample_format import Sample
from streaming_vggt import GeometryStage
from window import dilation_for_seconds, num_shot_windows, num_windows


@dataclass(frozen=True)
class WindowSettings:
    kernel: int
    stride: int
    dilation: int = 1
    window_seconds: float | None = None  # when set, dilation comes from each video's fps
    resize_mode: str = "crop"
    shots: str = "off"  # "detect": windows restart in every shot (shots.py); "off": the plain convolution
    decode_threads: int = 0  # FFmpeg's threads per video (0: FFmpeg picks, about one per core)

    def dilation_for(self, fps: float) -> int:
        if self.window_seconds is None:
            return self.dilation
        return dilation_for_seconds(self.window_seconds, fps, self.kernel)


@dataclass(frozen=True)
class VideoTask:
    video: str  # path as given
    after_focal: int = -1  # resume: windows with focal frame <= this were written before


@dataclass
class VideoStart:
    video: str
    num_frames: int  # the container's count: an estimate (the decoded count is in VideoResult)
    fps: float
    dilation: int
    windows: int  # windows of the whole video, estimated from num_frames
    windows_todo: int  # after resuming, estimated


@dataclass
class VideoResult:
    video: str
    status: str  # "done" | "no_windows" | "failed"
    reason: str = ""
    samples: int = 0  # written in this attempt
    windows: int = 0  # windows of the whole video, from the decoded count
    num_frames: int = 0  # decoded frames (the container's estimate if decoding failed before the end)
    fps: float = 0.0
    dilation: int = 0
    shots: list[list[int]] = field(default_factory=list)  # [[first, last], ...] inclusive; gaps: transitions
    windows_removed_by_cuts: int = 0  # windows of the plain convolution that shot detection removed


class Stats:
    """Counters and per-stage seconds, shared by logs, the summary and the benchmark."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: dict[str, float] = {}

    def stat_update(self, name: str, value: float = 1) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + value

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.counts)


@dataclass
class _Failed:  # model or writer failed on a video: drop its remaining windows / samples
    video: str
    reason: str


_STOP = object()
_IDLE = object()  # the decoder has no video left to decode: run partial batches now
MAX_CONSECUTIVE_FAILURES = 4  # failed forwards in a row (no success between) that end the worker
REMOTE_POLL_LINGER = 0.1  # seconds a remote caller's poll gathers events after the first (poll)
STALE_BATCHES = 4  # a partial batch runs once this many batches' worth of other windows went by


class DeviceFault(RuntimeError):
    """The device cannot be used any more (illegal memory access, ECC error, a lost or poisoned
    CUDA context, or every forward failing): the worker process must end and be replaced."""


@dataclass
class _Fault:  # model thread -> writer thread: commit what came before, then end the worker
    reason: str


class _WriteBug(BaseException):
    """An unexpected error in stage 3 written by the decode or model thread (no writer thread): a
    BaseException, so that the decoder's handlers, which fail the video being decoded, let it pass
    and the pipeline stops, as it does when the writer thread meets one. (Bad input never gets
    here: a failed write fails its own video inside `_write`.)"""


# Substrings of errors (RuntimeError and friends, as CUDA, cuBLAS and cuDNN raise them).
_OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", "HIPBLAS_STATUS_ALLOC_FAILED")
_FATAL_MARKERS = ("CUDA error", "CUDA driver error", "illegal memory access", "uncorrectable ECC",
                  "ECC error", "device-side assert", "CUBLAS_STATUS_", "CUDNN_STATUS_", "cudaError",
                  "misaligned address", "unspecified launch failure", "NCCL error", "HIP error")


def classify_error(error: BaseException) -> str:
    """'oom': out of device memory, retry smaller (torch.cuda.OutOfMemoryError, or cuBLAS/cuDNN
    allocation failures that arrive as plain RuntimeError); 'fatal': any other CUDA error (the
    context is unusable from now on: illegal memory access, ECC, a failed launch); 'error':
    anything else (this batch's windows are to blame)."""
    if isinstance(error, torch.OutOfMemoryError):
        return "oom"
    text = str(error)
    if isinstance(error, RuntimeError) and any(m in text for m in _OOM_MARKERS):
        return "oom"
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return "fatal"
    if isinstance(error, RuntimeError) and any(m in text for m in _FATAL_MARKERS):
        return "fatal"
    return "error"


def free_device_memory() -> None:
    """After a failed forward: collect its tensors, hand cached blocks back to the driver."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class _Batches:
    """The model thread's open batches, one per frame shape, and the video results waiting for
    their windows: a result is passed on right after the last sample of its video."""

    def __init__(self, pipeline: "Pipeline"):
        self.p = pipeline
        self.open: dict[tuple, list[WindowFrames]] = {}  # shape -> windows, in arrival order
        self.born: dict[tuple, int] = {}  # shape -> arrival number of its first window
        self.arrived = 0
        self.pending: dict[str, int] = {}  # video -> windows not yet through the model
        self.held: dict[str, VideoResult] = {}
        self.failed: dict[str, str] = {}

    def add(self, w: WindowFrames) -> None:
        if w.video in self.failed:
            return
        shape = tuple(w.frames.shape)
        batch = self.open.setdefault(shape, [])
        if not batch:
            self.born[shape] = self.arrived
        batch.append(w)
        self.arrived += 1
        self.pending[w.video] = self.pending.get(w.video, 0) + 1
        target = self.p.target_batch_size(shape)
        if len(batch) >= target:
            self.run(shape)
        for other in [s for s in self.open if self.arrived - self.born[s] > STALE_BATCHES * target]:
            self.run(other)

    def run(self, shape: tuple) -> None:
        batch = self.open.pop(shape)
        done: set[int] = set()
        for part, samples in self.p._forward_parts(batch, self.failed):
            self.p._emit(part, samples, self)
            done.update(id(w) for w in part)
        for w in batch:  # windows dropped because their video failed meanwhile
            if id(w) not in done:
                self.window_done(w.video)

    def run_all(self) -> None:
        for shape in sorted(self.open, key=self.born.get):
            self.run(shape)

    def window_done(self, video: str) -> None:
        self.pending[video] -= 1
        if self.pending[video] == 0:
            del self.pending[video]
            if video in self.held:
                self._pass_on(self.held.pop(video))

    def result(self, item: VideoResult) -> None:
        if self.pending.get(item.video):
            self.held[item.video] = item
        else:
            self._pass_on(item)

    def _pass_on(self, item: VideoResult) -> None:
        if item.video in self.failed:
            item.status, item.reason = "failed", self.failed.pop(item.video)
        self.p._to_writer(item)


class Pipeline:
    """Feed it VideoTasks with submit(); poll() returns what happened since the last poll."""

    def __init__(self, stage: GeometryStage, writer: ShardedWriter, settings: WindowSettings,
                 batch_size: int | Callable[[tuple], int] = 4, prefetch_windows: int = 16,
                 stats: Stats | None = None, on_device_fault: Callable[[str], None] | None = None,
                 grow_after: int = 8, shot_model=None, writer_thread: bool | None = None,
                 backlog: int = 2):
        """`batch_size`: windows per forward, or a function of the window shape (S, H, W, 3)
        giving it (--batch-size auto). `on_device_fault(reason)`: called in the thread that writes,
        once every sample before a DeviceFault is committed (the worker ends its process there);
        without it the fault surfaces through poll(). `grow_after`: good forwards after an
        out-of-memory halving before the batch doubles again. `writer_thread`: write samples in a
        thread of their own; default: unless the stage runs on the CPU. On a GPU the writer thread
        overlaps the next forward. On the CPU the model thread itself is CPU work, and a third busy
        thread only queues the decoder behind it on a machine with few cores (2 cores: decoder
        run-queue wait 2.7 -> 0.1 ms a window); there stage 3's items (samples and the video
        markers between them) wait in a backlog of at most `backlog`, written by the decode thread
        after each window it hands over and when it waits for room, and by the model thread when
        the backlog is full or it waits for windows: the two threads share the writing as their
        loads allow."""
        self.stage, self.writer, self.settings = stage, writer, settings
        if settings.shots not in ("detect", "off"):
            raise ValueError(f"shots must be 'detect' or 'off', got {settings.shots!r}")
        if settings.shots == "detect" and shot_model is None:
            from shots import load_transnetv2

            shot_model = load_transnetv2("cpu")
        self.shot_model = shot_model  # TransNetV2 on the worker's device (shots.load_transnetv2)
        self._batch_size_of = batch_size if callable(batch_size) else (lambda shape, b=batch_size: b)
        self._max_batch = batch_size if isinstance(batch_size, int) else 1 << 20
        self.batch_size = self._max_batch  # windows per forward now: lowered by out-of-memory, grows back
        self._grow_after, self._good_forwards, self._grown_recently = grow_after, 0, False
        self._consecutive_failures = 0
        self._failing_videos: set[str] = set()  # videos failed by the model since its last good forward
        self._on_device_fault = on_device_fault
        self.device_fault: str | None = None
        self.stats = stats or Stats()
        if hasattr(stage, "stats"):  # GeometryStage splits its time into forward / post-processing
            stage.stats = self.stats
        self._tasks: queue.Queue = queue.Queue()
        self._windows: queue.Queue = queue.Queue(maxsize=prefetch_windows)
        if writer_thread is None:
            writer_thread = getattr(getattr(stage, "device", None), "type", None) != "cpu"
        # model thread -> writer thread; None: no writer thread, stage 3's items wait in `_backlog`
        self._samples: queue.Queue | None = (queue.Queue(maxsize=max(2, 2 * min(self._max_batch, 64)))
                                             if writer_thread else None)
        self._backlog: collections.deque | None = None if writer_thread else collections.deque()
        self._backlog_size = backlog
        self._stage3 = threading.Lock()  # held while an item goes through stage 3: one at a time, in order
        self._write_failed: dict[str, str] = {}  # video -> why writing its samples failed
        self._written: dict[str, int] = {}  # video -> samples written, until its result goes out
        self._events: queue.Queue = queue.Queue()  # VideoStart, VideoResult, written samples: for poll()
        self._ended = threading.Event()  # set once a VideoResult is queued or a thread died: ends poll's linger
        self._fatal: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._guard, args=(self._decode_loop,), name="decode", daemon=True),
            threading.Thread(target=self._guard, args=(self._model_loop,), name="model", daemon=True),
        ] + ([] if self._samples is None else [
            threading.Thread(target=self._guard, args=(self._write_loop,), name="write", daemon=True)])
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ caller side

    def submit(self, task: VideoTask) -> None:
        self._tasks.put(task)

    def target_batch_size(self, shape: tuple) -> int:
        """Windows per batch for windows of this shape (S, H, W, 3): the configured size (or the
        one --batch-size auto picks for it), cut to what fits after an out-of-memory error."""
        return max(1, min(self._batch_size_of(shape), self.batch_size))

    def poll(self, timeout: float = 0.5, linger: float = 0.0) -> list:
        """Events since the last call (VideoStart, VideoResult, ("sample", video) per written
        sample), waiting up to `timeout` for the first; then up to `linger` seconds more while
        others gather (a VideoResult or a fault ends that wait). A remote caller (the driver,
        through Ray) lingers, so that it makes a few calls a second instead of one per sample:
        each call takes this process's GIL from the pipeline (issue 12: the CLI made ~55
        windows/s answering per sample, ~72 gathering; NOTES.md)."""
        events = []
        try:
            events.append(self._events.get(timeout=timeout))
            if linger > 0 and not isinstance(events[-1], VideoResult):
                self._ended.wait(linger)
            self._ended.clear()  # before taking the rest: one queued after this sets it again
            while True:
                events.append(self._events.get_nowait())
        except queue.Empty:
            pass
        if self._fatal is not None:
            raise RuntimeError(f"pipeline stopped: {self._fatal!r}") from self._fatal
        return events

    def close(self) -> None:
        """Finish everything submitted, then stop the threads and the writer."""
        self._tasks.put(_STOP)
        for t in self._threads:
            while t.is_alive() and self._fatal is None:  # after a fault a thread may wait forever
                t.join(0.1)
        self.writer.close()
        if self._fatal is not None:
            raise RuntimeError(f"pipeline stopped: {self._fatal!r}") from self._fatal

    def _put(self, q: queue.Queue, item, blocked: str) -> None:
        """q.put(item), counting the seconds spent waiting for room (the next stage is slower).
        Without a writer thread, the backlog is written while there is no room."""
        while True:
            try:
                return q.put_nowait(item)
            except queue.Full:
                if not self._write_backlog(blocking=True, counter="backlog_writes_waiting"):
                    break
        started = time.perf_counter()
        q.put(item)
        self.stats.stat_update(blocked, time.perf_counter() - started)

    def _get(self, q: queue.Queue, starved: str):
        """q.get(), counting the seconds spent waiting for an item (the previous stage is slower).
        Without a writer thread, the backlog is written while nothing comes."""
        while True:
            try:
                return q.get_nowait()
            except queue.Empty:
                if not self._write_backlog(blocking=True, counter="backlog_writes_waiting"):
                    break
        started = time.perf_counter()
        item = q.get()
        self.stats.stat_update(starved, time.perf_counter() - started)
        return item

    def _guard(self, loop) -> None:
        try:
            loop()
        except BaseException as e:  # a bug, not bad input: surface it through poll()
            self._fatal = e
            self._ended.set()
            raise

    # ------------------------------------------------------------------ stage 1: decode

    def _decode_loop(self) -> None:
        while (task := self._tasks.get()) is not _STOP:
            self._decode_video(task)
            if self._tasks.empty():  # nothing more to decode for now: partial batches may run
                self._windows.put(_IDLE)
        self._windows.put(_STOP)

    def _decode_video(self, task: VideoTask) -> None:
        s = self.settings
        result = VideoResult(task.video, "done")
        started = time.perf_counter()
        try:
            source = FrameSource(task.video, s.resize_mode, s.decode_threads)
            self.stats.stat_update("decode_seconds", time.perf_counter() - started)  # opening counts too
            info = source.info
            dilation = s.dilation_for(info.fps)
            result.num_frames, result.fps, result.dilation = info.num_frames, info.fps, dilation
            after = task.after_focal  # the resume point: the driver's (sample_format.resume_points)
            # the container's count is an estimate (progress); the decoded count decides, at the end
            estimate = num_windows(info.num_frames, s.kernel, s.stride, dilation)
            todo = num_windows(info.num_frames, s.kernel, s.stride, dilation, after)
            self._windows.put(VideoStart(task.video, info.num_frames, info.fps, dilation, estimate, todo))
            if s.shots == "detect":
                self._decode_shots(source, dilation, after)
            else:
                # decode_seconds - decode_cpu_seconds: the decoder waiting (Python's GIL, helper
                # threads, the CPU run queue) rather than decoding
                started, cpu_started = time.perf_counter(), time.thread_time()
                for window in source.windows(s.kernel, s.stride, dilation, after):
                    self.stats.stat_update("decode_seconds", time.perf_counter() - started)
                    self.stats.stat_update("decode_cpu_seconds", time.thread_time() - cpu_started)
                    self.stats.stat_update("windows_decoded")
                    self._hand_over(window)
                    started, cpu_started = time.perf_counter(), time.thread_time()
            self.stats.stat_update("frames_decoded", source.frames_decoded)
            result.num_frames = source.num_frames  # decoded: frame i is the decoder's i-th frame
            result.windows = num_windows(source.num_frames, s.kernel, s.stride, dilation)
            self._record_shots(source, result, dilation)
            if result.windows == 0:
                result.status = "no_windows"
            source.close()
        except (DecodeError, ValueError, OSError) as e:
            result.status, result.reason = "failed", str(e)
        except Exception as e:  # anything else this one file provokes fails it, not the worker
            result.status, result.reason = "failed", f"{type(e).__name__}: {str(e).strip()[:300]}"
        self._windows.put(result)

    def _hand_over(self, window: WindowFrames) -> None:
        """Queue a window for the model; then, without a writer thread, write one backlog item:
        the decoder's share of the writing (none while the model thread is writing)."""
        self._put(self._windows, window, "decode_blocked_seconds")
        self._write_backlog(blocking=False, counter="backlog_writes_by_decoder")

    def _decode_shots(self, source: FrameSource, dilation: int, after: int) -> None:
        """Windows restarted in every shot the detector finds while the video decodes (the whole
        video is decoded, also on resume, so shots and windows are the same as in one go)."""
        from shots import ShotDetector

        s = self.settings
        detector = ShotDetector(self.shot_model)
        started = time.perf_counter()
        detect_before = 0.0
        for window in source.shot_windows(s.kernel, s.stride, dilation, detector, after):
            detect_now = detector.scorer.seconds
            self.stats.stat_update("decode_seconds", time.perf_counter() - started - (detect_now - detect_before))
            self.stats.stat_update("detect_seconds", detect_now - detect_before)
            detect_before = detect_now
            self.stats.stat_update("windows_decoded")
            self._hand_over(window)
            started = time.perf_counter()
        detect_now = detector.scorer.seconds
        self.stats.stat_update("decode_seconds", time.perf_counter() - started - (detect_now - detect_before))
        self.stats.stat_update("detect_seconds", detect_now - detect_before)
        self.stats.stat_update("frames_detected", detector.frames_pushed)

    def _record_shots(self, source: FrameSource, result: VideoResult, dilation: int) -> None:
        """result.shots, and with --shots detect the windows the shots hold and those cuts removed
        (result.windows comes in as the plain convolution's count over the decoded frames)."""
        s = self.settings
        if s.shots != "detect":
            result.shots = [[0, source.num_frames - 1]] if source.num_frames else []
            return
        result.shots = [[shot.first_frame, shot.last_frame] for shot in source.shots]
        plain = result.windows
        result.windows = sum(num_shot_windows(a, b, s.kernel, s.stride, dilation) for a, b in result.shots)
        result.windows_removed_by_cuts = plain - result.windows
        self.stats.stat_update("windows_removed_by_cuts", result.windows_removed_by_cuts)
        if plain and not result.windows:
            result.reason = "every shot is shorter than one window"

    # ------------------------------------------------------------------ stage 2: model

    def _model_loop(self) -> None:
        """Windows go into one batch per frame shape; a batch runs when full, so batches span
        video boundaries. Partial batches run when the decoder goes idle (_IDLE), when the input
        ends, or when a batch has waited while `STALE_BATCHES` batches' worth of windows of other
        shapes went by. A video's result is passed on right after its last sample."""
        batches = _Batches(self)
        while True:
            item = self._get(self._windows, "model_starved_seconds")
            try:
                if isinstance(item, WindowFrames):
                    batches.add(item)
                elif item is _IDLE or item is _STOP:
                    batches.run_all()
                    if item is _STOP:
                        self._to_writer(_STOP)
                        return
                elif isinstance(item, VideoResult):
                    batches.result(item)
                else:  # VideoStart: before any of its samples, which can only come later
                    self._to_writer(item)
            except DeviceFault as e:  # the device is gone: commit what is done, then the worker ends
                self._to_writer(_Fault(str(e)))
                return

    def _forward_parts(self, batch: list[WindowFrames], failed: dict[str, str]):
        """Run `batch` through the stage in parts of at most `self.batch_size` windows, yielding
        (part, samples), or (part, None) when the model failed on that part (its videos are then
        in `failed`).

        Out of memory: leave the except block (its traceback holds every tensor of the failed
        forward), free, retry with half the windows, and stay there until `grow_after` forwards
        went well, then double again (each failed growth doubles that wait). Any other error: the
        part's windows run again one at a time, so one bad window fails only its own video. A CUDA
        error that is not out-of-memory raises DeviceFault, as do MAX_CONSECUTIVE_FAILURES failed
        forwards in a row: a worker whose device is broken must end, not fail every video."""
        todo = list(batch)
        alone: set[int] = set()  # id() of windows to run one at a time after a failed part
        while todo:
            todo = [w for w in todo if w.video not in failed]
            if not todo:
                return
            size = 1 if id(todo[0]) in alone else min(self.batch_size, len(todo))
            part = todo[:size]
            started = time.perf_counter()
            outcome = self._attempt(part)
            if isinstance(outcome, list):
                todo = todo[size:]
                self._consecutive_failures = 0
                self._failing_videos.clear()
                self.stats.stat_update("model_seconds", time.perf_counter() - started)
                self.stats.stat_update("batches")
                self._after_good_forward()
                yield part, outcome
                continue
            kind, message = outcome
            self._consecutive_failures += kind != "oom" or size == 1  # halving is no failure yet
            # A video failed since the last good forward, and now another one fails too: the
            # worker, not the videos, is broken.
            if self._consecutive_failures >= MAX_CONSECUTIVE_FAILURES or (
                    self._failing_videos and any(w.video not in self._failing_videos for w in part)):
                raise DeviceFault(f"{self._consecutive_failures} failed forwards in a row, after "
                                  f"{len(self._failing_videos)} video(s) failed; the last: {message}")
            if kind == "oom":
                free_device_memory()  # outside the except block: the failed attempt is gone by now
                self.stats.stat_update("oom_batch_halvings")
                if size > 1:
                    if self._grown_recently:
                        self._grow_after = min(2 * self._grow_after, 1 << 16)
                    self.batch_size, self._good_forwards, self._grown_recently = max(1, size // 2), 0, False
                    continue
                message = f"out of memory on a single window: {message}"
            elif size > 1:
                alone.update(id(w) for w in part)
                continue
            for w in part:
                failed.setdefault(w.video, f"model failed: {message}")
                self._failing_videos.add(w.video)
            todo = todo[size:]
            yield part, None

    def _attempt(self, part: list[WindowFrames]):
        """The stage's samples, or ("oom" | "error", message). Nothing of a failed attempt outlives
        this call: the exception becomes a string inside the except block."""
        try:
            return self.stage(part)
        except Exception as e:
            kind = classify_error(e)
            message = f"{type(e).__name__}: {str(e).strip()[:300]}"
            if kind == "fatal":
                raise DeviceFault(message) from None
        return kind, message

    def _after_good_forward(self) -> None:
        self._grown_recently = False
        if self.batch_size >= self._max_batch:
            return
        self._good_forwards += 1
        if self._good_forwards >= self._grow_after:
            self.batch_size, self._good_forwards = min(self._max_batch, 2 * self.batch_size), 0
            self._grown_recently = True
            self.stats.stat_update("batch_growths")

    def _emit(self, part: list[WindowFrames], samples: list[Sample] | None, batches: "_Batches") -> None:
        """Pass a part's samples on in order; a video's held result follows its last sample."""
        for i, w in enumerate(part):
            if samples is not None:
                self._to_writer(samples[i], "model_blocked_seconds")
            batches.window_done(w.video)

    # ------------------------------------------------------------------ stage 3: write

    def _to_writer(self, item, blocked: str | None = None) -> None:
        """Hand `item` (Sample, VideoStart, VideoResult, _Fault or _STOP) to stage 3: queued for
        the writer thread (`blocked`: the counter of the time spent waiting for room), or, without
        one, put in the backlog, written here while it holds more than `backlog` items."""
        if self._samples is None:
            if item is not _STOP:
                self._backlog.append(item)
            # everything before the end or a fault is written before the model thread stops
            size = 0 if item is _STOP or isinstance(item, _Fault) else self._backlog_size
            while len(self._backlog) > size:
                self._write_backlog(blocking=True)
        elif blocked is not None:
            self._put(self._samples, item, blocked)
        else:
            self._samples.put(item)

    def _write_backlog(self, blocking: bool, counter: str | None = None) -> bool:
        """Without a writer thread: take the backlog's oldest item through stage 3. False when
        there is none (or, not blocking, the other thread is writing). Taking the item and writing
        it under one lock keeps stage 3 in order."""
        if not self._backlog or not self._stage3.acquire(blocking):
            return False
        try:
            if not self._backlog:
                return False
            try:
                self._write(self._backlog.popleft())
            except Exception as e:
                raise _WriteBug(f"{type(e).__name__}: {e}") from e
        finally:
            self._stage3.release()
        if counter is not None:
            self.stats.stat_update(counter)
        return True

    def _write_loop(self) -> None:
        while (item := self._get(self._samples, "write_starved_seconds")) is not _STOP:
            self._write(item)
            if isinstance(item, _Fault):  # the worker ends: nothing after it is written
                return

    def _write(self, item) -> None:
        """Stage 3 for one item, in order: a Sample is written (a failed write fails its video, not
        the worker), a VideoStart / VideoResult goes to the caller once everything before it is
        committed, a _Fault commits what is written and hands over to the worker."""
        failed, written = self._write_failed, self._written
        if isinstance(item, _Fault):
            self._device_fault(item.reason)
        elif isinstance(item, Sample):
            if item.video in failed:
                return
            started = time.perf_counter()
            try:
                self.writer.write(item)
            except OSError as e:
                failed[item.video] = f"write failed: {e}"
                return
            self.stats.stat_update("write_seconds", time.perf_counter() - started)
            self.stats.stat_update("samples_written")
            self.stats.stat_update("points_written", int(item.points.shape[0]))
            written[item.video] = written.get(item.video, 0) + 1
            self._events.put(("sample", item.video))
        elif isinstance(item, VideoStart):
            self._events.put(item)
        elif isinstance(item, VideoResult):
            try:
                self.writer.flush()  # tar shards: commit the open shard before the video is reported
            except OSError as e:
                failed.setdefault(item.video, f"write failed: {e}")
            if item.video in failed:
                item.status, item.reason = "failed", failed.pop(item.video)
            item.samples = written.pop(item.video, 0)
            self.stats.stat_update(f"videos_{item.status}")
            self._events.put(item)
            self._ended.set()

    def _device_fault(self, reason: str) -> None:
        """Everything before the fault is written: commit it, then hand over to the worker."""
        self.device_fault = reason
        self.stats.stat_update("device_faults")
        try:
            self.writer.flush()
        finally:
            if self._on_device_fault is not None:
                self._on_device_fault(reason)
            self._fatal = DeviceFault(reason)
            self._ended.set()
