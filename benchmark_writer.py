"""Writer benchmark: CPU time of ShardedWriter.write per sample, and of its parts. Prints tables.

    python benchmark_writer.py                                  # 518x294 RGB, 50k points, all formats
    python benchmark_writer.py --video clip.mp4                 # RGB from the clip's first frame
    git archive <rev> sample_format.py sharded_writer.py | tar -x -C /tmp/old
    python benchmark_writer.py --baseline /tmp/old              # that version alternated with this one

One sample as the pipeline makes it (k5 window, 518x294, float32 depth with every pixel valid, 50k
points float32 [N, 6]) is written `--samples` times per round, into a fresh root under `--dir`; the
root is deleted after each round, so later rounds reuse memory the first one touched (on some VMs
memory touched for the first time costs several times more: compare rounds after the first). Whole
writes: CPU seconds of this process (time.process_time) per sample, median over rounds, round 0
(warm-up) dropped. Parts: the best of 5 repeats of 100 calls each, wall clock, one thread.
File creation is the file system's (4 files a dir sample). On ext4 without a journal a file
created within minutes of deletions nearby costs 0.3-1 ms instead of ~0.02 (the rounds here delete
their roots): the writer's top-directory flag on OUT/<rank> (sample_format.mark_top_directory)
avoids most of it, so a `--baseline` from before that flag pays for the deletions and this one not.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from types import ModuleType

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = ("sample_format", "sharded_writer")
FORMATS = (("dir", "jpg"), ("tar", "jpg"), ("dir", "png16"), ("tar", "png16"))


def load_version(folder: str, tag: str) -> tuple[ModuleType, ModuleType]:
    """(sample_format, sharded_writer) imported from `folder`, kept under private names so that two
    versions can live in one process."""
    for name in MODULES:
        sys.modules.pop(name, None)
    sys.path.insert(0, folder)
    try:
        modules = tuple(importlib.import_module(name) for name in MODULES)
    finally:
        sys.path.remove(folder)
    for name in MODULES:
        sys.modules[f"{tag}_{name}"] = sys.modules.pop(name)
    return modules  # type: ignore[return-value]


def rgb_frame(video: str | None, h: int, w: int):
    """uint8 [h, w, 3]: the clip's first frame resized (bicubic), or a textured synthetic frame."""
    import numpy as np
    import torch
    from PIL import Image

    if video:
        import av

        with av.open(video) as container:
            frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
        return torch.from_numpy(np.array(Image.fromarray(frame).resize((w, h), Image.BICUBIC)))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 12, (h, w, 3))
    base = np.stack([120 + 80 * np.sin(x / 17) * np.cos(y / 23), 100 + 60 * np.sin((x + y) / 9),
                     90 + 70 * np.cos(x / 31 - y / 13)], -1)
    return torch.from_numpy(np.clip(base + noise, 0, 255).astype(np.uint8))


def make_sample(sample_cls: type, rgb, i: int, points: int):
    import torch

    h, w = rgb.shape[:2]
    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    depth = (1.5 + 3 * y + 0.5 * torch.sin(x * 20) + 0.05 * torch.rand(h, w, generator=g)).float()
    frames = [4 + 3 * i + 2 * k for k in range(-2, 3)]
    return sample_cls(video="videos/clip.mp4", frame_index=frames[2], timestamp=frames[2] / 30, fps=30.0, dilation=2,
                      window_frame_indices=frames, window_timestamps=[f / 30 for f in frames], world_frame="first",
                      rgb=rgb, depth=depth, extrinsic=torch.eye(3, 4), intrinsic=torch.eye(3),
                      window_extrinsics=torch.eye(3, 4).repeat(5, 1, 1), window_intrinsics=torch.eye(3).repeat(5, 1, 1),
                      points=torch.rand(points, 6, generator=g),
                      quality={"conf_p10": 1.234567, "conf_p50": 2.345678, "conf_p90": 3.456789, "kept_fraction": 0.4})


def write_ms(sharded_writer: ModuleType, base: str, samples: list, shard_format: str, depth_format: str) -> float:
    """CPU ms per sample of writing `samples` into a fresh root (deleted afterwards)."""
    root = tempfile.mkdtemp(dir=base)
    writer = sharded_writer.ShardedWriter(root, 0, shard_format=shard_format, depth_format=depth_format)
    start = time.process_time()
    for sample in samples:
        writer.write(sample)
    writer.flush()
    spent = time.process_time() - start
    writer.close()
    shutil.rmtree(root)
    return spent / len(samples) * 1e3


