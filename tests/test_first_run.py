"""A first run as a new user: --model resolved before Ray starts, failures in seconds with one
line, a quiet console (only the tool's lines and its bar), worker logs at a stable path.

The hub is made unreachable on purpose (HF_ENDPOINT on a closed loopback port, an empty HF_HOME),
so these tests say the same on a machine with and without internet.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

import extract_dataset
from checkpoint import CheckpointError, resolve
from test_extract_dataset import explain, run_tool, tool_env
from videos import make_frames, write_mp4

README_COMMAND = ["--kernel", "5", "--stride", "3", "--dilation", "2"]
NOISE = ("Token authentication", "FutureWarning", "(Worker pid=", "Traceback", "torch.cuda.amp")


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # Port 9 (discard) on loopback is closed: a connection is refused at once, as offline.
    return tool_env(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"), **extra)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("first-run") / "clip.mp4"
    write_mp4(path, make_frames(14, 64, 48))
    return path


def tiny_vggt_checkpoint(path: Path) -> Path:
    pytest.importorskip("vggt")
    from tiny_vggt import tiny_vggt

    torch.save(tiny_vggt().state_dict(), path)
    return path


def test_unreachable_hub_fails_in_seconds_naming_model(tmp_path, clip):
    result = run_tool(["--root", tmp_path / "out", "--videos", clip, *README_COMMAND], tmp_path / "logs",
                      env=offline_env(tmp_path), timeout=60)
    assert result.rc == 1, explain(result)
    assert result.seconds < 10, explain(result)
    last = result.stderr.strip().splitlines()[-1]
    assert "--model" in last and "facebook/VGGT-1B" in last, explain(result)
    assert "Traceback" not in result.stderr and "worker" not in result.stderr, explain(result)


@pytest.mark.parametrize("content", ["not a checkpoint", "another model"])
def test_wrong_checkpoint_file_fails_in_one_line(tmp_path, clip, content):
    model = tmp_path / "model.pt"
    if content == "another model":
        torch.save({"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(1)}, model)
    else:
        model.write_bytes(b"\x00" * 1000)
    result = run_tool(["--root", tmp_path / "out", "--videos", clip, *README_COMMAND, "--model", model],
                      tmp_path / "logs", env=offline_env(tmp_path), timeout=60)
    assert result.rc == 1, explain(result)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("extract_dataset.py: error: argument --model: "), explain(result)
    assert ("not a readable checkpoint" if content == "not a checkpoint" else "does not hold VGGT weights") in lines[-1]
    assert "Traceback" not in result.stderr


def test_resolve_local_checkpoints(tmp_path):
    path = tiny_vggt_checkpoint(tmp_path / "model.pt")
    assert resolve(str(path)).path == str(path)
    assert resolve(str(tmp_path)).path == str(path)  # a folder: its model.pt
    with pytest.raises(CheckpointError, match="argument --model: no such file or folder"):
        resolve(str(tmp_path / "nothing.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds none of"):
        resolve(str(tmp_path / "empty"))


def test_resolve_hub_id_uses_the_cache_without_network(tmp_path, monkeypatch):
    """A hub id already in the local cache resolves to the cached file; the unreachable endpoint
    is never asked."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--vggt" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    tiny_vggt_checkpoint(snapshot / "model.pt")
    (cache / "models--someone--vggt" / "refs").mkdir()
    (cache / "models--someone--vggt" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    resolved = resolve("someone/vggt")
    assert resolved.path == str(snapshot / "model.pt") and "cached" in resolved.note
    with pytest.raises(CheckpointError, match="hub cannot be reached"):
        resolve("someone/other")


def test_dry_run_says_whether_the_model_resolves(tmp_path, clip):
    result = run_tool(["--root", tmp_path / "out", "--videos", clip, *README_COMMAND, "--dry-run"],
                      tmp_path / "logs", env=offline_env(tmp_path), timeout=60)
    assert result.rc == 0, explain(result)
    assert "model: a run would stop here: argument --model: facebook/VGGT-1B" in result.stdout, explain(result)
    model = tiny_vggt_checkpoint(tmp_path / "model.pt")
    result = run_tool(["--root", tmp_path / "out", "--videos", clip, *README_COMMAND, "--dry-run", "--model", model],
                      tmp_path / "logs2", env=offline_env(tmp_path), timeout=60)
    assert f"model: {model}" in result.stdout, explain(result)
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_normal_run_has_a_quiet_console(tmp_path, clip):
    """The real VGGT code path (tiny network): its FutureWarning, Ray's token notice and worker
    output stay out of the console; the worker's log holds what the worker printed."""
    pytest.importorskip("vggt")
    root = tmp_path / "out"
    result = run_tool(["--root", root, "--videos", clip, "--kernel", "3", "--stride", "4",
                       "--backend", "tiny_vggt:make", "--max-points", "100", "--no-progress"],
                      tmp_path / "logs", env=offline_env(tmp_path), timeout=300)
    assert result.rc == 0, explain(result)
    for noise in NOISE:
        assert noise not in result.stderr + result.stdout, (noise, explain(result))
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "1 videos: 0 already done, 1 to do", explain(result)
    assert lines[1] == "model: factory tiny_vggt:make", explain(result)
    assert re.fullmatch(r"worker 0: cpu on .*", lines[2]), explain(result)
    assert lines[3].startswith("videos: 1 done"), explain(result)
    assert (root / "0" / extract_dataset.WORKER_LOG).read_text().startswith("--- worker pid ")


def test_worker_that_fails_to_start_names_its_log(tmp_path, clip):
    root = tmp_path / "out"
    result = run_tool(["--root", root, "--videos", clip, *README_COMMAND, "--backend", "test_first_run:broken_factory"],
                      tmp_path / "logs", env=offline_env(tmp_path), timeout=120)
    assert result.rc != 0
    log = root / "0" / extract_dataset.WORKER_LOG
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"worker 0 failed to start: OSError: no such device: /dev/gpu9 (full log: {log.resolve()})", explain(result)
    assert "(Worker pid=" not in result.stderr and "Traceback" not in result.stderr
    assert "Traceback" in log.read_text() and "def broken_factory" not in result.stderr


def broken_factory(device, **options):
    """A --backend factory that fails while the worker starts."""
    raise OSError("no such device: /dev/gpu9")


def test_cpu_cost_warning_is_one_line_with_the_measured_cost(capsys):
    """VGGT on a CPU worker: one line, once, from the worker's own counters."""

    class Stats:
        def remote(self):
            return {"samples_written": 4, "model_seconds": 50.0}

    ray = types.SimpleNamespace(get=lambda ref, timeout=None: ref)
    args = types.SimpleNamespace(backend="vggt")
    progress = extract_dataset.Progress(videos_todo=1, enabled=False)
    progress.bar.total, progress.bar.n = 1004, 4
    dispatcher = types.SimpleNamespace(samples_written=0, actors={0: types.SimpleNamespace(stats=Stats())},
                                       progress=progress)
    warning = extract_dataset.CpuCostWarning(ray, args, {0: "cpu"})
    warning.check(dispatcher)  # nothing measured yet
    dispatcher.samples_written = 4
    warning.check(dispatcher)
    warning.check(dispatcher)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: VGGT runs on the CPU here: 12.5 s per window measured, about 3.5 h for the "
                   "windows left; a GPU is hundreds of times faster"]
    assert extract_dataset.CpuCostWarning(ray, args, {0: "cuda"}).ranks == []
    assert extract_dataset.CpuCostWarning(ray, types.SimpleNamespace(backend="m:f"), {0: "cpu"}).ranks == []
