"""Using the dataset: the loader (dataset.py), tar shards and 16-bit depth (sharded_writer.py), and
inspect_dataset.py. Datasets are written directly with ShardedWriter from synthetic Samples, except
one built by the real Pipeline with the oracle backend (tar shards: a video is reported done only
once its samples are committed)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

from dataset import VGGTDataset  # noqa: E402
from sharded_writer import (DEPTH_FORMATS, INDEX_NAME, ShardedWriter, decode_depth,  # noqa: E402
                            encode_depth, encode_sample, read_index)
from streaming_vggt import Sample  # noqa: E402

H, W, S = 28, 42, 3
FILES_PER_DIR = 3
# rank -> videos (name, samples): 4 + 3 samples on rank 0, 2 on rank 1
LAYOUT = {0: [("clips/a.mp4", 4), ("clips/b.mp4", 3)], 1: [("clips/c.mp4", 2)]}
POINT_COUNTS = [120, 40, 0, 300, 75, 10, 64, 200, 33]  # per sample, in writing order
FORMATS = [(shard, depth) for shard in ("dir", "tar") for depth in ("jpg", "png16")]


# ----------------------------------------------------------------------------- synthetic samples


def smooth_depth(h: int, w: int, phase: float = 0.0, near: float = 1.0, far: float = 20.0) -> np.ndarray:
    """A VGGT-like depth map: a floor receding to the horizon, gently curved walls, range near..far."""
    v, u = np.mgrid[0:h, 0:w]
    v, u = (v + 0.5) / h, (u + 0.5) / w
    inv = 0.05 + 0.95 * v ** 1.5  # 1/depth: far at the top, near at the bottom
    inv = inv * (1 + 0.08 * np.sin(5 * u + phase) * np.cos(3 * v))
    d = 1.0 / inv
    d = near + (d - d.min()) / (d.max() - d.min()) * (far - near)
    return d.astype(np.float32)


def make_sample(n: int, video: str = "clips/a.mp4", frame: int | None = None) -> Sample:
    """Sample number n: smooth RGB and depth, a camera, and points unprojected from the depth."""
    rng = np.random.default_rng(n)
    frame = 2 + 3 * n if frame is None else frame
    v, u = np.mgrid[0:H, 0:W] / np.array([H, W])[:, None, None]
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * u + n), 0.5 + 0.4 * np.cos(5 * v - n), 0.5 + 0.3 * np.sin(4 * (u + v))], -1)
    rgb = torch.from_numpy((rgb * 255 + 0.5).astype(np.uint8))
    depth = torch.from_numpy(smooth_depth(H, W, phase=n))
    K = torch.tensor([[W * 0.9, 0, (W - 1) / 2], [0, W * 0.9, (H - 1) / 2], [0, 0, 1]], dtype=torch.float32)
    angle = 0.1 * n
    R = torch.tensor([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]],
                     dtype=torch.float32)
    t = torch.tensor(rng.normal(size=3), dtype=torch.float32)
    E = torch.cat([R, t[:, None]], 1)
    count = POINT_COUNTS[n % len(POINT_COUNTS)]
    pix = rng.choice(H * W, count, replace=False)  # distinct points
    z = depth.reshape(-1)[pix]
    cam = torch.stack([(torch.from_numpy(pix % W).float() - K[0, 2]) / K[0, 0] * z,
                       (torch.from_numpy(pix // W).float() - K[1, 2]) / K[1, 1] * z, z], 1)
    world = (cam - t) @ R  # R^T (cam - t)
    colours = rgb.reshape(-1, 3)[pix].float() / 255
    window = [frame - 2, frame, frame + 2]
    return Sample(
        video=video, frame_index=frame, timestamp=frame / 30, fps=30.0, dilation=2,
        window_frame_indices=window, window_timestamps=[f / 30 for f in window], world_frame="first",
        rgb=rgb, depth=depth, extrinsic=E, intrinsic=K,
        window_extrinsics=torch.stack([E, E * 0.5, E * 0.25]), window_intrinsics=K.expand(S, 3, 3).clone(),
        points=torch.cat([world, colours], 1).float(),
        quality={"conf_p10": 1 + 0.1 * n, "conf_p50": 2 + 0.2 * n, "conf_p90": 4.0,
                 "kept_fraction": 0.1 * (n + 1), "depth_min": 1.0, "depth_max": 20.0},
    )


def all_samples() -> dict[tuple[str, int], Sample]:
    samples, n = {}, 0
    for rank, videos in LAYOUT.items():
        for video, count in videos:
            for k in range(count):
                samples[(video, 2 + 3 * k)] = make_sample(n, video, 2 + 3 * k)
                n += 1
    return samples


def write_root(root: Path, shard_format: str, depth_format: str) -> Path:
    """The same samples in every format; the writer is flushed at each video's end (as the pipeline does)."""
    samples = all_samples()
    for rank, videos in LAYOUT.items():
        with ShardedWriter(str(root), rank, FILES_PER_DIR, shard_format=shard_format,
                           depth_format=depth_format) as writer:
            for video, count in videos:
                for k in range(count):
                    writer.write(samples[(video, 2 + 3 * k)])
                writer.flush()
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[tuple[str, str], Path]:
    base = tmp_path_factory.mktemp("roots")
    return {(s, d): write_root(base / f"{s}_{d}", s, d) for s, d in FORMATS}


