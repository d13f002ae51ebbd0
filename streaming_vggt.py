"""The geometry stage: batches of windows in, one focal-frame sample per window out.

windows of uint8 frames --model--> depth + cameras for every frame --unproject, filter, cap--> Sample

The model sits behind a small seam (SPEC "The geometry model seam"): a factory
`make(device, **options) -> model`, where `model(frames [B,S,3,H,W] float in [0,1])` returns
float32 `depth [B,S,H,W]`, `depth_conf [B,S,H,W]`, `extrinsic [B,S,3,4]` (world-to-camera, OpenCV
axes, world = the camera of input frame 0) and `intrinsic [B,S,3,3]` (pixels of the HxW grid).
`make_vggt` is the default factory; `load_backend("module:function")` loads any other.
"""

from __future__ import annotations

import importlib
import math
import os
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

from frames import WindowFrames
from sample_format import Sample  # the record this stage produces (its home: the on-disk format)

DEFAULT_MODEL = "facebook/VGGT-1B"
HEADS_NOT_BUILT = ("point_head.", "track_head.")  # points come from depth + cameras instead


# ----------------------------------------------------------------------------- the model seam

ModelFactory = Callable[..., Callable[[torch.Tensor], dict[str, torch.Tensor]]]


def load_backend(spec: str) -> ModelFactory:
    """'vggt' -> make_vggt; 'module:function' -> that factory (module found on sys.path)."""
    if spec == "vggt":
        return make_vggt
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"--backend must be 'vggt' or 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--backend: cannot import module {module_name!r}: {e}") from e
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ValueError(f"--backend: module {module_name!r} has no callable {function_name!r}")
    return factory


def _import_vggt():
    try:
        from vggt.models.vggt import VGGT
        from vggt.utils.pose_enc import pose_encoding_to_extri_intri
    except ImportError as e:
        raise ImportError(
            "the VGGT backend needs the vggt package: pip install git+https://github.com/facebookresearch/vggt"
        ) from e
    return VGGT, pose_encoding_to_extri_intri


def load_vggt_state_dict(model: torch.nn.Module, source: str) -> None:
    """Load VGGT weights from a Hugging Face repo id or a local file/folder into a model built
    without point and track heads. Only `point_head.*` / `track_head.*` may be left unused; any
    other missing or unexpected key is an error (a wrong checkpoint must not load silently)."""
    state_dict = _read_state_dict(_checkpoint_file(source))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    unexpected = [k for k in unexpected if not k.startswith(HEADS_NOT_BUILT)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {source!r} does not fit VGGT: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )


