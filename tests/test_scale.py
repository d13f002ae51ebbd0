"""Scale (sample_format.py resume log, dataset.py column cache): a root's start-up and the loader
read state of bounded size, never the whole index again, and agree exactly with a full read."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import sample_format  # noqa: E402
from dataset import COLUMNS, VGGTDataset  # noqa: E402
from sample_format import (INDEX_NAME, STRETCH_SAMPLES, ResumeLog, iter_records, resume_log_path,  # noqa: E402
                           resume_points)
from sharded_writer import ShardedWriter  # noqa: E402
from test_dataset import make_sample  # noqa: E402


def synthetic_index(root: Path, rank: int, plan: list[tuple[str, int]], first: int = 0) -> None:
    """Append index lines (no sample files) for plan = [(video, samples), ...] to a rank's index,
    focal frames 4, 6, ... continuing per video."""
    path = root / str(rank) / INDEX_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = list(iter_records(str(path)))
    n = first + len(existing)
    focal = {}
    for _, r in existing:
        focal[r["video"]] = max(focal.get(r["video"], 2), r["frame_index"])
    with open(path, "a") as f:
        for video, count in plan:
            for _ in range(count):
                frame = focal.get(video, 2) + 2
                focal[video] = frame
                shard, stem = divmod(n, 500)
                f.write(json.dumps({"sample": f"{rank}/{shard:06d}/{stem:04d}", "rank": rank, "shard": shard,
                                    "stem": stem, "video": video, "frame_index": frame, "num_points": 10 + n % 7,
                                    "kept_fraction": (n % 10) / 10, "shard_format": "dir", "depth_format": "jpg"})
                        + "\n")
                n += 1


def full_scan(root: Path) -> dict[str, int]:
    """The reference: every index line read."""
    last: dict[str, int] = {}
    for path in root.glob("*/" + INDEX_NAME):
        for _, r in iter_records(str(path)):
            last[r["video"]] = max(last.get(r["video"], -1), r["frame_index"])
    return last


class CountingRecords:
    """Counts index lines read through sample_format.complete_lines and scan_stretches (every
    line-by-line read of an index, by the writer, the driver and the loader, goes there)."""

    def __init__(self, monkeypatch):
        self.lines = 0
        real = sample_format.complete_lines

        def counting(path, *args, **kwargs):
            for item in real(path, *args, **kwargs):
                if path.endswith(INDEX_NAME):
                    self.lines += 1
                yield item

        real_scan = sample_format.scan_stretches

        def scanning(path, *args, **kwargs):
            for stretch in real_scan(path, *args, **kwargs):
                self.lines += stretch.samples
                yield stretch

        monkeypatch.setattr(sample_format, "complete_lines", counting)
        monkeypatch.setattr(sample_format, "scan_stretches", scanning)


# ----------------------------------------------------------------------------- the resume log


def test_old_root_is_upgraded_once_then_opened_from_its_tail(tmp_path, monkeypatch, capsys):
    plan = [(f"v{k}.mp4", 40) for k in range(30)] + [("long.mp4", 3 * STRETCH_SAMPLES + 5)]
    synthetic_index(tmp_path, 0, plan)  # a root written before the resume log existed
    total = sum(n for _, n in plan)
    counter = CountingRecords(monkeypatch)
    log = ResumeLog(str(tmp_path), 0)
    assert "building the resume log" in capsys.readouterr().err  # said once, in one line
    assert counter.lines == total and log.lines == total and log.last_slot == divmod(total - 1, 500)
    stretches = [json.loads(line) for line in open(resume_log_path(str(tmp_path), 0))]
    assert len(stretches) == 30 + 4  # one per video, and the long one every STRETCH_SAMPLES
    assert resume_points(str(tmp_path)) == full_scan(tmp_path)

    counter.lines = 0
    again = ResumeLog(str(tmp_path), 0)
    assert counter.lines == 0 and again.lines == total and capsys.readouterr().err == ""
    synthetic_index(tmp_path, 0, [("v3.mp4", 5), ("new.mp4", 7)])  # committed, then a kill before the log line
    reference = full_scan(tmp_path)
    counter.lines = 0
    assert resume_points(str(tmp_path)) == reference
    assert counter.lines == 12  # the driver read only the index after the log
    counter.lines = 0
    assert ResumeLog(str(tmp_path), 0).lines == total + 12 and counter.lines == 12
    counter.lines = 0
    assert resume_points(str(tmp_path)) == reference and counter.lines == 0


def test_resume_points_skip_and_only(tmp_path):
    synthetic_index(tmp_path, 0, [("a", 3), ("b", 4), ("a", 2)])
    synthetic_index(tmp_path, 1, [("c", 5), ("b", 1)])
    ResumeLog(str(tmp_path), 0)
    reference = full_scan(tmp_path)
    assert resume_points(str(tmp_path)) == reference
    assert resume_points(str(tmp_path), skip={"a"}) == {k: v for k, v in reference.items() if k != "a"}
    assert resume_points(str(tmp_path), ranks=[1], only={"b"}) == {"b": 4}


def test_log_that_does_not_match_its_index_is_rebuilt(tmp_path, capsys):
    synthetic_index(tmp_path, 0, [("a", 10), ("b", 10)])
    ResumeLog(str(tmp_path), 0)
    index = tmp_path / "0" / INDEX_NAME
    lines = index.read_bytes().splitlines(keepends=True)
    index.write_bytes(b"".join(lines[:12]))  # an index cut by hand (a power cut): the log is ahead
    assert resume_points(str(tmp_path)) == full_scan(tmp_path) == {"a": 22, "b": 6}
    capsys.readouterr()
    assert ResumeLog(str(tmp_path), 0).lines == 12
    assert "does not match" in capsys.readouterr().err
    # a half-written log line (a kill while logging) is cut, the index tail read instead
    with open(resume_log_path(str(tmp_path), 0), "a") as f:
        f.write('{"video": "b", "last_fo')
    assert resume_points(str(tmp_path)) == full_scan(tmp_path)
    assert ResumeLog(str(tmp_path), 0).lines == 12
    assert open(resume_log_path(str(tmp_path), 0)).read().endswith("}\n")


def test_random_kills_between_index_and_log(tmp_path):
    """Random cuts of the log (never ahead of the index): resume points, next slot and line count
    always equal a full read's."""
    rng = random.Random(5)
    synthetic_index(tmp_path, 0, [(f"v{rng.randrange(6)}", rng.randint(1, 30)) for _ in range(40)])
    ResumeLog(str(tmp_path), 0)
    log = Path(resume_log_path(str(tmp_path), 0))
    full = log.read_bytes()
    total = sum(1 for _ in iter_records(str(tmp_path / "0" / INDEX_NAME)))
    for _ in range(20):
        log.write_bytes(full[:rng.randrange(len(full) + 1)])
        assert resume_points(str(tmp_path)) == full_scan(tmp_path)
        opened = ResumeLog(str(tmp_path), 0)
        assert opened.lines == total and opened.last_slot == divmod(total - 1, 500)


