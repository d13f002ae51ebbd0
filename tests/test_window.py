"""Window arithmetic (window.py): kernel / stride / dilation exactly as SPEC "Windows" says."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from window import Window, dilation_for_seconds, needed_frames, num_windows, window_span, windows

odd_kernels = st.integers(0, 8).map(lambda k: 2 * k + 1)  # 1, 3, ..., 17


def reference_windows(n: int, kernel: int, stride: int, dilation: int, after_focal: int = -1) -> list[Window]:
    """The SPEC, written out naively: focal frames half*d, half*d + stride, ... while the window's
    last index half*d after the focal still fits in 0..n-1."""
    half = kernel // 2
    out, focal = [], half * dilation
    while focal + half * dilation <= n - 1:
        if focal > after_focal:
            out.append(Window(focal, tuple(range(focal - half * dilation, focal + half * dilation + 1, dilation))))
        focal += stride
    return out


@settings(max_examples=400, deadline=None)
@given(
    n=st.integers(0, 400),
    kernel=odd_kernels,
    stride=st.integers(1, 15),
    dilation=st.integers(1, 12),
    after_focal=st.integers(-1, 420),
)
@example(n=13, kernel=5, stride=2, dilation=1, after_focal=-1)
@example(n=29, kernel=5, stride=9, dilation=7, after_focal=-1)  # exactly one window fits
@example(n=28, kernel=5, stride=9, dilation=7, after_focal=-1)  # one frame short: none
def test_window_properties(n, kernel, stride, dilation, after_focal):
    half = kernel // 2
    got = list(windows(n, kernel, stride, dilation, after_focal))
    all_windows = list(windows(n, kernel, stride, dilation))

    for w in got:
        idx = w.frame_indices
        assert len(idx) == kernel
        assert all(0 <= i <= n - 1 for i in idx)  # no padding, no clamping
        assert idx[half] == w.focal_frame  # focal is the middle one
        assert all(b - a == dilation for a, b in zip(idx, idx[1:]))  # time order, step dilation
        assert w.focal_frame > after_focal
        assert (w.focal_frame - half * dilation) % stride == 0  # on the stride grid

    focals = [w.focal_frame for w in all_windows]
    assert all(b - a == stride for a, b in zip(focals, focals[1:]))
    if all_windows:
        assert focals[0] == half * dilation
        last = all_windows[-1]
        assert last.frame_indices[-1] <= n - 1
        assert last.focal_frame + stride + half * dilation > n - 1  # the next one would not fit
    else:
        assert 2 * half * dilation > n - 1  # not even the first window fits
    # resuming gives exactly the later windows
    assert got == [w for w in all_windows if w.focal_frame > after_focal]
    assert got == reference_windows(n, kernel, stride, dilation, after_focal)

    assert num_windows(n, kernel, stride, dilation, after_focal) == len(got)
    assert num_windows(n, kernel, stride, dilation) == len(all_windows)
    union = sorted({i for w in got for i in w.frame_indices})
    assert needed_frames(n, kernel, stride, dilation, after_focal) == union
    assert window_span(kernel, dilation) == 2 * half * dilation + 1


def test_request_example_kernel5_stride2_dilation1():
    ws = list(windows(20, kernel=5, stride=2, dilation=1))
    focals = [w.focal_frame for w in ws]
    at = focals.index(6)
    assert ws[at] == Window(6, (4, 5, 6, 7, 8))
    assert ws[at + 1] == Window(8, (6, 7, 8, 9, 10))  # the very next window


def test_request_example_kernel5_stride3_dilation2():
    ws = list(windows(20, kernel=5, stride=3, dilation=2))
    assert ws[0] == Window(4, (0, 2, 4, 6, 8))
    assert ws[1] == Window(7, (3, 5, 7, 9, 11))


@pytest.mark.parametrize(
    "kernel, stride, dilation",
    [(4, 1, 1), (2, 1, 1), (0, 1, 1), (-1, 1, 1), (5, 0, 1), (5, -2, 1), (5, 1, 0), (5, 1, -1)],
)
def test_bad_arguments_raise_value_error(kernel, stride, dilation):
    with pytest.raises(ValueError):
        list(windows(100, kernel, stride, dilation))
    with pytest.raises(ValueError):
        num_windows(100, kernel, stride, dilation)
    with pytest.raises(ValueError):
        needed_frames(100, kernel, stride, dilation)


@pytest.mark.parametrize("n", [0, 1, 8, 16])
def test_short_video_yields_no_windows(n):
    # kernel 5, dilation 4: one window spans 17 frames
    assert list(windows(n, 5, 1, 4)) == []
    assert num_windows(n, 5, 1, 4) == 0
    assert needed_frames(n, 5, 1, 4) == []


def test_exactly_one_window_fits():
    assert list(windows(17, 5, 3, 4)) == [Window(8, (0, 4, 8, 12, 16))]


@settings(max_examples=300, deadline=None)
@given(
    seconds=st.floats(0.01, 30, allow_nan=False),
    fps=st.floats(1, 240, allow_nan=False),
    kernel=st.integers(1, 8).map(lambda k: 2 * k + 1),  # 3, 5, ...
)
def test_dilation_for_seconds_rule(seconds, fps, kernel):
    half = kernel // 2
    d = dilation_for_seconds(seconds, fps, kernel)
    assert d == max(1, round(seconds * fps / half))
    assert isinstance(d, int) and d >= 1
    if d > 1:  # the window reaches about +-seconds: off by at most half a dilation step
        assert abs(half * d / fps - seconds) <= half / (2 * fps) + 1e-9


def test_dilation_for_seconds_examples():
    assert dilation_for_seconds(5, 30, 5) == 75  # +-5 s at 30 fps, 2 frames each side: 75 apart
    assert dilation_for_seconds(5, 29.97, 11) == 30
    assert dilation_for_seconds(0.01, 30, 5) == 1  # never below 1


@pytest.mark.parametrize("kernel", [1, 0, -3])
def test_dilation_for_seconds_needs_kernel_3(kernel):
    with pytest.raises(ValueError):
        dilation_for_seconds(5, 30, kernel)


@pytest.mark.parametrize("seconds, fps", [(0, 30), (-1, 30), (5, 0), (5, float("nan"))])
def test_dilation_for_seconds_bad_numbers(seconds, fps):
    with pytest.raises(ValueError):
        dilation_for_seconds(seconds, fps, 5)


# ----------------------------------------------------------------------------- windows of a shot


@settings(max_examples=400, deadline=None)
@given(
    first=st.integers(0, 300),
    length=st.integers(0, 200),
    kernel=odd_kernels,
    stride=st.integers(1, 15),
    dilation=st.integers(1, 12),
    after_focal=st.integers(-1, 520),
)
@example(first=40, length=9, kernel=5, stride=3, dilation=2, after_focal=-1)  # exactly one window
@example(first=40, length=8, kernel=5, stride=3, dilation=2, after_focal=-1)  # one frame short: none
def test_shot_windows_restart_the_convolution_inside_the_shot(first, length, kernel, stride, dilation, after_focal):
    from window import num_shot_windows, shot_windows

    last = first + length - 1
    half = kernel // 2
    got = list(shot_windows(first, last, kernel, stride, dilation, after_focal))
    # the plain convolution of a video made of the shot's frames alone, shifted to the shot
    expected = [Window(w.focal_frame + first, tuple(i + first for i in w.frame_indices))
                for w in reference_windows(length, kernel, stride, dilation) if w.focal_frame + first > after_focal]
    assert got == expected
    assert num_shot_windows(first, last, kernel, stride, dilation, after_focal) == len(got)
    for w in got:
        assert first <= w.frame_indices[0] and w.frame_indices[-1] <= last  # never a frame outside the shot
        assert w.focal_frame - first >= half * dilation and last - w.focal_frame >= half * dilation
    if length < window_span(kernel, dilation):
        assert got == []
    if got and after_focal < first:
        assert got[0].focal_frame == first + half * dilation
    assert all(b.focal_frame - a.focal_frame == stride for a, b in zip(got, got[1:]))