def by_key(dataset: VGGTDataset, items=None) -> dict[tuple[str, int], dict]:
    items = items if items is not None else [dataset[i] for i in range(len(dataset))]
    out = {}
    for i, item in enumerate(items):
        record = dataset.record(i)
        out[(record["video"], record["frame_index"])] = item
    return out


def assert_same(a, b, path="item"):
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    else:
        assert a == b, path


def depth_step(camera: dict) -> float:
    """One code step in inverse depth."""
    levels = camera["depth_levels"]
    return (1 / camera["depth_min"] - 1 / camera["depth_max"]) / (levels - 1)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("shard_format,depth_format", FORMATS)
def test_every_field_comes_back(roots, shard_format, depth_format):
    ds = VGGTDataset(str(roots[shard_format, depth_format]), rgb="uint8")
    samples = all_samples()
    assert len(ds) == len(samples)
    items = by_key(ds)
    assert items.keys() == samples.keys()
    for key, sample in samples.items():
        item = items[key]
        # RGB: exactly the stored JPEG, which is close to the frame
        stored = np.array(Image.open(io.BytesIO(encode_sample(sample)[".jpg"])))
        assert np.array_equal(item["rgb"].numpy(), stored)
        assert np.abs(item["rgb"].numpy().astype(int) - sample.rgb.numpy()).mean() < 2.0
        # camera: every field as given
        cam = item["camera"]
        assert torch.equal(cam["extrinsic"], sample.extrinsic) and cam["extrinsic"].dtype == torch.float32
        assert torch.equal(cam["intrinsic"], sample.intrinsic)
        assert torch.equal(cam["window_extrinsics"], sample.window_extrinsics)
        assert torch.equal(cam["window_intrinsics"], sample.window_intrinsics)
        assert cam["window_frame_indices"].tolist() == sample.window_frame_indices
        assert cam["window_frame_indices"].dtype == torch.int64
        assert (cam["height"], cam["width"], cam["video"], cam["frame_index"]) == (H, W, sample.video, key[1])
        assert cam["timestamp"] == pytest.approx(sample.timestamp) and cam["dilation"] == 2
        assert cam["depth_levels"] == DEPTH_FORMATS[depth_format][1]
        assert cam["depth_encoding"] == DEPTH_FORMATS[depth_format][2]
        # points: bit-exact
        assert torch.equal(item["points"], sample.points) and item["num_points"] == sample.points.shape[0]
        # depth: within the encoding's bound
        depth, truth = item["depth"].numpy(), sample.depth.numpy()
        assert depth.dtype == np.float32 and depth.shape == (H, W) and (depth > 0).all()
        inverse_error = np.abs(1 / depth.astype(np.float64) - 1 / truth.astype(np.float64))
        if depth_format == "png16":  # lossless: half a code step in inverse depth (+ float32 rounding)
            assert (inverse_error <= 0.5 * depth_step(cam) + 2e-7 / truth).all()
        else:  # 8-bit quantisation plus JPEG: a few code steps
            assert np.median(inverse_error) <= 1.0 * depth_step(cam)
            assert inverse_error.max() <= 4.0 * depth_step(cam)


