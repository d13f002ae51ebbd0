"""Frame source: decode each needed frame of a video once, in order, and hand out windows.

video file --PyAV--> upright uint8 frames --resize like VGGT's loader--> windows of frames

Only frames that some window needs are kept, and only while a later window still needs them,
so memory is bounded by one window's span, never by the video's length.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from window import Window, WindowPlanner

MODEL_SIZE = 518  # VGGT's training resolution (long side / width)
PATCH = 14  # VGGT's patch size: model H and W are multiples of it


class DecodeError(RuntimeError):
    """The video cannot be opened or decoded; the message says why, in one line."""


@dataclass(frozen=True)
class VideoInfo:
    """What opening a video tells, before decoding it. `num_frames` is the container's count (its
    packets): a hint for planning and progress, never the definition of a frame. Frame i is the
    i-th frame the decoder outputs (`FrameSource.num_frames` once the stream has ended)."""

    path: str
    num_frames: int  # packets the container lists (an estimate of the decoded count)
    fps: float
    width: int  # upright: the container's display matrix (phone videos) is applied
    height: int
    timestamps_from_container: bool  # False: container timestamps were garbage, index / fps used
    count_exact: bool = False  # the packet index is trusted: num_frames is the decoded count, seeks land exactly


@dataclass(frozen=True)
class Grid:
    """How a WxH upright frame maps onto the model's pixel grid (VGGT's load_and_preprocess_images)."""

    resize_w: int
    resize_h: int
    crop_top: int  # rows cut from the top of the resized frame ("crop" mode)
    pad_top: int  # white rows / cols added ("pad" mode)
    pad_left: int
    height: int  # final model-grid size, multiples of 14
    width: int


@dataclass
class WindowFrames:
    """One window ready for the model: frames in time order, focal frame in the middle."""

    video: str
    window: Window
    dilation: int
    frames: torch.Tensor  # uint8 [S, H, W, 3], model grid, RGB
    timestamps: tuple[float, ...]  # seconds, one per frame, time order
    fps: float
    shot_index: int = 0  # the shot (segment) the window lies in; 0 with shots off
    shot_first_frame: int = 0  # first frame of that shot (inclusive)
    shot_last_frame: int = -1  # last frame of the shot (inclusive); -1: not known yet when handed out


def model_grid(width: int, height: int, mode: str = "crop") -> Grid:
    """VGGT's loader geometry: crop = width 518, height scaled and rounded to a multiple of 14,
    centre-cropped to 518 if taller; pad = long side 518, short side a multiple of 14, white-padded
    to 518x518."""
    if mode == "crop" or width >= height:
        resize_w = MODEL_SIZE
        resize_h = round(height * (MODEL_SIZE / width) / PATCH) * PATCH
    else:
        resize_h = MODEL_SIZE
        resize_w = round(width * (MODEL_SIZE / height) / PATCH) * PATCH
    if mode == "crop":
        crop_top = max(0, (resize_h - MODEL_SIZE) // 2)
        return Grid(resize_w, resize_h, crop_top, 0, 0, min(resize_h, MODEL_SIZE), resize_w)
    if mode == "pad":
        pad_top, pad_left = (MODEL_SIZE - resize_h) // 2, (MODEL_SIZE - resize_w) // 2
        return Grid(resize_w, resize_h, 0, pad_top, pad_left, MODEL_SIZE, MODEL_SIZE)
    raise ValueError(f"resize mode must be 'crop' or 'pad', got {mode!r}")


def to_model_grid(frames: torch.Tensor, grid: Grid) -> torch.Tensor:
    """uint8 [N, h, w, 3] upright frames -> uint8 [N, grid.height, grid.width, 3].

    torch's antialiased bicubic on uint8 matches PIL's BICUBIC resize (VGGT's) within 1/255 and is
    ~10x faster; it must run on uint8 (converting to float first costs ~10x more memory traffic).
    """
    x = frames.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(grid.resize_h, grid.resize_w), mode="bicubic", antialias=True)
    if grid.crop_top or grid.resize_h > grid.height:
        x = x[:, :, grid.crop_top : grid.crop_top + grid.height]
    if grid.pad_top or grid.pad_left:
        pad_bottom = grid.height - grid.resize_h - grid.pad_top
        pad_right = grid.width - grid.resize_w - grid.pad_left
        x = F.pad(x, (grid.pad_left, pad_right, grid.pad_top, pad_bottom), value=255)
    return x.permute(0, 2, 3, 1).contiguous()




def _clean_timestamps(raw: np.ndarray, fps: float) -> tuple[list[float], bool]:
    """Container start times, or index / fps when they are garbage (some AVIs report -3.8e17)."""
    n = len(raw)
    fallback = [i / fps for i in range(n)]
    if n == 0 or not np.all(np.isfinite(raw)):
        return fallback, False
    if raw.min() < -1e-3 or np.any(np.diff(raw) < 0) or raw.max() > 10 * (n / fps) + 10:
        return fallback, False
    return [float(t) for t in raw], True


# Demuxers with a complete packet index whose packets are whole frames carrying their own
# presentation timestamps (MP4/MOV/3GP family, Matroska/WebM): with unique timestamps, a frame's pts
# tells its index, so a seek can be checked. Other containers (MPEG-PS/TS, AVI, FLV, ASF, Ogg, ...)
# are decoded through: their packets may be partial, packed (AVI B-frames), or lack timestamps.
INDEXED_FORMATS = ("mov", "matroska")


@dataclass
class _Probe:
    stream: int  # index of the video stream decoded (the one the ffmpeg program picks)
    packets: int  # non-empty packets not marked discard: the container's frame count
    fps: float
    time_base: float
    start: int  # stream start time, in time_base units
    sorted_pts: list[int] | None  # packet pts in presentation order (None: missing or duplicated)
    keys: list[int]  # indices (in sorted_pts) of keyframes, always starting with 0
    indexed: bool  # seeks can land exactly and `packets` is the decoded count (see INDEXED_FORMATS)
    damaged: bool  # the demuxer flagged a packet corrupt (e.g. the partial last packet of a cut file)
    raw_times: np.ndarray
    width: int
    height: int
    turns: int  # quarter turns counter-clockwise that make frames upright


class FrameSource:
    """Opens one video with PyAV; `windows()` yields WindowFrames, decoding each needed frame once.

    Frame i is the i-th frame the decoder outputs, in presentation order, exactly as
    `ffmpeg -fps_mode passthrough` counts them. The container's packet count and timestamps are
    hints: the count for planning and progress, the timestamps for seeking. Windows are planned on
    what decodes (window.WindowPlanner), so the last windows are decided when the stream ends.

    Decoding runs in the caller's thread, one frame at a time, so memory holds only the frames a
    pending window still needs (plus the codec's few reference frames). decord 0.6.0 is not used
    for this: its threaded reader pushes every packet of the file to its decode thread as soon as
    reading starts and queues all decoded full-resolution RGB frames, so memory grows with the
    video's length (a 3 s 1080p clip: +570 MB; see tests/test_frames.py::test_memory_*).

    Seeking (resume, long strides) is used only in indexed containers (INDEXED_FORMATS, unique
    packet pts, the first decoded frame is the first listed): the frame a seek lands on is named by
    its pts, every later frame's pts must match the next index, and any doubt (unknown pts,
    overshoot, a mismatch) decodes again from the start, where counting is the definition.

    `frames_decoded` counts frames handed over by the decoder (the benchmark compares it with
    window.needed_frames). `num_frames` is the decoded count once a pass reached the end of the
    stream (None before). `num_threads` is the codec's thread count (0: FFmpeg picks).
    """

    def __init__(self, path: str, resize_mode: str = "crop", num_threads: int = 0):
        try:
            import av
        except ImportError as e:  # pragma: no cover - PyAV is a hard requirement
            raise ImportError("PyAV is not installed: pip install av") from e
        if not hasattr(av.VideoFrame, "rotation"):  # pragma: no cover
            raise ImportError(f"PyAV {av.__version__} cannot read a video's rotation: pip install 'av>=14.2'")
        self.path = path
        self._num_threads = num_threads
        self._container = None  # open while windows() decodes
        self._decoder = None  # iterator over decoded av.VideoFrame, presentation order
        try:
            probe = _probe(path)
        except DecodeError:
            raise
        except Exception as e:  # av.FFmpegError, OSError, ...
            raise DecodeError(f"cannot open video: {_one_line(e)}") from e
        if not (probe.fps > 0 and math.isfinite(probe.fps)):
            raise DecodeError(f"video reports a frame rate of {probe.fps}")
        self._probe = probe
        self._rank = {p: i for i, p in enumerate(probe.sorted_pts)} if probe.indexed else None
        _, from_container = _clean_timestamps(probe.raw_times, probe.fps)
        self.info = VideoInfo(path, probe.packets, probe.fps, probe.width, probe.height, from_container,
                              probe.indexed and not probe.damaged)
        self.grid = model_grid(probe.width, probe.height, resize_mode)
        self.frames_decoded = 0
        self.num_frames: int | None = None
        self.seeks = 0  # seeks done (each checked), and how many of them fell back to the start
        self.seek_fallbacks = 0

    def windows(self, kernel: int, stride: int, dilation: int, after_focal: int = -1) -> Iterator[WindowFrames]:
        """Windows in increasing focal order; frames decoded in increasing index order, once each.

        A window is handed out as soon as its last frame has decoded; the windows of the stream's end
        are decided when it ends. Kept frames: those a pending window needs, at most one window
        span, on the model grid (each frame is resized as soon as it is decoded).
        """
        # In an indexed container the packet count is the decoded count: windows past it are not
        # planned (no frame decoded for a window that cannot fit) unless the stream proves longer.
        planner = WindowPlanner(kernel, stride, dilation, after_focal,
                                expected_end=self.info.num_frames if self.info.count_exact else None)
        kept: dict[int, torch.Tensor] = {}  # frame index -> uint8 [H, W, 3] on the model grid
        times: dict[int, float] = {}
        try:
            to_rgb = _ToRGB()
            for index, frame, t in self._needed_frames(planner):
                if index in times:  # handed over again after a restart
                    continue
                kept[index] = self._on_model_grid(to_rgb(frame))
                times[index] = t
                due = planner.next_window_last()
                if due is not None and index < due:  # no window is complete yet
                    continue
                yield from self._hand_out(planner, index, kept, times, dilation)
            planner.end_stream(self.num_frames)
            yield from self._hand_out(planner, self.num_frames - 1, kept, times, dilation)
        finally:
            self._stop()

    def shot_windows(self, kernel: int, stride: int, dilation: int, detector, after_focal: int = -1
                     ) -> Iterator[WindowFrames]:
        """Windows of each shot (shots.ShotDetector finds them while the video decodes), each shot
        treated like a video of its own (window.shot_windows); increasing focal order.

        Every frame is decoded, counted from the start (no seeking past unneeded stretches: the
        detector needs them all, in order), and its 48x27 copy goes to the detector. A frame's shot is
        known only the detector's lookahead (about 80 frames) after it decoded, so frames a window
        may need are kept on the model grid until then: memory is bounded by lookahead + one window
        span, never by video length. After the loop, `self.shots` holds the video's shots and
        `self.num_frames` its decoded count. Windows with focal <= after_focal (resume) are skipped;
        the detector still sees every frame, so the shots are the same."""
        from shots import small_copy, upright_small
        from window import shot_windows

        half_span = (kernel // 2) * dilation
        turns = self._probe.turns
        kept: dict[int, torch.Tensor] = {}  # frame index -> uint8 [H, W, 3] on the model grid
        times: dict[int, float] = {}
        emitted: dict[int, int] = {}  # first frame of a shot -> last focal handed out
        done = 0  # shots before this one have handed out all their windows
        self.shots = []
        self.max_frames_held = 0  # model-grid frames held at once (memory check in tests)

        def ready() -> Iterator[WindowFrames]:
            nonlocal done
            spans = [(s.first_frame, s.last_frame, s.index, s.last_frame) for s in detector.shots[done:]]
            if detector.open_shot is not None:
                spans.append((detector.open_shot, detector.final_upto - 1, len(detector.shots), -1))
            for first, last, index, known_last in spans:
                after = max(after_focal, emitted.get(first, -1))
                for window in shot_windows(first, last, kernel, stride, dilation, after):
                    emitted[first] = window.focal_frame
                    yield WindowFrames(
                        video=self.path, window=window, dilation=dilation,
                        frames=torch.stack([kept[i] for i in window.frame_indices]),
                        timestamps=tuple(times[i] for i in window.frame_indices),
                        fps=self.info.fps, shot_index=index, shot_first_frame=first, shot_last_frame=known_last)
                if known_last >= 0:
                    done = index + 1
                    emitted.pop(first, None)
            # no later window needs a frame before the fate frontier and before the open shot's next window
            keep_from = detector.final_upto
            if detector.open_shot is not None:
                next_first = emitted.get(detector.open_shot, -1) + stride - half_span
                keep_from = min(keep_from, max(detector.open_shot, next_first))
            self.max_frames_held = max(self.max_frames_held, len(kept))
            for i in [i for i in kept if i < keep_from]:
                del kept[i]
            for i in [i for i in times if i < keep_from]:
                del times[i]

        try:
            to_rgb = _ToRGB()
            for index, frame, t in self._every_frame():
                detector.push(upright_small(small_copy(frame), turns))
                times[index] = t
                if index + half_span > after_focal:  # a window still to write may use this frame
                    kept[index] = self._on_model_grid(to_rgb(frame))
                yield from ready()
            detector.finish()
            yield from ready()
            self.shots = list(detector.shots)
        finally:
            self._stop()

    def _every_frame(self):
        """(index, av.VideoFrame, seconds) of every frame, counted from the start of the stream (no
        seeking: the shot detector sees each frame once, in order); sets self.num_frames at the end."""
        probe = self._probe
        self._start()
        index, last_time = 0, None
        while True:
            frame = self._read(index)
            if frame is None:
                if probe.indexed and probe.damaged and index < probe.packets:  # a truncated download
                    raise DecodeError(f"video ended after {index} of the {probe.packets} frames its index "
                                      f"lists (a truncated or damaged file)")
                self.num_frames = index
                return
            last_time = self._time_of(frame, index, last_time)
            yield index, frame, last_time
            index += 1

    def _on_model_grid(self, rgb: np.ndarray) -> torch.Tensor:
        """One decoded uint8 [h, w, 3] frame -> upright, on the model grid, uint8 [H, W, 3]; counted
        in frames_decoded. Resized as soon as it is decoded, alone: batching frames for the resize
        only added a stacked copy of the full-size frames (0.14 ms a 720p frame) and held up to 8 of
        them (22 MB at 720p), while the resize loops over frames anyway (NOTES.md, issue 12)."""
        turns = self._probe.turns
        upright = np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb
        self.frames_decoded += 1
        return to_model_grid(torch.from_numpy(upright)[None], self.grid)[0]

    def _hand_out(self, planner: WindowPlanner, arrived: int, kept: dict[int, torch.Tensor],
                  times: dict[int, float], dilation: int) -> Iterator[WindowFrames]:
        for window in planner.ready(arrived):
            yield WindowFrames(
                video=self.path,
                window=window,
                dilation=dilation,
                frames=torch.stack([kept[i] for i in window.frame_indices]),
                timestamps=tuple(times[i] for i in window.frame_indices),
                fps=self.info.fps,
            )
        first = planner.keep_from()  # frames before it are never needed again
        for i in [i for i in kept if i < first]:
            del kept[i]
            del times[i]

    def _needed_frames(self, planner: WindowPlanner):
        """(index, av.VideoFrame, seconds) of every frame the planner needs, in index order, each
        once; sets self.num_frames when the stream ends."""
        probe = self._probe
        seekable = probe.indexed
        self._start()
        next_index: int | None = 0  # index of the next frame out of the decoder (None: after a seek)
        from_start = True  # frames counted from the start of the stream (no seek since)
        position = 0  # frames below it were handed over or are not needed
        want = 0
        sought = 0  # the last keyframe sought: seeks only go forward (one landing early is not redone)
        last_time: float | None = None
        while True:
            if seekable and next_index is not None:
                want = planner.next_needed(position)  # None: no frame needed before the end
                key = probe.keys[-1 if want is None else bisect.bisect_right(probe.keys, want) - 1]
                if key > next_index and key > sought:  # whole GOPs nobody needs: jump over them
                    sought = key
                    self._seek(probe.sorted_pts[key])
                    self.seeks += 1
                    next_index, from_start, last_time = None, False, None
            frame = self._read(position)
            if frame is None:
                if next_index is None:  # a seek found nothing: count from the start instead
                    seekable, next_index, from_start, last_time = self._fall_back()
                    continue
                if probe.indexed and probe.damaged and next_index < probe.packets:  # a truncated download
                    raise DecodeError(f"video ended after {next_index} of the {probe.packets} frames its index "
                                      f"lists (a truncated or damaged file)")
                self.num_frames = next_index
                return
            if seekable:
                rank = self._rank.get(frame.pts)
                if next_index is None:  # the first frame after a seek: its pts names it
                    if rank is None or (want is not None and rank > want):
                        seekable, next_index, from_start, last_time = self._fall_back()
                        continue
                    next_index = rank
                elif rank != next_index:  # pts and output order disagree: pts name nothing
                    if not from_start:
                        seekable, next_index, from_start, last_time = self._fall_back()
                        continue
                    seekable = False  # counting from the start is the definition: go on counting
            index = next_index
            next_index += 1
            last_time = self._time_of(frame, index, last_time)
            if planner.expected_end is not None and index >= planner.expected_end:
                planner.expected_end = None  # the stream is longer than its index says: plan on it
                if any(planner.needed(i) for i in range(planner.keep_from(), index)):  # frames let pass
                    position = planner.keep_from()
                    seekable, next_index, from_start, last_time = self._fall_back()
                    continue
            if index < position:
                continue
            position = index + 1
            if planner.needed(index):
                yield index, frame, last_time

    def _fall_back(self):
        """A seek could not be verified: decode again from the start, counting, without seeking."""
        self.seek_fallbacks += 1
        self._stop()
        self._start()
        return False, 0, True, None

    def _time_of(self, frame, index: int, previous: float | None) -> float:
        """Seconds from the stream's start: the frame's own pts while those increase and stay sane,
        else the previous frame's time + 1/fps (AVIs with packed B-frames hand out pts out of order,
        some AVIs report -3.8e17)."""
        fps = self.info.fps
        if frame.pts is not None:
            t = (frame.pts - self._probe.start) * self._probe.time_base
            if math.isfinite(t) and -1e-3 <= t <= 10 * (index + 1) / fps + 10 and (previous is None or t > previous):
                return max(0.0, t)
        return index / fps if previous is None else previous + 1 / fps

    def _read(self, index: int):
        try:
            return next(self._decoder, None)
        except Exception as e:  # av.FFmpegError from a corrupt or truncated file
            raise DecodeError(f"cannot decode frame {index}: {_one_line(e)}") from e

    def _start(self) -> None:
        """Open the file and decode from its beginning."""
        import av

        try:
            self._container = av.open(self.path)
            stream = self._container.streams[self._probe.stream]
            stream.thread_type = "AUTO"
            stream.thread_count = self._num_threads
            self._decoder = self._container.decode(stream)
        except Exception as e:
            self._stop()
            raise DecodeError(f"cannot open video: {_one_line(e)}") from e

    def _seek(self, pts: int) -> None:
        """Decode from the keyframe at or before `pts` (the frame that comes out is checked)."""
        stream = self._container.streams[self._probe.stream]
        try:
            self._container.seek(pts, stream=stream, backward=True)
        except Exception as e:
            raise DecodeError(f"cannot seek: {_one_line(e)}") from e
        self._decoder = self._container.decode(stream)

    def _stop(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._decoder = None

    def close(self) -> None:
        self._stop()

    def count_frames(self) -> int:
        """The decoded frame count: the container's when its index is trusted (info.count_exact),
        else counted by decoding every frame (no colour conversion). DecodeError on a damaged file."""
        if self.info.count_exact:
            return self.info.num_frames
        if self.num_frames is None:
            count = 0
            self._start()
            try:
                while self._read(count) is not None:
                    count += 1
            finally:
                self._stop()
            probe = self._probe
            if probe.indexed and probe.damaged and count < probe.packets:
                raise DecodeError(f"video ended after {count} of the {probe.packets} frames its index lists "
                                  f"(a truncated or damaged file)")
            self.num_frames = count
        return self.num_frames


class _ToRGB:
    """Decoded av.VideoFrame -> uint8 [H, W, 3] RGB, converted as the ffmpeg program converts it.

    8-bit 4:2:0 goes through swscale's direct YUV->RGB path (identical either way, and fastest);
    other formats (10-bit, 4:2:2, 4:1:1 DV, ...) through FFmpeg's own format filter, as the ffmpeg
    program's auto-inserted scaler does: a plain swscale call interpolates chroma differently
    (up to 120/255 apart at sharp colour edges of 10-bit HEVC, 154/255 for DV).

    The conversion runs in the calling thread (swscale threads = 1, the same pixels). PyAV 17+
    otherwise splits each frame over one swscale thread per core: measured on 2 cores, 720p, the
    decode thread then waited ~1.5 ms a frame for those threads whenever the model and writer
    threads had the cores (0.2 ms alone), and ran no faster alone either (NOTES.md, issue 12)."""

    DIRECT = ("yuv420p", "yuvj420p")

    def __init__(self):
        import av

        self._graph = None
        self._key = None
        self._options = {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}  # older: 1 anyway

    def __call__(self, frame) -> np.ndarray:
        if frame.format.name in self.DIRECT:
            return frame.to_ndarray(format="rgb24", **self._options)
        import av.filter
        from fractions import Fraction

        key = (frame.format.name, frame.width, frame.height)
        if key != self._key:  # (re)built when the stream changes format or size
            graph = av.filter.Graph()
            if self._options and hasattr(type(graph), "threads"):
                graph.threads = 1  # before any filter is added; the same reason as above
            source = graph.add_buffer(width=frame.width, height=frame.height, format=frame.format,
                                      time_base=frame.time_base or Fraction(1, 25))
            convert = graph.add("format", "rgb24")
            sink = graph.add("buffersink")
            source.link_to(convert)
            convert.link_to(sink)
            graph.configure()
            self._graph, self._key = graph, key
        self._graph.push(frame)
        return self._graph.pull().to_ndarray()


def _video_stream(container):
    """The video stream the ffmpeg program picks by default: the largest picture, skipping cover art
    (attached pictures); the first of equals."""
    import av

    streams = [s for s in container.streams.video
               if not (s.disposition & av.stream.Disposition.attached_pic)] or list(container.streams.video)
    if not streams:
        raise DecodeError("file has no video stream")
    return max(streams, key=lambda s: (s.codec_context.width or 0) * (s.codec_context.height or 0))


def _probe(path: str) -> _Probe:
    """One demux pass (no decoding) for the packet count, timestamps and keyframes, then the first
    frame decoded for its upright size."""
    import av

    with av.open(path) as container:
        stream = _video_stream(container)
        stream_index = stream.index
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else float("nan")
        time_base = float(stream.time_base) if stream.time_base else float("nan")
        start = stream.start_time or 0
        format_name = container.format.name.split(",")[0]
        # discarded packets (an edit list cutting into a GOP, e.g. a clip trimmed by stream copy)
        # are decoded for reference only and never shown: not frames of the video
        packets, damaged = [], False
        for p in container.demux(stream):
            damaged = damaged or p.is_corrupt
            if p.size > 0 and not p.is_discard:
                packets.append((p.pts, p.is_keyframe))
    if not packets:
        raise DecodeError("video has no frames")
    pts = [p for p, _ in packets]
    sorted_pts, keys, raw = None, [0], np.full(len(pts), np.nan)
    if all(p is not None for p in pts) and len(set(pts)) == len(pts):
        sorted_pts = sorted(pts)
        rank = {p: i for i, p in enumerate(sorted_pts)}
        keys = sorted({0} | {rank[p] for p, key in packets if key})
        raw = (np.asarray(sorted_pts, dtype=np.float64) - start) * time_base
    if not (fps > 0 and math.isfinite(fps)) and sorted_pts is not None and len(sorted_pts) > 1:
        fps = (len(sorted_pts) - 1) / ((sorted_pts[-1] - sorted_pts[0]) * time_base)  # no rate given: from the pts
    with av.open(path) as container:
        first = next(container.decode(container.streams[stream_index]), None)
    if first is None:
        raise DecodeError("no frame of the video can be decoded")
    indexed = (format_name in INDEXED_FORMATS and sorted_pts is not None and first.pts == sorted_pts[0]
               and math.isfinite(time_base))
    # PyAV's rotation: counter-clockwise degrees from the display matrix (phone videos)
    turns = round((getattr(first, "rotation", 0) or 0) / 90) % 4
    width, height = (first.height, first.width) if turns % 2 else (first.width, first.height)
    return _Probe(stream_index, len(packets), fps, time_base, start, sorted_pts if indexed else None, keys if indexed else [0],
                  indexed, damaged, raw, width, height, turns)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]
