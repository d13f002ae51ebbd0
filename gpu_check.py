"""One-shot GPU check: is this machine ready, and how fast is the tool on it? Prints tables.

    python gpu_check.py --vggt-src ../vggt            # one H100/H200, about 3-5 minutes
    python gpu_check.py --tiny --device cpu            # a tiny VGGT on the CPU, seconds (the test suite runs it)

Needs only torch, numpy, pillow and PyAV (no Ray, no tqdm, no network, no checkpoint): VGGT is the
full-size architecture with random weights (the same compute as VGGT-1B), and `--vggt-src` points at
a vggt source checkout (the folder holding the `vggt` package) when it is not installed. Sections:

  forward     VGGT forward ms/window and peak GPU memory at B = 1, 4, 8, 16, 32 (k5, 518x294, heads as
              the tool builds them: camera + depth; bf16 autocast), k15 at B=16, host syncs per
              forward, and the upstream model without the tool's patches at B=8 for comparison;
              the measured bytes per token for streaming_vggt.VGGT_BYTES_PER_TOKEN (--batch-size auto)
  post        GeometryStage post-processing ms/window and host syncs per batch (model outputs
              replayed, so only post-processing runs)
  e2e         model-only vs end-to-end (decode thread -> model -> writer, real files) windows/s on
              a generated 1080p clip at strides 1 and 3 (k5, dilation 1)
  variants    forward variants measured before any is kept (issue 12): the aggregator's weights cast
              to bf16 once (autocast re-casts them every forward; the heads stay fp32) and, with
              --compile BACKEND, torch.compile of the network (first call = compile time; its graph
              breaks): ms/window, peak memory and how far the outputs move from the tool's model
              on the same input (random weights: a rough guide)
  oom         out-of-memory recovery: device memory filled until only a few windows fit, the
              pipeline at a batch that does not: it must halve, write every sample, leak nothing
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import threading
import time
import types
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _import_path(vggt_src: str | None) -> None:
    """vggt from a source folder; its model module imports huggingface_hub only for a hub mixin
    (downloads), which a machine with no network may lack: an empty stand-in then."""
    if vggt_src:
        sys.path.insert(0, os.path.abspath(vggt_src))
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        stub = types.ModuleType("huggingface_hub")
        stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {"__init_subclass__": classmethod(lambda cls, **kw: None)})
        sys.modules["huggingface_hub"] = stub


# ----------------------------------------------------------------------------- helpers


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SyncCounter:
    """Counts the host syncs CUDA ops make (torch.cuda.set_sync_debug_mode 'warn'); None on CPU."""

    def __init__(self, device):
        self.device, self.count = device, None

    def __enter__(self):
        import torch

        if self.device.type != "cuda":
            return self
        self._catch = warnings.catch_warnings(record=True)
        self._seen = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type != "cuda":
            return
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        self.count = sum("synchroniz" in str(w.message) for w in self._seen)


def build_network(args, device):
    """Full-size VGGT (random weights) as the tool builds it, or the tests' tiny one."""
    import torch

    if args.tiny:
        sys.path.insert(0, os.path.join(HERE, "tests"))
        from tiny_vggt import tiny_vggt

        return tiny_vggt().to(device)
    from vggt.models.vggt import VGGT

    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds
        net = VGGT(enable_point=False, enable_track=False)
    with torch.no_grad():  # random init predicts fov ~ 0 (no usable camera, no points): as tests/tiny_vggt.py
        net.camera_head.pose_branch.fc2.bias[7:] += 0.6
    return net.eval()


def windows_of(frames_u8, count: int, kernel: int, video: str = "synthetic"):
    """`count` WindowFrames over one random uint8 clip [T, H, W, 3] (k frames, dilation 1)."""
    from frames import WindowFrames
    from window import Window

    out = []
    for i in range(count):
        idx = tuple(range(i, i + kernel))
        out.append(WindowFrames(video=video, window=Window(focal_frame=i + kernel // 2, frame_indices=idx),
                                dilation=1, frames=frames_u8[i:i + kernel], timestamps=tuple(j / 30 for j in idx),
                                fps=30.0))
    return out


def clip_frames(kernel: int, count: int, height: int, width: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count + kernel, height, width, 3), dtype=torch.uint8, generator=g)


