"""Scale benchmark: what a root's size costs a rerun and the loader. Prints a table.

    python benchmark_scale.py                          # roots of 1k, 100k and 2M samples under /tmp
    python benchmark_scale.py --sizes 1000 100000 --keep

For each size a root is synthesized the way today's writer makes it: rank 0's samples.jsonl
(~430-byte lines from sample_format.index_record, 30 samples per video) and videos.jsonl (one
"done" line per video, with its shots), but no sample files (nothing reads them here). The root
has no resume log, like a root written before it existed, so:
- rerun: extract_dataset.py on the root with two new short videos (oracle backend on the CPU, one
  worker, a private Ray): wall seconds from launch to exit and to the first new sample, and the
  peak memory of the whole process tree (driver + Ray's processes + worker, summed RSS sampled
  every 50 ms; "machine-wide" without the other users of a shared machine). Twice: on the root as
  synthesized (its worker upgrades it: one full read of the index), then again with the log in
  place. The new samples are checked exactly each time.
- upgrade: the one-time pass that builds the rank's resume log, alone in a process.
- loader: VGGTDataset(root) in a fresh process, first open (builds the column cache) and second
  open (maps it): seconds, and memory held (RSS after minus before the open) and the process's
  peak RSS (VmHWM; torch and numpy imported: ~250 MiB before any open).
The synthesized root is deleted at the end (2M samples take ~1 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "tests")]

SAMPLES_PER_VIDEO = 30
KERNEL_ARGS = ["--kernel", "5", "--stride", "2", "--dilation", "2", "--files-per-dir", "500"]
NEW_VIDEO_FRAMES = (21, 17)


def synthesize(root: str, samples: int) -> tuple[int, int]:
    """rank 0's index and videos.jsonl of a root with `samples` samples: (index bytes, videos)."""
    import torch

    from sample_format import INDEX_NAME, VIDEOS_FILE, Sample, index_record

    s = 5
    template = Sample(video="", frame_index=0, timestamp=0.0, fps=30.0, dilation=2, window_frame_indices=[0] * s,
                      window_timestamps=[0.0] * s, world_frame="first", rgb=torch.zeros(294, 518, 3, dtype=torch.uint8),
                      depth=torch.zeros(1, 1), extrinsic=torch.zeros(3, 4), intrinsic=torch.zeros(3, 3),
                      window_extrinsics=torch.zeros(s, 3, 4), window_intrinsics=torch.zeros(s, 3, 3),
                      points=torch.zeros(50000, 6))
    os.makedirs(os.path.join(root, "0"), exist_ok=True)
    videos = (samples + SAMPLES_PER_VIDEO - 1) // SAMPLES_PER_VIDEO
    size = 0
    with open(os.path.join(root, "0", INDEX_NAME), "w", encoding="utf-8") as index, \
            open(os.path.join(root, VIDEOS_FILE), "w", encoding="utf-8") as status:
        n = 0
        for v in range(videos):
            video = f"/data/videos/batch_{v // 1000:03d}/clip_{v:07d}.mp4"
            count = min(SAMPLES_PER_VIDEO, samples - n)
            lines = []
            for k in range(count):
                focal = 4 + 2 * k
                template.video, template.frame_index, template.timestamp = video, focal, focal / 30
                template.window_frame_indices = [focal - 4, focal - 2, focal, focal + 2, focal + 4]
                template.quality = {"conf_p10": 1.1 + k / 97, "conf_p50": 2.3 + k / 89, "conf_p90": 5.7 + k / 83,
                                    "kept_fraction": 0.75 - k / 211, "depth_min": 0.81 + k / 71,
                                    "depth_max": 17.3 + k / 73}
                shard, stem = divmod(n, 500)
                record = index_record(template, 0, shard, stem, 4, "dir", "jpg")
                record["num_points"] = 50000
                lines.append(json.dumps(record) + "\n")
                n += 1
            text = "".join(lines)
            size += len(text)
            index.write(text)
            frames = 4 + 2 * count + 5
            status.write(json.dumps({"video": video, "status": "done", "reason": "", "samples": count,
                                     "windows": count, "num_frames": frames, "fps": 30.0, "dilation": 2,
                                     "shots": [[0, frames - 1]], "windows_removed_by_cuts": 0, "rank": 0,
                                     "attempts": 1, "finished_at": "2026-01-01T00:00:00"}) + "\n")
    with open(os.path.join(root, "run.json"), "w") as f:
        json.dump({"kernel": 5, "stride": 2, "dilation": 2, "window_seconds": None, "backend": "oracle_backend:make",
                   "model": "facebook/VGGT-1B", "world_frame": "first", "max_points": 300, "conf_percentile": 25.0,
                   "min_conf": 0.0, "resize_mode": "crop", "shard_format": "dir", "depth_format": "jpg"}, f, indent=2)
    return size, videos


def tree_peak(proc: subprocess.Popen) -> tuple[float, dict]:
    """Wait for proc; (peak summed RSS of it and all its descendants in bytes, timing marks)."""
    import psutil

    peak, marks = 0, {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        total = 0
        try:
            members = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for p in members:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        peak = max(peak, total)
        time.sleep(0.05)
    return peak, marks


def rerun(root: str, videos: list[str]) -> tuple[float, float, float, str]:
    """(seconds to exit, seconds to the first new sample, peak tree bytes, stderr) of a rerun."""
    from sample_format import INDEX_NAME

    index = os.path.join(root, "0", INDEX_NAME)
    before = os.path.getsize(index)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.join(HERE, "tests")]))
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "extract_dataset.py"), "--root", root,
                             "--videos", *videos, *KERNEL_ARGS, "--backend", "oracle_backend:make",
                             "--max-points", "300", "--num-workers", "1", "--no-progress"],
                            env=env, stderr=subprocess.PIPE, text=True)
    first = [None]

    def watch():
        while proc.poll() is None and first[0] is None:
            if os.path.getsize(index) > before:
                first[0] = time.perf_counter() - started
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True)
    reader.start()
    peak, _ = tree_peak(proc)
    elapsed = time.perf_counter() - started
    reader.join()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"rerun failed (rc {proc.returncode}):\n{''.join(err_lines)}")
    return elapsed, first[0] or float("nan"), peak, "".join(err_lines)