def _checkpoint_file(source: str) -> str:
    """--model -> a local checkpoint file. The driver resolved it before Ray started
    (checkpoint.resolve), so a worker normally gets a local path; a hub id is taken from this
    machine's cache or downloaded here (a node that does not share the driver's disk)."""
    from checkpoint import hub_cached_file, hub_download, local_file, looks_like_path

    if looks_like_path(source):
        return local_file(source)
    return hub_cached_file(source) or hub_download(source)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    # mmap: the 5 GB checkpoint is paged in as it is copied into the network, not held twice
    state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return state_dict.get("model", state_dict) if isinstance(state_dict, dict) else state_dict


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 on Ampere+ GPUs, fp16 on older ones; no autocast on CPU (bf16 there was 3.6x slower)."""
    if precision == "fp32" or device.type != "cuda":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class VGGTModel:
    """VGGT behind the seam: frames [B,S,3,H,W] in [0,1] -> depth, depth_conf, extrinsic, intrinsic."""

    def __init__(self, network: torch.nn.Module, device: torch.device, precision: str = "auto"):
        _, self._pose_encoding_to_extri_intri = _import_vggt()
        self.network = network.to(device).eval()
        self.device = device
        self.dtype = autocast_dtype(device, precision)

    def __call__(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.network(frames)  # heads run in fp32 inside VGGT
        extrinsic, intrinsic = self._pose_encoding_to_extri_intri(out["pose_enc"].float(), frames.shape[-2:])
        return {
            "depth": out["depth"][..., 0].float(),
            "depth_conf": out["depth_conf"].float(),
            "extrinsic": extrinsic.float(),
            "intrinsic": intrinsic.float(),
        }


def make_vggt(device: str | torch.device, model: str = DEFAULT_MODEL, precision: str = "auto",
              network: torch.nn.Module | None = None) -> VGGTModel:
    """The default factory. `model`: Hugging Face id or local checkpoint (file or folder);
    `network`: an already-built VGGT (tests pass a tiny random one), skips loading."""
    VGGT, _ = _import_vggt()
    if network is None:
        network = VGGT(enable_point=False, enable_track=False)
        load_vggt_state_dict(network, model)
    return VGGTModel(network, torch.device(device), precision)


# ----------------------------------------------------------------------------- geometry helpers


def as_4x4(extrinsic: torch.Tensor) -> torch.Tensor:
    """[..., 3, 4] -> [..., 4, 4] with the homogeneous row."""
    bottom = torch.zeros(*extrinsic.shape[:-2], 1, 4, dtype=extrinsic.dtype, device=extrinsic.device)
    bottom[..., 0, 3] = 1
    return torch.cat([extrinsic, bottom], dim=-2)


def rebase_extrinsics(extrinsic: torch.Tensor, anchor: int) -> torch.Tensor:
    """[B,S,3,4] world-to-camera -> same cameras with world = camera `anchor` (E_i @ E_anchor^-1)."""
    full = as_4x4(extrinsic.double())
    return (full @ torch.linalg.inv(full[:, anchor : anchor + 1]))[..., :3, :].float()


def unproject_points(depth: torch.Tensor, u: torch.Tensor, v: torch.Tensor, extrinsic: torch.Tensor,
                     intrinsic: torch.Tensor) -> torch.Tensor:
    """depth [N] at pixels (u [N], v [N]) of frames whose world-to-camera [N,3,4] and intrinsic
    [N,3,3] are given per point -> world points [N,3].

    Pixel centres at integer coordinates: X_cam = depth * K^-1 [u, v, 1]; X_world = R^T (X_cam - t).
    """
    fx, fy, cx, cy = intrinsic[:, 0, 0], intrinsic[:, 1, 1], intrinsic[:, 0, 2], intrinsic[:, 1, 2]
    cam = torch.stack([(u - cx) / fx * depth, (v - cy) / fy * depth, depth], dim=-1)
    R, t = extrinsic[..., :3], extrinsic[..., 3]
    return torch.einsum("nji,nj->ni", R, cam - t)


def priority_of(index: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed pseudo-random int64 key per point index (a 32-bit integer hash of index + seed): the
    same on every device and every run, so capping by the smallest keys is deterministic and needs
    no RNG state. Distinct indices (< 2^32) get distinct keys: every step is a bijection."""
    x = index + (seed & 0xFFFFFFFF)
    x &= 0xFFFFFFFF  # in place from here: 3x less time than fresh tensors on the CPU
    for _ in range(2):
        x ^= x >> 16
        x *= 0x45D9F3B  # constants < 2^31: no int64 overflow
        x &= 0xFFFFFFFF
    x ^= x >> 16
    return x


def sample_seed(video: str, frame_index: int) -> int:
    return zlib.crc32(f"{video}:{frame_index}".encode())


# ----------------------------------------------------------------------------- the stage


@dataclass
class GeometryConfig:
    world_frame: str = "first"  # "first": earliest window frame's camera; "focal": the focal camera
    conf_percentile: float = 25.0  # drop the window's lowest-confidence points below this percentile
    min_conf: float = 0.0  # and any point below this absolute depth_conf (VGGT's is >= 1)
    max_points: int = 50_000  # cap per sample, deterministic subsample
    focal_first: bool = True  # feed the focal frame as input 0 (VGGT's reference, predicted best)


