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
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
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


class _GridSize:
    """Stands in for the aggregator's PositionGetter (same call) and remembers the largest RoPE
    position of the grid it made: patch rows/columns + 1 (the aggregator shifts patch positions
    by one so that its special tokens sit at 0)."""

    def __init__(self, inner):
        self.inner = inner
        self.max_position = 0

    def __call__(self, batch_size: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        self.max_position = max(height, width) + 1  # an exclusive bound: a longer table changes no value
        return self.inner(batch_size, height, width, device)


def _rope_without_sync(rope: torch.nn.Module, grid: _GridSize):
    """RotaryPositionEmbedding2D.forward with the table length known from the patch grid instead
    of `int(positions.max())`, a host sync in each of the 48 blocks for q and k (96 a forward),
    which also stops CUDA graphs and torch.compile. Uses the module's own table and rotation."""

    def forward(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = rope._compute_frequency_components(tokens.size(-1) // 2, grid.max_position, tokens.device,
                                                      tokens.dtype)
        vertical, horizontal = tokens.chunk(2, dim=-1)
        return torch.cat((rope._apply_1d_rope(vertical, positions[..., 0], cos, sin),
                          rope._apply_1d_rope(horizontal, positions[..., 1], cos, sin)), dim=-1)

    return forward


def _keep_only(process, needed: set[int]):
    """Wraps Aggregator._process_frame/global_attention: intermediate outputs no head reads become
    empty [B, S, P, 0] tensors, so the 20 of VGGT's 24 layer outputs that the heads never read are
    freed as the forward goes instead of being held (and concatenated) to its end."""

    def run(tokens, B, S, P, C, index, pos=None):
        tokens, next_index, intermediates = process(tokens, B, S, P, C, index, pos=pos)
        return tokens, next_index, [t if index + i in needed else t.new_empty(B, S, P, 0)
                                    for i, t in enumerate(intermediates)]

    return run


def prepare_vggt(network: torch.nn.Module) -> torch.nn.Module:
    """Patches a built VGGT instance (never vggt's files) for inference: RoPE without host syncs,
    and unused aggregator outputs dropped early. Outputs are unchanged (tests compare)."""
    aggregator = network.aggregator
    if getattr(aggregator, "rope", None) is not None and not isinstance(aggregator.position_getter, _GridSize):
        aggregator.position_getter = _GridSize(aggregator.position_getter)
        aggregator.rope.forward = _rope_without_sync(aggregator.rope, aggregator.position_getter)
    depth = len(aggregator.frame_blocks)
    needed = {depth - 1}  # the camera head reads the last layer
    for head in (getattr(network, name, None) for name in ("depth_head", "point_head", "track_head")):
        layers = getattr(head, "intermediate_layer_idx", None) or getattr(
            getattr(head, "feature_extractor", None), "intermediate_layer_idx", None)
        if head is not None:
            if layers is None:
                return network  # a head whose reads are unknown: keep every output
            needed |= {i % depth for i in layers}
    if "_process_frame_attention" not in vars(aggregator):
        aggregator._process_frame_attention = _keep_only(aggregator._process_frame_attention, needed)
        aggregator._process_global_attention = _keep_only(aggregator._process_global_attention, needed)
    return network


class VGGTModel:
    """VGGT behind the seam: frames [B,S,3,H,W] in [0,1] -> depth, depth_conf, extrinsic, intrinsic."""

    def __init__(self, network: torch.nn.Module, device: torch.device, precision: str = "auto"):
        _, self._pose_encoding_to_extri_intri = _import_vggt()
        self.network = prepare_vggt(network.to(device).eval())
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


# Device memory of one window in a VGGT forward (prepare_vggt's trimmed outputs, bf16 autocast),
# per token: S * (H/14 * W/14 + 5) tokens a window. Estimated from the architecture (24 frame +
# 24 global blocks of width 1024; 4 kept layer outputs x 2 in fp32 and their concatenation; block
# transients; the DPT head at full resolution, 8 frames a chunk) and rounded up; gpu_check.py
# measures the real figure (peak memory / windows) and prints the number to put here.
VGGT_BYTES_PER_TOKEN = 300 * 1024
VGGT_RESERVED_BYTES = 3 * 2**30  # workspaces, fragmentation, the CUDA context's own growth
AUTO_BATCH_MAX = 32  # past this a forward is long enough that launch overhead no longer matters


def auto_batch_size(frames: int, height: int, width: int, free_bytes: int) -> int:
    """--batch-size auto on a GPU: windows of `frames` x height x width that fit in `free_bytes`
    (device memory free with the model loaded), within [1, AUTO_BATCH_MAX]."""
    tokens = frames * ((height // 14) * (width // 14) + 5)
    return max(1, min(AUTO_BATCH_MAX, int((free_bytes - VGGT_RESERVED_BYTES) // (tokens * VGGT_BYTES_PER_TOKEN))))


# ----------------------------------------------------------------------------- geometry helpers


def as_4x4(extrinsic: torch.Tensor) -> torch.Tensor:
    """[..., 3, 4] -> [..., 4, 4] with the homogeneous row."""
    bottom = torch.zeros(*extrinsic.shape[:-2], 1, 4, dtype=extrinsic.dtype, device=extrinsic.device)
    bottom[..., 0, 3] = 1
    return torch.cat([extrinsic, bottom], dim=-2)


def rebase_extrinsics(extrinsic: torch.Tensor, anchor: int) -> torch.Tensor:
    """[B,S,3,4] world-to-camera -> same cameras with world = camera `anchor` (E_i @ E_anchor^-1)."""
    full = as_4x4(extrinsic.double())
    # inv_ex: linalg.inv checks for singular input on the host, a sync per batch on CUDA
    return (full @ torch.linalg.inv_ex(full[:, anchor : anchor + 1]).inverse)[..., :3, :].float()


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
    # (the exact percentile of every PERCENTILE_STRIDE-th pixel of the window)
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
        self._key_tables: dict[int, PointKeys] = {}  # pixels per window -> its point keys
        self._input = torch.empty(0)  # CPU: the model's input, reused while the batch shape stays

    def input_order(self, num_frames: int) -> list[int]:
        """Positions (time order) in the order the model sees them."""
        focal = num_frames // 2
        if not self.config.focal_first:
            return list(range(num_frames))
        return [focal] + [i for i in range(num_frames) if i != focal]

    @torch.inference_mode()
    def predict(self, frames_u8: torch.Tensor | list[torch.Tensor]) -> dict:
        """uint8 [B,S,H,W,3], or a list of B windows' uint8 [S,H,W,3] (time order, host) -> model
        outputs on the device, cameras re-expressed in the configured world frame:
            depth, depth_conf  float32 [B,S,H,W]; time frame s is at index position[s] of dim 1
            extrinsic          float32 [B,S,3,4] world-to-camera, time order
            intrinsic          float32 [B,S,3,3], time order
            frames             the points' colours, time order: uint8 [B,S,H,W,3] on CUDA; on the
                               CPU the B windows' own uint8 [S,H,W,3] (a list: never stacked)
            position           list[int] [S]: time order on CUDA; on the CPU the model's own
                               order (no 12 MB copy a window: the host steps index frames by it)"""
        B, (S, H, W, _) = len(frames_u8), frames_u8[0].shape
        order = self.input_order(S)
        # [B,S,3,H,W] float in [0,1], model order, channels-last strides (a permuted view).
        if self.device.type == "cpu":
            # One pass per frame, straight from each window (no stacked copy first), into a float
            # buffer kept between calls: a fresh one above glibc's largest heap block (32 MB: B >= 4
            # at k5 518x294) is mapped anew and page-faulted every call, which cost more than the
            # conversion (17 ms vs 2.6 ms at B=4).
            if self._input.shape != (B, S, H, W, 3):
                self._input = torch.empty(B, S, H, W, 3)
            buffer = self._input.numpy()
            for b in range(B):
                frames = frames_u8[b].numpy()
                # An exact uint8 -> float32 cast per frame, then one in-place division: the values of
                # np.divide(uint8, 255), whose mixed-type loop is slower (0.60 vs 0.86 ms a k5 window).
                for j, i in enumerate(order):
                    buffer[b, j] = frames[i]
                np.divide(buffer[b], np.float32(255), out=buffer[b])
            x = self._input.permute(0, 1, 4, 2, 3)
            colours = [frames_u8[b] for b in range(B)]
        else:  # two vectorised passes on the device: stack of views, then convert and divide in place
            colours = _stacked(frames_u8, pin=frames_u8[0].device.type == "cpu").to(self.device, non_blocking=True)
            x = torch.stack([colours[:, i] for i in order], dim=1).permute(0, 1, 4, 2, 3).float().div_(255)
        out = self.model(x)
        position = [order.index(i) for i in range(S)]  # time frame s -> model input position[s]
        back = _upload(position, x.device)
        # on the CPU the depth maps stay in model order (the host steps read them by position)
        reorder = ("extrinsic", "intrinsic") + (("depth", "depth_conf") if self.device.type != "cpu" else ())
        out = {k: (out[k].index_select(1, back) if k in reorder else out[k]).float()
               for k in ("depth", "depth_conf", "extrinsic", "intrinsic")}
        out["position"] = list(range(S)) if "depth" in reorder else position
        anchor = 0 if self.config.world_frame == "first" else S // 2
        out["extrinsic"] = rebase_extrinsics(out["extrinsic"], anchor)
        out["frames"] = colours
        return out

    @torch.inference_mode()
    def __call__(self, batch: list[WindowFrames]) -> list[Sample]:
        started = time.perf_counter()
        out = self.predict([w.frames for w in batch])
        if self.stats is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            forward_done = time.perf_counter()
            self.stats.stat_update("forward_seconds", forward_done - started)
        seeds = [sample_seed(w.video, w.window.focal_frame) for w in batch]
        selection = self.select_points(out, seeds)
        points = self.assemble_points(out, selection)  # [B*K, 6] (device path, padded) or B x [count, 6]
        quality = self.quality_figures(out, selection)  # [B, 6]
        focal_depth = out["depth"][:, out["position"][len(batch[0].frames) // 2]]  # [B, H, W]
        if selection.padded is None:  # the host path: on the host already, each window's points its own
            points_cpu, quality_cpu, depth_cpu, extrinsic_cpu, intrinsic_cpu = (
                points, quality, focal_depth, out["extrinsic"], out["intrinsic"])
        else:
            # The one wait of the batch: kept points, counts, quality, focal depth and cameras cross
            # to the host together (pinned buffers, non-blocking copies).
            points_all, counts_cpu, quality_cpu, depth_cpu, extrinsic_cpu, intrinsic_cpu = _to_host([
                points, selection.counts, quality, focal_depth.contiguous(), out["extrinsic"], out["intrinsic"]])
            K, counts = selection.padded, counts_cpu.tolist()
            points_cpu = [points_all[b * K:b * K + counts[b]] for b in range(len(batch))]
        samples = [make_sample(w, self.config.world_frame, depth_cpu[b], extrinsic_cpu[b], intrinsic_cpu[b],
                               points_cpu[b], quality_cpu[b].tolist())
                   for b, w in enumerate(batch)]
        if self.stats is not None:
            self.stats.stat_update("postprocess_seconds", time.perf_counter() - forward_done)
        return samples

    # ------------------------------------------------------------------ batch-wide steps

    def select_points(self, out: dict, seeds: list[int]) -> "PointSelection":
        """Which pixels of each window become points: confidence at or above the window's
        `conf_percentile` (the exact k-th value of every PERCENTILE_STRIDE-th pixel, 95k of the
        762k at k5 518x294: within ~0.2 percentile points of the full window's, at a fifth of the
        cost) and `min_conf`, finite positive depth, a usable camera;
        of those, the `max_points` with the smallest keys (`PointKeys`), in flat (s, v, u) order.

        On CUDA everything stays on the device with static shapes (no host sync): [B, K] pixel
        indices, K = min(max_points, S*H*W), padded past each window's count. On the CPU the same
        pixels are found with numpy (several times faster than torch there for these steps)."""
        if self.device.type == "cpu":
            return self._select_on_host(out, seeds)
        return self._select_on_device(out, seeds)

    def _threshold_rank(self, n: int) -> int:
        """1-based rank of the confidence threshold among n values; 0 = no percentile filter."""
        p = self.config.conf_percentile
        return 0 if p <= 0 else max(1, min(n, int(round(n * p / 100))))

    def _select_on_host(self, out: dict, seeds: list[int]) -> "PointSelection":
        B, S, H, W = out["depth"].shape
        HW, P = H * W, PERCENTILE_STRIDE
        N, M = S * HW, self.config.max_points
        camera_ok = _camera_ok(out["extrinsic"], out["intrinsic"]).numpy()  # [B, S]
        rank = self._threshold_rank(-(-N // P))  # among the sampled pixels
        indices, counts, kept = [], [], []
        for b in range(B):
            cs, ds = _time_frames(out, "depth_conf", b), _time_frames(out, "depth", b)  # [HW] each
            # every P-th pixel of the window in (s, v, u) order: frame s starts at flat s*HW
            sample = np.concatenate([c[(-s * HW) % P::P] for s, c in enumerate(cs)])
            threshold = max(self.config.min_conf, _kth_smallest_np(sample, rank)) if rank else self.config.min_conf
            valid = np.empty(N, bool)  # flat (s, v, u), time order
            for s, c in enumerate(cs):
                np.greater_equal(c, threshold, out=valid[s * HW:(s + 1) * HW])
            if not all(d.min() > 0 and d.max() < np.inf for d in ds):  # NaN fails both: only then the masks
                with np.errstate(invalid="ignore"):
                    for s, d in enumerate(ds):
                        valid[s * HW:(s + 1) * HW] &= d > 0
                        valid[s * HW:(s + 1) * HW] &= d < np.inf
            if not camera_ok[b].all():
                valid.reshape(S, H * W)[~camera_ok[b]] = False
            count = int(np.count_nonzero(valid))
            kept.append(count / N)
            if M == 0:
                index = np.zeros(0, np.int64)
            elif count <= M:
                index = np.flatnonzero(valid)
            else:
                index = self._keys(N).first_valid(valid, count, seeds[b], M)
            indices.append(index + b * N)
            counts.append(index.size)
        return PointSelection(torch.from_numpy(np.concatenate(indices)), torch.tensor(counts),
                              torch.tensor(kept, dtype=torch.float64), None)

    def _select_on_device(self, out: dict, seeds: list[int]) -> "PointSelection":
        depth, conf = _time_ordered(out, "depth"), _time_ordered(out, "depth_conf")
        B, S, H, W = depth.shape
        N, dev = S * H * W, depth.device
        K = min(self.config.max_points, N)
        flat_conf = conf.reshape(B, N)
        sample = flat_conf[:, ::PERCENTILE_STRIDE]
        rank = self._threshold_rank(sample.shape[1])
        threshold = (sample.float().kthvalue(rank, dim=1).values.clamp_min(self.config.min_conf) if rank
                     else torch.full((B,), self.config.min_conf, device=dev))
        valid = (flat_conf >= threshold[:, None]) & (depth.reshape(B, N) > 0) & (depth.reshape(B, N) < float("inf"))
        valid = (valid.view(B, S, H * W) & _camera_ok(out["extrinsic"], out["intrinsic"])[:, :, None]).view(B, N)
        count = valid.sum(1)
        kept = count.double() / N
        if K == 0:
            return PointSelection(torch.zeros(B, 0, dtype=torch.int64, device=dev), torch.zeros_like(count), kept, 0)
        pixel = torch.arange(N, device=dev)
        if K == N:  # no cap: every valid pixel, in order
            index = torch.where(valid, pixel, N).sort(dim=1).values
        else:
            key = self._keys(N).keys(_upload(seeds, dev), dev)  # [B, N]
            key = torch.where(valid, key, key + N)  # invalid pixels after every valid one
            smallest, at = key.topk(K, dim=1, largest=False, sorted=False)
            index = torch.where(smallest < N, at, N).sort(dim=1).values
        return PointSelection(index, count.clamp_max(K), kept, K)

    def _keys(self, n: int) -> "PointKeys":
        if n not in self._key_tables:
            self._key_tables[n] = PointKeys(n)
        return self._key_tables[n]

    def assemble_points(self, out: dict, selection: "PointSelection") -> torch.Tensor | list[torch.Tensor]:
        """Kept pixels -> points [.., 6]: x y z in the window's world (unprojected through their
        own frame's camera) and r g b in [0, 1] from their own frame. Device path: [B*K, 6],
        window b's points at b*K (padded); host path: a list of B float32 [count_b, 6]."""
        if selection.padded is None:
            return _assemble_on_host(out, selection.index)
        depth, extrinsic, intrinsic = _time_ordered(out, "depth"), out["extrinsic"], out["intrinsic"]
        B, S, H, W = depth.shape
        N = S * H * W
        flat = selection.index
        # device path: [B, K], padding (N) where a window has fewer points
        flat = (flat.clamp_max(N - 1) + torch.arange(B, device=flat.device)[:, None] * N).reshape(-1)
        window, pixel = flat // N, flat % N
        frame = pixel // (H * W)
        camera = window * S + frame
        xyz = unproject_points(depth.reshape(-1)[flat], (pixel % W).float(), ((pixel // W) % H).float(),
                               extrinsic.reshape(B * S, 3, 4)[camera], intrinsic.reshape(B * S, 3, 3)[camera])
        rgb = _stacked(out["frames"]).reshape(B * N, 3)[flat].float().div_(255)  # the CPU keeps a list
        return torch.cat([xyz, rgb], dim=1)

    def quality_figures(self, out: dict, selection: "PointSelection") -> torch.Tensor:
        """[B, 6] float64: focal-frame confidence p10 / p50 / p90 (over every QUALITY_STRIDE-th
        pixel, torch.quantile's linear interpolation), kept fraction of the window's pixels, focal
        depth min and max."""
        depth, conf = out["depth"], out["depth_conf"]
        B, S = depth.shape[:2]
        focal = out["position"][S // 2]
        focal_conf = conf[:, focal].reshape(B, -1)[:, ::QUALITY_STRIDE]
        if selection.padded is None:  # the host path
            conf_q = _quantiles_np(focal_conf, QUALITY_QUANTILES)
        else:  # torch.quantile checks q on the host (a sync): the same interpolation from a sort
            ranks = [q * (focal_conf.shape[1] - 1) for q in QUALITY_QUANTILES]
            ordered = focal_conf.float().sort(dim=1).values
            low_q = torch.stack([ordered[:, math.floor(r)] for r in ranks], dim=1)  # plain indexing: no
            high_q = torch.stack([ordered[:, math.ceil(r)] for r in ranks], dim=1)  # index tensor to upload
            weight = _upload([r - math.floor(r) for r in ranks], ordered.device, torch.float32)
            conf_q = low_q + (high_q - low_q) * weight
            conf_q = torch.where(focal_conf.isnan().any(1, keepdim=True), float("nan"), conf_q)
        if selection.padded is None:  # numpy: several times faster than aminmax on the CPU (NaN propagates alike)
            focal_depth = depth[:, focal].reshape(B, -1).numpy()
            low, high = torch.from_numpy(focal_depth.min(axis=1)), torch.from_numpy(focal_depth.max(axis=1))
        else:
            low, high = torch.aminmax(depth[:, focal].reshape(B, -1), dim=1)
        kept = selection.kept_fraction.to(conf_q.device)
        return torch.cat([conf_q.double(), kept[:, None], low.double()[:, None], high.double()[:, None]], dim=1)


PERCENTILE_STRIDE = 8  # the confidence threshold is the percentile of every 8th pixel of the window
QUALITY_QUANTILES = (0.1, 0.5, 0.9)
QUALITY_STRIDE = 8  # confidence percentiles of the focal frame from every 8th pixel (38k of 152k at 518x294)


@dataclass
class PointSelection:
    """Kept pixels of a batch. padded None (host path): `index` int64 [total], flat b*N + pixel,
    windows one after another; padded K (device path): `index` int64 [B, K] pixel indices in
    increasing order, N past each window's `counts[b]`. `kept_fraction` float64 [B]: the fraction
    of the window's pixels that passed the filters (before the cap)."""

    index: torch.Tensor
    counts: torch.Tensor
    kept_fraction: torch.Tensor
    padded: int | None


class PointKeys:
    """Deterministic point keys for windows of n pixels: a fixed pseudo-random walk over the
    pixels, started at the window's seed; a pixel's key is its step in that walk. Capping keeps
    the valid pixels with the smallest keys, i.e. the first max_points valid ones the walk meets:
    the same pixels on every device, in every batch, on every rerun, needing no RNG state.

    walk step j visits pixel (order[j] + seed) mod n, where `order` sorts the integer hash
    priority_of(0..n-1) (a fixed random permutation); key(pixel) = rank[(pixel - seed) mod n]."""

    def __init__(self, n: int):
        self.n = n
        order = torch.argsort(priority_of(torch.arange(n, dtype=torch.int64), n))  # keys distinct: unique order
        self.order = order.numpy().astype(np.int32)  # int32: half the bytes to gather
        self.rank = torch.empty(n, dtype=torch.int64)
        self.rank[order] = torch.arange(n)
        self._on_device: dict[torch.device, torch.Tensor] = {}
        # walk prefix length -> (the pixels it visits in increasing order, the step of each): int32
        self._sorted_prefixes: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def keys(self, seeds: torch.Tensor, device: torch.device) -> torch.Tensor:
        """[B] seeds -> [B, n] int64 key of every pixel."""
        if device not in self._on_device:
            self._on_device[device] = self.rank.to(device)
        pixel = torch.arange(self.n, device=device)
        return self._on_device[device][(pixel[None, :] - seeds[:, None] % self.n) % self.n]

    def first_valid(self, valid: np.ndarray, valid_count: int, seed: int, count: int) -> np.ndarray:
        """The first `count` pixels of the walk where `valid` (bool [n], `valid_count` > `count`
        of them True) holds, as int64 pixel indices in increasing order. Only a prefix of the walk
        is looked at, through `valid` rotated by the seed (so the walk itself needs no arithmetic):
        the walk finds how many steps `taken` it needs, and a prefix of the walk sorted once per
        table (`_sorted_prefix`) hands out the pixels it met already in increasing order (sorting
        the 50k pixels met cost 1.3-1.7 ms a window; this 0.3)."""
        n, seed = self.n, seed % self.n
        rotated = np.concatenate((valid[seed:], valid[:seed]))  # rotated[j] = valid[(j + seed) % n]
        look = min(n, int(count * n / valid_count * 1.1) + 4096)
        while True:
            met = np.flatnonzero(np.take(rotated, self.order[:look]))  # steps that meet a valid pixel
            if met.size >= count or look == n:
                break
            look = min(n, 2 * look)
        taken = int(met[count - 1]) + 1  # steps 0 .. taken-1 meet exactly `count` valid pixels
        pixels, steps = self._sorted_prefix(taken)
        walk = np.compress(np.take(rotated, pixels) & (steps < taken), pixels).astype(np.int64)
        wrap = np.searchsorted(walk, n - seed)  # positions from here on wrap round to the start
        return np.concatenate((walk[wrap:] - (n - seed), walk[:wrap] + seed))

    def _sorted_prefix(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(rotated positions visited by the first L >= `steps` steps of the walk, in increasing
        order; the step that visits each), int32 [L] each, L the next power of two from 2^16
        (at most n): a few tables a window size, ~2n entries in all, built on first use."""
        length = min(self.n, max(1 << 16, 1 << (steps - 1).bit_length()))
        if length not in self._sorted_prefixes:
            pixels = np.sort(self.order[:length])
            self._sorted_prefixes[length] = (pixels, self.rank.numpy()[pixels].astype(np.int32))
        return self._sorted_prefixes[length]


def _assemble_on_host(out: dict, flat: torch.Tensor) -> list[torch.Tensor]:
    """assemble_points on the CPU, in numpy: `flat` [total] increasing b*N + pixel indices ->
    B float32 [count_b, 6], each window's points in an array of its own (a sample never pins its
    batch, and needs no copy). Each camera's points are one contiguous run, unprojected with that
    camera's numbers as planar [3, run] arrays (numpy is several times slower on [run, 3] rows)
    and turned into rows by the matrix product, written straight into the points (BLAS writes
    strided rows at full speed; numpy's own strided writes do not). Same arithmetic as
    unproject_points."""
    B, S, H, W = out["depth"].shape
    HW = H * W
    index = flat.numpy()
    bounds = np.searchsorted(index, np.arange(B * S + 1) * HW)  # camera c = b*S + s: bounds[c]:bounds[c+1]
    K = out["intrinsic"].reshape(B * S, 3, 3).numpy()
    E = out["extrinsic"].reshape(B * S, 3, 4).numpy()
    windows = []
    for b in range(B):
        z = _time_frames(out, "depth", b)  # z[s]: flat [H*W]
        first, last = bounds[b * S], bounds[(b + 1) * S]
        points = np.empty((last - first, 6), np.float32)  # x y z r g b
        for c in range(b * S, (b + 1) * S):
            if bounds[c] == bounds[c + 1]:
                continue
            pixel = index[bounds[c]:bounds[c + 1]] - c * HW
            v, u = np.divmod(pixel, W)
            zc = z[c - b * S][pixel]
            cam = np.stack(((u.astype(np.float32) - K[c, 0, 2]) / K[c, 0, 0] * zc,
                            (v.astype(np.float32) - K[c, 1, 2]) / K[c, 1, 1] * zc, zc))  # [3, run]
            cam -= E[c, :, 3:]
            np.matmul(cam.T, E[c, :, :3], out=points[bounds[c] - first:bounds[c + 1] - first, :3])  # (x - t)^T R
        # uint8 [count, 3] from the window's own frames (flat (s, v, u) rows)
        rgb = torch.from_numpy(np.take(out["frames"][b].numpy().reshape(-1, 3), index[first:last] - b * S * HW, axis=0))
        points = torch.from_numpy(points)
        torch.div(rgb, 255, out=points[:, 3:])  # torch: strided rows 2x faster than numpy
        windows.append(points)
    return windows


def _stacked(frames: torch.Tensor | list[torch.Tensor], pin: bool = False) -> torch.Tensor:
    """uint8 [B,S,H,W,3] itself, or B windows' [S,H,W,3] stacked into one (one window: a view).
    `pin`: in page-locked memory, for a non-blocking upload; B windows are stacked straight into
    it, one host copy instead of a stack and then a pinned copy (73 MB each at B=32, k5 518x294)."""
    if isinstance(frames, torch.Tensor):
        return frames.pin_memory() if pin else frames
    if len(frames) == 1:
        return frames[0][None].pin_memory() if pin else frames[0][None]
    out = torch.empty((len(frames), *frames[0].shape), dtype=frames[0].dtype, pin_memory=pin)
    return torch.stack(frames, out=out)


def _time_frames(out: dict, key: str, b: int) -> list[np.ndarray]:
    """Window b of out[key] (CPU, [B,S,H,W]) as S flat [H*W] numpy views, in time order."""
    return [out[key][b, p].reshape(-1).numpy() for p in out["position"]]


def _time_ordered(out: dict, key: str) -> torch.Tensor:
    """out[key] [B,S,H,W] in time order: itself on CUDA (predict reorders there), else a copy."""
    position = out["position"]
    if position == list(range(len(position))):
        return out[key]
    return out[key].index_select(1, torch.tensor(position, device=out[key].device))


def _camera_ok(extrinsic: torch.Tensor, intrinsic: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: the frame's camera can unproject (finite, fx and fy non-zero)."""
    return (torch.isfinite(extrinsic).flatten(2).all(-1) & torch.isfinite(intrinsic).flatten(2).all(-1)
            & (intrinsic[..., 0, 0] != 0) & (intrinsic[..., 1, 1] != 0))


def make_sample(w: WindowFrames, world_frame: str, focal_depth: torch.Tensor, extrinsic: torch.Tensor,
                intrinsic: torch.Tensor, points: torch.Tensor, quality: list[float]) -> Sample:
    """One window's Sample from host tensors: focal depth [H, W], cameras [S, 3, 4] / [S, 3, 3],
    points [N, 6], quality (QUALITY order + kept fraction, depth min, max). Copies what it keeps
    of batch-wide tensors, so a sample never pins its batch."""
    S = len(w.window.frame_indices)
    q = quality
    return Sample(
        video=w.video,
        frame_index=w.window.focal_frame,
        timestamp=w.timestamps[S // 2],
        fps=w.fps,
        dilation=w.dilation,
        window_frame_indices=list(w.window.frame_indices),
        window_timestamps=list(w.timestamps),
        world_frame=world_frame,
        rgb=w.frames[S // 2].clone(),  # a copy frees the window's other frames now
        depth=_own(focal_depth),
        extrinsic=extrinsic[S // 2].clone(),
        intrinsic=intrinsic[S // 2].clone(),
        window_extrinsics=_own(extrinsic),
        window_intrinsics=_own(intrinsic),
        points=_own(points),  # torch.save would otherwise write the whole batch
        quality={"conf_p10": q[0], "conf_p50": q[1], "conf_p90": q[2],
                 "kept_fraction": q[3], "depth_min": q[4], "depth_max": q[5]},
        **{name: getattr(w, name) for name in SHOT_FIELDS if hasattr(w, name) and name in Sample.__dataclass_fields__},
    )


SHOT_FIELDS = ("shot_index", "shot_first_frame", "shot_last_frame")  # WindowFrames -> Sample, once both have them


def _upload(values: list, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A tensor of `values` on `device`; on CUDA through pinned memory, so the copy makes the host
    wait for nothing (a plain torch.tensor(..., device=cuda) copy does)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t


def _own(t: torch.Tensor) -> torch.Tensor:
    """t itself when it is all of its storage (a batch of one), else a copy of just t."""
    if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy device tensors to the host: pinned buffers, non-blocking copies, one wait at the end."""
    if all(t.device.type != "cuda" for t in tensors):
        return [t.cpu() for t in tensors]
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for h, t in zip(host, tensors):
        h.copy_(t, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host


def _kth_smallest_np(values: np.ndarray, k: int) -> float:
    """values (float32, flat) -> its k-th smallest (1-based) exactly, as torch.kthvalue (NaN
    last). Two strided samples narrow a bracket [lo, hi] round the answer (a sorted 1-in-(n/8192)
    sample, then the 1-in-8 values inside its bracket) to about 1 % of the values; one pass over
    all values then counts those below the bracket and pulls out those inside, and numpy's
    selection runs on those few. A bracket that missed falls back to a full selection."""
    n = values.size
    if n < (1 << 15):
        return float(np.partition(values, k - 1)[k - 1])
    lo, hi = -np.inf, np.inf
    margin_share = 4 * math.sqrt(k / n * (1 - k / n))  # 4 standard deviations of a sample rank, / sqrt(m)
    for step in (n >> 13, 8):
        sample = np.ascontiguousarray(values[::step])  # numpy compares strided arrays ~10x slower
        m = sample.size
        inside = np.sort(sample[(sample >= lo) & (sample <= hi)])
        at = k * m / n - np.count_nonzero(sample < lo)  # the answer's expected place in `inside`
        first, last = math.floor(at - margin_share * math.sqrt(m) - 8), math.ceil(at + margin_share * math.sqrt(m) + 8)
        if 0 <= first < inside.size:
            lo = inside[first]
        if 0 <= last < inside.size:
            hi = inside[last]
    below_lo = values < lo
    below = int(np.count_nonzero(below_lo))
    up_to_hi = values <= hi
    if below < k <= np.count_nonzero(up_to_hi):  # the answer is in [lo, hi]
        if lo == hi:
            return float(lo)
        inside = up_to_hi > below_lo  # lo <= value <= hi
        if np.count_nonzero(inside) > n // 16 and k <= np.count_nonzero(values <= lo):  # ties at lo
            return float(lo)
        inside = values[inside]
        return float(np.partition(inside, k - below - 1)[k - below - 1])
    return float(np.partition(values, k - 1)[k - 1])


def _quantiles_np(values: torch.Tensor, q: tuple[float, ...]) -> torch.Tensor:
    """[B, n] float (CPU) -> [B, len(q)] float32, torch.quantile's linear interpolation (NaN in a
    row gives NaN, as there). Only the order statistics it reads are put in place (np.partition:
    0.06 vs 0.44 ms for sorting 19k values), and the row's largest, which is NaN if any is."""
    x = values.float().numpy()
    n = x.shape[1]
    ranks = np.asarray(q, np.float64) * (n - 1)
    below, above = np.floor(ranks).astype(np.int64), np.ceil(ranks).astype(np.int64)
    x = np.partition(x, sorted({*below.tolist(), *above.tolist(), n - 1}), axis=1)  # NaN last, as sorted
    lo, hi = x[:, below], x[:, above]
    out = lo + (hi - lo) * (ranks - below).astype(np.float32)
    out[np.isnan(x[:, -1])] = np.nan
    return torch.from_numpy(out.astype(np.float32))