def _encoded(image) -> bytes:
    """An image payload as bytes, from this version (a Picture, encoded when written) or an older
    one (bytes already)."""
    return image.to_bytes() if hasattr(image, "to_bytes") else image


def parts_ms(sample_format: ModuleType, sample, folder: str) -> list[tuple[str, float]]:
    """Wall ms of each step of a default (dir, jpg) write, called alone (files: under `folder`)."""
    code, depth_min, depth_max = sample_format.encode_depth(sample.depth)
    camera = sample_format.camera_record(sample, code, depth_min, depth_max, "jpg")
    points = sample_format._torch_bytes(sample.points)
    names = iter(range(10**9))

    def new_file(data: bytes) -> None:  # a new file each call, as the writer makes them
        path = os.path.join(folder, f"part{next(names)}")
        with open(path, "wb") as f:
            f.write(data)
        os.rename(path, path + ".done")

    steps = [
        ("encode_depth (518x294 -> uint8)", lambda: sample_format.encode_depth(sample.depth)),
        ("RGB JPEG q95", lambda: _encoded(sample_format._jpeg(sample.rgb.numpy(), 95))),
        ("depth JPEG q95", lambda: _encoded(sample_format._jpeg(code, 95))),
        ("camera_record", lambda: sample_format.camera_record(sample, code, depth_min, depth_max, "jpg")),
        ("torch.save camera -> bytes", lambda: sample_format._torch_bytes(camera)),
        ("torch.save points -> bytes", lambda: sample_format._torch_bytes(sample.points)),
        ("new file, empty, + rename", lambda: new_file(b"")),
        ("new file, 1.2 MB of points + rename", lambda: new_file(points)),
        ("index_record", lambda: sample_format.index_record(sample, 0, 0, 0, 4, "dir", "jpg")),
    ]
    return [(name, min(timeit.repeat(step, number=100, repeat=5)) / 100 * 1e3) for name, step in steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=60, help="samples written per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per version and format (plus a warm-up)")
    parser.add_argument("--points", type=int, default=50_000)
    parser.add_argument("--video", help="take the RGB frame from this clip (PyAV)")
    parser.add_argument("--baseline", help="a folder with another version's sample_format.py and sharded_writer.py")
    parser.add_argument("--formats", default="all", help='"all" or e.g. "dir/jpg,tar/jpg"')
    parser.add_argument("--dir", default=None, help="where the roots are written (default: the system's temp folder)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    versions = {"this": load_version(HERE, "this")}
    if args.baseline:
        versions["baseline"] = load_version(os.path.abspath(args.baseline), "baseline")
    sample_format = versions["this"][0]
    rgb = rgb_frame(args.video, 294, 518)
    samples = [make_sample(sample_format.Sample, rgb, i, args.points) for i in range(args.samples)]
    formats = FORMATS if args.formats == "all" else tuple(tuple(f.split("/")) for f in args.formats.split(","))
    base = tempfile.mkdtemp(prefix="benchmark_writer_", dir=args.dir)
    try:
        print(f"ShardedWriter.write, CPU ms per sample (518x294, {args.points} points, {args.samples} samples x "
              f"{args.rounds} rounds, median; versions alternated round by round)")
        header = f"{'format':12s}" + "".join(f"{tag:>12s}" for tag in versions)
        print(header + ("  this/baseline" if args.baseline else ""))
        for shard_format, depth_format in formats:
            spent: dict[str, list[float]] = {tag: [] for tag in versions}
            for r in range(args.rounds + 1):
                order = list(versions) if r % 2 == 0 else list(reversed(versions))
                for tag in order:
                    ms = write_ms(versions[tag][1], base, samples, shard_format, depth_format)
                    if r:
                        spent[tag].append(ms)
            medians = {tag: statistics.median(v) for tag, v in spent.items()}
            line = f"{shard_format + '/' + depth_format:12s}" + "".join(f"{medians[t]:12.2f}" for t in versions)
            if args.baseline:
                line += f"  {medians['this'] / medians['baseline']:13.2f}"
            print(line)
        print("\nParts of a dir/jpg write (this version), wall ms, best of 5 x 100 calls")
        for name, ms in parts_ms(sample_format, samples[0], base):
            print(f"  {name:34s} {ms:7.3f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
