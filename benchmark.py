"""Throughput benchmark of one worker's pipeline; prints one table.

    python benchmark.py                                   # zero-cost model, generated 1080p + 360p clips
    python benchmark.py --backend tiny --seconds 3        # tiny random VGGT (needs the vggt package)
    python benchmark.py --backend vggt --device cuda --batch-size 1 4 8 16 --heads off
    python benchmark.py --rss-check                       # peak RSS: 10-minute vs 10-second 360p video
    python benchmark.py --shots-cost --sizes 1080p        # shot detector cost vs decode-only (--shots detect)

For every video and every --batch-size B, side by side in one run (medians over --repeats; the
ratios e2e/dec and e2e/model are medians of each repeat's own ratio, its runs being minutes apart
at most, so that a machine whose speed drifts affects both sides of a ratio alike):
  e2e         pipeline.Pipeline (decode thread -> model thread, B windows per forward -> writer
              thread) with a real ShardedWriter into a temporary folder: windows/s from submit to
              the video's last committed sample
  model-only  the same GeometryStage (forward + post-processing + copy to the host) called in a
              loop on pre-decoded windows, B per call
  decode-only FrameSource alone (the product's decoder): reading just the needed frames, once
              each, + resize to the model grid, with the e2e run's FFmpeg threads (--decode-threads)
  dec/need    frames handed over by the decoder / distinct frames some window needs (worst of the
              e2e and decode-only runs)
  s/window    decode, model forward, post-process and write seconds per window, from the same
              pipeline.Stats counters the worker logs and the driver's summary read
  dec wait    of decode s/w, the seconds the decode thread was not on a CPU (decode_seconds -
              decode_cpu_seconds): waiting for Python's GIL, for helper threads or for a core.
              Decode-only waits ~0.1 ms a window; much more in e2e means the other stages hold
              the decoder up (swscale's helper threads once cost 4-5 ms here, NOTES.md)
  overlap     sum of those four / e2e seconds per window: 1 = stages ran one after another,
              2 = two stages busy at every moment, at most 3 (or the free cores, on a CPU run)
  RSS MB      peak resident memory of a fresh process running that pipeline (--rss fresh)
  GPU MB      peak torch.cuda.max_memory_allocated during the e2e runs
  naive       per-window decord get_batch + PIL bicubic resize (VGGT's loader), one window per
              forward, everything to the host, numpy per-frame unprojection, numpy random subsample,
              inline writes, no threads (needs `pip install decord`); "speed-up" = e2e / naive

Timing notes: every loop runs in its own thread with torch on --cpu-threads threads (1 by default,
as a worker runs with --cpus-per-worker 1): on a loaded machine, OpenMP's spinning intra-op
threads made the same CPU post-processing 3-10x slower and erratic. Numbers are medians over
--repeats, the methods interleaved, so a change in machine load hits all of them alike.

Backends: 'zero' (a zero-cost model defined here: constant depth and cameras of the right shapes,
returned instantly, so everything but the network is measured), 'zero-stage' (no model and no
post-processing either: decode, queues and writer only), 'tiny' (tests/tiny_vggt.py),
'vggt' (full-size VGGT with random weights: same compute as VGGT-1B, no download), or any
'module:function' factory.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from frames import FrameSource, model_grid  # noqa: E402
from pipeline import REMOTE_POLL_LINGER, Pipeline, Stats, VideoResult, VideoTask, WindowSettings  # noqa: E402
from sharded_writer import ShardedWriter  # noqa: E402
from streaming_vggt import GeometryConfig, GeometryStage, Sample, load_backend, sample_seed  # noqa: E402
from window import needed_frames, num_windows, windows  # noqa: E402

# ----------------------------------------------------------------------------- test videos

SIZES = {"2160p": (3840, 2160), "1080p": (1920, 1080), "720p": (1280, 720), "360p": (640, 360)}


def generate_video(path: str, width: int, height: int, frames: int, fps: float, crf: int = 23) -> str:
    """An H.264 clip panning over a smooth multi-scale texture (about 7 Mbit/s at 1080p, 1 Mbit/s
    at 360p with crf 23: a realistic bitrate, unlike noise). Written to `path` atomically."""
    import av
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    pan_x, pan_y = 384, 256
    H, W = height + pan_y, width + pan_x
    img = torch.zeros(3, H, W)
    for cell, amp in ((64, 0.6), (16, 0.3), (4, 0.1)):
        noise = torch.rand(1, 3, H // cell + 2, W // cell + 2, generator=gen)
        img += amp * F.interpolate(noise, size=(H, W), mode="bilinear", align_corners=False)[0]
    base = (img.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    tmp = path + ".part.mp4"
    container = av.open(tmp, "w")
    stream = container.add_stream("libx264", rate=round(fps))
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"preset": "ultrafast", "crf": str(crf)}
    encode_pan(container, stream, base, frames)
    os.replace(tmp, path)
    return path


def encode_pan(container, stream, base: np.ndarray, frames: int) -> None:
    """Encode `frames` frames of stream.width x stream.height cut from uint8 [H, W, 3] `base`,
    moving 3 px right and 2 px down a frame (wrapping within its margin), then close the file."""
    import av

    width, height = stream.width, stream.height
    pan_x, pan_y = base.shape[1] - width, base.shape[0] - height
    for i in range(frames):
        dx, dy = (3 * i) % pan_x, (2 * i) % pan_y
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[dy:dy + height, dx:dx + width]), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def cached_video(workdir: str, size: str, seconds: float, fps: float) -> str:
    width, height = SIZES[size]
    frames = max(1, round(seconds * fps))
    path = os.path.join(workdir, f"bench_{size}_{frames}f_{fps:g}fps.mp4")
    if not os.path.exists(path):
        os.makedirs(workdir, exist_ok=True)
        started = time.perf_counter()
        generate_video(path, width, height, frames, fps)
        print(f"generated {path} ({frames} frames, {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return path


# ----------------------------------------------------------------------------- backends


class ZeroModel:
    """A model that costs nothing: constant depth, confidence and cameras of the right shapes, made
    once per input shape on the device and returned as is. What remains is the pipeline itself."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}

    def __call__(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        B, S, _, H, W = frames.shape
        key = (B, S, H, W)
        if key not in self._cache:
            dev = self.device
            v = torch.arange(H, device=dev, dtype=torch.float32)[:, None]
            u = torch.arange(W, device=dev, dtype=torch.float32)[None, :]
            depth = (2.0 + v / H + 0.5 * u / W).expand(B, S, H, W).contiguous()
            # confidence with spread, so the percentile filter keeps a realistic fraction
            conf = 1.0 + ((u * 7 + v * 13) % 17) / 4.0
            extrinsic = torch.zeros(B, S, 3, 4, device=dev)
            extrinsic[..., :3, :3] = torch.eye(3, device=dev)
            extrinsic[..., 0, 3] = torch.arange(S, device=dev, dtype=torch.float32) * 0.05
            intrinsic = torch.zeros(B, S, 3, 3, device=dev)
            intrinsic[..., 0, 0] = intrinsic[..., 1, 1] = 0.8 * W
            intrinsic[..., 0, 2], intrinsic[..., 1, 2], intrinsic[..., 2, 2] = (W - 1) / 2, (H - 1) / 2, 1.0
            self._cache[key] = {"depth": depth, "depth_conf": conf.expand(B, S, H, W).contiguous(),
                                "extrinsic": extrinsic, "intrinsic": intrinsic}
        return self._cache[key]


def make_zero(device: str = "cpu", **_options) -> ZeroModel:
    return ZeroModel(device)


class ZeroStage:
    """--backend zero-stage: the whole GeometryStage at zero cost (no model, no post-processing):
    each window's focal frame with canned depth, cameras and points. Only decode, the queues and
    the writer remain: on a machine without a GPU, where the post-processing of 'zero' runs on
    the CPU beside the decoder, this shows whether the pipeline and the writer keep up with decode."""

    def __init__(self, device: str | torch.device, max_points: int):
        self.device, self.stats, self.max_points = torch.device(device), None, max_points
        self._canned: dict[tuple, tuple] = {}

    def __call__(self, batch: list) -> list[Sample]:
        samples = []
        for w in batch:
            S, H, W, _ = w.frames.shape
            if (S, H, W) not in self._canned:
                depth = ZeroModel("cpu")(torch.zeros(1, S, 3, H, W))
                points = torch.rand(self.max_points, 6, generator=torch.Generator().manual_seed(0))
                self._canned[(S, H, W)] = (depth["depth"][0, S // 2].clone(), depth["extrinsic"][0].clone(),
                                           depth["intrinsic"][0].clone(), points)
            depth, extrinsic, intrinsic, points = self._canned[(S, H, W)]
            samples.append(Sample(
                video=w.video, frame_index=w.window.focal_frame, timestamp=w.timestamps[S // 2], fps=w.fps,
                dilation=w.dilation, window_frame_indices=list(w.window.frame_indices),
                window_timestamps=list(w.timestamps), world_frame="first", rgb=w.frames[S // 2].clone(),
                depth=depth, extrinsic=extrinsic[S // 2], intrinsic=intrinsic[S // 2],
                window_extrinsics=extrinsic, window_intrinsics=intrinsic, points=points,
                quality={"conf_p10": 1.0, "conf_p50": 2.0, "conf_p90": 3.0, "kept_fraction": 0.75,
                         "depth_min": float(depth.min()), "depth_max": float(depth.max())}))
        return samples


def make_stage(args, model, device: torch.device, config: GeometryConfig):
    if args.backend == "zero-stage":
        return ZeroStage(device, config.max_points)
    return GeometryStage(model, device, config)


def decode_threads(args) -> int:
    """FFmpeg's threads per video, as a worker sets them (extract_dataset.Worker): on a CPU device
    the worker's CPUs (--cpu-threads here, --cpus-per-worker there), on a GPU FFmpeg's choice."""
    if args.decode_threads is not None:
        return args.decode_threads
    return max(1, args.cpu_threads) if torch.device(args.device).type == "cpu" else 0


def make_model(args):
    if args.backend in ("zero", "zero-stage"):
        return make_zero(args.device)
    if args.backend == "tiny":
        sys.path.insert(0, os.path.join(HERE, "tests"))
        import tiny_vggt

        return tiny_vggt.make(args.device, precision=args.precision)
    if args.backend == "vggt":
        from streaming_vggt import make_vggt
        from vggt.models.vggt import VGGT

        torch.manual_seed(0)
        heads = args.heads == "on"  # point head runs; the track head only runs with query points
        with torch.device(args.device):  # random init straight on the GPU: seconds, not minutes
            network = VGGT(enable_point=heads, enable_track=heads)
        return make_vggt(args.device, network=network, precision=args.precision)
    return load_backend(args.backend)(args.device)


# ----------------------------------------------------------------------------- measuring tools


class PeakRSS:
    """This process's peak resident set size over the `with` block; `peak` in bytes.

    On Linux the kernel keeps the peak itself (VmHWM in /proc/self/status, reset by writing 5 to
    /proc/self/clear_refs), so nothing runs beside the measured pipeline. Elsewhere a thread
    samples the RSS every 5 ms; such a thread costs the pipeline it watches: waking 200 times a
    second, it took e2e/decode-only from 0.815 to 0.735 on the 2-core VM (paired, 8 rounds each;
    decode-only never ran beside it), so it is the fallback only."""

    def __init__(self):
        self.peak = 0
        self._kernel = _reset_peak_rss()
        self._thread = None
        if not self._kernel:
            import psutil

            self._process = psutil.Process()
            self.peak = self._process.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self):
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._kernel:
            self.peak = _kernel_peak_rss()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process; False where there is none to reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _kernel_peak_rss() > 0
    except OSError:
        return False


def _kernel_peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")


def in_thread(function, *args):
    """Run a measurement in a fresh thread, as the pipeline runs its stages: torch's intra-op
    threads behave differently in the main thread (on a loaded 2-core machine the main thread was
    ~10x slower on the same post-processing), so every loop is timed where the pipeline runs it."""
    result, error = [], []

    def run():
        try:
            result.append(function(*args))
        except BaseException as e:  # re-raised in the caller
            error.append(e)

    thread = threading.Thread(target=run, name=getattr(function, "__name__", "measure"))
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def measure_decode_only(video: str, settings: WindowSettings) -> dict:
    """FrameSource alone: the most windows/s the decode stage can hand the model."""
    started = time.perf_counter()
    source = FrameSource(video, settings.resize_mode, settings.decode_threads)
    dilation = settings.dilation_for(source.info.fps)
    count = sum(1 for _ in source.windows(settings.kernel, settings.stride, dilation))
    seconds = time.perf_counter() - started
    num_frames = source.num_frames if source.num_frames is not None else source.info.num_frames  # decoded
    needed = len(needed_frames(num_frames, settings.kernel, settings.stride, dilation))
    return {"windows": count, "seconds": seconds, "frames_decoded": source.frames_decoded,
            "frames_needed": needed, "num_frames": num_frames}


def measure_pipeline(stage: GeometryStage, video: str, settings: WindowSettings, batch_size: int,
                     out_root: str) -> dict:
    """The real pipeline on one video: submit, wait for the video's result, read the counters.
    `out_root` must not exist; what is written there stays until the caller removes it (see
    `fresh_root`)."""
    stats = Stats()
    writer = ShardedWriter(out_root, 0)
    pipeline = Pipeline(stage, writer, settings, batch_size=batch_size, stats=stats)
    gpu_peak_reset(stage.device)
    result = None
    with PeakRSS() as rss:
        started = time.perf_counter()
        pipeline.submit(VideoTask(video))
        while result is None:
            for event in pipeline.poll(0.5, linger=REMOTE_POLL_LINGER):
                if isinstance(event, VideoResult):
                    result = event
        seconds = time.perf_counter() - started
        pipeline.close()
    if result.status != "done":
        raise RuntimeError(f"pipeline on {video}: {result.status}: {result.reason}")
    counts = stats.snapshot()
    if counts.get("oom_batch_halvings"):
        print(f"e2e: out of GPU memory at B={batch_size}: the pipeline went on with B={pipeline.batch_size}",
              file=sys.stderr)
    return {"windows": result.samples, "seconds": seconds, "counts": counts,
            "peak_rss": rss.peak, "peak_gpu": gpu_peak(stage.device)}


def fresh_root(scratch: str, name: str) -> str:
    """A new, unused output root under `scratch` for one measured run. Runs never delete what an
    earlier run wrote: the whole scratch folder goes at the end. On ext4 without a journal (this
    VM's disk) every file created in the 1-6 minutes after a deletion scans past the deleted
    inodes (`recently_deleted` in the kernel's inode allocator): after the ~400 files of one e2e
    run were deleted, creating a file cost 0.3-1 ms of CPU instead of 0.02-0.06 (NOTES.md), which
    a real extraction, that never deletes, does not pay."""
    for n in itertools.count():
        root = os.path.join(scratch, f"{name}-{n}")
        if not os.path.exists(root):
            return root


def predecode(video: str, settings: WindowSettings, limit: int) -> list:
    source = FrameSource(video, settings.resize_mode, settings.decode_threads)
    dilation = settings.dilation_for(source.info.fps)
    out = []
    for w in source.windows(settings.kernel, settings.stride, dilation):
        out.append(w)
        if len(out) >= limit:
            break
    return out


def measure_model_only(stage: GeometryStage, decoded: list, batch_size: int) -> dict:
    """GeometryStage (forward, post-processing, copy to the host) in a loop, B windows per call."""
    stats = Stats()
    stage.stats = stats
    started = time.perf_counter()
    try:
        for at in range(0, len(decoded), batch_size):
            stage(decoded[at:at + batch_size])
    except torch.cuda.OutOfMemoryError:  # the pipeline would halve B; here the row says n/a
        print(f"model-only: out of GPU memory at B={batch_size}", file=sys.stderr)
        torch.cuda.empty_cache()
        return {"windows": 0, "seconds": float("nan"), "counts": {}}
    finally:
        stage.stats = None
    sync(stage.device)
    seconds = time.perf_counter() - started
    return {"windows": len(decoded), "seconds": seconds, "counts": stats.snapshot()}


# ----------------------------------------------------------------------------- the naive way


def unproject_numpy(depth: np.ndarray, extrinsic: np.ndarray, intrinsic: np.ndarray) -> np.ndarray:
    """Per-frame numpy unprojection, the way a straightforward script does it.
    depth [S,H,W], world-to-camera [S,3,4], intrinsic [S,3,3] -> world points [S,H,W,3]."""
    S, H, W = depth.shape
    u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    pixels = np.stack([u, v, np.ones_like(u)], axis=-1).reshape(-1, 3)  # homogeneous pixel coordinates
    world = np.empty((S, H, W, 3), np.float32)
    for i in range(S):
        rays = pixels @ np.linalg.inv(intrinsic[i].astype(np.float64)).T
        in_camera = rays * depth[i].reshape(-1, 1)
        rotation, translation = extrinsic[i][:, :3].astype(np.float64), extrinsic[i][:, 3].astype(np.float64)
        world[i] = ((in_camera - translation) @ rotation).reshape(H, W, 3)  # R^T (x - t), row vectors
    return world


def naive_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        print("naive baseline skipped: it reads with decord (pip install decord)", file=sys.stderr)
        return False
    return True


def measure_naive(model, device: torch.device, video: str, settings: WindowSettings, config: GeometryConfig,
                  out_root: str, limit: int) -> dict:
    """Window by window, one thread: decode, resize with PIL, forward, numpy geometry, write."""
    import decord  # the naive script's reader; not a requirement of the tool
    from PIL import Image

    writer = ShardedWriter(out_root, 0)
    started = time.perf_counter()
    reader = decord.VideoReader(video, ctx=decord.cpu(0))
    fps = float(reader.get_avg_fps())
    first = reader[0].shape
    grid = model_grid(first[1], first[0], settings.resize_mode)
    dilation = settings.dilation_for(fps)
    count = 0
    for window in windows(len(reader), settings.kernel, settings.stride, dilation):
        if count >= limit:
            break
        raw = reader.get_batch(list(window.frame_indices)).asnumpy()
        frames = np.stack([
            np.asarray(Image.fromarray(f).resize((grid.resize_w, grid.resize_h), Image.BICUBIC))
            [grid.crop_top:grid.crop_top + grid.height] for f in raw])
        x = torch.from_numpy(frames).to(device).permute(0, 3, 1, 2)[None].float() / 255
        with torch.inference_mode():
            out = model(x)
        depth = out["depth"][0].float().cpu().numpy()
        conf = out["depth_conf"][0].float().cpu().numpy()
        extrinsic = out["extrinsic"][0].float().cpu().numpy()
        intrinsic = out["intrinsic"][0].float().cpu().numpy()
        S, H, W = depth.shape
        world = unproject_numpy(depth, extrinsic, intrinsic).reshape(-1, 3)
        colours = frames.reshape(-1, 3).astype(np.float32) / 255
        threshold = max(config.min_conf, np.percentile(conf, config.conf_percentile))
        valid = (conf.reshape(-1) >= threshold) & (depth.reshape(-1) > 0) & np.isfinite(world).all(1)
        index = np.flatnonzero(valid)
        if len(index) > config.max_points:
            rng = np.random.default_rng(sample_seed(video, window.focal_frame))
            index = np.sort(rng.choice(index, config.max_points, replace=False))
        points = np.concatenate([world[index], colours[index]], axis=1)
        focal = S // 2
        focal_conf = conf[focal]
        writer.write(Sample(
            video=video, frame_index=window.focal_frame, timestamp=window.focal_frame / fps, fps=fps,
            dilation=dilation, window_frame_indices=list(window.frame_indices),
            window_timestamps=[i / fps for i in window.frame_indices], world_frame="first",
            rgb=torch.from_numpy(frames[focal].copy()), depth=torch.from_numpy(depth[focal].copy()),
            extrinsic=torch.from_numpy(extrinsic[focal].copy()), intrinsic=torch.from_numpy(intrinsic[focal].copy()),
            window_extrinsics=torch.from_numpy(extrinsic.copy()), window_intrinsics=torch.from_numpy(intrinsic.copy()),
            points=torch.from_numpy(points),
            quality={"conf_p10": float(np.percentile(focal_conf, 10)), "conf_p50": float(np.percentile(focal_conf, 50)),
                     "conf_p90": float(np.percentile(focal_conf, 90)), "kept_fraction": float(valid.mean()),
                     "depth_min": float(depth[focal].min()), "depth_max": float(depth[focal].max())},
        ))
        count += 1
    writer.close()
    seconds = time.perf_counter() - started
    return {"windows": count, "seconds": seconds}


# ----------------------------------------------------------------------------- the run


def median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


@dataclass
class Row:
    video: str
    batch: int
    windows: int
    e2e: float
    model_only: float
    decode_only: float
    e2e_per_decode: float  # median over repeats of (e2e / decode-only) of the same repeat
    e2e_per_model: float
    decoded_per_needed: float
    decode_s: float
    decode_wait_s: float
    model_s: float
    post_s: float
    write_s: float
    rss_mb: float
    gpu_mb: float
    naive: float

    @property
    def overlap(self) -> float:
        """Busy seconds of the three stage threads per window / e2e seconds per window: 1 = no
        overlap at all, up to 3 (or the number of free cores) = stages fully overlapped."""
        return (self.decode_s + self.model_s + self.post_s + self.write_s) * self.e2e


COLUMNS = [  # header, width, format
    ("video", 12, "s"), ("B", 3, "d"), ("windows", 7, "d"), ("e2e w/s", 8, ".2f"), ("model-only", 10, ".2f"),
    ("decode-only", 11, ".2f"), ("e2e/dec", 7, ".2f"), ("e2e/model", 9, ".2f"), ("dec/need", 8, ".2f"),
    ("decode s/w", 10, ".4f"), ("dec wait", 8, ".4f"), ("model s/w", 9, ".4f"), ("post s/w", 8, ".4f"),
    ("write s/w", 9, ".4f"), ("overlap", 7, ".2f"), ("RSS MB", 6, ".0f"), ("GPU MB", 6, ".0f"), ("naive w/s", 9, ".2f"),
    ("speed-up", 8, ".2f"),
]


def print_table(rows: list[Row], file=None) -> None:
    file = file or sys.stdout
    print(" | ".join(f"{h:>{w}}" for h, w, _ in COLUMNS), file=file)
    print("-|-".join("-" * w for _, w, _ in COLUMNS), file=file)
    for r in rows:
        values = [r.video, r.batch, r.windows, r.e2e, r.model_only, r.decode_only, r.e2e_per_decode,
                  r.e2e_per_model, r.decoded_per_needed, r.decode_s, r.decode_wait_s, r.model_s, r.post_s,
                  r.write_s, r.overlap, r.rss_mb, r.gpu_mb, r.naive, r.e2e / r.naive]
        cells = []
        for (h, w, f), v in zip(COLUMNS, values):
            cells.append(f"{'n/a':>{w}}" if isinstance(v, float) and v != v else f"{v:>{w}{f}}")
        print(" | ".join(cells), file=file)


def child_arguments(args, batch_size: int) -> list[str]:
    """The command-line options a --rss-child run needs to rebuild the same model and settings."""
    out = ["--backend", args.backend, "--device", args.device, "--batch-size", str(batch_size),
           "--kernel", str(args.kernel), "--stride", str(args.stride), "--dilation", str(args.dilation),
           "--resize-mode", args.resize_mode, "--max-points", str(args.max_points),
           "--precision", args.precision, "--heads", args.heads, "--cpu-threads", str(args.cpu_threads),
           "--decode-threads", str(decode_threads(args))]
    return out


def fresh_process_run(args, video: str, batch_size: int) -> dict:
    """One pipeline run on `video` in a new Python process: the peak RSS of a worker on its own."""
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child", video,
                           *child_arguments(args, batch_size)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"--rss-child on {video} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_benchmark(args) -> list[Row]:
    device = torch.device(args.device)
    settings = WindowSettings(args.kernel, args.stride, args.dilation, None, args.resize_mode,
                              decode_threads=decode_threads(args))
    config = GeometryConfig(max_points=args.max_points)
    model = make_model(args)
    stage = make_stage(args, model, device, config)
    # As a worker does once its model is loaded (extract_dataset.py): what is loaded now stays out of
    # the collector's sight, so no full collection (~50 ms with the GIL held, NOTES.md) lands in a run.
    gc.freeze()
    videos = [(os.path.basename(v), v) for v in args.videos] if args.videos else [
        (size, cached_video(args.workdir, size, args.seconds, args.fps)) for size in args.sizes]
    scratch = tempfile.mkdtemp(prefix="bench_out_")
    rows = []
    try:
        for label, video in videos:
            print(f"{label}: {video}", file=sys.stderr)
            decoded = in_thread(predecode, video, settings, args.model_windows or 10**9)
            if not decoded:
                print(f"{label}: shorter than one window, skipped", file=sys.stderr)
                continue
            for b in args.batch_size:  # warm-up: allocator, kernels, lazy init, per-shape caches
                in_thread(measure_model_only, stage, decoded[:b], b)
            sync(device)
            runs = {b: [] for b in args.batch_size}
            model_runs = {b: [] for b in args.batch_size}
            decode_runs, naive_runs = [], []
            for repeat in range(args.repeats):  # interleaved, so load changes hit every method alike
                decode_runs.append(in_thread(measure_decode_only, video, settings))
                order = args.batch_size if repeat % 2 == 0 else args.batch_size[::-1]
                for b in order:
                    runs[b].append(measure_pipeline(stage, video, settings, b, fresh_root(scratch, "e2e")))
                    model_runs[b].append(in_thread(measure_model_only, stage, decoded, b))
                if not args.no_naive and naive_available():
                    naive_runs.append(in_thread(measure_naive, model, device, video, settings, config,
                                                fresh_root(scratch, "naive"), args.model_windows or 10**9))
                print(f"{label}: repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
            del decoded
            decode_rate = median([d["windows"] / d["seconds"] for d in decode_runs])
            naive_rate = median([n["windows"] / n["seconds"] for n in naive_runs]) if naive_runs else float("nan")
            needed = decode_runs[0]["frames_needed"]
            for b in args.batch_size:
                e2e = runs[b]
                per_window = lambda key: median([r["counts"].get(key, 0) / max(1, r["windows"]) for r in e2e])
                # the worse of the pipeline's own count and the decode-only run's
                decoded_ratio = max([r["counts"].get("frames_decoded", 0) / max(1, needed) for r in e2e]
                                    + [d["frames_decoded"] / max(1, needed) for d in decode_runs])
                if args.rss == "fresh":
                    rss = fresh_process_run(args, video, b)["peak_rss"]
                else:
                    rss = median([r["peak_rss"] for r in e2e])
                rate = lambda run: run["windows"] / run["seconds"]
                rows.append(Row(
                    video=label, batch=b, windows=e2e[0]["windows"],
                    e2e=median([rate(r) for r in e2e]),
                    model_only=median([rate(m) for m in model_runs[b]]),
                    decode_only=decode_rate,
                    e2e_per_decode=median([rate(r) / rate(d) for r, d in zip(e2e, decode_runs)]),
                    e2e_per_model=median([rate(r) / rate(m) for r, m in zip(e2e, model_runs[b])]),
                    decoded_per_needed=decoded_ratio,
                    decode_s=per_window("decode_seconds"),
                    decode_wait_s=(per_window("decode_seconds") - per_window("decode_cpu_seconds")
                                   if all("decode_cpu_seconds" in r["counts"] for r in e2e) else float("nan")),
                    model_s=per_window("forward_seconds"),
                    post_s=per_window("postprocess_seconds"), write_s=per_window("write_seconds"),
                    rss_mb=rss / 2**20,
                    gpu_mb=median([r["peak_gpu"] for r in e2e]) / 2**20,
                    naive=naive_rate,
                ))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------- peak RSS vs video length


def rss_child(args) -> None:
    """One pipeline run in this (fresh) process; prints a JSON line with its peak RSS."""
    model = make_model(args)
    stage = make_stage(args, model, torch.device(args.device), GeometryConfig(max_points=args.max_points))
    settings = WindowSettings(args.kernel, args.stride, args.dilation, None, args.resize_mode,
                              decode_threads=decode_threads(args))
    scratch = tempfile.mkdtemp(prefix="bench_rss_")
    try:
        result = measure_pipeline(stage, args.rss_child, settings, args.batch_size[0], os.path.join(scratch, "out"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    import resource

    print(json.dumps({"windows": result["windows"], "seconds": result["seconds"], "peak_rss": result["peak_rss"],
                      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "frames_decoded": result["counts"].get("frames_decoded", 0)}))


def rss_check(args) -> None:
    """Peak RSS of a worker on a long 360p video vs a 10-second one: flat memory means within 10%."""
    short = cached_video(args.workdir, "360p", 10, args.rss_fps)
    long = cached_video(args.workdir, "360p", args.rss_minutes * 60, args.rss_fps)
    results = []
    for label, video in ((f"360p 10 s", short), (f"360p {args.rss_minutes:g} min", long)):
        results.append((label, fresh_process_run(args, video, args.batch_size[0])))
    base = results[0][1]["peak_rss"]
    print(f"# backend={args.backend} device={args.device} B={args.batch_size[0]} kernel={args.kernel} "
          f"stride={args.stride} dilation={args.dilation} fps={args.rss_fps:g}; each video in a fresh process")
    print(f"{'video':>14} | {'decoded':>7} | {'windows':>7} | {'w/s':>6} | {'peak RSS MB':>11} | "
          f"{'ru_maxrss MB':>12} | {'vs 10 s':>7}")
    print("-|-".join("-" * w for w in (14, 7, 7, 6, 11, 12, 7)))
    for label, r in results:
        print(f"{label:>14} | {r['frames_decoded']:>7} | {r['windows']:>7} | {r['windows'] / r['seconds']:>6.1f} | "
              f"{r['peak_rss'] / 2**20:>11.0f} | {r['ru_maxrss'] / 2**20:>12.0f} | {r['peak_rss'] / base:>7.3f}")


# ----------------------------------------------------------------------------- shot detection cost


def shots_cost(args) -> None:
    """What --shots detect adds to decoding, side by side on each video (medians over --repeats,
    the variants interleaved): one table.

      decode-only   FrameSource.windows (--shots off): the needed frames decoded + resized
      all frames    every frame decoded by PyAV, nothing converted (what detection must at least read)
      +small        ... plus each frame's 48x27 RGB copy (FFmpeg's scaler), the detector's input
      detector      TransNetV2 on those copies (--device), seconds and frames/s
      shots e2e     FrameSource.shot_windows with the detector: the decode stage of --shots detect
      cost          (shots e2e - decode-only) / decode-only: what detection adds to the decode stage
    """
    import av

    from shots import ShotDetector, TransNetV2Scores, load_transnetv2, small_copy

    videos = args.videos or [cached_video(args.workdir, size, args.seconds, args.fps) for size in args.sizes]
    model = load_transnetv2(args.device)
    settings = WindowSettings(args.kernel, args.stride, args.dilation, None, args.resize_mode,
                              decode_threads=decode_threads(args))

    def plain(video):
        source = FrameSource(video, settings.resize_mode, settings.decode_threads)
        return sum(1 for _ in source.windows(settings.kernel, settings.stride, settings.dilation))

    def every_frame(video, small: bool):
        smalls = []
        with av.open(video) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if small:
                    smalls.append(small_copy(frame))
        return smalls

    def shot_windows(video):
        source = FrameSource(video, settings.resize_mode, settings.decode_threads)
        return sum(1 for _ in source.shot_windows(settings.kernel, settings.stride, settings.dilation,
                                                  ShotDetector(model)))

    print(f"# shots cost: detector TransNetV2 on {args.device}, torch_threads={torch.get_num_threads()}, "
          f"kernel={args.kernel} stride={args.stride} dilation={args.dilation}, repeats={args.repeats} (medians)")
    print(f"{'video':>28} | {'frames':>6} | {'decode-only s':>13} | {'all frames s':>12} | {'+small s':>8} | "
          f"{'detector s':>10} | {'det f/s':>7} | {'shots e2e s':>11} | {'cost':>6}")
    print("-" * 128)
    for video in videos:
        times: dict[str, list[float]] = {}
        smalls: list = []
        for _ in range(args.repeats):
            for name, run in (("plain", lambda: plain(video)), ("all", lambda: every_frame(video, False)),
                              ("small", lambda: every_frame(video, True)), ("shots", lambda: shot_windows(video))):
                started = time.perf_counter()
                out = run()
                times.setdefault(name, []).append(time.perf_counter() - started)
                if name == "small":
                    smalls = out
            scorer = TransNetV2Scores(model)
            for small in smalls:
                scorer.push(small)
            scorer.finish()
            sync(torch.device(args.device))
            times.setdefault("detector", []).append(scorer.seconds)
        m = {k: median(v) for k, v in times.items()}
        print(f"{os.path.basename(video)[-28:]:>28} | {len(smalls):>6} | {m['plain']:>13.2f} | {m['all']:>12.2f} | "
              f"{m['small']:>8.2f} | {m['detector']:>10.2f} | {len(smalls) / m['detector']:>7.0f} | "
              f"{m['shots']:>11.2f} | {(m['shots'] - m['plain']) / m['plain']:>+6.0%}")


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--videos", nargs="+", default=None, help="video files (default: generate --sizes clips)")
    p.add_argument("--sizes", nargs="+", default=["1080p", "360p"], choices=sorted(SIZES),
                   help="generated H.264 clips")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each generated clip")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate of generated clips")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "vggt_benchmark_videos"),
                   help="where generated clips are kept (reused across runs)")
    p.add_argument("--backend", default="zero",
                   help="zero | zero-stage (no model and no post-processing either) | tiny | vggt | module:function")
    p.add_argument("--heads", default="off", choices=("off", "on"),
                   help="vggt: build the point (and track) heads too, as stock VGGT() does")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model and the post-processing run")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="autocast on CUDA (auto: bf16 on Ampere or newer), as extract_dataset.py")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 4], help="windows per forward (one row each)")
    p.add_argument("--kernel", type=int, default=5, help="frames per window (odd)")
    p.add_argument("--stride", type=int, default=3, help="frames between focal frames")
    p.add_argument("--dilation", type=int, default=2, help="frames between window frames")
    p.add_argument("--resize-mode", default="crop", choices=("crop", "pad"))
    p.add_argument("--max-points", type=int, default=50_000, help="points per sample, as extract_dataset.py")
    p.add_argument("--repeats", type=int, default=3, help="measurements per number; the table shows medians")
    p.add_argument("--model-windows", type=int, default=0,
                   help="model-only and naive runs use the first N windows of each video; 0: all")
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    p.add_argument("--decode-threads", type=int, default=None,
                   help="FFmpeg threads per video for decode-only and e2e alike (default: as a worker: "
                        "--cpu-threads on a CPU device, FFmpeg's choice (0) on a GPU)")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch.set_num_threads, as a worker sets it from --cpus-per-worker (default 1); 0: torch's "
                        "default (on a loaded machine OpenMP's spinning made 2 threads erratic, 3-10x slower)")
    p.add_argument("--rss", default="fresh", choices=("fresh", "inprocess"),
                   help="RSS column: a separate fresh-process pipeline run per row (a worker's true peak), "
                        "or the peak of this process during the e2e runs (includes everything loaded before)")
    p.add_argument("--rss-check", action="store_true",
                   help="instead: peak RSS of one pipeline on a long 360p video vs a 10-second one, each in a subprocess")
    p.add_argument("--shots-cost", action="store_true",
                   help="instead: what shot detection (--shots detect) adds to decode-only time, one table")
    p.add_argument("--rss-minutes", type=float, default=10.0)
    p.add_argument("--rss-fps", type=float, default=30.0)
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.kernel < 1 or args.kernel % 2 == 0:
        build_parser().error(f"argument --kernel: must be odd and >= 1, got {args.kernel}")
    if min(args.batch_size) < 1:
        build_parser().error("argument --batch-size: must be >= 1")
    if args.repeats < 1:
        build_parser().error("argument --repeats: must be >= 1")
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    if args.rss_child:
        rss_child(args)
        return 0
    if args.rss_check:
        rss_check(args)
        return 0
    if args.shots_cost:
        shots_cost(args)
        return 0
    rows = run_benchmark(args)
    print(f"# backend={args.backend} heads={args.heads} device={args.device} precision={args.precision} "
          f"kernel={args.kernel} stride={args.stride} dilation={args.dilation} max_points={args.max_points} "
          f"repeats={args.repeats} (medians) torch_threads={torch.get_num_threads()} "
          f"decode_threads={decode_threads(args)} "
          f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else os.cpu_count()} "
          f"{'GPU' if args.device.startswith('cuda') else 'CPUs'}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