def test_float_rgb_layout(roots):
    a = VGGTDataset(str(roots["dir", "jpg"]), rgb="uint8")[0]["rgb"]
    b = VGGTDataset(str(roots["dir", "jpg"]))[0]["rgb"]
    assert a.shape == (H, W, 3) and a.dtype == torch.uint8
    assert b.shape == (3, H, W) and b.dtype == torch.float32
    assert torch.equal(b, a.permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize("depth_format", ["jpg", "png16"])
def test_dir_and_tar_identical_through_dataloader(roots, depth_format):
    loaded = {}
    for shard_format in ("dir", "tar"):
        ds = VGGTDataset(str(roots[shard_format, depth_format]), num_points=48)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        items = list(loader)
        direct = [ds[i] for i in range(len(ds))]
        for a, b in zip(items, direct):  # the workers read what the main process reads
            assert_same(a, b)
        loaded[shard_format] = {k: {f: v for f, v in item.items() if f != "sample"}
                                for k, item in by_key(ds, items).items()}
    assert loaded["dir"].keys() == loaded["tar"].keys()
    for key in loaded["dir"]:
        assert_same(loaded["dir"][key], loaded["tar"][key], str(key))


def test_tar_layout_is_webdataset_style(roots):
    root = roots["tar", "png16"]
    # rank 0: video a (4) -> shards 0 (full) and 1 (closed at the video's end); video b (3) -> shard 2
    assert sorted(os.listdir(root / "0")) == ["000000.tar", "000001.tar", "000002.tar", INDEX_NAME]
    with tarfile.open(root / "0" / "000000.tar") as tar:
        names = tar.getnames()
    assert names == [f"{stem:04d}{suffix}" for stem in range(3)
                     for suffix in (".jpg", ".depth.png", ".camera.pt", ".points.pt")]
    records = read_index(str(root / "0" / INDEX_NAME))
    assert [r["sample"] for r in records] == ["0/000000/0000", "0/000000/0001", "0/000000/0002",
                                              "0/000001/0000", "0/000002/0000", "0/000002/0001", "0/000002/0002"]
    assert {r["shard_format"] for r in records} == {"tar"}


# ----------------------------------------------------------------------------- points


def test_fixed_points_deterministic_and_collate(roots):
    root = str(roots["tar", "jpg"])
    ds = VGGTDataset(root, num_points=64)
    again = VGGTDataset(root, num_points=64)
    for i in range(len(ds)):
        p = ds[i]["points"]
        assert p.shape == (64, 6) and p.dtype == torch.float32
        assert torch.equal(p, ds[i]["points"]) and torch.equal(p, again[i]["points"])
    # fewer points than asked: all of them, padded by repeats; none stored: zeros
    full = VGGTDataset(root)
    for i in range(len(ds)):
        stored, picked = full[i]["points"], ds[i]["points"]
        assert ds[i]["num_points"] == stored.shape[0]
        if stored.shape[0] == 0:
            assert torch.equal(picked, torch.zeros(64, 6))
        elif stored.shape[0] <= 64:
            assert {tuple(r) for r in stored.tolist()} == {tuple(r) for r in picked.tolist()}
        else:  # a subset without repeats
            assert len({tuple(r) for r in picked.tolist()}) == 64
            assert {tuple(r) for r in picked.tolist()} <= {tuple(r) for r in stored.tolist()}
    big = next(i for i in range(len(ds)) if full[i]["num_points"] > 64)
    assert not torch.equal(VGGTDataset(root, num_points=64, seed=1)[big]["points"], ds[big]["points"])
    epoch = VGGTDataset(root, num_points=64)
    epoch.set_epoch(3)
    assert not torch.equal(epoch[big]["points"], ds[big]["points"])
    assert torch.equal(epoch[big]["points"], epoch[big]["points"])
    # the default collate batches everything, with two workers
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert batches[0]["points"].shape == (4, 64, 6)
    assert batches[0]["rgb"].shape == (4, 3, H, W) and batches[0]["depth"].shape == (4, H, W)
    assert batches[0]["camera"]["extrinsic"].shape == (4, 3, 4)
    assert batches[0]["camera"]["window_frame_indices"].shape == (4, S)
    assert len(batches[0]["camera"]["video"]) == 4
    assert torch.equal(torch.cat([b["points"] for b in batches]), torch.stack([ds[i]["points"] for i in range(len(ds))]))


# ----------------------------------------------------------------------------- filters


def test_index_filters(roots, monkeypatch):
    root = str(roots["dir", "png16"])
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: (opened.append(str(path)), real_open(path, *a, **k))[1])
    ds = VGGTDataset(root, min_kept_fraction=0.55)
    assert all(p.endswith(INDEX_NAME) for p in opened)  # only the index files are read
    monkeypatch.undo()
    assert [ds.record(i)["kept_fraction"] for i in range(len(ds))] == pytest.approx([0.6, 0.7, 0.8, 0.9])
    assert len(VGGTDataset(root, min_conf_p50=3.0)) == 4  # conf_p50 = 2 + 0.2 n >= 3 for n >= 5
    assert len(VGGTDataset(root, min_kept_fraction=0.3, min_conf_p50=3.0)) == 4
    assert len(VGGTDataset(root, min_points=100)) == 3
    assert {VGGTDataset(root, videos=["clips/c.mp4"]).record(i)["video"] for i in range(2)} == {"clips/c.mp4"}
    odd = VGGTDataset(root, filter=lambda r: r["frame_index"] % 2 == 1)
    assert sorted(odd.record(i)["frame_index"] for i in range(len(odd))) == [5, 5, 5, 11]
    assert len(VGGTDataset(root, ranks=[1])) == 2
    assert odd.find(odd.record(1)["sample"]) == 1


