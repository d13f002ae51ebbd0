"""GPU faults end to end (extract_dataset.py with real Ray, CPU workers): a device too small for
--batch-size and a poisoned CUDA context. The backends (tests/fault_backends.py) fail exactly as
CUDA does, so the paths a GPU takes run here.
"""

from __future__ import annotations

import json

from test_extract_dataset import (BACKEND, GOOD_LENGTHS, check_root, clips, explain, run_tool,  # noqa: F401
                                  tool_env, video_records)
from window import windows

K = ["--kernel", "3", "--stride", "2", "--dilation", "1", "--files-per-dir", "6"]
VIDEOS = ("c.mp4", "d.mp4", "e.mp4")


def _expected(clips) -> dict[str, set[int]]:
    return {str(clips / v): {w.focal_frame for w in windows(GOOD_LENGTHS[v], 3, 2, 1)} for v in VIDEOS}


def test_out_of_memory_above_two_windows_at_batch_size_8_writes_everything(tmp_path, clips):
    root = tmp_path / "out"
    result = run_tool(["--root", root, "--videos", *[clips / v for v in VIDEOS], *K,
                       "--backend", "fault_backends:make_oom", "--max-points", "300", "--batch-size", "8",
                       "--no-progress"], tmp_path / "logs", env=tool_env(FAULT_OOM_ABOVE="2"))
    assert result.rc == 0, explain(result)
    status = video_records(root)
    assert all(status[str(clips / v)]["status"] == "done" for v in VIDEOS), status
    check_root(root, _expected(clips), 6)


def test_poisoned_cuda_context_replaces_the_worker_and_loses_nothing(tmp_path, clips):
    root, faults = tmp_path / "out", tmp_path / "faults"
    result = run_tool(["--root", root, "--videos", *[clips / v for v in VIDEOS], *K,
                       "--backend", "fault_backends:make_poisoned", "--max-points", "300", "--batch-size", "2",
                       "--max-attempts", "1",  # a device fault is not charged to the videos in flight
                       "--no-progress"], tmp_path / "logs", env=tool_env(FAULT_DIR=str(faults), FAULT_GOOD_CALLS="2"))
    assert result.rc == 0, explain(result)
    status = video_records(root)
    assert all(status[str(clips / v)]["status"] == "done" for v in VIDEOS), status
    check_root(root, _expected(clips), 6)
    calls = [json.loads(line) for line in (faults / "calls.jsonl").read_text().splitlines()]
    poisoned = {c["pid"] for c in calls if c["poisoned"]}
    assert len(poisoned) == 1 and [c["ok"] for c in calls if c["poisoned"]] == [True, True, False]
    assert {c["pid"] for c in calls} - poisoned, "the poisoned worker was not replaced"
    assert "device fault" in result.stderr and "illegal memory access" in result.stderr
    assert "videos: 3 done, 0 too short for one window, 0 failed" in result.stderr