def check_new_samples(root: str, videos: list[str], old: int, old_bytes: int) -> None:
    """The rerun's samples are exactly the new videos' windows, after the old ones, numbered on."""
    from sample_format import INDEX_NAME, iter_records
    from window import windows

    new = [r for _, r in iter_records(os.path.join(root, "0", INDEX_NAME), old_bytes)]
    want = [(v, w.focal_frame) for v, n in zip(videos, NEW_VIDEO_FRAMES) for w in windows(n, 5, 2, 2)]
    got = [(r["video"], r["frame_index"]) for r in new]
    assert sorted(got) == sorted(want), (got, want)
    assert [(r["shard"], r["stem"]) for r in new] == [divmod(old + k, 500) for k in range(len(new))]


LOADER_SCRIPT = """
import os, sys, time, json
sys.path.insert(0, {here!r})
import psutil
from dataset import VGGTDataset
proc = psutil.Process()
before = proc.memory_info().rss
t = time.perf_counter()
ds = VGGTDataset({root!r}, min_kept_fraction=0.5)
seconds = time.perf_counter() - t
held = proc.memory_info().rss - before
item = ds.record(len(ds) - 1)
peak = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(json.dumps({{"seconds": seconds, "held": held, "peak": peak,
                  "samples": len(ds), "last": item["sample"]}}))
"""


def loader(root: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOADER_SCRIPT.format(here=HERE, root=root)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def upgrade(root: str) -> tuple[float, float]:
    """Seconds and peak RSS bytes of the one-time pass that builds rank 0's resume log."""
    script = (f"import sys, time; sys.path.insert(0, {HERE!r}); from sample_format import ResumeLog; "
              f"t = time.perf_counter(); ResumeLog({root!r}, 0); "
              f"print(time.perf_counter() - t, [int(x.split()[1]) * 1024 for x in open('/proc/self/status') "
              f"if x.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    seconds, peak = out.stdout.split()
    return float(seconds), float(peak)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000, 2_000_000])
    p.add_argument("--work", default=None, help="folder for the synthesized roots (default: a new one under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the roots")
    args = p.parse_args(argv)
    import oracle_backend

    work = args.work or tempfile.mkdtemp(prefix="benchmark_scale_")
    os.makedirs(work, exist_ok=True)
    clips = os.path.join(work, "clips")
    os.makedirs(clips, exist_ok=True)
    rows = []
    try:
        for samples in args.sizes:
            root = os.path.join(work, f"root_{samples}")
            shutil.rmtree(root, ignore_errors=True)
            t = time.perf_counter()
            size, videos = synthesize(root, samples)
            synth = time.perf_counter() - t
            reruns = []
            for attempt in ("old", "logged"):  # the root as written before the log, then with it
                new = []
                for k, n in enumerate(NEW_VIDEO_FRAMES):  # new names each time: each rerun does the same work
                    path = os.path.join(clips, f"new_{samples}_{attempt}_{k}.mp4")
                    oracle_backend.render_scene_video(path, n, width=160, height=96)
                    new.append(path)
                index = os.path.join(root, "0", "samples.jsonl")
                with open(index, "rb") as f:
                    before, before_bytes = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")), f.tell()
                seconds, first, peak, _ = rerun(root, new)
                check_new_samples(root, new, before, before_bytes)
                reruns.append((seconds, first, peak))
            os.remove(os.path.join(root, ".resume", "0.jsonl"))
            up_s, up_peak = upgrade(root)  # the upgrade alone, in a process of its own
            first_open, second_open = loader(root), loader(root)
            rows.append((samples, size / samples, videos, synth, up_s, up_peak, reruns, first_open, second_open))
            print(f"done {samples} samples", file=sys.stderr)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    mib = 2 ** 20
    print(f"{'samples':>9} {'B/line':>6} {'videos':>7} | {'upgrade s':>9} {'MiB':>5} | "
          f"{'rerun old root: s':>17} {'1st':>5} {'MiB':>5} | {'rerun: s':>8} {'1st':>5} {'MiB':>5} | "
          f"{'open1 s':>7} {'held':>5} {'peak':>5} | {'open2 s':>7} {'held':>5} {'peak':>5}")
    for (samples, per_line, videos, _, up_s, up_peak, reruns, one, two) in rows:
        (s_old, f_old, p_old), (s_new, f_new, p_new) = reruns
        print(f"{samples:>9} {per_line:>6.0f} {videos:>7} | {up_s:>9.2f} {up_peak / mib:>5.0f} | "
              f"{s_old:>17.1f} {f_old:>5.1f} {p_old / mib:>5.0f} | {s_new:>8.1f} {f_new:>5.1f} {p_new / mib:>5.0f} | "
              f"{one['seconds']:>7.2f} {one['held'] / mib:>5.0f} {one['peak'] / mib:>5.0f} | "
              f"{two['seconds']:>7.2f} {two['held'] / mib:>5.0f} {two['peak'] / mib:>5.0f}")
    print("seconds: wall; 1st: seconds to the first new sample; MiB: peak RSS (rerun: whole process tree); "
          "held: RSS after the open minus before")
    return 0


if __name__ == "__main__":
    sys.exit(main())