def test_old_index_lines_without_format_keys(roots, tmp_path):
    """Roots written before the format flags read as dir shards with 8-bit depth."""
    root = tmp_path / "old"
    shutil.copytree(roots["dir", "jpg"], root)
    for rank in LAYOUT:
        path = root / str(rank) / INDEX_NAME
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("shard_format", "depth_format")})
                                + "\n" for r in lines))
    a, b = VGGTDataset(str(root)), VGGTDataset(str(roots["dir", "jpg"]))
    for i in range(len(a)):
        assert_same(a[i], b[i])


# ----------------------------------------------------------------------------- depth formats


def test_depth_round_trip_error_both_formats(capsys):
    """Measured on a VGGT-like smooth depth map with range 1..20 at the model's 518 x 294 grid."""
    depth = smooth_depth(294, 518)
    results = {}
    for depth_format in ("jpg", "png16"):
        sample = make_sample(0)
        sample.depth = torch.from_numpy(depth)
        files = encode_sample(sample, depth_format=depth_format)
        suffix, levels, _ = DEPTH_FORMATS[depth_format]
        image = Image.open(io.BytesIO(files[suffix]))
        code = np.array(image)
        if depth_format == "png16":  # a real 16-bit grayscale PNG: IHDR bit depth 16, colour type 0
            assert image.mode == "I;16" and code.dtype == np.uint16
            assert files[suffix][24:26] == b"\x10\x00"
            assert code.max() == 65535 and np.array_equal(code, encode_depth(sample.depth, 65535)[0])
        camera = torch.load(io.BytesIO(files[".camera.pt"]), weights_only=True)
        assert camera["depth_invalid_pixels"] == 0
        back = decode_depth(code, camera["depth_min"], camera["depth_max"], camera["depth_levels"], all_valid=True)
        rel = np.abs(back - depth) / depth
        results[depth_format] = (rel.max(), np.median(rel), len(files[suffix]))
    with capsys.disabled():
        for name, (worst, median, size) in results.items():
            print(f"\ndepth round trip {name:>5}: max relative error {worst:.2e}, median {median:.2e}, "
                  f"{size} bytes at 518x294 (depth 1..20)", end="")
        print()
    # 8-bit: one step of (1/1 - 1/20)/254 in inverse depth is 7.5 % of depth at 20 (3.7 % from
    # rounding alone); JPEG moves far, flat areas by a level or two, so the worst case is there
    assert results["jpg"][0] < 0.15 and results["jpg"][1] < 0.005
    # 16-bit: the same code at 65535 levels: (20/1 - 1) / (2 * 65534) = 1.5e-4 at worst
    assert results["png16"][0] < 1.5e-4 and results["png16"][1] < 2e-5


