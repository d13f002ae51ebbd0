"""Frame source: decode each needed frame of a video once, in order, and hand out windows.

video file --PyAV--> upright uint8 frames --resize like VGGT's loader--> windows of frames

Only frames that some window needs are kept, and only while a later window still needs them,
so memory is bounded by one window's span, never by the video's length.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from window import Window, windows

MODEL_SIZE = 518  # VGGT's training resolution (long side / width)
PATCH = 14  # VGGT's patch size: model H and W are multiples of it
READ_CHUNK = 8  # frames resized per call: amortises call overhead, bounds full-res memory


class DecodeError(RuntimeError):
    """The video cannot be opened or decoded; the message says why, in one line."""


@dataclass(frozen=True)
class VideoInfo:
    path: str
    num_frames: int
    fps: float
    width: int  # upright: the container's display matrix (phone videos) is applied
    height: int
    timestamps_from_container: bool  # False: container timestamps were garbage, index / fps used


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
    shot_index: int = 0  # the shot's index in the video (0 with --shots off)
    shot_first_frame: int = 0  # first frame of the shot, inclusive
    shot_last_frame: int = -1  # last frame of the shot, inclusive; -1: the shot had not ended yet


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


class FrameSource:
    """Opens one video with PyAV; `windows()` yields WindowFrames, decoding each needed frame once.

    Decoding runs in the caller's thread, one frame at a time, so memory holds only the frames a
    pending window still needs (plus the codec's few reference frames). decord 0.6.0 is not used
    for this: its threaded reader pushes every packet of the file to its decode thread as soon as
    reading starts and queues all decoded full-resolution RGB frames, so memory grows with the
    video's length (a 3 s 1080p clip: +570 MB; see tests/test_frames.py::test_memory_*).

    `frames_decoded` counts frames handed over by the decoder (the benchmark compares it with
    window.needed_frames). `num_threads` is the codec's thread count (0: FFmpeg picks).
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
        self._next_index = 0  # index of the frame the decoder hands over next (at least)
        self._may_seek = True
        try:
            probe = _probe(path)
        except DecodeError:
            raise
        except Exception as e:  # av.FFmpegError, OSError, ...
            raise DecodeError(f"cannot open video: {_one_line(e)}") from e
        num_frames, fps, raw, self._rank, self._sorted_pts, self._keys, width, height, self._turns = probe
        if not (fps > 0 and math.isfinite(fps)):
            raise DecodeError(f"video reports a frame rate of {fps}")
        self._timestamps, from_container = _clean_timestamps(raw, fps)
        if not from_container:  # timestamps are garbage: frames are identified by decode order
            self._rank = None
        self.info = VideoInfo(path, num_frames, fps, width, height, from_container)
        self.grid = model_grid(width, height, resize_mode)
        self.frames_decoded = 0

    def windows(self, kernel: int, stride: int, dilation: int, after_focal: int = -1) -> Iterator[WindowFrames]:
        """Windows in increasing focal order; frames decoded in increasing index order, once each.

        Before decoding up to a window's last frame, every later window starting at or before that
        frame is looked at too, so the frames they need below it are decoded in the same pass
        (with dilation > stride, later windows reach back between the frames of earlier ones).
        """
        upcoming = windows(self.info.num_frames, kernel, stride, dilation, after_focal)
        scheduled: deque[Window] = deque()  # windows whose frames are pending or kept
        pending: set[int] = set()  # needed frame indices not decoded yet
        kept: dict[int, torch.Tensor] = {}  # frame index -> uint8 [H, W, 3] on the model grid
        exhausted = False
        try:
            while True:
                if not scheduled:
                    if exhausted or (first := next(upcoming, None)) is None:
                        return
                    scheduled.append(first)
                    pending.update(first.frame_indices)
                window = scheduled[0]
                last = window.frame_indices[-1]
                while not exhausted and scheduled[-1].frame_indices[0] <= last:
                    later = next(upcoming, None)
                    if later is None:
                        exhausted = True
                    else:
                        scheduled.append(later)
                        pending.update(later.frame_indices)
                due = sorted(i for i in pending if i <= last)
                pending.difference_update(due)
                self._decode_into(due, kept)
                scheduled.popleft()
                yield WindowFrames(
                    video=self.path,
                    window=window,
                    dilation=dilation,
                    frames=torch.stack([kept[i] for i in window.frame_indices]),
                    timestamps=tuple(self._timestamps[i] for i in window.frame_indices),
                    fps=self.info.fps,
                )
                # The next window starts `stride` frames later: frames before it are never needed again.
                next_first = window.frame_indices[0] + stride
                for i in [i for i in kept if i < next_first]:
                    del kept[i]
        finally:
            self._stop()

    def shot_windows(self, kernel: int, stride: int, dilation: int, detector, after_focal: int = -1
                     ) -> Iterator[WindowFrames]:
        """Windows of each shot (shots.ShotDetector finds them while the video decodes), each shot
        treated like a video of its own (window.shot_windows); increasing focal order.

        Every frame is decoded (no seeking past unneeded stretches: the detector needs them all) and
        its small copy goes to the detector. A frame's shot is known only `detector`'s lookahead
        (about 80 frames) after it decoded, so frames that a window may need are kept on the model
        grid until then: memory is bounded by lookahead + one window span, never by video length.
        After the loop, `self.shots` holds the video's shots. Windows with focal <= after_focal
        (resume) are skipped; the detector still sees every frame, so shots are the same."""
        from shots import small_copy, upright_small
        from window import shot_windows

        half_span = (kernel // 2) * dilation
        kept: dict[int, torch.Tensor] = {}  # frame index -> uint8 [H, W, 3] on the model grid
        batch: list[tuple[int, np.ndarray]] = []  # decoded, not yet resized (READ_CHUNK at a time)
        emitted: dict[int, int] = {}  # shot first frame -> last focal handed out
        self.shots = []
        self.max_frames_held = 0  # model-grid frames held at once (memory check in tests)

        done = 0  # shots before this one have handed out all their windows

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
                        timestamps=tuple(self._timestamps[i] for i in window.frame_indices),
                        fps=self.info.fps, shot_index=index, shot_first_frame=first, shot_last_frame=known_last)
                if known_last >= 0:
                    done = index + 1
                    emitted.pop(first, None)
            # frames no later window can need: before the fate frontier and before the open shot's next window
            keep_from = detector.final_upto
            if detector.open_shot is not None:
                keep_from = min(keep_from, max(detector.open_shot, emitted.get(detector.open_shot, -1) + stride - half_span))
            self.max_frames_held = max(self.max_frames_held, len(kept) + len(batch))
            for i in [i for i in kept if i < keep_from]:
                del kept[i]

        def flush() -> None:
            if batch:
                frames = torch.from_numpy(np.stack([rgb for _, rgb in batch]))
                for (i, _), frame in zip(batch, to_model_grid(frames, self.grid)):
                    kept[i] = frame
                batch.clear()

        try:
            for i, frame in self._every_frame():
                detector.push(upright_small(small_copy(frame), self._turns))
                if i + half_span > after_focal:  # a window still to write may use this frame
                    rgb = frame.to_ndarray(format="rgb24")
                    batch.append((i, np.ascontiguousarray(np.rot90(rgb, k=self._turns)) if self._turns else rgb))
                    self.frames_decoded += 1
                    if len(batch) >= READ_CHUNK:
                        flush()
                if detector.final_upto > min([j for j, _ in batch], default=i + 1):
                    flush()  # a window may be ready that needs frames still in the batch
                yield from ready()
            detector.finish()
            flush()
            yield from ready()
            self.shots = list(detector.shots)
        finally:
            self._stop()

    def _every_frame(self):
        """(index, av.VideoFrame) of every frame in order, from the start, no seeking."""
        try:
            self._start(0)
            expected = 0
            while True:
                frame = next(self._decoder, None)
                if frame is None:
                    break
                i = self._index_of(frame)
                if i is None or i < expected:
                    continue
                if i > expected:
                    raise DecodeError(f"frame {expected} is missing from the decoded stream")
                expected += 1
                yield i, frame
        except DecodeError:
            raise
        except Exception as e:  # av.FFmpegError from a corrupt or truncated file
            raise DecodeError(f"cannot decode frame {expected}: {_one_line(e)}") from e
        if expected < self.info.num_frames:
            raise DecodeError(f"video ended before frame {expected} of the {self.info.num_frames} it lists")

    def _decode_into(self, indices: list[int], kept: dict[int, torch.Tensor]) -> None:
        for at in range(0, len(indices), READ_CHUNK):
            chunk = indices[at : at + READ_CHUNK]
            batch = np.stack([self._frame_at(i) for i in chunk])
            self.frames_decoded += len(chunk)
            for i, frame in zip(chunk, to_model_grid(torch.from_numpy(batch), self.grid)):
                kept[i] = frame

    def _frame_at(self, index: int) -> np.ndarray:
        """Upright uint8 [H, W, 3] of frame `index`; indices must come in increasing order."""
        try:
            key = self._keys[bisect.bisect_right(self._keys, index) - 1]
            if self._decoder is None or (self._may_seek and self._rank is not None and key > self._next_index):
                self._start(key)  # skips whole GOPs of unneeded frames (resume, long strides)
            while True:
                frame = next(self._decoder, None)
                if frame is None:
                    raise DecodeError(f"video ended before frame {index} of the {self.info.num_frames} it lists")
                i = self._index_of(frame)
                if i is None or i < index:
                    continue
                if i > index:
                    if key > 0 and self._may_seek and self._rank is not None:
                        self._may_seek = False  # the seek overshot: decode from the start instead
                        self._start(0)
                        continue
                    raise DecodeError(f"frame {index} is missing from the decoded stream")
                self._next_index = i + 1
                rgb = frame.to_ndarray(format="rgb24")
                return np.ascontiguousarray(np.rot90(rgb, k=self._turns)) if self._turns else rgb
        except DecodeError:
            raise
        except Exception as e:  # av.FFmpegError from a corrupt or truncated file
            raise DecodeError(f"cannot decode frame {index}: {_one_line(e)}") from e

    def _index_of(self, frame) -> int | None:
        if self._rank is None:  # no usable timestamps: count frames from the start
            self._counter += 1
            return self._counter - 1
        return self._rank.get(frame.pts)

    def _start(self, key: int) -> None:
        """(Re)start decoding at keyframe index `key` (0: the beginning of the file)."""
        import av

        if self._container is None:
            self._container = av.open(self.path)
            stream = self._container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.thread_count = self._num_threads
        stream = self._container.streams.video[0]
        if key > 0 or self._decoder is not None:
            self._container.seek(self._sorted_pts[key] if key > 0 else stream.start_time or 0,
                                 stream=stream, backward=True)
        self._decoder = self._container.decode(stream)
        self._next_index = key
        self._counter = 0

    def _stop(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._decoder = None
        self._next_index, self._may_seek = 0, True

    def close(self) -> None:
        self._stop()


def _probe(path: str):
    """One demux pass (no decoding) for frame count, timestamps and keyframes, then the first
    frame decoded for its upright size."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise DecodeError("file has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else float("nan")
        time_base = float(stream.time_base) if stream.time_base else float("nan")
        start = stream.start_time or 0
        # discarded packets (an edit list cutting into a GOP, e.g. a clip trimmed by stream copy)
        # are decoded for reference only and never shown: not frames of the video
        packets = [(p.pts, p.is_keyframe) for p in container.demux(stream)
                   if p.size > 0 and not getattr(p, "is_discard", False)]
    if not packets:
        raise DecodeError("video has no frames")
    pts = [p for p, _ in packets]
    if all(p is not None for p in pts) and len(set(pts)) == len(pts):
        sorted_pts = sorted(pts)
        rank = {p: i for i, p in enumerate(sorted_pts)}
        keys = sorted({0} | {rank[p] for p, key in packets if key})
        raw = (np.asarray(sorted_pts, dtype=np.float64) - start) * time_base
    else:
        sorted_pts, rank, keys, raw = None, None, [0], np.full(len(pts), np.nan)
    with av.open(path) as container:
        first = next(container.decode(container.streams.video[0]), None)
    if first is None:
        raise DecodeError("no frame of the video can be decoded")
    # PyAV's rotation: counter-clockwise degrees from the display matrix (phone videos)
    turns = round((getattr(first, "rotation", 0) or 0) / 90) % 4
    width, height = (first.height, first.width) if turns % 2 else (first.width, first.height)
    return len(packets), fps, raw, rank, sorted_pts, keys, width, height, turns


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]
