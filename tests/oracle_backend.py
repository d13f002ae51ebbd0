"""A test-only geometry "model" with exact ground truth, behind the tool's model seam.

The scene is the inside of a box room (6 planes, procedurally textured) filmed by a pinhole
camera moving on a smooth trajectory `scene_pose(frame_index)`. `render_scene_video` renders
it to an mp4 and burns each frame's index into the picture as a barcode. The model returned by
`make(device)` reads that barcode from every frame it is given and answers with the exact
depth, cameras and intrinsics of that frame at the model's H x W grid, so every number the tool
writes can be checked against the truth.

Camera: defined in normalised image coordinates (fixed horizontal AND vertical field of view),
so a video of any size shows the same view and the intrinsic of any resampled grid is exact:
    fx = FX_N * W, fy = FY_N * H, cx = CX_N * W - 0.5, cy = CY_N * H - 0.5
(pixel centres at integer coordinates). Pixels are square at the nominal 518 x 294, where the
principal point is (W/2, H/2) = (259, 147) like VGGT's; other aspect ratios are stretched but
still exact. Recommended video sizes: 518x294 (the model grid itself) or 1036x588 (exactly 2x).

Which part of the video the model sees: by default the oracle assumes the model grid shows the
whole video frame (true for every video that VGGT's "crop" preprocessing does not crop, i.e.
any landscape video). For a video whose upright height becomes > 518 after resizing to width
518 (portrait), pass make(..., video_size=(w, h)) or set ORACLE_VIDEO_SIZE=WxH (upright size).

Usable as `tests.oracle_backend:make` and, with tests/ on PYTHONPATH, `oracle_backend:make`
(hence the fallback import of the video writer below).

Options of make(), each also readable from the environment (the tool may pass no options):
    video_size  (w, h) of the upright video        ORACLE_VIDEO_SIZE=518x294
    scale       multiplies depth and translations  ORACLE_SCALE=2.5   (VGGT is up to scale)
    log_path    append one JSON line per call with the frame indices seen   ORACLE_LOG=path
    delay       sleep this many seconds in every call (a slow model)       ORACLE_DELAY=0.2
    exit_frames os._exit(1) in a call that sees one of these frame indices (barcode values), as a
                crashing worker process would: "40,75" every time; "40:1" only the first time
                (counted with files in exit_dir, shared by all processes)   ORACLE_EXIT_FRAMES=40:1,75
    exit_dir    folder for those counts                                     ORACLE_EXIT_DIR=path
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

try:  # imported as tests.oracle_backend
    from . import videos as _videos
except ImportError:  # imported as oracle_backend, with tests/ on sys.path
    import videos as _videos

# ---------------------------------------------------------------------------------------------
# the scene (OpenCV world axes: x right, y down, z forward)

ROOM_LO = np.array([-4.0, -2.5, -3.0])  # box corners in metres; y = +2.5 is the floor
ROOM_HI = np.array([4.0, 2.5, 9.0])
PLANE_COLOURS = np.array(  # base colour per plane: (axis, side) -> 2 * axis + (side == hi)
    [[0.9, 0.4, 0.3], [0.3, 0.8, 0.4], [0.8, 0.8, 0.9], [0.6, 0.5, 0.3], [0.4, 0.5, 0.9], [0.9, 0.8, 0.4]]
)

HFOV_DEG = 70.0
NOMINAL_W, NOMINAL_H = 518, 294  # square pixels and principal point (W/2, H/2) at this size
FX_N = 0.5 / np.tan(np.radians(HFOV_DEG) / 2)  # focal length in units of image width
FY_N = FX_N * NOMINAL_W / NOMINAL_H  # ... and of image height
CX_N = (NOMINAL_W / 2 + 0.5) / NOMINAL_W  # principal point, continuous normalised coordinates
CY_N = (NOMINAL_H / 2 + 0.5) / NOMINAL_H

# Barcode: a strip across the full width at mid-height (a centre crop never removes it).
# 16 blocks: white, black guards, 12 bits of the frame index (MSB first), even parity, black.
BAR_Y0_N, BAR_Y1_N = 0.46, 0.54
BAR_BLOCKS = 16
BAR_BITS = 12
MAX_FRAMES = 2**BAR_BITS
TARGET_SIZE = 518  # VGGT preprocessing width


def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def scene_pose(frame_index: float) -> np.ndarray:
    """World-to-camera [3, 4] (float64, OpenCV axes) of the scene camera at a frame index.

    Smooth: up to ~10 cm and ~1.5 degrees of motion per frame, periods of 60-130 frames (incommensurate,
    so poses never repeat in practice); always well inside the room, looking roughly along +z."""
    t = 2 * np.pi * float(frame_index)
    centre = np.array([1.2 * np.sin(t / 97), 0.4 * np.sin(t / 61 + 1.0), 1.5 * np.sin(t / 131)])
    yaw, pitch, roll = 0.35 * np.sin(t / 89), 0.12 * np.sin(t / 73), 0.05 * np.sin(t / 109)
    cam_to_world = _rot_y(yaw) @ _rot_x(pitch) @ _rot_z(roll)
    rotation = cam_to_world.T
    return np.concatenate([rotation, -rotation @ centre[:, None]], axis=1)


def scene_intrinsic(width: int, height: int) -> np.ndarray:
    """Intrinsic [3, 3] of the scene camera for an image that shows the whole view at
    width x height (pixel centres at integer coordinates)."""
    return np.array(
        [[FX_N * width, 0, CX_N * width - 0.5], [0, FY_N * height, CY_N * height - 0.5], [0, 0, 1]]
    )


def preprocessed_size(video_w: int, video_h: int, target: int = TARGET_SIZE) -> tuple[int, int, int]:
    """VGGT "crop" preprocessing of an upright video frame: (resized_h, crop_top, grid_h).
    Width becomes `target`, height is scaled and rounded to a multiple of 14 (Python round, as
    VGGT), then centre-cropped to `target` if taller."""
    resized_h = round(video_h * (target / video_w) / 14) * 14
    if resized_h > target:
        top = (resized_h - target) // 2
        return resized_h, top, target
    return resized_h, 0, resized_h


def intrinsic_for_grid(video_w: int, video_h: int, H: int, W: int) -> np.ndarray:
    """Exact intrinsic [3, 3] at the model's H x W grid for frames made from a video_w x video_h
    (upright) video by VGGT's crop preprocessing (resize to width W, crop rows if taller)."""
    resized_h, top, grid_h = preprocessed_size(video_w, video_h, target=W)
    if grid_h != H:
        raise ValueError(f"a {video_w}x{video_h} video gives a {W}x{grid_h} grid, not {W}x{H}")
    K = scene_intrinsic(W, resized_h)  # the resize keeps normalised coordinates
    K[1, 2] -= top
    return K


