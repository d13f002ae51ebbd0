"""Sharded writer (sharded_writer.py): layout, naming, resume without overwriting, crash safety,
what the files hold (SPEC "Output layout" and "Conventions inside a sample"), depth round trip."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sharded_writer import ShardedWriter, decode_depth, encode_depth
from streaming_vggt import Sample

SUFFIXES = {".jpg", ".depth.jpg", ".camera.pt", ".points.pt"}
CAMERA_KEYS = {
    "extrinsic", "intrinsic", "height", "width", "video", "frame_index", "timestamp",
    "window_frame_indices", "window_extrinsics", "window_intrinsics",
    "depth_min", "depth_max", "depth_encoding",
}


# ----------------------------------------------------------------------------- helpers


def smooth_depth(h: int, w: int, near: float = 1.0, far: float = 10.0) -> torch.Tensor:
    """A floor-and-wall-like depth map: far (10) at the top row, near (1) at the bottom row,
    smooth, with gentle bumps; both ends of the range are reached."""
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    inverse = 1 / far + (1 / near - 1 / far) * y**1.5
    depth = 1 / (inverse * (1 + 0.05 * torch.sin(6 * x) * torch.sin(4 * y)))
    return depth.clamp(near, far).float()


def make_sample(i: int, h: int = 28, w: int = 42, s: int = 5, n_points: int = 300,
                video: str = "videos/clip.mp4", depth: torch.Tensor | None = None) -> Sample:
    g = torch.Generator().manual_seed(i)
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    rgb = torch.stack([x * 200 + 20, y * 200 + 20, (x + y) * 100 + 20 + i], -1).round().to(torch.uint8)
    extrinsics = torch.cat([torch.eye(3).expand(s, 3, 3), torch.randn(s, 3, 1, generator=g)], -1)
    intrinsics = torch.tensor([[30.0, 0, (w - 1) / 2], [0, 30.0, (h - 1) / 2], [0, 0, 1]]).expand(s, 3, 3).clone()
    frame_indices = [i * 3 + k * 2 for k in range(s)]
    return Sample(
        video=video,
        frame_index=frame_indices[s // 2],
        timestamp=frame_indices[s // 2] / 30,
        fps=30.0,
        dilation=2,
        window_frame_indices=frame_indices,
        window_timestamps=[f / 30 for f in frame_indices],
        world_frame="first",
        rgb=rgb,
        depth=smooth_depth(h, w) if depth is None else depth,
        extrinsic=extrinsics[s // 2].clone(),
        intrinsic=intrinsics[s // 2].clone(),
        window_extrinsics=extrinsics.clone(),
        window_intrinsics=intrinsics,
        points=torch.cat([torch.randn(n_points, 3, generator=g), torch.rand(n_points, 3, generator=g)], 1),
        quality={"conf_p50": 1.5},
    )


def shard_contents(rank_dir: Path) -> dict[str, list[str]]:
    """Shard folder name -> sorted file names."""
    return {d.name: sorted(f.name for f in d.iterdir())
            for d in sorted(rank_dir.iterdir()) if d.is_dir() and d.name.isdigit()}


def index_records(rank_dir: Path) -> list[dict]:
    text = (rank_dir / "samples.jsonl").read_text()
    assert text == "" or text.endswith("\n"), "the index ends with a complete line"
    return [json.loads(line) for line in text.splitlines()]


def checksums(rank_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(rank_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(rank_dir.rglob("*")) if p.is_file() and p.name != "samples.jsonl"}


def assert_consistent(rank_dir: Path) -> list[dict]:
    """What a reader may rely on at any time after a (re)open: no temp files, every visible stem
    has its four files, every visible stem has exactly one index line and vice versa."""
    tmp = rank_dir / ".tmp"
    assert not tmp.exists() or not any(tmp.iterdir()), f"left in .tmp: {list(tmp.iterdir())}"
    stems: dict[tuple[str, str], set[str]] = {}
    for shard, names in shard_contents(rank_dir).items():
        assert len(shard) == 6
        for name in names:
            stem, _, rest = name.partition(".")
            assert len(stem) == 4 and stem.isdigit(), name
            stems.setdefault((shard, stem), set()).add("." + rest)
    for key, suffixes in stems.items():
        assert suffixes == SUFFIXES, f"sample {key} is incomplete: {sorted(suffixes)}"
    records = index_records(rank_dir)
    indexed = [(f"{r['shard']:06d}", f"{r['stem']:04d}") for r in records]
    assert len(indexed) == len(set(indexed)), "a sample is indexed twice"
    assert set(indexed) == set(stems), f"visible {sorted(stems)} != indexed {sorted(indexed)}"
    for r, key in zip(records, indexed):
        assert r["sample"] == f"{rank_dir.name}/{key[0]}/{key[1]}"
    return records


def write_all(root: Path, samples, files_per_dir: int, rank: int = 0) -> None:
    writer = ShardedWriter(str(root), rank, files_per_dir=files_per_dir)
    for sample in samples:
        writer.write(sample)
    writer.close()


# ----------------------------------------------------------------------------- layout and naming


def test_files_per_dir_cap_and_exact_names(tmp_path):
    write_all(tmp_path, [make_sample(i) for i in range(8)], files_per_dir=3)
    rank_dir = tmp_path / "0"
    contents = shard_contents(rank_dir)
    assert list(contents) == ["000000", "000001", "000002"]

    def names(count):
        return sorted(f"{stem:04d}{suffix}" for stem in range(count) for suffix in SUFFIXES)

    assert contents == {"000000": names(3), "000001": names(3), "000002": names(2)}
    # metadata lives beside the shards, never inside a shard folder
    assert all(not name.endswith((".json", ".jsonl")) for files in contents.values() for name in files)
    records = assert_consistent(rank_dir)
    assert [r["frame_index"] for r in records] == [make_sample(i).frame_index for i in range(8)]
    for r in records:  # each index line points at the files of its own sample
        camera = torch.load(tmp_path / (r["sample"] + ".camera.pt"), weights_only=True)
        assert camera["frame_index"] == r["frame_index"] and camera["video"] == r["video"]


def test_ranks_write_separate_folders(tmp_path):
    write_all(tmp_path, [make_sample(0)], files_per_dir=3, rank=0)
    write_all(tmp_path, [make_sample(1), make_sample(2)], files_per_dir=3, rank=1)
    assert len(assert_consistent(tmp_path / "0")) == 1
    assert len(assert_consistent(tmp_path / "1")) == 2


# ----------------------------------------------------------------------------- resume


def test_reopen_continues_numbering_and_never_overwrites(tmp_path):
    rank_dir = tmp_path / "0"
    write_all(tmp_path, [make_sample(i) for i in range(4)], files_per_dir=3)
    before = checksums(rank_dir)
    assert len(before) == 16

    ShardedWriter(str(tmp_path), 0, files_per_dir=3).close()  # an open with nothing to do changes nothing
    assert checksums(rank_dir) == before

    write_all(tmp_path, [make_sample(i) for i in range(4, 7)], files_per_dir=3)
    after = checksums(rank_dir)
    assert {k: after[k] for k in before} == before, "an old file was changed"
    assert len(after) == 28
    contents = shard_contents(rank_dir)
    assert [len(files) // 4 for files in contents.values()] == [3, 3, 1]
    records = assert_consistent(rank_dir)
    assert [r["frame_index"] for r in records] == [make_sample(i).frame_index for i in range(7)]


# ----------------------------------------------------------------------------- crash safety


class SimulatedKill(BaseException):
    """Stands for SIGKILL mid-write: like a kill, it runs no `except OSError` clean-up."""


@pytest.mark.parametrize("renames_before_crash", [0, 2, 3])
def test_crash_between_temp_write_and_rename_leaves_nothing_visible(tmp_path, monkeypatch, renames_before_crash):
    rank_dir = tmp_path / "0"
    writer = ShardedWriter(str(tmp_path), 0, files_per_dir=3)
    writer.write(make_sample(0))
    committed = checksums(rank_dir)

    real_rename, real_replace, calls = os.rename, os.replace, []

    def dying(real):
        def move(src, dst, *args, **kwargs):
            calls.append(dst)
            if len(calls) > renames_before_crash:
                raise SimulatedKill("simulated kill")  # not an OSError: no handler of ours runs
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "rename", dying(real_rename))
    monkeypatch.setattr(os, "replace", dying(real_replace))
    with pytest.raises(SimulatedKill):
        writer.write(make_sample(1))
    monkeypatch.undo()
    del writer  # killed: never closed

    if renames_before_crash:
        assert len(shard_contents(rank_dir)["000000"]) == 4 + renames_before_crash, "the crash left partial files"

    writer = ShardedWriter(str(tmp_path), 0, files_per_dir=3)  # the rerun
    records = assert_consistent(rank_dir)
    assert len(records) == 1
    assert {k: v for k, v in checksums(rank_dir).items() if not k.startswith(".tmp")} == committed
    writer.write(make_sample(1))  # the lost sample is written again, in the freed slot
    writer.close()
    records = assert_consistent(rank_dir)
    assert [(r["shard"], r["stem"], r["frame_index"]) for r in records] == [
        (0, 0, make_sample(0).frame_index), (0, 1, make_sample(1).frame_index)]


def test_a_failed_write_does_not_poison_the_running_writer(tmp_path, monkeypatch):
    """A write that fails half-way (an OSError from a rename: disk full, NFS hiccup) costs that
    sample only. The pipeline catches the OSError, fails that video and goes on writing the
    others with the same writer: those writes must succeed, and the failed sample's renamed
    pieces must not stay visible without an index line."""
    rank_dir = tmp_path / "0"
    writer = ShardedWriter(str(tmp_path), 0, files_per_dir=3)
    writer.write(make_sample(0))
    real_rename, real_replace, calls = os.rename, os.replace, []

    def failing(real):
        def move(src, dst, *args, **kwargs):
            calls.append(dst)
            if len(calls) > 2:
                raise OSError(28, "No space left on device (simulated)")
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "rename", failing(real_rename))
    monkeypatch.setattr(os, "replace", failing(real_replace))
    with pytest.raises(OSError):
        writer.write(make_sample(1, video="videos/other.mp4"))
    monkeypatch.undo()

    writer.write(make_sample(2))  # the next sample, same writer
    writer.close()
    records = assert_consistent(rank_dir)
    assert [r["frame_index"] for r in records] == [make_sample(0).frame_index, make_sample(2).frame_index]


def test_leftovers_of_a_killed_run_are_removed_on_reopen(tmp_path):
    """State a kill can leave: files in <rank>/.tmp, a partial sample, and a complete sample
    whose index line was never written."""
    rank_dir = tmp_path / "0"
    write_all(tmp_path, [make_sample(i) for i in range(4)], files_per_dir=3)  # 000000/0000-0002, 000001/0000
    committed = checksums(rank_dir)
    tmp = rank_dir / ".tmp"
    tmp.mkdir(exist_ok=True)
    (tmp / "0001.points.pt").write_bytes(b"half a file")
    (tmp / "0001.jpg").write_bytes(b"")
    shard1 = rank_dir / "000001"
    for suffix in SUFFIXES:  # a complete but unindexed sample ...
        shutil.copy(shard1 / f"0000{suffix}", shard1 / f"0001{suffix}")
    for suffix in (".points.pt", ".camera.pt"):  # ... and a partial one
        shutil.copy(shard1 / f"0000{suffix}", shard1 / f"0002{suffix}")
    (rank_dir / "000002").mkdir()
    shutil.copy(shard1 / "0000.points.pt", rank_dir / "000002" / "0000.points.pt")  # in a new shard, too

    writer = ShardedWriter(str(tmp_path), 0, files_per_dir=3)
    assert len(assert_consistent(rank_dir)) == 4
    assert {k: v for k, v in checksums(rank_dir).items() if not k.startswith(".tmp")} == committed
    writer.write(make_sample(4))
    writer.close()
    records = assert_consistent(rank_dir)
    assert (records[-1]["shard"], records[-1]["stem"]) == (1, 1)


@pytest.mark.parametrize("cut", [1, 7, "all_but_one"])
def test_truncated_last_index_line_is_dropped(tmp_path, cut):
    rank_dir = tmp_path / "0"
    write_all(tmp_path, [make_sample(i) for i in range(3)], files_per_dir=5)
    index = rank_dir / "samples.jsonl"
    data = index.read_bytes()
    last_line = len(data.splitlines(keepends=True)[-1])
    cut = last_line - 1 if cut == "all_but_one" else cut
    index.write_bytes(data[:-cut])  # killed while appending the third line

    writer = ShardedWriter(str(tmp_path), 0, files_per_dir=5)
    records = assert_consistent(rank_dir)  # the third sample's files are gone with its line
    assert [r["stem"] for r in records] == [0, 1]
    writer.write(make_sample(2))
    writer.close()
    records = assert_consistent(rank_dir)
    assert [r["stem"] for r in records] == [0, 1, 2]
    assert records[2]["frame_index"] == make_sample(2).frame_index


def test_damaged_line_inside_the_index_is_an_error_and_deletes_nothing(tmp_path):
    rank_dir = tmp_path / "0"
    write_all(tmp_path, [make_sample(i) for i in range(3)], files_per_dir=5)
    index = rank_dir / "samples.jsonl"
    lines = index.read_bytes().splitlines(keepends=True)
    index.write_bytes(lines[0] + b'{"sample": "0/000000/00' + b"\n" + lines[2])  # line 2 damaged
    before = checksums(rank_dir)
    with pytest.raises(ValueError, match="line 2 of 3 is damaged"):
        ShardedWriter(str(tmp_path), 0, files_per_dir=5)
    assert checksums(rank_dir) == before, "a damaged index must not make the writer delete samples"


# ----------------------------------------------------------------------------- file contents


def test_files_load_with_weights_only_and_hold_the_spec_keys(tmp_path):
    sample = make_sample(3, h=28, w=42, s=5, n_points=300)
    write_all(tmp_path, [sample], files_per_dir=3)
    base = tmp_path / "0" / "000000" / "0000"

    camera = torch.load(f"{base}.camera.pt", weights_only=True)
    assert CAMERA_KEYS <= set(camera), f"missing {sorted(CAMERA_KEYS - set(camera))}"

    def tensor(key, dtype, shape):
        value = camera[key]
        assert isinstance(value, torch.Tensor) and value.dtype == dtype and tuple(value.shape) == shape, (
            key, type(value), getattr(value, "dtype", None), getattr(value, "shape", None))
        return value

    assert torch.equal(tensor("extrinsic", torch.float32, (3, 4)), sample.extrinsic)
    assert torch.equal(tensor("intrinsic", torch.float32, (3, 3)), sample.intrinsic)
    assert tensor("window_frame_indices", torch.int64, (5,)).tolist() == sample.window_frame_indices
    assert torch.equal(tensor("window_extrinsics", torch.float32, (5, 3, 4)), sample.window_extrinsics)
    assert torch.equal(tensor("window_intrinsics", torch.float32, (5, 3, 3)), sample.window_intrinsics)
    assert (camera["height"], camera["width"]) == (28, 42)
    assert camera["video"] == sample.video and camera["frame_index"] == sample.frame_index
    assert camera["timestamp"] == pytest.approx(sample.timestamp)
    assert isinstance(camera["depth_encoding"], str) and camera["depth_encoding"]
    assert 0 < camera["depth_min"] <= camera["depth_max"]

    points = torch.load(f"{base}.points.pt", weights_only=True)
    assert isinstance(points, torch.Tensor) and points.dtype == torch.float32 and tuple(points.shape) == (300, 6)
    assert torch.equal(points, sample.points)

    with Image.open(f"{base}.jpg") as rgb:
        assert rgb.size == (42, 28) and rgb.mode == "RGB"
        assert np.abs(np.asarray(rgb).astype(int) - sample.rgb.numpy()).mean() < 3
    with Image.open(f"{base}.depth.jpg") as depth:
        assert depth.size == (42, 28) and depth.mode == "L"


def test_depth_round_trip_error(tmp_path):
    """depth 1..10 on the 1080p model grid (294x518), smooth. Measured (this file, JPEG q95):
    codec alone max 1.77% / median 0.20%, through the written JPEG max 2.6% / median 0.20%.
    Bounds: codec alone <= half a code step at the far end (depth_max * (1/dmin - 1/dmax) / 508
    = 1.77%); through JPEG max <= 6% (one JPEG level more at the far end: 5.3%) and median <= 0.5%."""
    depth = smooth_depth(294, 518)
    d = depth.numpy().astype(np.float64)

    code, depth_min, depth_max = encode_depth(depth)
    codec = np.abs(decode_depth(code, depth_min, depth_max) - d) / d
    half_step = depth_max * (1 / depth_min - 1 / depth_max) / (2 * 254)

    sample = make_sample(0, h=294, w=518, depth=depth)
    write_all(tmp_path, [sample], files_per_dir=3)
    base = tmp_path / "0" / "000000" / "0000"
    camera = torch.load(f"{base}.camera.pt", weights_only=True)
    with Image.open(f"{base}.depth.jpg") as image:
        stored = np.asarray(image)
    assert stored.shape == (294, 518)
    decoded = decode_depth(stored, camera["depth_min"], camera["depth_max"])
    assert (decoded > 0).all(), f"{int((decoded <= 0).sum())} pixels lost their depth in the JPEG"
    jpeg = np.abs(decoded - d) / d

    print(f"depth round trip, relative error: codec alone max {codec.max():.4f} median {np.median(codec):.4f}; "
          f"through depth.jpg max {jpeg.max():.4f} median {np.median(jpeg):.4f} p99 {np.percentile(jpeg, 99):.4f}")
    assert camera["depth_min"] == pytest.approx(1.0, rel=1e-6) and camera["depth_max"] == pytest.approx(10.0, rel=1e-6)
    assert codec.max() <= half_step + 1e-6
    assert np.median(codec) <= 0.005
    assert jpeg.max() <= 0.06
    assert np.median(jpeg) <= 0.005


def test_depth_codec_ends_and_invalid_pixels():
    depth = torch.tensor([[1.0, 2.0, 10.0], [0.0, float("nan"), float("inf")]])
    code, depth_min, depth_max = encode_depth(depth)
    assert (depth_min, depth_max) == (1.0, 10.0)
    decoded = decode_depth(code, depth_min, depth_max)
    assert decoded[0, 0] == pytest.approx(1.0) and decoded[0, 2] == pytest.approx(10.0)
    assert decoded[0, 1] == pytest.approx(2.0, rel=0.02)
    assert (decoded[1] == 0).all(), "pixels without depth must stay recognisable"


@pytest.mark.parametrize("levels", [255, 65535])
def test_depth_codec_every_pixel_valid_matches_the_masked_path(levels):
    """encode_depth's shortcut for a map with every pixel valid (VGGT's) gives the codes of the
    masked path that handles invalid pixels: one invalid pixel (at the corner, range unchanged)
    must not move any other pixel's code. Codes round half up; the exact ends are 1 and levels."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        depth = torch.from_numpy((rng.uniform(0.2, 30.0, (40, 64)) ** rng.uniform(0.5, 2.0)).astype(np.float32))
        depth[0, 0] = depth.max()  # the corner repeats the far end: the range survives masking it
        code, depth_min, depth_max = encode_depth(depth, levels)
        assert code.dtype == (np.uint8 if levels == 255 else np.uint16)
        assert code.min() == 1 and code.max() == levels
        holed = depth.clone()
        holed[0, 0] = float("nan")
        masked, masked_min, masked_max = encode_depth(holed, levels)
        assert (masked_min, masked_max) == (depth_min, depth_max) and masked[0, 0] == 0
        assert np.array_equal(code.ravel()[1:], masked.ravel()[1:]), f"trial {trial}"
        exact = 1 + (1 / depth.double().numpy() - 1 / depth_max) / (1 / depth_min - 1 / depth_max) * (levels - 1)
        assert np.abs(code - exact).max() <= 0.5 + 1e-9
    flat = torch.full((3, 4), 2.5)  # no range at all: every pixel on the far level (a shortcut) ...
    assert encode_depth(flat, levels)[0].tolist() == [[1] * 4] * 3
    flat[0, 0] = float("nan")  # ... as the masked path has it
    assert encode_depth(flat, levels)[0].tolist() == [[0, 1, 1, 1]] + [[1] * 4] * 2