def test_png16_files_on_disk(roots):
    files = sorted(os.listdir(roots["dir", "png16"] / "0" / "000000"))
    assert files[:4] == ["0000.camera.pt", "0000.depth.png", "0000.jpg", "0000.points.pt"]
    assert not any(f.endswith(".depth.jpg") for f in files)
    files = sorted(os.listdir(roots["dir", "jpg"] / "0" / "000000"))
    assert files[:4] == ["0000.camera.pt", "0000.depth.jpg", "0000.jpg", "0000.points.pt"]


def test_one_root_one_format(roots, tmp_path):
    root = tmp_path / "mix"
    shutil.copytree(roots["dir", "jpg"], root)
    with pytest.raises(ValueError, match="shard_format"):
        ShardedWriter(str(root), 0, FILES_PER_DIR, shard_format="tar")
    with pytest.raises(ValueError, match="depth_format"):
        ShardedWriter(str(root), 0, FILES_PER_DIR, depth_format="png16")
    ShardedWriter(str(root), 0, FILES_PER_DIR).close()  # the same formats are fine


def test_cli_flags():
    from extract_dataset import DATASET_PARAMETERS, parse_args, run_parameters

    args = parse_args(["--root", "r", "--videos", "v", "--shard-format", "tar", "--depth-format", "png16"])
    assert (args.shard_format, args.depth_format) == ("tar", "png16")
    args = parse_args(["--root", "r", "--videos", "v"])
    assert (args.shard_format, args.depth_format) == ("dir", "jpg")
    assert {"shard_format", "depth_format"} <= set(DATASET_PARAMETERS)
    assert run_parameters(args)["shard_format"] == "dir"
    with pytest.raises(SystemExit):
        parse_args(["--root", "r", "--videos", "v", "--shard-format", "zip"])


# ----------------------------------------------------------------------------- tar commits


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    import sharded_writer
    from sharded_writer import ShardedWriter
    from test_dataset import make_sample

    w = ShardedWriter({root!r}, 0, 3, shard_format="tar")
    for n in range(3):  # shard 0 fills and commits
        w.write(make_sample(n))
    w.write(make_sample(3))
    w.write(make_sample(4))
    if {stage!r} == "before_rename":
        real = os.rename
        os.rename = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL) if dst.endswith(".tar") else real(src, dst)
    else:  # after the rename, before the index lines
        ShardedWriter._commit = lambda self, records: os.kill(os.getpid(), signal.SIGKILL)
    w.flush()
    print("not killed")