def test_writer_logs_stretches_and_resumes_from_them(tmp_path):
    root = tmp_path / "out"
    with ShardedWriter(str(root), 0, 3) as w:
        for n in range(4):
            w.write(make_sample(n, video="clips/a.mp4"))
        w.flush()  # the pipeline's video end
        w.write(make_sample(4, video="clips/b.mp4"))
    stretches = [json.loads(line) for line in open(resume_log_path(str(root), 0))]
    assert [(s["video"], s["samples"], s["last_focal"]) for s in stretches] == [
        ("clips/a.mp4", 4, make_sample(3).frame_index), ("clips/b.mp4", 1, make_sample(4).frame_index)]
    assert resume_points(str(root)) == full_scan(root)
    with ShardedWriter(str(root), 0, 3) as w:
        assert w.last_focal == full_scan(root)
        assert w.write(make_sample(5, video="clips/b.mp4"))["sample"] == "0/000001/0002"


# ----------------------------------------------------------------------------- the loader's columns


def test_loader_columns_cache_and_tail_refresh(tmp_path, monkeypatch):
    synthetic_index(tmp_path, 0, [("a", 700), ("b", 600)])
    synthetic_index(tmp_path, 1, [("c", 50)])
    counter = CountingRecords(monkeypatch)
    first = VGGTDataset(str(tmp_path))
    assert len(first) == 1350 and counter.lines == 1350
    assert (tmp_path / ".index-cache" / "0.columns").exists()
    per_sample = sum(np.dtype(t).itemsize for t in COLUMNS.values())
    assert per_sample <= 200
    counter.lines = 0
    second = VGGTDataset(str(tmp_path))
    assert counter.lines == 0 and len(second) == 1350
    assert [second.record(i) for i in (0, 699, 700, 1349)] == [first.record(i) for i in (0, 699, 700, 1349)]
    synthetic_index(tmp_path, 0, [("d", 5)])
    counter.lines = 0
    third = VGGTDataset(str(tmp_path))
    assert counter.lines == 5 and len(third) == 1355
    assert third.record(1304)["video"] == "d" and third.record(1305)["video"] == "c"
    assert third.find("0/000002/0299") == 1299
    # vectorised filters agree with the same tests on the records
    records = [third.record(i) for i in range(len(third))]
    ds = VGGTDataset(str(tmp_path), min_kept_fraction=0.5, videos=["a", "d"], min_points=12)
    want = [r for r in records if r["kept_fraction"] >= 0.5 and r["video"] in ("a", "d") and r["num_points"] >= 12]
    assert [ds.record(i) for i in range(len(ds))] == want
    # an index rewritten under the cache (cut): the cache is not trusted, the columns are rebuilt
    index = tmp_path / "0" / INDEX_NAME
    index.write_bytes(b"".join(index.read_bytes().splitlines(keepends=True)[:100]))
    assert len(VGGTDataset(str(tmp_path), ranks=[0])) == 100