def scene_distance_to_surfaces(points_world: np.ndarray) -> np.ndarray:
    """Distance [N] from points [N, 3] (scene world) to the nearest of the six room planes."""
    p = np.asarray(points_world, dtype=np.float64)
    return np.minimum(np.abs(p - ROOM_LO), np.abs(p - ROOM_HI)).min(axis=-1)


def render_view(frame_index: int, intrinsic: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast the room for one frame: (rgb [H, W, 3] float in [0, 1], depth [H, W] float64).

    Depth is z in the camera frame (what VGGT predicts), not distance along the ray."""
    E = scene_pose(frame_index)
    cam_to_world, centre = E[:, :3].T, -E[:, :3].T @ E[:, 3]
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    rays = np.stack([u, v, np.ones_like(u)], axis=-1) @ np.linalg.inv(intrinsic).T  # z = 1
    dirs = rays @ cam_to_world.T  # world directions; the ray parameter at a hit equals depth
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.where(dirs > 0, ROOM_HI, ROOM_LO)
        t = np.where(dirs != 0, (bound - centre) / dirs, np.inf)  # [H, W, 3], one per axis
    axis = t.argmin(axis=-1)
    depth = np.take_along_axis(t, axis[..., None], axis=-1)[..., 0]
    hit = centre + depth[..., None] * dirs

    # Texture: smooth sinusoids in the plane's own two coordinates (no aliasing, codec-friendly).
    side = np.take_along_axis(dirs, axis[..., None], axis=-1)[..., 0] > 0
    plane = 2 * axis + side
    a = np.take_along_axis(hit, ((axis + 1) % 3)[..., None], axis=-1)[..., 0]  # in-plane coords
    b = np.take_along_axis(hit, ((axis + 2) % 3)[..., None], axis=-1)[..., 0]
    s1 = np.sin(2 * np.pi * a / 1.7 + plane) * np.sin(2 * np.pi * b / 1.3 - plane)
    s2 = np.sin(2 * np.pi * (a + 0.5 * b) / 0.6)
    shade = 0.55 + 0.25 * s1 + 0.12 * s2
    rgb = np.clip(PLANE_COLOURS[plane] * shade[..., None] + 0.05, 0.0, 1.0)
    return rgb, depth


# ---------------------------------------------------------------------------------------------
# barcode


def _barcode_bits(frame_index: int) -> list[int]:
    data = [(frame_index >> (BAR_BITS - 1 - k)) & 1 for k in range(BAR_BITS)]
    return [1, 0] + data + [sum(data) % 2, 0]


def draw_barcode(rgb: np.ndarray, frame_index: int) -> np.ndarray:
    """Paint the frame-index barcode into an image [H, W, 3] float (in place, returned)."""
    h, w = rgb.shape[:2]
    y0, y1 = round(BAR_Y0_N * h), round(BAR_Y1_N * h)
    for k, bit in enumerate(_barcode_bits(frame_index)):
        x0, x1 = round(k * w / BAR_BLOCKS), round((k + 1) * w / BAR_BLOCKS)
        rgb[y0:y1, x0:x1] = float(bit)
    return rgb


def read_barcode(gray: np.ndarray, resized_h: int | None = None, top: int = 0) -> int:
    """Frame index from a grayscale image [H, W] in [0, 1] that went through VGGT's
    preprocessing (`resized_h`, `top` as in `preprocessed_size`; default: not cropped).

    Reads the inner half of every block, so codec ringing and a bicubic resize do not matter;
    raises ValueError if any block is ambiguous or guards/parity are wrong (e.g. a sideways,
    flipped or wrong frame)."""
    h, w = gray.shape
    resized_h = h if resized_h is None else resized_h
    yc = 0.5 * (BAR_Y0_N + BAR_Y1_N) * resized_h - top
    half = 0.25 * (BAR_Y1_N - BAR_Y0_N) * resized_h
    rows = slice(int(np.ceil(yc - half)), int(np.floor(yc + half)) + 1)
    bits = []
    for k in range(BAR_BLOCKS):
        xc, xh = (k + 0.5) * w / BAR_BLOCKS, 0.25 * w / BAR_BLOCKS
        level = float(gray[rows, int(np.ceil(xc - xh)) : int(np.floor(xc + xh)) + 1].mean())
        if 0.25 < level < 0.75:
            raise ValueError(f"barcode block {k} is grey ({level:.2f}): not an oracle scene frame, or not upright")
        bits.append(int(level >= 0.5))
    data = bits[2 : 2 + BAR_BITS]
    if bits[:2] != [1, 0] or bits[-1] != 0 or bits[-2] != sum(data) % 2:
        raise ValueError(f"barcode guards/parity wrong {bits}: not an oracle scene frame, or not upright")
    return int("".join(map(str, data)), 2)


# ---------------------------------------------------------------------------------------------
# video


def render_scene_video(
    path: str | Path,
    num_frames: int = 30,
    width: int = NOMINAL_W,
    height: int = NOMINAL_H,
    fps: float = 30,
    rotation_degrees: int = 0,
) -> Path:
    """Render frames 0..num_frames-1 of the scene (with barcodes) to an H.264 mp4.

    `width` x `height` is the upright size (keep width >= ~400 so barcode blocks are >= 24 px).
    With `rotation_degrees` (clockwise, phone style; see tests/videos.py) the file stores the
    frames turned the other way plus a display matrix, so only a reader that honours the
    rotation gives the oracle readable (upright) frames."""
    if num_frames > MAX_FRAMES:
        raise ValueError(f"the barcode holds at most {MAX_FRAMES} frames")
    K = scene_intrinsic(width, height)

    def frames():
        for i in range(num_frames):
            rgb, _ = render_view(i, K, height, width)
            yield np.round(draw_barcode(rgb, i) * 255).astype(np.uint8)

    if rotation_degrees % 360:
        return _videos.write_rotated_mp4(path, rotation_degrees, frames(), fps=fps)
    return _videos.write_mp4(path, frames(), fps=fps)


# ---------------------------------------------------------------------------------------------
# the model


@functools.lru_cache(maxsize=64)  # windows overlap: the same frame is asked for many times
def _truth(frame_index: int, H: int, W: int, resized_h: int, top: int) -> tuple[np.ndarray, np.ndarray]:
    K = scene_intrinsic(W, resized_h)
    K[1, 2] -= top
    _, depth = render_view(frame_index, K, H, W)
    return depth.astype(np.float32), K


def _confidence(H: int, W: int) -> np.ndarray:
    """Deterministic confidence in [1, 5] (VGGT's is >= 1), highest in the image centre, so a
    confidence filter has something to remove."""
    v, u = np.mgrid[0:H, 0:W]
    r2 = ((u - (W - 1) / 2) / (W / 2)) ** 2 + ((v - (H - 1) / 2) / (H / 2)) ** 2
    return (1.0 + 4.0 * np.clip(1.0 - r2 / 2.0, 0.0, 1.0)).astype(np.float32)


class OracleModel:
    """Callable model: frames [B, S, 3, H, W] in [0, 1] -> dict of exact predictions."""

    def __init__(self, device: str | torch.device, video_size: tuple[int, int] | None, scale: float, log_path: str | None,
                 delay: float = 0.0, exit_frames: dict[int, int | None] | None = None, exit_dir: str | None = None):
        self.delay = float(delay)
        self.exit_frames = exit_frames or {}  # frame index -> times to exit (None: always)
        self.exit_dir = exit_dir
        self.device = torch.device(device)
        self.video_size = video_size
        self.scale = float(scale)
        self.log_path = log_path
        self.calls: list[list[list[int]]] = []  # frame indices seen, per call, per batch element

    def __call__(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(f"expected frames [B, S, 3, H, W], got {tuple(frames.shape)}")
        B, S, _, H, W = frames.shape
        if H % 14 or W % 14:
            raise ValueError(f"H, W must be multiples of 14, got {H}x{W}")
        if frames.device.type != self.device.type:
            raise ValueError(f"frames on {frames.device}, model made for {self.device}")
        x = frames.detach().float().cpu().numpy()
        if x.min() < -1e-3 or x.max() > 1 + 1e-3:
            raise ValueError(f"frames must be in [0, 1], got [{x.min():.3f}, {x.max():.3f}]")
        if self.video_size is not None:
            resized_h, top, grid_h = preprocessed_size(*self.video_size, target=W)
            if grid_h != H:
                raise ValueError(f"video_size {self.video_size} gives a {W}x{grid_h} grid, not {W}x{H}")
        else:
            resized_h, top = H, 0

        gray = x.mean(axis=2)  # [B, S, H, W]
        indices = [[read_barcode(gray[b, s], resized_h, top) for s in range(S)] for b in range(B)]
        depth = np.empty((B, S, H, W), np.float32)
        extrinsic = np.empty((B, S, 3, 4), np.float64)
        intrinsic = np.empty((B, S, 3, 3), np.float64)
        for b in range(B):
            world_from_cam0 = np.linalg.inv(_to4x4(scene_pose(indices[b][0])))
            for s, index in enumerate(indices[b]):
                d, K = _truth(index, H, W, resized_h, top)
                rel = _to4x4(scene_pose(index)) @ world_from_cam0  # cam0 -> cam s
                depth[b, s] = d * self.scale
                extrinsic[b, s] = rel[:3] * [[1, 1, 1, self.scale]]
                intrinsic[b, s] = K
        conf = np.broadcast_to(_confidence(H, W), (B, S, H, W))

        self._maybe_exit(indices)
        if self.delay:
            time.sleep(self.delay)
        self.calls.append(indices)
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "shape": [B, S, H, W], "frame_indices": indices}) + "\n")
        out = {"depth": depth, "depth_conf": conf, "extrinsic": extrinsic, "intrinsic": intrinsic}
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(frames.device) for k, v in out.items()}

    def _maybe_exit(self, indices: list[list[int]]) -> None:
        for frame in sorted({i for window in indices for i in window} & set(self.exit_frames)):
            limit = self.exit_frames[frame]
            if limit is not None:
                if not self.exit_dir:
                    raise ValueError("exit_frames with a count needs exit_dir (ORACLE_EXIT_DIR)")
                os.makedirs(self.exit_dir, exist_ok=True)
                done = sum(name.startswith(f"{frame}.") for name in os.listdir(self.exit_dir))
                if done >= limit:
                    continue
                Path(self.exit_dir, f"{frame}.{os.getpid()}.{time.time_ns()}").touch()
            if self.log_path:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps({"pid": os.getpid(), "exit_at_frame": frame}) + "\n")
            os._exit(1)


def _parse_exit_frames(spec) -> dict[int, int | None]:
    if not spec:
        return {}
    if isinstance(spec, dict):
        return {int(k): v for k, v in spec.items()}
    out = {}
    for item in str(spec).split(","):
        frame, _, limit = item.strip().partition(":")
        out[int(frame)] = int(limit) if limit else None
    return out


def _to4x4(E: np.ndarray) -> np.ndarray:
    return np.concatenate([E, [[0.0, 0.0, 0.0, 1.0]]], axis=0)


def make(
    device: str | torch.device = "cpu",
    video_size: Sequence[int] | str | None = None,
    scale: float | None = None,
    log_path: str | None = None,
    delay: float | None = None,
    exit_frames=None,
    exit_dir: str | None = None,
    **options,
) -> OracleModel:
    """Factory for the tool's `--backend tests.oracle_backend:make`.

    Unknown options are accepted and ignored (the tool may pass VGGT-specific knobs)."""
    video_size = video_size if video_size is not None else os.environ.get("ORACLE_VIDEO_SIZE")
    if isinstance(video_size, str):
        video_size = tuple(int(v) for v in video_size.lower().split("x"))
    scale = scale if scale is not None else float(os.environ.get("ORACLE_SCALE", 1.0))
    log_path = log_path or os.environ.get("ORACLE_LOG")
    delay = delay if delay is not None else float(os.environ.get("ORACLE_DELAY", 0.0))
    exit_frames = _parse_exit_frames(exit_frames if exit_frames is not None else os.environ.get("ORACLE_EXIT_FRAMES"))
    exit_dir = exit_dir or os.environ.get("ORACLE_EXIT_DIR")
    return OracleModel(device, tuple(video_size) if video_size else None, scale, log_path, delay, exit_frames, exit_dir)