def test_dir_files_hold_the_bytes_of_encode_sample(tmp_path):
    """Dir shards encode the images and save the .pt files straight into the files; tar shards hold encode_sample's
    bytes: both are the same bytes (the archive inside a .pt is named "archive" either way)."""
    from sharded_writer import encode_sample

    sample = make_sample(3)
    write_all(tmp_path, [sample], files_per_dir=3)
    base = tmp_path / "0" / "000000" / "0000"
    for suffix, payload in encode_sample(sample).items():
        assert Path(f"{base}{suffix}").read_bytes() == payload, suffix


# ----------------------------------------------------------------------------- page cache


def resident_pages(path: str) -> int:
    """Pages of the file now in the page cache (mincore on a private mapping of it)."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vector = (ctypes.c_ubyte * pages)()
        address = ctypes.addressof(ctypes.c_char.from_buffer(m))
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) == 0, ctypes.get_errno()
        count = sum(v & 1 for v in vector)
        del address  # the buffer export must end before the mapping closes
        return count


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise: Linux")
def test_written_samples_leave_the_page_cache(tmp_path):
    """Files written WRITTEN_LAG files ago, and on disk by then, are dropped from the page cache
    (a dataset is write-once: cached samples only push the videos being read out of memory)."""
    import sharded_writer

    probe = tmp_path / "probe.bin"
    probe.write_bytes(os.urandom(1 << 20))
    os.sync()
    with open(probe, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if resident_pages(str(probe)) > 0:
        pytest.skip("this file system keeps clean pages cached after POSIX_FADV_DONTNEED (tmpfs?)")
    with ShardedWriter(str(tmp_path / "out"), 0) as writer:
        writer.write(make_sample(0, n_points=20_000))
        first = [str(p) for p in (tmp_path / "out" / "0" / "000000").glob("0000.*")]
        assert len(first) == 4
        os.sync()  # on disk now, as it would be a few samples later
        for i in range(1, sharded_writer.WRITTEN_LAG // 4 + 1):
            writer.write(make_sample(i, n_points=20_000))
        assert sum(resident_pages(p) for p in first) == 0


def _directory_flags(path) -> int | None:
    """The folder's inode flags (FS_IOC_GETFLAGS), None where the file system has none."""
    import fcntl
    import struct

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, 0x80086601, struct.pack("i", 0)))[0]
    except OSError:
        return None
    finally:
        os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inode flags: Linux")
def test_the_rank_folder_is_a_top_directory(tmp_path):
    """The writer flags OUT/<rank> as a top directory (chattr +T) before it makes .tmp/, where every
    file is created: ext4 then places .tmp/ in a block group of its own choosing, not beside a
    folder whose recently deleted inodes each create would scan (sample_format.mark_top_directory)."""
    from sample_format import mark_top_directory

    probe = tmp_path / "probe"
    probe.mkdir()
    if not mark_top_directory(str(probe)):
        pytest.skip("this file system has no top-directory flag (tmpfs, overlayfs?)")
    assert _directory_flags(probe) & 0x00020000
    write_all(tmp_path / "out", [make_sample(0)], files_per_dir=3)
    assert _directory_flags(tmp_path / "out" / "0") & 0x00020000
    assert mark_top_directory(str(tmp_path / "out" / "0"))  # already set: still True, nothing else changes
    assert_consistent(tmp_path / "out" / "0")