""")


@pytest.mark.parametrize("stage", ["before_rename", "after_rename"])
def test_kill_during_tar_commit(tmp_path, stage):
    root = tmp_path / "out"
    script = KILL_SCRIPT.format(repo=str(REPO), tests=str(HERE), root=str(root), stage=stage)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    rank = root / "0"
    visible = sorted(n for n in os.listdir(rank) if not n.startswith("."))
    if stage == "before_rename":  # the open shard was built but never renamed: invisible, not indexed
        assert visible == ["000000.tar", INDEX_NAME]
        assert os.listdir(rank / ".tmp") == ["000001.tar"]
    else:  # renamed but never indexed: the next writer removes it
        assert visible == ["000000.tar", "000001.tar", INDEX_NAME]
    records = read_index(str(rank / INDEX_NAME))
    assert [r["sample"] for r in records] == ["0/000000/0000", "0/000000/0001", "0/000000/0002"]
    assert len(VGGTDataset(str(root))) == 3
    # the resume writes the lost samples again, in shard 1, with nothing duplicated
    with ShardedWriter(str(root), 0, 3, shard_format="tar") as w:
        assert w.last_focal == {"clips/a.mp4": make_sample(2).frame_index}
        assert sorted(os.listdir(rank)) == [".tmp", "000000.tar", INDEX_NAME]
        w.write(make_sample(3))
        w.write(make_sample(4))
    ds = VGGTDataset(str(root))
    assert [ds.record(i)["frame_index"] for i in range(len(ds))] == [make_sample(n).frame_index for n in range(5)]
    with tarfile.open(rank / "000001.tar") as tar:
        assert len(tar.getnames()) == 8


def test_tar_resume_and_partial_index(tmp_path):
    root = tmp_path / "out"
    with ShardedWriter(str(root), 0, 5, shard_format="tar") as w:
        for n in range(3):
            w.write(make_sample(n))
        assert not (root / "0" / "000000.tar").exists() and w.samples_committed == 0
        assert read_index(str(root / "0" / INDEX_NAME)) == [] and w.last_focal == {}
        assert [r["stem"] for r in w.flush()] == [0, 1, 2]
        assert w.flush() == []  # nothing open
        w.write(make_sample(3))  # a flushed shard is never appended to: shard 1
    assert sorted(os.listdir(root / "0")) == ["000000.tar", "000001.tar", INDEX_NAME]
    # a reopened writer starts a new shard; nothing is overwritten
    with ShardedWriter(str(root), 0, 5, shard_format="tar") as w:
        record = w.write(make_sample(4))
    assert record["sample"] == "0/000002/0000"
    # an index whose last lines were lost (power cut) while the tar holds them: the tar is trimmed
    index = root / "0" / INDEX_NAME
    lines = index.read_bytes().splitlines(keepends=True)
    index.write_bytes(b"".join(lines[:2]) + lines[2][:10])  # 0/000000/0000, 0001 and a cut line
    with ShardedWriter(str(root), 0, 5, shard_format="tar") as w:
        assert w.removed_orphans == 2 * 4 + 4  # stem 2 of shard 0, and all of shards 1 and 2
        assert sorted(os.listdir(root / "0")) == [".tmp", "000000.tar", INDEX_NAME]
        with tarfile.open(root / "0" / "000000.tar") as tar:
            assert sorted({n.split(".")[0] for n in tar.getnames()}) == ["0000", "0001"]
        assert w.write(make_sample(2))["sample"] == "0/000001/0000"
    assert len(VGGTDataset(str(root))) == 3


def test_failed_tar_write_drops_the_open_shard(tmp_path, monkeypatch):
    root = tmp_path / "out"
    w = ShardedWriter(str(root), 0, 5, shard_format="tar")
    w.write(make_sample(0))
    monkeypatch.setattr(w._tar, "addfile", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        w.write(make_sample(1))
    monkeypatch.undo()
    assert os.listdir(root / "0" / ".tmp") == [] and w.samples_written == 0
    assert w.write(make_sample(2))["sample"] == "0/000000/0000"  # the shard number is reused
    w.close()
    assert [r["frame_index"] for r in read_index(str(root / "0" / INDEX_NAME))] == [make_sample(2).frame_index]


# ----------------------------------------------------------------------------- the pipeline, end to end


@pytest.fixture(scope="module")
def oracle_root(tmp_path_factory) -> Path:
    """Two videos through the real Pipeline (oracle model, CPU) into tar shards of 3 samples,
    checking at each 'video finished' event that its samples are already committed."""
    import oracle_backend
    from pipeline import Pipeline, VideoResult, VideoTask, WindowSettings
    from streaming_vggt import GeometryConfig, GeometryStage

    base = tmp_path_factory.mktemp("oracle")
    first = oracle_backend.render_scene_video(base / "a.mp4", num_frames=12)
    second = shutil.copy(first, base / "b.mp4")
    root = base / "out"
    writer = ShardedWriter(str(root), 0, 3, shard_format="tar", depth_format="png16")
    stage = GeometryStage(oracle_backend.make("cpu"), "cpu", GeometryConfig(max_points=4000))
    pipeline = Pipeline(stage, writer, WindowSettings(kernel=5, stride=2), batch_size=2)
    videos = [str(first), str(second)]
    for video in videos:
        pipeline.submit(VideoTask(video))
    results = []
    while len(results) < 2:
        for event in pipeline.poll(0.2):
            if isinstance(event, VideoResult):
                records = [r for r in read_index(str(root / "0" / INDEX_NAME)) if r["video"] == event.video]
                assert event.status == "done" and len(records) == event.samples == 4
                assert all((root / "0" / f"{r['shard']:06d}.tar").exists() for r in records)
                results.append(event)
    pipeline.close()
    with open(root / "videos.jsonl", "w") as f:  # what the driver records
        for r in results:
            f.write(json.dumps({"video": r.video, "status": r.status, "samples": r.samples}) + "\n")
        f.write(json.dumps({"video": "broken.mp4", "status": "failed", "reason": "cannot decode"}) + "\n")
    return root


def test_pipeline_commits_tar_before_reporting(oracle_root):
    assert sorted(os.listdir(oracle_root / "0")) == ["000000.tar", "000001.tar", "000002.tar", "000003.tar",
                                                     INDEX_NAME]  # 3 + 1 per video
    ds = VGGTDataset(str(oracle_root))
    assert len(ds) == 8
    item = ds[0]
    assert item["rgb"].shape == (3, 294, 518) and item["points"].shape == (4000, 6)
    # pixel alignment survives the round trip: focal points land at their stored depth
    cam = item["camera"]
    xyz = item["points"][:, :3].double()
    local = xyz @ cam["extrinsic"][:, :3].double().T + cam["extrinsic"][:, 3].double()
    uv = local @ cam["intrinsic"].double().T
    u, v, z = uv[:, 0] / uv[:, 2], uv[:, 1] / uv[:, 2], local[:, 2]
    on_grid = (u.round() - u).abs().lt(1e-3) & (v.round() - v).abs().lt(1e-3) & (z > 0)
    assert on_grid.sum() > 100  # the focal frame's own points
    d = item["depth"][v[on_grid].round().long(), u[on_grid].round().long()].double()
    assert ((d - z[on_grid]).abs() / z[on_grid]).max() < 1e-3


# ----------------------------------------------------------------------------- inspect_dataset.py


def test_summary_and_contact_sheet(oracle_root, tmp_path, capsys):
    import inspect_dataset

    sheet = tmp_path / "sheet.png"
    assert inspect_dataset.main([str(oracle_root), "--sheet", str(sheet), "--samples", "3"]) == 0
    out = capsys.readouterr().out
    assert "videos: 2 done, 0 too short for one window, 1 failed" in out
    assert "failed: broken.mp4: cannot decode" in out
    assert "samples: 8 from 2 videos; rank 0: 8" in out and "tar shards with png16 depth: 8" in out
    assert "points per sample: median 4000" in out
    for kind in ("points.pt", "jpg", "depth.png", "camera.pt", "(tar headers)"):
        assert f"  {kind} " in out
    image = np.array(Image.open(sheet).convert("RGB")).astype(float)
    rows = 3
    row_h = inspect_dataset.PANEL_HEIGHT + inspect_dataset.CAPTION_HEIGHT + 4
    panel_w = round(518 * inspect_dataset.PANEL_HEIGHT / 294)
    assert image.shape == (rows * row_h, 3 * panel_w + 8, 3)
    for row in range(rows):
        top = row * row_h + inspect_dataset.CAPTION_HEIGHT
        for k in range(3):
            panel = image[top:top + inspect_dataset.PANEL_HEIGHT, k * (panel_w + 4):k * (panel_w + 4) + panel_w]
            assert panel.std() > 20, (row, k)  # not blank
    # the projected cloud looks like the frame where it has points (same scene, same place)
    top = inspect_dataset.CAPTION_HEIGHT
    rgb = image[top:top + inspect_dataset.PANEL_HEIGHT, :panel_w]
    cloud = image[top:top + inspect_dataset.PANEL_HEIGHT, 2 * (panel_w + 4):2 * (panel_w + 4) + panel_w]
    hit = np.abs(cloud - 24).sum(-1) > 0
    assert hit.mean() > 0.1
    assert np.abs(cloud[hit] - rgb[hit]).mean() < 25


def test_contact_sheet_dir_root(roots, tmp_path):
    import inspect_dataset

    sheet = tmp_path / "s.png"
    assert inspect_dataset.main([str(roots["dir", "jpg"]), "--sheet", str(sheet), "--no-disk"]) == 0
    assert np.array(Image.open(sheet)).std() > 20


@pytest.mark.parametrize("ascii_ply", [False, True])
def test_ply(oracle_root, tmp_path, ascii_ply):
    import inspect_dataset
    from plyfile import PlyData

    ds = VGGTDataset(str(oracle_root))
    sample_id = ds.record(5)["sample"]
    path = tmp_path / "cloud.ply"
    argv = [str(oracle_root), "--ply", sample_id, "--ply-out", str(path)] + (["--ascii"] if ascii_ply else [])
    assert inspect_dataset.main(argv) == 0
    ply = PlyData.read(str(path))
    vertex = ply["vertex"].data
    points = ds[5]["points"].numpy()
    assert len(vertex) == len(points) == 4000
    assert vertex.dtype["x"] == np.float32 and vertex.dtype["red"] == np.uint8
    xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], 1)
    np.testing.assert_allclose(xyz, points[:, :3], rtol=1e-6 if ascii_ply else 0)
    rgb = np.stack([vertex["red"], vertex["green"], vertex["blue"]], 1)
    assert np.array_equal(rgb, np.rint(points[:, 3:] * 255).astype(np.uint8))
    assert ("ascii" if ascii_ply else "binary_little_endian") in path.read_bytes()[:60].decode()


def test_shot_filters_use_the_final_shot_boundaries(tmp_path):
    """min_shot_frames / min_cut_distance read each video's shots from videos.jsonl (a sample
    written while its shot was going on has shot_last_frame -1); unknown shots are dropped."""
    import dataclasses

    root = tmp_path / "out"
    shots = {"v/a.mp4": [[0, 40], [46, 60]], "v/b.mp4": [[0, 200]]}
    samples = []
    for video, focal, shot in (("v/a.mp4", 5, 0), ("v/a.mp4", 20, 0), ("v/a.mp4", 37, 0), ("v/a.mp4", 52, 1),
                               ("v/b.mp4", 100, 0), ("v/c.mp4", 10, 0)):
        first = shots.get(video, [[0, -1]])[shot][0]
        samples.append(dataclasses.replace(make_sample(len(samples), video, focal), shot_index=shot,
                                           shot_first_frame=first, shot_last_frame=-1))
    with ShardedWriter(str(root), 0, FILES_PER_DIR) as writer:
        for sample in samples:
            writer.write(sample)
    with open(root / "videos.jsonl", "w") as f:
        for video, video_shots in shots.items():
            f.write(json.dumps({"video": video, "status": "done", "shots": video_shots}) + "\n")
    assert len(VGGTDataset(str(root))) == 6
    keys = lambda ds: sorted((r["video"], r["frame_index"]) for r in ds.records())  # noqa: E731
    # windows are [f-2, f, f+2]; shot 0 of a.mp4 holds 41 frames, shot 1 15, b.mp4's 201; c.mp4: no record
    assert keys(VGGTDataset(str(root), min_shot_frames=20)) == [("v/a.mp4", 5), ("v/a.mp4", 20), ("v/a.mp4", 37),
                                                                ("v/b.mp4", 100)]
    assert keys(VGGTDataset(str(root), min_cut_distance=2)) == [("v/a.mp4", 5), ("v/a.mp4", 20), ("v/a.mp4", 52),
                                                               ("v/b.mp4", 100)]
    assert keys(VGGTDataset(str(root), min_cut_distance=4)) == [("v/a.mp4", 20), ("v/a.mp4", 52), ("v/b.mp4", 100)]
