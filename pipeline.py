"""One worker's pipeline: three stages that overlap, joined by bounded queues.

    tasks --[decode thread]--> windows --[model thread]--> samples --[writer thread]--> files
          FrameSource           bounded   GeometryStage,    bounded   ShardedWriter
          (decode + resize)               B per forward               (encode + commit)

The decode thread runs ahead by at most `prefetch_windows` windows, across the end of one video
into the next, so the model never waits for a video to open. Markers (VideoStart / VideoEnd) travel
through the same queues as the data, so a video's end reaches the writer after its last sample.
Memory is flat: every queue is bounded and frames travel as uint8.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

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


class Pipeline:
    """Feed it VideoTasks with submit(); poll() returns what happened since the last poll."""

    def __init__(self, stage: GeometryStage, writer: ShardedWriter, settings: WindowSettings,
                 batch_size: int = 4, prefetch_windows: int = 16, stats: Stats | None = None,
                 shot_model=None):
        self.stage, self.writer, self.settings = stage, writer, settings
        if settings.shots not in ("detect", "off"):
            raise ValueError(f"shots must be 'detect' or 'off', got {settings.shots!r}")
        if settings.shots == "detect" and shot_model is None:
            from shots import load_transnetv2

            shot_model = load_transnetv2("cpu")
        self.shot_model = shot_model  # TransNetV2 on the worker's device (shots.load_transnetv2)
        self.batch_size = batch_size
        self.stats = stats or Stats()
        if hasattr(stage, "stats"):  # GeometryStage splits its time into forward / post-processing
            stage.stats = self.stats
        self._tasks: queue.Queue = queue.Queue()
        self._windows: queue.Queue = queue.Queue(maxsize=prefetch_windows)
        self._samples: queue.Queue = queue.Queue(maxsize=max(2, 2 * batch_size))
        self._events: queue.Queue = queue.Queue()  # VideoStart / VideoResult for the caller
        self._fatal: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._guard, args=(self._decode_loop,), name="decode", daemon=True),
            threading.Thread(target=self._guard, args=(self._model_loop,), name="model", daemon=True),
            threading.Thread(target=self._guard, args=(self._write_loop,), name="write", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ caller side

    def submit(self, task: VideoTask) -> None:
        self._tasks.put(task)

    def poll(self, timeout: float = 0.5) -> list:
        """Events since the last call (VideoStart, VideoResult), waiting up to `timeout` for one."""
        events = []
        try:
            events.append(self._events.get(timeout=timeout))
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
            t.join()
        self.writer.close()
        if self._fatal is not None:
            raise RuntimeError(f"pipeline stopped: {self._fatal!r}") from self._fatal

    def _put(self, q: queue.Queue, item, blocked: str) -> None:
        """q.put(item), counting the seconds spent waiting for room (the next stage is slower)."""
        try:
            q.put_nowait(item)
        except queue.Full:
            started = time.perf_counter()
            q.put(item)
            self.stats.stat_update(blocked, time.perf_counter() - started)

    def _get(self, q: queue.Queue, starved: str):
        """q.get(), counting the seconds spent waiting for an item (the previous stage is slower)."""
        try:
            return q.get_nowait()
        except queue.Empty:
            started = time.perf_counter()
            item = q.get()
            self.stats.stat_update(starved, time.perf_counter() - started)
            return item

    def _guard(self, loop) -> None:
        try:
            loop()
        except BaseException as e:  # a bug, not bad input: surface it through poll()
            self._fatal = e
            raise

    # ------------------------------------------------------------------ stage 1: decode

    def _decode_loop(self) -> None:
        while (task := self._tasks.get()) is not _STOP:
            self._decode_video(task)
        self._windows.put(_STOP)

    def _decode_video(self, task: VideoTask) -> None:
        s = self.settings
        result = VideoResult(task.video, "done")
        started = time.perf_counter()
        try:
            source = FrameSource(task.video, s.resize_mode)
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
                started = time.perf_counter()
                for window in source.windows(s.kernel, s.stride, dilation, after):
                    self.stats.stat_update("decode_seconds", time.perf_counter() - started)
                    self.stats.stat_update("windows_decoded")
                    self._put(self._windows, window, "decode_blocked_seconds")
                    started = time.perf_counter()
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
            self._put(self._windows, window, "decode_blocked_seconds")
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
        batch: list[WindowFrames] = []
        failed: dict[str, str] = {}
        while True:
            item = self._get(self._windows, "model_starved_seconds")
            if isinstance(item, WindowFrames):
                if item.video in failed:
                    continue
                if batch and item.frames.shape != batch[0].frames.shape:
                    self._run_batch(batch, failed)
                    batch = []
                batch.append(item)
                if len(batch) >= self.batch_size:
                    self._run_batch(batch, failed)
                    batch = []
                continue
            if batch:  # a marker or the end: finish what is pending first, keeping order
                self._run_batch(batch, failed)
                batch = []
            if isinstance(item, VideoResult) and item.video in failed:
                item.status, item.reason = "failed", failed.pop(item.video)
            self._samples.put(item)
            if item is _STOP:
                return

    def _run_batch(self, batch: list[WindowFrames], failed: dict[str, str]) -> None:
        started = time.perf_counter()
        try:
            samples = self._forward(batch)
        except Exception as e:  # the model failed on these windows: their videos fail, others go on
            for w in batch:
                failed.setdefault(w.video, f"model failed: {type(e).__name__}: {str(e).strip()[:300]}")
            return
        self.stats.stat_update("model_seconds", time.perf_counter() - started)
        self.stats.stat_update("batches")
        for sample in samples:
            self._put(self._samples, sample, "model_blocked_seconds")

    def _forward(self, batch: list[WindowFrames]) -> list[Sample]:
        try:
            return self.stage(batch)
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
            torch.cuda.empty_cache()
            self.batch_size = max(1, len(batch) // 2)  # stay smaller for the rest of the run
            self.stats.stat_update("oom_batch_halvings")
            half = len(batch) // 2
            return self._forward(batch[:half]) + self._forward(batch[half:])

    # ------------------------------------------------------------------ stage 3: write

    def _write_loop(self) -> None:
        failed: dict[str, str] = {}
        written: dict[str, int] = {}
        while (item := self._get(self._samples, "write_starved_seconds")) is not _STOP:
            if isinstance(item, Sample):
                if item.video in failed:
                    continue
                started = time.perf_counter()
                try:
                    self.writer.write(item)
                except OSError as e:
                    failed[item.video] = f"write failed: {e}"
                    continue
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