def time_forward(model, x, device, iterations: int) -> float:
    import torch

    with torch.inference_mode():
        model(x)  # warm-up: allocator, kernels, caches
        sync(device)
        started = time.perf_counter()
        for _ in range(iterations):
            model(x)
        sync(device)
    return (time.perf_counter() - started) / iterations


def is_oom(error: BaseException) -> bool:
    from pipeline import classify_error

    return classify_error(error) == "oom"


def free_memory(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- sections


def check_forward(args, network, device) -> dict:
    import torch

    from streaming_vggt import VGGT_BYTES_PER_TOKEN, make_vggt

    upstream = copy.deepcopy(network) if args.compare_upstream else None
    model = make_vggt(device, network=network, precision=args.precision)
    H, W = args.height, args.width
    rows, per_token = [], []
    shapes = [(args.kernel, b) for b in args.batch_sizes] + [(k, b) for k, b in args.extra]
    for kernel, batch in shapes:
        frames = torch.rand(batch, kernel, 3, H, W, device=device)
        if device.type == "cuda":
            free_memory(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        try:
            seconds = time_forward(model, frames, device, args.iterations)
        except Exception as e:
            if not is_oom(e):
                raise
            rows.append((f"k{kernel}", batch, float("nan"), float("nan"), "out of memory"))
            seconds = None
        if seconds is not None:
            peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else float("nan")
            tokens = batch * kernel * ((H // 14) * (W // 14) + 5)
            per_token.append(peak / tokens)
            rows.append((f"k{kernel}", batch, 1000 * seconds / batch, peak / 2**30, ""))
        del frames
        free_memory(device)
    with SyncCounter(device) as syncs, torch.inference_mode():
        model(torch.rand(1, args.kernel, 3, H, W, device=device))
    print(f"\n## forward: VGGT {'tiny' if args.tiny else 'full-size, random weights'}, {H}x{W}, "
          f"precision {args.precision}, {args.iterations} timed iterations after one warm-up")
    print(f"{'kernel':>6} | {'B':>3} | {'ms/window':>9} | {'peak GiB':>8} | note")
    for kernel, batch, ms, gib, note in rows:
        print(f"{kernel:>6} | {batch:>3} | {ms:9.1f} | {gib:8.2f} | {note}")
    print(f"host syncs per forward: {'n/a on CPU' if syncs.count is None else syncs.count}")
    if per_token and device.type == "cuda":
        print(f"peak bytes per token: max {max(per_token) / 1024:.0f} KiB (streaming_vggt.VGGT_BYTES_PER_TOKEN "
              f"= {VGGT_BYTES_PER_TOKEN / 1024:.0f} KiB)")
    if upstream is not None:
        check_upstream(args, upstream, device)
    return {"model": model, "rows": rows}


def check_upstream(args, network, device) -> None:
    """The same network without the tool's patches (RoPE sync, all 24 layer outputs kept)."""
    import torch

    from streaming_vggt import autocast_dtype

    dtype = autocast_dtype(device, args.precision)
    batch = min(8, max(args.batch_sizes))

    def forward(x):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return network(x)

    x = torch.rand(batch, args.kernel, 3, args.height, args.width, device=device)
    if device.type == "cuda":
        free_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        ms = 1000 * time_forward(forward, x, device, args.iterations) / batch
    except Exception as e:
        if not is_oom(e):
            raise
        ms = float("nan")
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")
    with SyncCounter(device) as syncs, torch.inference_mode():
        forward(x[:1])
    print(f"upstream VGGT unpatched, B={batch}: {ms:.1f} ms/window, peak {peak:.2f} GiB, host syncs per forward: "
          f"{'n/a on CPU' if syncs.count is None else syncs.count}")
    del x, network
    free_memory(device)


def check_variants(args, device) -> None:
    """Each variant is built from a fresh network (the same seeded weights): make_vggt patches a
    network in place, so a copy of a patched one would still run the original's blocks."""
    import torch

    from streaming_vggt import make_vggt

    batch = min(8, max(args.batch_sizes))
    x = torch.rand(batch, args.kernel, 3, args.height, args.width, generator=torch.Generator().manual_seed(1))
    x = x.to(device)

    def build(name):
        model = make_vggt(device, network=build_network(args, device), precision=args.precision)
        if name.startswith("bf16 aggregator"):
            # the heads stay fp32 (VGGT runs them with autocast off): the aggregator's weights are cast
            # once, its input cast as autocast would, its kept layer outputs handed on in fp32
            aggregator = model.network.aggregator.to(torch.bfloat16)
            inner = aggregator.forward

            def forward(images, *rest, **options):
                outputs, start = inner(images.to(torch.bfloat16), *rest, **options)
                return [t.float() for t in outputs], start

            aggregator.forward = forward
        if name.startswith("torch.compile"):
            model.network = torch.compile(model.network, backend=args.compile, dynamic=False)
        return model

    names = ["tool: fp32 weights" + (", autocast" if device.type == "cuda" else ""), "bf16 aggregator weights"]
    names += [f"torch.compile {args.compile}"] if args.compile else []
    print(f"\n## forward variants: B={batch}, k{args.kernel} {args.height}x{args.width}, precision "
          f"{args.precision}; output change against the tool's model on the same input")
    print(f"{'variant':<28} | {'first call s':>12} | {'ms/window':>9} | {'peak GiB':>8} | "
          f"{'depth rel. diff median / p99':>28} | {'extrinsic max diff':>18}")
    reference = None
    for name in names:
        free_memory(device)
        model = build(name)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            started = time.perf_counter()
            out = model(x)  # for torch.compile: the compilation
            sync(device)
            first = time.perf_counter() - started
        ms = 1000 * time_forward(model, x, device, args.iterations) / batch
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")
        out = {k: v.float().cpu() for k, v in out.items()}
        if reference is None:
            reference, change = out, "(reference)"
            extrinsic = ""
        else:
            relative = ((out["depth"] - reference["depth"]).abs() / reference["depth"].abs().clamp_min(1e-6)).flatten()
            low, high = torch.quantile(relative[torch.isfinite(relative)][:1 << 24].double(),
                                       torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist()
            change = f"{low:.2e} / {high:.2e}"
            extrinsic = f"{(out['extrinsic'] - reference['extrinsic']).abs().max().item():.2e}"
        print(f"{name:<28} | {first:12.2f} | {ms:9.1f} | {peak:8.2f} | {change:>28} | {extrinsic:>18}")
        del model, out
    if args.compile:
        from torch._dynamo.utils import counters

        print(f"torch.compile graph breaks: {sum(counters['graph_break'].values())}")
    free_memory(device)


class Replay:
    """A model that returns one stored set of outputs: the stage then measures only post-processing."""

    def __init__(self, outputs: dict):
        self.outputs = outputs

    def __call__(self, frames):
        return self.outputs


def check_post(args, model, device) -> None:
    import torch

    from pipeline import Stats
    from streaming_vggt import GeometryConfig, GeometryStage

    batch = args.post_batch
    windows = windows_of(clip_frames(args.kernel, batch, args.height, args.width), batch, args.kernel)
    stage = GeometryStage(model, device, GeometryConfig())
    with torch.inference_mode():
        outputs = model(torch.stack([w.frames for w in windows]).to(device).permute(0, 1, 4, 2, 3).div(255))
    stage.model = Replay({k: v.clone() for k, v in outputs.items()})
    stage(windows)  # warm-up (key tables, kernels)
    stats = Stats()
    stage.stats = stats
    for _ in range(args.iterations):
        stage(windows)
    with SyncCounter(device) as syncs:
        stage(windows)
    counts = stats.snapshot()
    post_ms = 1000 * counts["postprocess_seconds"] / (args.iterations * batch)
    print(f"\n## post-processing: B={batch}, k{args.kernel} {args.height}x{args.width}, default filter and cap")
    print(f"post-processing: {post_ms:.2f} ms/window; host syncs per batch: "
          f"{'n/a on CPU (one by design: the copy to the host)' if syncs.count is None else syncs.count}")


def generate_clip(path: str, width: int, height: int, frames: int, fps: int = 30) -> str:
    """An H.264 (or, without libx264, MPEG-4 part 2) clip panning over a smooth texture, encoded
    with PyAV (no ffmpeg program needed)."""
    import av
    import torch
    import torch.nn.functional as F

    from benchmark import encode_pan

    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, (height + 256) // 32, (width + 384) // 32, generator=g)
    base = (F.interpolate(noise, size=(height + 256, width + 384), mode="bilinear")[0] * 255).to(torch.uint8)
    base = base.permute(1, 2, 0).contiguous().numpy()
    for codec, options in (("libx264", {"preset": "ultrafast", "crf": "23"}), ("mpeg4", {"qscale": "3"})):
        container = av.open(path, "w")
        try:
            stream = container.add_stream(codec, rate=fps)
        except Exception:  # this PyAV build lacks the encoder: try the next one
            container.close()
            continue
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options
        encode_pan(container, stream, base, frames)
        return codec
    raise RuntimeError("PyAV has neither libx264 nor mpeg4 encoders")


def check_e2e(args, model, device, batch_size) -> None:
    from frames import FrameSource
    from pipeline import REMOTE_POLL_LINGER, Pipeline, Stats, VideoResult, VideoTask, WindowSettings
    from sharded_writer import ShardedWriter
    from streaming_vggt import GeometryConfig, GeometryStage

    scratch = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        clip = os.path.join(scratch, "clip.mp4")
        width, height = args.clip_size
        codec = generate_clip(clip, width, height, args.clip_frames)
        print(f"\n## end to end: {width}x{height} {codec} clip, {args.clip_frames} frames; k{args.kernel} "
              f"dilation 1; B={batch_size}")
        print(f"{'stride':>6} | {'windows':>7} | {'model-only w/s':>14} | {'e2e w/s':>8} | {'e2e/model':>9} | "
              f"{'decode-only w/s':>15}")
        for stride in (1, 3):
            settings = WindowSettings(args.kernel, stride)
            stage = GeometryStage(model, device, GeometryConfig())
            source = FrameSource(clip)
            started = time.perf_counter()
            decoded = list(source.windows(args.kernel, stride, 1))
            decode_rate = len(decoded) / (time.perf_counter() - started)
            source.close()
            stage(decoded[:batch_size])  # warm-up
            sync(device)
            started = time.perf_counter()
            for at in range(0, len(decoded), batch_size):
                stage(decoded[at:at + batch_size])
            sync(device)
            model_rate = len(decoded) / (time.perf_counter() - started)
            del decoded
            out = os.path.join(scratch, f"out{stride}")
            pipeline = Pipeline(stage, ShardedWriter(out, 0), settings, batch_size=batch_size, stats=Stats())
            started = time.perf_counter()
            pipeline.submit(VideoTask(clip))
            result = None
            while result is None:
                result = next((e for e in pipeline.poll(0.5, linger=REMOTE_POLL_LINGER) if isinstance(e, VideoResult)), None)
            e2e_rate = result.samples / (time.perf_counter() - started)
            pipeline.close()
            if result.status != "done":
                raise RuntimeError(f"e2e run failed: {result.reason}")
            print(f"{stride:>6} | {result.samples:>7} | {model_rate:>14.1f} | {e2e_rate:>8.1f} | "
                  f"{e2e_rate / model_rate:>9.2f} | {decode_rate:>15.1f}")
            # kept until the end: files deleted now would slow the next run's file creation
            # (benchmark.fresh_root)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class OutOfMemoryAbove:
    """CPU stand-in for a small GPU: out-of-memory above `limit` windows a forward."""

    def __init__(self, model, limit: int):
        self.model, self.limit = model, limit

    def __call__(self, frames):
        import torch

        if frames.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated above {self.limit} windows)")
        return self.model(frames)


def check_oom(args, model, device) -> None:
    """The pipeline at a batch that does not fit: it must halve, go on, write every window, and
    hold no memory of the failed attempts afterwards."""
    import torch

    from pipeline import REMOTE_POLL_LINGER, Pipeline, Stats, VideoResult, VideoTask, WindowSettings
    from sharded_writer import ShardedWriter
    from streaming_vggt import GeometryConfig, GeometryStage

    fits = 2
    ballast = None
    free_memory(device)
    if device.type == "cuda":
        # fill the device until about `fits` windows of this shape fit (measured on a B=1 forward)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            model(torch.rand(1, args.kernel, 3, args.height, args.width, device=device))
        per_window = torch.cuda.max_memory_allocated(device) - before
        free, _ = torch.cuda.mem_get_info(device)
        ballast = torch.empty(max(0, int(free - (fits + 0.5) * per_window)), dtype=torch.uint8, device=device)
        stage_model = model
    else:
        stage_model = OutOfMemoryAbove(model, fits)
    scratch = tempfile.mkdtemp(prefix="gpu_check_oom_")
    try:
        clip = os.path.join(scratch, "clip.mp4")
        generate_clip(clip, *args.clip_size, args.kernel + 2 * args.oom_batch - 1)
        stats = Stats()
        baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        pipeline = Pipeline(GeometryStage(stage_model, device, GeometryConfig()), ShardedWriter(os.path.join(scratch, "o"), 0),
                            WindowSettings(args.kernel, 1), batch_size=args.oom_batch, stats=stats)
        pipeline.submit(VideoTask(clip))
        result = None
        while result is None:
            result = next((e for e in pipeline.poll(0.5, linger=REMOTE_POLL_LINGER) if isinstance(e, VideoResult)), None)
        pipeline.close()
        counts = stats.snapshot()
        leaked = (torch.cuda.memory_allocated(device) - baseline) / 2**20 if device.type == "cuda" else 0.0
        expected = 2 * args.oom_batch
        ok = result.status == "done" and result.samples == expected and counts.get("oom_batch_halvings", 0) >= 1
        print(f"\n## out-of-memory recovery: B={args.oom_batch} where about {fits} fit")
        print(f"{'PASS' if ok else 'FAIL'}: {result.status}, {result.samples}/{expected} samples, "
              f"{int(counts.get('oom_batch_halvings', 0))} halvings, {int(counts.get('batch_growths', 0))} growths, "
              f"batch now {pipeline.batch_size}, memory held after: {leaked:.0f} MiB")
        if not ok:
            raise SystemExit("out-of-memory recovery failed")
    finally:
        del ballast
        free_memory(device)
        shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--vggt-src", default=os.environ.get("VGGT_SRC"),
                   help="folder holding the vggt package (a source checkout), when it is not installed")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny VGGT instead of the full-size one")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--height", type=int, default=294)
    p.add_argument("--width", type=int, default=518)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    p.add_argument("--extra", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="*", default=[(15, 16)],
                   help="more KERNELxB forward rows")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--no-upstream", dest="compare_upstream", action="store_false",
                   help="skip the unpatched upstream model row")
    p.add_argument("--post-batch", type=int, default=16)
    p.add_argument("--clip-size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(1920, 1080))
    p.add_argument("--clip-frames", type=int, default=300)
    p.add_argument("--e2e-batch", default="auto", help="windows per forward in the e2e runs (auto: as the tool)")
    p.add_argument("--oom-batch", type=int, default=16)
    p.add_argument("--compile", default=None, metavar="BACKEND",
                   help="also time torch.compile(network, backend=BACKEND) in the variants section "
                        "(inductor: minutes of compilation; eager: tracing only)")
    p.add_argument("--sections", nargs="+", default=["forward", "variants", "post", "e2e", "oom"],
                   choices=["forward", "variants", "post", "e2e", "oom"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the workers run
    _import_path(args.vggt_src)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":  # as a CPU worker runs (--cpus-per-worker 1): OpenMP spinning on a busy
        torch.set_num_threads(1)  # machine made 2 threads several times slower than one
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    print(f"# gpu_check: {name}, torch {torch.__version__}, python {sys.version.split()[0]}")
    started = time.perf_counter()
    network = build_network(args, device)
    from streaming_vggt import auto_batch_size, make_vggt

    if "forward" in args.sections:
        model = check_forward(args, network, device)["model"]
    else:
        model = make_vggt(device, network=network, precision=args.precision)
    if "variants" in args.sections:
        check_variants(args, device)
    if "post" in args.sections:
        check_post(args, model, device)
    if "e2e" in args.sections:
        if args.e2e_batch == "auto":
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
            batch = auto_batch_size(args.kernel, args.height, args.width, free) if device.type == "cuda" else 1
        else:
            batch = int(args.e2e_batch)
        check_e2e(args, model, device, batch)
    if "oom" in args.sections:
        check_oom(args, model, device)
    print(f"\ngpu_check done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "gpu_check"
    sys.exit(main())