class GeometryStage:
    """Runs the model on a batch of equal-shape windows and turns predictions into Samples.

    All post-processing stays on the model's device; only the kept points, the focal depth and
    the cameras cross to the host, in one copy each per batch.

    `stats` (anything with `stat_update(name, seconds)`, e.g. pipeline.Stats; the Pipeline sets
    it) receives `forward_seconds` (upload + model) and `postprocess_seconds` (unprojection,
    filter, cap, copies to the host) per call; on CUDA the forward is synchronised to split them.
    """

    def __init__(self, model: Callable[[torch.Tensor], dict[str, torch.Tensor]], device: str | torch.device,
                 config: GeometryConfig = GeometryConfig(), stats=None):
        if config.world_frame not in ("first", "focal"):
            raise ValueError(f"world frame must be 'first' or 'focal', got {config.world_frame!r}")
        if config.max_points < 0:
            raise ValueError(f"max_points must be >= 0, got {config.max_points}")
        self.model = model
        self.device = torch.device(device)
        self.config = config
        self.stats = stats

    def input_order(self, num_frames: int) -> list[int]:
        """Positions (time order) in the order the model sees them."""
        focal = num_frames // 2
        if not self.config.focal_first:
            return list(range(num_frames))
        return [focal] + [i for i in range(num_frames) if i != focal]

    @torch.inference_mode()
    def predict(self, frames_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 [B,S,H,W,3] (time order, host) -> model outputs in time order on the device,
        cameras re-expressed in the configured world frame."""
        B, S, H, W, _ = frames_u8.shape
        if frames_u8.device.type == "cpu" and self.device.type == "cuda":
            frames_u8 = frames_u8.pin_memory()
        order = self.input_order(S)
        on_device = frames_u8.to(self.device, non_blocking=True)
        x = on_device[:, order]
        x = x.permute(0, 1, 4, 2, 3).float().div_(255)  # [B,S,3,H,W] in [0,1]; cast after the copy
        out = self.model(x)
        back = [order.index(i) for i in range(S)]  # model order -> time order
        out = {k: out[k][:, back].float() for k in ("depth", "depth_conf", "extrinsic", "intrinsic")}
        anchor = 0 if self.config.world_frame == "first" else S // 2
        out["extrinsic"] = rebase_extrinsics(out["extrinsic"], anchor)
        out["frames"] = on_device  # uint8 [B,S,H,W,3], time order: the colours of the points
        return out

    @torch.inference_mode()
    def __call__(self, batch: list[WindowFrames]) -> list[Sample]:
        started = time.perf_counter()
        frames_u8 = torch.stack([w.frames for w in batch])  # [B,S,H,W,3]
        B, S, H, W, _ = frames_u8.shape
        out = self.predict(frames_u8)
        if self.stats is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            forward_done = time.perf_counter()
            self.stats.stat_update("forward_seconds", forward_done - started)
        depth, conf = out["depth"], out["depth_conf"]
        extrinsic, intrinsic = out["extrinsic"], out["intrinsic"]
        colours = out["frames"].reshape(B, S * H * W, 3)
        # Only the kept points are unprojected. A point's world position is finite iff its depth is
        # and its frame's camera is (finite, fx and fy non-zero), so validity is known before.
        camera_ok = (torch.isfinite(extrinsic).flatten(2).all(-1) & torch.isfinite(intrinsic).flatten(2).all(-1)
                     & (intrinsic[..., 0, 0] != 0) & (intrinsic[..., 1, 1] != 0))  # [B, S]
        quantiles = torch.tensor([0.1, 0.5, 0.9], device=self.device)

        kept_points, quality = [], []
        for b, w in enumerate(batch):
            flat_conf, flat_depth = conf[b].reshape(-1), depth[b].reshape(-1)
            threshold = max(self.config.min_conf, _percentile(flat_conf, self.config.conf_percentile))
            valid = (flat_conf >= threshold) & (flat_depth > 0) & (flat_depth < float("inf"))
            valid = (valid.view(S, H * W) & camera_ok[b, :, None]).view(-1)
            index = valid.nonzero()[:, 0]  # increasing
            if self.config.max_points == 0:
                index = index[:0]  # no points wanted (kthvalue below needs k >= 1)
            elif index.numel() > self.config.max_points:
                # the max_points smallest keys (distinct), kept in index order: no sort, no top-k
                keys = priority_of(index, sample_seed(w.video, w.window.focal_frame))
                index = index[keys <= _kth_smallest(keys, [self.config.max_points])[0]]
            frame, pixel = index // (H * W), index % (H * W)
            xyz = unproject_points(flat_depth[index], (pixel % W).float(), (pixel // W).float(),
                                   extrinsic[b, frame], intrinsic[b, frame])
            kept_points.append(torch.cat([xyz, colours[b, index].float() / 255], dim=1))
            focal_conf = conf[b, S // 2].reshape(-1)
            focal_depth = depth[b, S // 2]
            quality.append(torch.stack([
                *_quantiles(focal_conf, quantiles),
                valid.float().mean(),
                focal_depth.min(), focal_depth.max(),
            ]))

        # Only kept points, focal depth, cameras and quality numbers cross to the host: into pinned
        # memory without blocking, one wait for all of them.
        counts = [p.shape[0] for p in kept_points]
        points_cpu, quality_cpu, depth_cpu, extrinsic_cpu, intrinsic_cpu = _to_host(
            [torch.cat(kept_points), torch.stack(quality), depth[:, S // 2].contiguous(), extrinsic, intrinsic])
        points_cpu, quality_cpu = points_cpu.split(counts), quality_cpu.tolist()

        samples = []
        for b, w in enumerate(batch):
            q = quality_cpu[b]
            samples.append(Sample(
                video=w.video,
                frame_index=w.window.focal_frame,
                timestamp=w.timestamps[S // 2],
                fps=w.fps,
                dilation=w.dilation,
                window_frame_indices=list(w.window.frame_indices),
                window_timestamps=list(w.timestamps),
                world_frame=self.config.world_frame,
                rgb=w.frames[S // 2].clone(),  # a copy frees the window's other frames now
                depth=depth_cpu[b],
                extrinsic=extrinsic_cpu[b, S // 2].clone(),
                intrinsic=intrinsic_cpu[b, S // 2].clone(),
                window_extrinsics=extrinsic_cpu[b].clone(),
                window_intrinsics=intrinsic_cpu[b].clone(),
                points=points_cpu[b].clone(),  # clone: torch.save would otherwise write the whole batch
                shot_index=getattr(w, "shot_index", 0),
                shot_first_frame=getattr(w, "shot_first_frame", 0),
                shot_last_frame=getattr(w, "shot_last_frame", -1),
                quality={
                    "conf_p10": q[0], "conf_p50": q[1], "conf_p90": q[2],
                    "kept_fraction": q[3], "depth_min": q[4], "depth_max": q[5],
                },
            ))
        if self.stats is not None:
            self.stats.stat_update("postprocess_seconds", time.perf_counter() - forward_done)
        return samples


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy device tensors to the host: pinned buffers, non-blocking copies, one wait at the end."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors]
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for h, t in zip(host, tensors):
        h.copy_(t, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host


def _percentile(values: torch.Tensor, percentile: float) -> float:
    if percentile <= 0:
        return float("-inf")
    # k-th value works on any size and device (quantile refuses inputs over 16M elements)
    k = max(1, min(values.numel(), int(round(values.numel() * percentile / 100))))
    return _kth_smallest(values.float(), [k])[0].item()


def _kth_smallest(values: torch.Tensor, ks: list[int]) -> list[torch.Tensor]:
    """[values.kthvalue(k).values for k in ks] (1-based, flat tensor), exactly, but ~3x faster on
    the CPU for large inputs: a strided sample brackets each answer, one pass counts the values
    below the bracket, and the selection runs on the few values inside it. When a bracket misses
    (odd data) that k falls back to a full kthvalue. CUDA runs kthvalue as is."""
    n = values.numel()
    if values.device.type != "cpu" or n < (1 << 16):
        return [values.kthvalue(k).values for k in ks]
    sample = values[:: n >> 12].sort().values  # about 4096 values
    m = sample.numel()
    margin = 2 * math.isqrt(m) + 8  # sample ranks: ~4 standard deviations
    found: dict[int, torch.Tensor] = {}
    for k in sorted(set(ks)):
        if k in found:
            continue
        group = [j for j in ks if k <= j <= k + 2]  # a quantile's two neighbouring ranks share a bracket
        lo = sample[max(0, k * m // n - margin)]
        hi = sample[min(m - 1, max(group) * m // n + margin)]
        below = int((values < lo).sum())
        inside = values[(values >= lo) & (values <= hi)]  # NaN is in neither: kthvalue sorts it last
        for j in group:
            r = j - below
            found[j] = inside.kthvalue(r).values if 1 <= r <= inside.numel() else values.kthvalue(j).values
    return [found[k] for k in ks]


def _quantiles(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """torch.quantile(values, q) (linear interpolation, same float32 arithmetic), without sorting
    all values on the CPU (a 152k-value sort cost 13 ms a window)."""
    n = values.numel()
    if values.device.type != "cpu" or n < (1 << 16) or bool(values.isnan().any()):
        return torch.quantile(values, q)
    ranks = q * (n - 1)
    below, above = ranks.long(), ranks.ceil().long()
    kth = _kth_smallest(values, [int(i) + 1 for i in below.tolist() + above.tolist()])
    return torch.stack(kth[: len(q)]).lerp(torch.stack(kth[len(q):]), ranks - below)