def test_loader_where_the_cache_cannot_be_written(tmp_path):
    synthetic_index(tmp_path, 0, [("a", 20)])
    (tmp_path / ".index-cache").write_text("a file where the cache folder would go")  # (tests run as root)
    ds = VGGTDataset(str(tmp_path))
    assert len(ds) == 20 and ds.record(19)["frame_index"] == 42


def test_min_shot_frames(tmp_path):
    rank = tmp_path / "0"
    rank.mkdir()
    rows = [  # video, shot_index, first, last
        ("a", 0, 0, 9), ("a", 1, 10, 49),  # shots known when written: 10 and 40 frames
        ("b", 0, 0, -1), ("b", 1, 30, -1),  # open when written: videos.jsonl says [0, 29], [30, 34]
        ("c", 0, 0, -1),  # no shot information: one shot of num_frames = 60
        ("d", 0, 0, -1),  # not finished: length unknown, dropped
        ("e", 3, 0, -1),  # shot index past the video's shots: dropped
    ]
    with open(rank / INDEX_NAME, "w") as f:
        for n, (video, shot, first, last) in enumerate(rows):
            f.write(json.dumps({"sample": f"0/000000/{n:04d}", "rank": 0, "shard": 0, "stem": n, "video": video,
                                "frame_index": first + 2, "num_points": 5, "shot_index": shot,
                                "shot_first_frame": first, "shot_last_frame": last}) + "\n")
    with open(tmp_path / "videos.jsonl", "w") as f:
        for record in ({"video": "b", "status": "done", "num_frames": 35, "shots": [[0, 29], [30, 34]]},
                       {"video": "c", "status": "done", "num_frames": 60},
                       {"video": "e", "status": "done", "num_frames": 60, "shots": [[0, 59]]}):
            f.write(json.dumps(record) + "\n")
    lengths = {(r["video"], r["shot_index"]) for r in VGGTDataset(str(tmp_path), min_shot_frames=30).records()}
    assert lengths == {("a", 1), ("b", 0), ("c", 0)}
    assert len(VGGTDataset(str(tmp_path), min_shot_frames=1)) == 5
    assert len(VGGTDataset(str(tmp_path), min_shot_frames=41)) == 1  # c: 60 frames


def test_scan_reads_any_layout_and_finds_damage(tmp_path):
    """Lines not in the writer's layout (keys sorted, a name with quotes and backslashes) take the
    slow path with the same result; a damaged line inside is an error."""
    synthetic_index(tmp_path, 0, [("a", 30), ('we"ird\\name', 4), ("b", 3)])
    index = tmp_path / "0" / INDEX_NAME
    lines = index.read_bytes().splitlines(keepends=True)
    lines[5:8] = [json.dumps(json.loads(line), sort_keys=True).encode() + b"\n" for line in lines[5:8]]
    index.write_bytes(b"".join(lines))
    assert resume_points(str(tmp_path)) == full_scan(tmp_path)
    log = ResumeLog(str(tmp_path), 0)
    assert log.lines == 37 and [json.loads(x)["video"] for x in open(resume_log_path(str(tmp_path), 0))] == [
        "a", 'we"ird\\name', "b"]
    index.write_bytes(b"".join(lines[:10]) + lines[10][:25] + b"\n" + b"".join(lines[11:]))
    with pytest.raises(ValueError, match="line 11 of 37 is damaged"):
        sample_format.ResumeLog(str(tmp_path), 0)


def test_the_driver_says_which_ranks_it_upgrades(tmp_path, capsys):
    import extract_dataset

    synthetic_index(tmp_path, 0, [("a", 3)])
    synthetic_index(tmp_path, 1, [("b", 3)])
    ResumeLog(str(tmp_path), 1)
    capsys.readouterr()
    extract_dataset.announce_upgrades(str(tmp_path))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{tmp_path / '0'}: upgrading to a resume log")
    ResumeLog(str(tmp_path), 0)
    capsys.readouterr()
    extract_dataset.announce_upgrades(str(tmp_path))
    assert capsys.readouterr().err == ""


def test_a_failed_log_append_leaves_no_gap(tmp_path, monkeypatch):
    """Disk full while logging: the writer stops logging (a log with a hole in the middle would
    lose a video's resume point); the next open reads the index after the last logged stretch."""
    root = tmp_path / "out"
    w = ShardedWriter(str(root), 0, 3)
    w.write(make_sample(0, video="clips/a.mp4"))
    w.flush()
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if str(path).endswith(".jsonl") and ".resume" in str(path) and "a" in mode:
            raise OSError(28, "No space left on device (simulated)")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    w.write(make_sample(1, video="clips/b.mp4"))
    w.flush()
    monkeypatch.undo()
    w.write(make_sample(2, video="clips/c.mp4"))
    w.close()
    assert [json.loads(x)["video"] for x in open(resume_log_path(str(root), 0))] == ["clips/a.mp4"]
    assert resume_points(str(root)) == full_scan(root)
    assert ResumeLog(str(root), 0).lines == 3
    assert [json.loads(x)["video"] for x in open(resume_log_path(str(root), 0))] == [
        "clips/a.mp4", "clips/b.mp4", "clips/c.mp4"]
