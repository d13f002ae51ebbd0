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


def num_windows(num_frames: int, kernel: int, stride: int, dilation: int, after_focal: int = -1) -> int:
    """How many windows a video of `num_frames` frames gives (those with focal > after_focal)."""
    check_window_args(kernel, stride, dilation)
    span = window_span(kernel, dilation)
    if num_frames < span:
        return 0
    total = (num_frames - span) // stride + 1
    skipped = max(0, (after_focal - (kernel // 2) * dilation) // stride + 1)
    return max(0, total - skipped)


def window_at(i: int, kernel: int, stride: int, dilation: int) -> Window:
    """The i-th window (0-based) of any video long enough to hold it."""
    half = kernel // 2
    focal = half * dilation + i * stride
    return Window(focal, tuple(focal + k * dilation for k in range(-half, half + 1)))


def windows(num_frames: int, kernel: int, stride: int, dilation: int, after_focal: int = -1) -> Iterator[Window]:
    """All windows of a video of `num_frames` frames, in increasing focal order.

    `after_focal` skips windows whose focal frame is <= it (resume after the last written sample).
    """
    total = num_windows(num_frames, kernel, stride, dilation)
    for i in range(total - num_windows(num_frames, kernel, stride, dilation, after_focal), total):
        yield window_at(i, kernel, stride, dilation)


def needed_frames(num_frames: int, kernel: int, stride: int, dilation: int, after_focal: int = -1) -> list[int]:
    """Sorted distinct frame indices that some window needs: what a decoder must hand over."""
    needed: set[int] = set()
    for window in windows(num_frames, kernel, stride, dilation, after_focal):
        needed.update(window.frame_indices)
    return sorted(needed)


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
    like a video of its own: the plain convolution restarted at `first_frame`, no padding, the
    shot's first and last half*dilation frames never focal, a shot shorter than a window gives none.
    `after_focal` (a frame index of the video) skips windows whose focal frame is <= it."""
    if last_frame < first_frame:
        return
    for w in windows(last_frame - first_frame + 1, kernel, stride, dilation, after_focal - first_frame):
        yield Window(w.focal_frame + first_frame, tuple(i + first_frame for i in w.frame_indices))


def num_shot_windows(first_frame: int, last_frame: int, kernel: int, stride: int, dilation: int,
                     after_focal: int = -1) -> int:
    """How many windows shot_windows gives, without listing them."""
    if last_frame < first_frame:
        return 0
    return num_windows(last_frame - first_frame + 1, kernel, stride, dilation, after_focal - first_frame)
