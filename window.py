"""Window arithmetic: which frames each sample needs. Pure functions, no I/O.

A window slides over the frame indices 0..n-1 of one video like a 1-D convolution:
kernel (odd) frames, `dilation` frames apart, centred on a focal frame; each next focal frame
is `stride` frames later. No padding: the first focal frame is half*dilation, and the last window
is the last one whose every index is <= n-1.

    kernel 5, stride 2, dilation 1:  [0 1 2 3 4] (focal 2), [2 3 4 5 6] (focal 4), ...
    kernel 5, stride 3, dilation 2:  [0 2 4 6 8] (focal 4), [3 5 7 9 11] (focal 7), ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Window:
    focal_frame: int
    frame_indices: tuple[int, ...]  # time order; focal_frame is the middle one


def check_window_args(kernel: int, stride: int, dilation: int) -> None:
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be odd and >= 1, got {kernel}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")


def window_span(kernel: int, dilation: int) -> int:
    """Frames from the first to the last index of one window, both included."""
    return (kernel - 1) * dilation + 1


def num_windows(num_frames: int, kernel: int, stride: int, dilation: int, after_focal: int = -1,
                first_frame: int = 0) -> int:
    """How many windows a segment of `num_frames` frames starting at frame `first_frame` gives (those
    with focal > after_focal). A whole video is the segment first_frame=0."""
    check_window_args(kernel, stride, dilation)
    span = window_span(kernel, dilation)
    if num_frames < span:
        return 0
    total = (num_frames - span) // stride + 1
    return max(0, total - first_window(kernel, stride, dilation, after_focal, first_frame))


def first_window(kernel: int, stride: int, dilation: int, after_focal: int = -1, first_frame: int = 0) -> int:
    """Number (0-based, within the segment starting at `first_frame`) of the first window whose focal
    frame is > after_focal."""
    return max(0, (after_focal - first_frame - (kernel // 2) * dilation) // stride + 1)


def window_at(i: int, kernel: int, stride: int, dilation: int, first_frame: int = 0) -> Window:
    """The i-th window (0-based) of any segment starting at `first_frame` long enough to hold it."""
    half = kernel // 2
    focal = first_frame + half * dilation + i * stride
    return Window(focal, tuple(focal + k * dilation for k in range(-half, half + 1)))


def windows(num_frames: int, kernel: int, stride: int, dilation: int, after_focal: int = -1,
            first_frame: int = 0) -> Iterator[Window]:
    """All windows of a segment of `num_frames` frames starting at `first_frame` (a whole video:
    first_frame=0), in increasing focal order.

    `after_focal` skips windows whose focal frame is <= it (resume after the last written sample).
    """
    total = num_windows(num_frames, kernel, stride, dilation, first_frame=first_frame)
    for i in range(first_window(kernel, stride, dilation, after_focal, first_frame), total):
        yield window_at(i, kernel, stride, dilation, first_frame)


def needed_frames(num_frames: int, kernel: int, stride: int, dilation: int, after_focal: int = -1,
                  first_frame: int = 0) -> list[int]:
    """Sorted distinct frame indices that some window needs: what a decoder must hand over."""
    needed: set[int] = set()
    for window in windows(num_frames, kernel, stride, dilation, after_focal, first_frame):
        needed.update(window.frame_indices)
    return sorted(needed)


class WindowPlanner:
    """Windows planned on frames as they arrive, when the frame count is not known in advance.

    Frames come in increasing index order (a decoder's output). They belong to *segments*: runs of
    consecutive frames treated like a video of their own (the rules of `windows` with the segment's
    first frame as 0). Today one segment is the whole video, ended by the end of the stream
    (`end_stream`); a shot detector ends segments at cuts (`end_segment`). Frames after one segment's
    end and before the next one's start (a gradual transition) belong to no segment.

    Pure index arithmetic, no I/O: the caller asks which frames to keep (`needed`, `next_needed`),
    tells it how far the frames have arrived (`ready`), and frees what is below `keep_from()`.
    """

    def __init__(self, kernel: int, stride: int, dilation: int, after_focal: int = -1, first_frame: int = 0,
                 expected_end: int | None = None):
        check_window_args(kernel, stride, dilation)
        # A trusted estimate of the frame count: windows reaching past it are held back (their frames
        # are not asked for) until frames at or past it arrive (then set it to None) or the stream ends.
        self.expected_end = expected_end
        self.kernel, self.stride, self.dilation, self.after_focal = kernel, stride, dilation, after_focal
        self.segment_index = 0
        self.segment_first = first_frame  # first frame of the current segment
        self.segment_end: int | None = None  # frames >= this are not in the current segment (None: open)
        self._next = first_window(kernel, stride, dilation, after_focal, first_frame)  # next window number
        self._reach = (kernel - 1) * dilation  # last frame - first frame of a window

    def _window(self, number: int) -> Window:
        return window_at(number, self.kernel, self.stride, self.dilation, self.segment_first)

    def _first_index(self, number: int) -> int:
        return self.segment_first + number * self.stride

    def _fits(self, number: int) -> bool:
        end = self.segment_end if self.segment_end is not None else self.expected_end
        return end is None or self._first_index(number) + self._reach < end

    def needed(self, index: int) -> bool:
        """Whether frame `index` is in a window still to come."""
        if index < self.segment_first or (self.segment_end is not None and index >= self.segment_end):
            return False
        if self.expected_end is not None and index >= self.expected_end:
            return False
        relative = index - self.segment_first
        for k in range(self.kernel):  # index is the k-th frame of window number `relative - k*d` / stride
            offset = relative - k * self.dilation
            if offset < 0:
                break
            number, rest = divmod(offset, self.stride)
            if rest == 0 and number >= self._next and self._fits(number):
                return True
        return False

    def next_needed(self, index: int) -> int | None:
        """The smallest frame >= `index` some window still to come needs (None: none in this segment,
        which can only happen once the segment has ended)."""
        best = None
        # windows whose last frame is >= index, in order, while one could still hold a smaller frame
        number = max(self._next, -(-(index - self.segment_first - self._reach) // self.stride))
        while self._fits(number):
            first = self._first_index(number)
            if best is not None and first >= best:
                break
            if first >= index:
                candidate = first
            else:
                candidate = first + -(-(index - first) // self.dilation) * self.dilation
            best = candidate if best is None else min(best, candidate)
            number += 1
        return best

    def ready(self, arrived_through: int) -> list[Window]:
        """Windows (in focal order) whose frames have all arrived, frames 0..arrived_through;
        each is handed out once."""
        out = []
        while self._fits(self._next) and self._first_index(self._next) + self._reach <= arrived_through:
            out.append(self._window(self._next))
            self._next += 1
        return out

    def next_window_last(self) -> int | None:
        """Last frame of the next window to hand out (None: no window of the segment fits any more)."""
        return self._first_index(self._next) + self._reach if self._fits(self._next) else None

    def keep_from(self) -> int:
        """Frames below this are in no window still to come."""
        if not self._fits(self._next):
            return self.segment_end if self.segment_end is not None else self._first_index(self._next)
        return self._first_index(self._next)

    def end_segment(self, end: int, next_first: int | None = None) -> None:
        """The current segment holds no frame >= `end`; the next segment starts at `next_first`
        (default `end`; later when frames in between belong to no segment). Windows of the current
        segment that reach `end` are never handed out. Call `ready(end - 1)` first."""
        next_first = end if next_first is None else next_first
        if next_first < end:
            raise ValueError(f"a segment cannot start at {next_first}, before the previous one ends at {end}")
        self.segment_index += 1
        self.segment_first, self.segment_end = next_first, None
        self._next = first_window(self.kernel, self.stride, self.dilation, self.after_focal, next_first)

    def end_stream(self, num_frames: int) -> None:
        """The video has `num_frames` frames: the current segment ends there and no other follows."""
        self.segment_end = max(self.segment_first, num_frames)
        self.expected_end = None

    @property
    def done(self) -> bool:
        """No window can come any more (the stream has ended and every fitting window was handed out)."""
        return self.segment_end is not None and not self._fits(self._next)


def dilation_for_seconds(seconds: float, fps: float, kernel: int) -> int:
    """Dilation making a window span about +-`seconds` around its focal frame at `fps`."""
    if kernel < 3:
        raise ValueError("--window-seconds needs kernel >= 3")
    if not seconds > 0:
        raise ValueError(f"window seconds must be > 0, got {seconds}")
    if not fps > 0:
        raise ValueError(f"frame rate must be > 0, got {fps}")
    return max(1, round(seconds * fps / (kernel // 2)))


def shot_windows(first_frame: int, last_frame: int, kernel: int, stride: int, dilation: int,
                 after_focal: int = -1) -> Iterator[Window]:
    """Windows of one shot (frames first_frame..last_frame, inclusive), each shot treated exactly
    like a video of its own: the plain convolution restarted at `first_frame` (`windows` of that
    segment), no padding, the shot's first and last half*dilation frames never focal, a shot
    shorter than a window gives none. `after_focal` skips windows whose focal frame is <= it."""
    return windows(max(0, last_frame - first_frame + 1), kernel, stride, dilation, after_focal, first_frame)


def num_shot_windows(first_frame: int, last_frame: int, kernel: int, stride: int, dilation: int,
                     after_focal: int = -1) -> int:
    """How many windows shot_windows gives, without listing them."""
    return num_windows(max(0, last_frame - first_frame + 1), kernel, stride, dilation, after_focal, first_frame)
