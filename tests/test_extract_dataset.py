"""End-to-end tests of the command line tool, extract_dataset.py, run as a subprocess.

Every run uses the oracle backend (tests/oracle_backend.py, `--backend oracle_backend:make` with
tests/ on PYTHONPATH: also the path a user takes to plug in another model), small oracle-scene
videos, CPU workers and a private Ray on loopback. A tool run costs ~15-25 s here (Ray and worker
start), so runs are shared by module-scoped fixtures.

Every run is started in a new session (start_new_session=True) and everything left in that
session afterwards (Ray's raylet, GCS, agents, workers) is killed by process id: no test calls
`ray stop`, which would also stop other people's clusters on the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [p for p in (str(REPO), str(HERE)) if p not in sys.path]

import oracle_backend as oracle  # noqa: E402
import videos as vids  # noqa: E402
from window import num_windows, windows  # noqa: E402

TOOL = REPO / "extract_dataset.py"
SUFFIXES = (".jpg", ".depth.jpg", ".camera.pt", ".points.pt")
BACKEND = ["--backend", "oracle_backend:make", "--max-points", "300"]

# The main run: kernel 5, stride 2, dilation 2 (a window spans 9 frames), 4 samples per shard.
MAIN = ["--kernel", "5", "--stride", "2", "--dilation", "2", "--files-per-dir", "4"]
KERNEL, STRIDE, DILATION, FILES_PER_DIR = 5, 2, 2, 4
GOOD_LENGTHS = {"a.mp4": 37, "b.mp4": 30, "c.mp4": 24, "d.mp4": 19, "e.mp4": 13, "short.mp4": 6}  # short: < 9
BAD = ("zero.mp4", "truncated.mp4", "text.mp4")


# ----------------------------------------------------------------------------- running the tool


def _session_members(sid: int) -> dict[int, str]:
    """pid -> command line of every live (not zombie) process in session `sid`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[3]) != sid or fields[0] == b"Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found


def kill_session(sid: int) -> None:
    """SIGKILL every process of a session this test started (by pid; never `ray stop`)."""
    for _ in range(50):
        members = _session_members(sid)
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def tool_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ORACLE_", "RAY_ADDRESS", "RAY_AUTH_TOKEN")) and k != "RAY_AUTH_MODE"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra)
    return env


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    seconds: float


class Tool:
    """One `python extract_dataset.py ...` in its own session; output goes to files (no pipe stalls)."""

    def __init__(self, args: list[str], logs: Path, env: dict[str, str] | None = None, stdin=subprocess.DEVNULL):
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        self.out_path, self.err_path = logs / "stdout.txt", logs / "stderr.txt"
        self.started = time.monotonic()
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(TOOL), *map(str, args)], cwd=REPO,
                                         env=env or tool_env(), stdin=stdin, stdout=out, stderr=err,
                                         start_new_session=True)

    @property
    def sid(self) -> int:
        return self.proc.pid  # a session leader's sid is its pid

    def wait(self, timeout: float = 300) -> Result:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cleanup()
            pytest.fail(f"the tool ran over {timeout} s; stderr:\n{self.err_path.read_text()[-3000:]}")
        seconds = time.monotonic() - self.started
        return Result(rc, self.out_path.read_text(), self.err_path.read_text(), seconds)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        kill_session(self.sid)


def run_tool(args: list[str], logs: Path, env: dict[str, str] | None = None, timeout: float = 300,
             stdin=subprocess.DEVNULL) -> Result:
    tool = Tool(args, logs, env, stdin)
    try:
        return tool.wait(timeout)
    finally:
        tool.cleanup()


def explain(result: Result) -> str:
    return f"rc={result.rc} after {result.seconds:.1f} s\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}"


# ----------------------------------------------------------------------------- videos


def render_offset_video(path: Path, first_index: int, num_frames: int, width: int = 160, height: int = 96) -> Path:
    """An oracle-scene video whose barcodes (what the oracle model reads) start at `first_index`,
    so oracle options keyed on frame indices can single out this video."""
    K = oracle.scene_intrinsic(width, height)

    def frames():
        for i in range(first_index, first_index + num_frames):
            rgb, _ = oracle.render_view(i, K, height, width)
            yield np.round(oracle.draw_barcode(rgb, i) * 255).astype(np.uint8)

    return vids.write_mp4(path, frames(), fps=30)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Six oracle-scene videos of different lengths (one shorter than a window) and three broken
    files: a zero-byte one, a truncated mp4 and a text file named .mp4."""
    folder = tmp_path_factory.mktemp("clips")
    for name, length in GOOD_LENGTHS.items():
        oracle.render_scene_video(folder / name, length, width=160, height=96)
    vids.write_zero_byte(folder / "zero.mp4")
    vids.write_truncated_mp4(folder / "truncated.mp4")
    vids.write_text_as_mp4(folder / "text.mp4")
    return folder


def expected_focals(num_frames: int, kernel=KERNEL, stride=STRIDE, dilation=DILATION) -> set[int]:
    return {w.focal_frame for w in windows(num_frames, kernel, stride, dilation)}


# ----------------------------------------------------------------------------- reading a root


def index_records(root: Path) -> list[dict]:
    records = []
    for path in sorted(root.glob("*/samples.jsonl")):
        with open(path) as f:
            records += [json.loads(line) for line in f]
    return records


def video_records(root: Path) -> dict[str, dict]:
    """video -> its latest line in videos.jsonl."""
    path = root / "videos.jsonl"
    if not path.exists():
        return {}
    with open(path) as f:
        return {r["video"]: r for r in map(json.loads, f)}


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob("*/[0-9]*/*")) if p.is_file()}


def check_root(root: Path, expected: dict[str, set[int]], files_per_dir: int, partial: dict[str, set[int]] = {},
               load_files: bool = True) -> list[dict]:
    """The invariants of a finished root; returns its index records.

    expected: video -> exact set of focal frames; partial: video -> frames it may have a subset of.
    Every index line's four files exist (and load); no sample file lacks an index line; no
    (video, frame) twice; shards hold at most files_per_dir samples, numbered densely per rank;
    nothing left in OUT/<rank>/.tmp.
    """
    records = index_records(root)
    keys = [(r["video"], r["frame_index"]) for r in records]
    duplicates = {k for k in keys if keys.count(k) > 1}
    assert not duplicates, f"duplicate samples: {sorted(duplicates)}"
    by_video: dict[str, set[int]] = {}
    for video, frame in keys:
        by_video.setdefault(video, set()).add(frame)
    for video, frames in expected.items():
        assert by_video.get(video, set()) == frames, f"{video}: got {sorted(by_video.get(video, []))}, want {sorted(frames)}"
    for video, frames in partial.items():
        assert by_video.get(video, set()) <= frames, video
    assert set(by_video) <= set(expected) | set(partial), f"unexpected videos {set(by_video) - set(expected) - set(partial)}"

    indexed = set()
    for rank_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        rank = int(rank_dir.name)
        tmp = rank_dir / ".tmp"
        assert not tmp.exists() or not any(tmp.iterdir()), f"left in {tmp}: {list(tmp.iterdir())}"
        ranked = [r for r in records if r["rank"] == rank]
        for k, r in enumerate(ranked):  # dense numbering, a new shard every files_per_dir samples
            assert (r["shard"], r["stem"]) == divmod(k, files_per_dir), (rank, k, r["sample"])
            assert r["sample"] == f"{rank}/{r['shard']:06d}/{r['stem']:04d}"
            indexed.add(r["sample"])
        for shard in sorted(p for p in rank_dir.iterdir() if p.is_dir() and p.name != ".tmp"):
            assert re.fullmatch(r"\d{6}", shard.name), shard
            stems = {f.name.split(".", 1)[0] for f in shard.iterdir()}
            assert len(stems) <= files_per_dir, f"{shard} holds {len(stems)} samples"
            for f in shard.iterdir():
                stem, suffix = f.name.split(".", 1)
                assert "." + suffix in SUFFIXES, f
                assert f"{rank}/{shard.name}/{stem}" in indexed, f"{f} has no index line"
    for r in records:
        for suffix in SUFFIXES:
            assert (root / (r["sample"] + suffix)).is_file(), r["sample"] + suffix
    if load_files:
        import torch
        from PIL import Image

        for r in records:
            camera = torch.load(root / (r["sample"] + ".camera.pt"), weights_only=True)
            assert (camera["video"], camera["frame_index"]) == (r["video"], r["frame_index"])
            assert torch.load(root / (r["sample"] + ".points.pt"), weights_only=True).shape[1] == 6
            with Image.open(root / (r["sample"] + ".jpg")) as im:
                im.load()
                assert im.size == (camera["width"], camera["height"])
    return records


# ----------------------------------------------------------------------------- 1. argument errors


@pytest.mark.parametrize("argv, name", [
    (["--kernel", "4"], "--kernel"),
    (["--kernel", "0"], "--kernel"),
    (["--stride", "0"], "--stride"),
    (["--dilation", "0"], "--dilation"),
    (["--files-per-dir", "0"], "--files-per-dir"),
    (["--num-workers", "0"], "--num-workers"),
    (["--max-attempts", "0"], "--max-attempts"),
    (["--backend", "no_colon"], "--backend"),
    (["NO_VIDEOS"], "--videos"),  # --videos left out
    (["--videos", "/nonexistent/clips"], "--videos"),
    (["--videos", "/nonexistent/*.mp4"], "--videos"),
    (["--videos", "UNREADABLE_LIST"], "--videos"),
    (["--videos", "NO_PERMISSION_LIST"], "--videos"),
    (["--videos", "EMPTY_DIR"], "--videos"),
    (["--root", "A_FILE"], "--root"),
])
def test_argument_errors_before_any_work(tmp_path, clips, argv, name):
    """Exit 2 with one line naming the argument, in a few seconds (no Ray start, no root created)."""
    if "NO_PERMISSION_LIST" in argv and os.geteuid() == 0:
        pytest.skip("root reads a chmod 000 file anyway (the not-UTF-8 list covers an unreadable list)")
    unreadable = tmp_path / "list.txt"
    unreadable.write_bytes(b"\xff\xfe\x00not utf-8\n")
    no_permission = tmp_path / "secret.txt"
    no_permission.write_text(str(clips / "a.mp4") + "\n")
    no_permission.chmod(0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    root = tmp_path / "out"
    args = {"--root": str(root), "--videos": str(clips)}
    extra = []
    for flag, value in zip(argv[::2], argv[1::2] + [None]):
        if flag == "NO_VIDEOS":
            args.pop("--videos")
            continue
        value = {"UNREADABLE_LIST": str(unreadable), "NO_PERMISSION_LIST": str(no_permission),
                 "EMPTY_DIR": str(tmp_path / "empty"),
                 "A_FILE": str(tmp_path / "a_file")}.get(value, value)
        if flag in args:
            args[flag] = value
        else:
            extra += [flag, value]
    cmd = BACKEND + [x for kv in args.items() for x in kv] + extra  # the flag under test comes last: it wins
    result = run_tool(cmd, tmp_path / "logs", timeout=60)
    assert result.rc == 2, explain(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, explain(result)
    assert name in lines[0] and "error" in lines[0], lines[0]
    assert result.seconds < 10, f"took {result.seconds:.1f} s: work started before the argument check"
    assert "Ray" not in result.stderr
    if name != "--root":
        assert not root.exists(), "the root was created before the arguments were checked"


# ----------------------------------------------------------------------------- 2. dry run


def test_dry_run_lists_windows_without_a_model(tmp_path, clips):
    root = tmp_path / "out"
    log = tmp_path / "oracle.log"
    # A backend that cannot even be imported: a dry run must never load a model.
    result = run_tool(["--root", root, "--videos", clips, *MAIN, "--backend", "no_such_module:make", "--dry-run"],
                      tmp_path / "logs", env=tool_env(ORACLE_LOG=str(log)), timeout=120)
    assert result.rc == 0, explain(result)
    assert result.seconds < 60
    lines = {line.split()[-1]: line for line in result.stdout.splitlines()[1:-1]}
    total = 0
    for name, length in GOOD_LENGTHS.items():
        line = next(v for k, v in lines.items() if k.endswith("/" + name))
        count = num_windows(length, KERNEL, STRIDE, DILATION)
        total += count
        assert line.split()[:2] == [str(count), str(length)], line
    for name in BAD:
        line = next(line for line in result.stdout.splitlines() if f"{name}:" in line)
        assert line.split()[0] == "failed", line
    assert result.stdout.splitlines()[-1] == f"total: {total} samples from {len(GOOD_LENGTHS) + len(BAD)} videos"
    assert not root.exists() and not log.exists()
    assert "Ray" not in result.stderr and "worker" not in result.stderr


# ----------------------------------------------------------------------------- 3 + 8. the main run


@pytest.fixture(scope="module")
def main_run(tmp_path_factory, clips):
    """Two CPU workers over six good videos and three broken files, with the progress bar on."""
    work = tmp_path_factory.mktemp("main")
    root = work / "out"
    log = work / "oracle.log"
    result = run_tool(["--root", root, "--videos", clips, *MAIN, *BACKEND, "--num-workers", "2"],
                      work / "logs", env=tool_env(ORACLE_LOG=str(log)))
    return root, result, log


def test_two_workers_exact_samples_and_failures(main_run, clips):
    root, result, log = main_run
    assert result.rc == 1, explain(result)  # some videos failed
    expected = {str(clips / name): expected_focals(n) for name, n in GOOD_LENGTHS.items()}
    records = check_root(root, expected, FILES_PER_DIR)
    assert len(records) == sum(len(v) for v in expected.values())

    status = video_records(root)
    for name, n in GOOD_LENGTHS.items():
        want = "done" if num_windows(n, KERNEL, STRIDE, DILATION) else "no_windows"
        assert status[str(clips / name)]["status"] == want, status[str(clips / name)]
    for name in BAD:
        record = status[str(clips / name)]
        assert record["status"] == "failed" and record["reason"], record
        assert f"failed: {clips / name}: " in result.stderr
    assert len(status) == len(GOOD_LENGTHS) + len(BAD)

    # Both ranks got work: videos recorded by each, samples in each rank folder, two model processes.
    assert {r["rank"] for r in status.values() if r["status"] == "done"} == {0, 1}, status
    assert {r["rank"] for r in records} == {0, 1}
    assert len({json.loads(line)["pid"] for line in log.read_text().splitlines()}) == 2
    assert len(re.findall(r"^worker [01]: cpu on ", result.stderr, re.M)) == 2, result.stderr
    run = json.loads((root / "run.json").read_text())
    assert (run["kernel"], run["stride"], run["dilation"]) == (KERNEL, STRIDE, DILATION)


def test_progress_bar_moves_and_summary(main_run, clips):
    root, result, _ = main_run
    total = sum(num_windows(n, KERNEL, STRIDE, DILATION) for n in GOOD_LENGTHS.values())
    counts = [int(n) for n in re.findall(r"(\d+)/\d+ \[", result.stderr)]
    assert counts and counts[-1] == total, result.stderr[-2000:]
    assert counts == sorted(counts), "the bar went backwards"
    inner = {n for n in counts if 0 < n < total}
    assert len(inner) >= 4, f"the bar barely moved: {sorted(inner)}"
    # A bar that moved only when videos ended would show sums of whole videos' window counts only.
    whole = {0}
    for n in GOOD_LENGTHS.values():
        whole |= {s + num_windows(n, KERNEL, STRIDE, DILATION) for s in whole}
    assert inner - whole, f"the bar never moved inside a video: {sorted(inner)}"
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+win/s", result.stderr), "no rate or ETA"
    assert f"videos: {len(GOOD_LENGTHS) - 1} done, 1 too short for one window, {len(BAD)} failed" in result.stderr
    assert f"samples: {total} written in " in result.stderr
    assert f"failures are recorded in {root / 'videos.jsonl'}" in result.stderr


# ----------------------------------------------------------------------------- 5. reruns on one root


def test_rerun_appends_skips_and_refuses(main_run, clips, tmp_path):
    """A new list on the same root appends (old files untouched, numbering continued, cap kept,
    finished videos skipped); a second run while one runs refuses at once; a changed --kernel refuses."""
    base, _, _ = main_run
    root = tmp_path / "out"
    shutil.copytree(base, root)
    before_sums = checksums(root)
    before_index = {p.parent.name: p.read_bytes() for p in root.glob("*/samples.jsonl")}
    new = {"f.mp4": 21, "g.mp4": 17}
    for name, n in new.items():
        oracle.render_scene_video(tmp_path / name, n, width=160, height=96)
    (tmp_path / "link.mp4").symlink_to(clips / "b.mp4")
    listing = tmp_path / "list.txt"
    # A comment, a blank line, a path relative to the list, an old finished video spelled twice
    # (de-duplicated), another one reached only through a symlink (known by its first name).
    listing.write_text(f"# new and old\nf.mp4\n{clips / 'a.mp4'}\n\n{tmp_path / 'g.mp4'}\nlink.mp4\n"
                       f"{clips}/../{clips.name}/a.mp4\n")

    tool = Tool(["--root", root, "--videos", listing, *MAIN, *BACKEND, "--num-workers", "2", "--no-progress"],
                tmp_path / "logs")
    try:
        deadline = time.monotonic() + 60
        while "pid" not in ((root / ".lock").read_text() if (root / ".lock").exists() else ""):
            assert tool.proc.poll() is None and time.monotonic() < deadline, tool.err_path.read_text()
            time.sleep(0.05)
        second = run_tool(["--root", root, "--videos", clips, *MAIN, *BACKEND], tmp_path / "second", timeout=60)
        result = tool.wait()
    finally:
        tool.cleanup()
    assert second.rc == 2, explain(second)
    line, = second.stderr.strip().splitlines()
    assert "--root" in line and "in use" in line and str(tool.proc.pid) in line, line
    assert second.seconds < 10

    assert result.rc == 0, explain(result)
    assert "4 videos: 2 already done, 2 to do" in result.stderr
    after_sums = checksums(root)
    assert {k: after_sums.get(k) for k in before_sums} == before_sums, "an old file changed or vanished"
    for rank, data in before_index.items():
        assert (root / rank / "samples.jsonl").read_bytes().startswith(data), f"rank {rank}'s index was rewritten"
    expected = {str(clips / name): expected_focals(n) for name, n in GOOD_LENGTHS.items()}
    expected.update({str(tmp_path / name): expected_focals(n) for name, n in new.items()})
    records = check_root(root, expected, FILES_PER_DIR)  # numbering continues densely, cap kept
    old_count = sum(data.count(b"\n") for data in before_index.values())
    assert len(records) == old_count + sum(num_windows(n, KERNEL, STRIDE, DILATION) for n in new.values())
    assert set(after_sums) - set(before_sums), "nothing new was written"

    # Only finished videos: nothing to do, no Ray.
    done = run_tool(["--root", root, "--videos", clips / "a.mp4", clips / "c.mp4", *MAIN, *BACKEND],
                    tmp_path / "done", timeout=60)
    assert done.rc == 0 and "2 videos: 2 already done, 0 to do" in done.stderr, explain(done)
    assert done.seconds < 10 and checksums(root) == after_sums

    changed = run_tool(["--root", root, "--videos", tmp_path / "f.mp4", *MAIN[:1], "7", *MAIN[2:], *BACKEND],
                       tmp_path / "changed", timeout=60)
    assert changed.rc == 2, explain(changed)
    line, = changed.stderr.strip().splitlines()
    assert "--kernel" in line and "7" in line and "5" in line, line
    assert changed.seconds < 10 and checksums(root) == after_sums


# ----------------------------------------------------------------------------- 4. kill -9 the driver


KILL_VIDEOS = {"a.mp4": 37, "b.mp4": 30, "c.mp4": 24}
KILL_ARGS = ["--kernel", "3", "--stride", "2", "--dilation", "1", "--files-per-dir", "5"]
KILL_SEED = int(os.environ.get("KILL_SEED", random.SystemRandom().randrange(10**6)))


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("moment", ["first_sample", "mid_run", "after_video_done"])
def test_kill_driver_then_rerun(tmp_path, clips, moment):
    """kill -9 the driver at a random moment of a given phase, rerun: the exact sample set of an
    uninterrupted run, no duplicates, no temp or orphan files; the killed run's Ray goes away."""
    rng = random.Random(f"{KILL_SEED}-{moment}")
    note = f"KILL_SEED={KILL_SEED} moment={moment}"
    root = tmp_path / "out"
    videos = [clips / name for name in KILL_VIDEOS]
    total = sum(num_windows(n, 3, 2, 1) for n in KILL_VIDEOS.values())
    args = ["--root", root, "--videos", *videos, *KILL_ARGS, *BACKEND, "--num-workers", "2", "--no-progress"]
    threshold = {"first_sample": 1, "mid_run": rng.randint(total // 4, 3 * total // 4)}.get(moment)
    extra_delay = rng.uniform(0, 0.3)

    first = Tool(args, tmp_path / "killed")
    try:
        deadline = time.monotonic() + 180
        while True:
            assert first.proc.poll() is None, f"{note}: the run ended before the kill\n{first.err_path.read_text()}"
            assert time.monotonic() < deadline, note
            samples = sum(_lines(p) for p in root.glob("*/samples.jsonl"))
            if (samples >= threshold) if threshold else _lines(root / "videos.jsonl") >= 1:
                break
            time.sleep(0.02)
        time.sleep(extra_delay)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        killed_at = sum(_lines(p) for p in root.glob("*/samples.jsonl"))
        assert killed_at < total, f"{note}: killed too late"

        second = run_tool(args, tmp_path / "rerun")
        assert second.rc == 0, f"{note}\n{explain(second)}"
        expected = {str(v): {w.focal_frame for w in windows(KILL_VIDEOS[v.name], 3, 2, 1)} for v in videos}
        records = check_root(root, expected, 5)
        assert len(records) == total, note
        assert all(video_records(root)[str(v)]["status"] == "done" for v in videos)

        # The killed driver's Ray must not outlive it: raylet, GCS and workers go within seconds.
        # (Ray's dashboard / runtime-env agents, orphaned by the raylet's death, hang up to ~2 min
        # on a publish to the dead GCS before they exit; they hold no lock and write nothing here.)
        deadline = time.monotonic() + 30
        while True:
            left = {pid: cmd for pid, cmd in _session_members(first.sid).items() if "Agent" not in cmd}
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not left, f"{note}: the killed run left {left}"
    finally:
        first.cleanup()
    assert not _session_members(first.sid)


# ----------------------------------------------------------------------------- 6. a worker dies


def test_worker_process_dies_and_is_replaced(tmp_path, clips):
    """The model calls os._exit(1): once on one video (retried, completes), every time on another
    (failed after --max-attempts); the other videos finish; the run ends with exit 1."""
    once, always = tmp_path / "once.mp4", tmp_path / "always.mp4"
    render_offset_video(once, 1000, 24)  # barcodes 1000..1023: only the oracle sees the offset
    render_offset_video(always, 2000, 24)
    good = [clips / "d.mp4", clips / "e.mp4"]
    log = tmp_path / "oracle.log"
    env = tool_env(ORACLE_LOG=str(log), ORACLE_EXIT_FRAMES="1012:1,2012", ORACLE_EXIT_DIR=str(tmp_path / "exits"))
    k = ["--kernel", "3", "--stride", "2", "--dilation", "1", "--files-per-dir", "6"]
    result = run_tool(["--root", tmp_path / "out", "--videos", once, always, *good, *k, *BACKEND,
                       "--num-workers", "2", "--max-attempts", "2", "--no-progress"], tmp_path / "logs", env=env)
    assert result.rc == 1, explain(result)
    root = tmp_path / "out"
    status = video_records(root)
    assert status[str(once)]["status"] == "done", status[str(once)]
    assert status[str(always)]["status"] == "failed" and "worker died 2 times" in status[str(always)]["reason"]
    assert all(status[str(v)]["status"] == "done" for v in good)
    full = lambda n: {w.focal_frame for w in windows(n, 3, 2, 1)}  # noqa: E731
    # `always` keeps the samples before its fatal batch (none of them twice), never the window with frame 12.
    records = check_root(root, {str(once): full(24), **{str(v): full(GOOD_LENGTHS[v.name]) for v in good}}, 6,
                         partial={str(always): {f for f in full(24) if abs(f - 12) > 1}})
    assert records
    events = [json.loads(line) for line in log.read_text().splitlines()]
    exits = [e["exit_at_frame"] for e in events if "exit_at_frame" in e]
    assert exits.count(1012) == 1 and exits.count(2012) >= 2, exits
    assert len({e["pid"] for e in events}) >= 1 + len(exits), "dead workers were not replaced"
    assert f"failed: {always}: worker died 2 times" in result.stderr
    assert "videos: 3 done, 0 too short for one window, 1 failed" in result.stderr


# ----------------------------------------------------------------------------- 7. a two-node cluster


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture
def two_node_cluster(tmp_path):
    """A Ray cluster of two nodes on loopback (127.0.0.2 head, 127.0.0.3), one CPU each, token
    auth with a fresh token, its own temp folder (so no other `ray.init()` on the machine finds it)."""
    token = secrets.token_hex(32)
    env = tool_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    port = _free_port("127.0.0.2")
    temp = Path(f"/tmp/rt{os.getpid()}_{secrets.token_hex(3)}")  # short: unix socket paths are limited
    ray_bin = Path(sys.executable).with_name("ray")
    ray_cmd = [str(ray_bin)] if ray_bin.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
    common = ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(80 * 2**20), "--disable-usage-stats"]
    starts = [
        ray_cmd + ["start", "--head", "--node-ip-address", "127.0.0.2", "--port", str(port), "--include-dashboard=false",
                   "--temp-dir", str(temp), "--resources", '{"node_a": 1}', *common],
        ray_cmd + ["start", "--address", f"127.0.0.2:{port}", "--node-ip-address", "127.0.0.3",
                   "--resources", '{"node_b": 1}', *common],
    ]
    sessions = []
    try:
        for i, cmd in enumerate(starts):
            with open(tmp_path / f"ray_start_{i}.log", "w") as log:
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                sessions.append(proc.pid)
                rc = proc.wait(120)
            if rc != 0:
                pytest.skip(f"`ray start` of node {i} failed here (rc {rc}): "
                            f"{(tmp_path / f'ray_start_{i}.log').read_text()[-500:]}")
        yield f"127.0.0.2:{port}", env
    finally:
        for sid in sessions:
            kill_session(sid)
        shutil.rmtree(temp, ignore_errors=True)


def test_two_node_cluster_through_address(tmp_path, clips, two_node_cluster):
    address, env = two_node_cluster
    root = tmp_path / "out"
    videos = [clips / "a.mp4", clips / "c.mp4", clips / "d.mp4"]
    result = run_tool(["--root", root, "--videos", *videos, *MAIN, *BACKEND, "--address", address,
                       "--num-workers", "2", "--no-progress"], tmp_path / "logs", env=env)
    assert result.rc == 0, explain(result)
    ips = dict(re.findall(r"^worker (\d+): cpu on .*\((127\.0\.0\.\d+), node \w+\)$", result.stderr, re.M))
    assert sorted(ips.values()) == ["127.0.0.2", "127.0.0.3"], result.stderr
    expected = {str(v): expected_focals(GOOD_LENGTHS[v.name]) for v in videos}
    records = check_root(root, expected, FILES_PER_DIR)
    assert {r["rank"] for r in records} == {0, 1}


# ----------------------------------------------------------------------------- 9. every container, stdin, skipped files

ZERO = ["--backend", "benchmark:make_zero", "--max-points", "100"]  # no barcodes needed: any picture
CARD = ["--kernel", "5", "--stride", "3", "--dilation", "2"]  # the design card's windows


@pytest.fixture(scope="module")
def every_container(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """A folder holding one file of every container/codec of the corpus (tests/videos.py) that this
    ffmpeg build can make, and three files that are not videos. -> (folder, name -> frame count of the
    ffmpeg program's own decode)."""
    pytest.importorskip("imageio_ffmpeg")
    folder = tmp_path_factory.mktemp("containers")
    made = vids.build_corpus(folder / "all")
    counts = {}
    for name, path in made.items():
        if isinstance(path, Path):
            counts[name] = len(vids.ffmpeg_decode_upright(path))
    (folder / "all" / "notes.txt").write_text("not a video\n")
    (folder / "all" / "more.TXT").write_text("not a video\n")
    (folder / "all" / "meta.json").write_text("{}\n")
    assert len(counts) >= 30, f"the corpus lacks formats: {sorted(set(made) - set(counts))}"
    return folder / "all", counts


def test_every_container_in_a_folder_gives_exactly_its_windows(tmp_path, every_container):
    """A folder, as a user passes it: --dry-run predicts exactly the samples the run writes; every
    file gives the windows of the frames the ffmpeg program decodes; the files that are not videos
    are reported on one line; the run exits 0."""
    folder, counts = every_container
    root = tmp_path / "out"
    expected = {str(folder / name): {w.focal_frame for w in windows(n, 5, 3, 2)} for name, n in counts.items()}
    total = sum(len(v) for v in expected.values())
    skipped = "skipped 3 files that are not videos: .txt 2, .json 1"

    dry = run_tool(["--root", root, "--videos", folder, *CARD, *ZERO, "--dry-run"], tmp_path / "dry", timeout=240)
    assert dry.rc == 0, explain(dry)
    assert dry.stdout.splitlines()[-1] == f"total: {total} samples from {len(counts)} videos", explain(dry)
    assert skipped in dry.stdout.splitlines()

    result = run_tool(["--root", root, "--videos", folder, *CARD, *ZERO, "--no-progress"], tmp_path / "run",
                      timeout=600)
    assert result.rc == 0, explain(result)
    assert skipped in result.stderr.splitlines()
    check_root(root, expected, 500, load_files=False)
    status = video_records(root)
    for name, n in counts.items():
        record = status[str(folder / name)]
        assert record["status"] == "done" and record["num_frames"] == n, record
    assert f"videos: {len(counts)} done, 0 too short for one window, 0 failed" in result.stderr


def test_the_cards_command_reads_videos_from_a_pipe(tmp_path, every_container):
    """`find /data -name '*.mp4' | python extract_dataset.py --root out --kernel 5 --stride 3 --dilation 2`."""
    folder, counts = every_container
    names = [n for n in ("h264.m4v", "xvid_packed.avi", "mpeg2_cut.mpg", "vfr.mkv") if n in counts]
    listing = "".join(f"{folder / n}\n" for n in names) + "\n"
    root = tmp_path / "out"
    with open(tmp_path / "list", "w") as f:
        f.write(listing)
    with open(tmp_path / "list") as stdin:
        result = run_tool(["--root", root, *CARD, *ZERO, "--no-progress"], tmp_path / "logs", stdin=stdin)
    assert result.rc == 0, explain(result)
    expected = {str(folder / n): {w.focal_frame for w in windows(counts[n], 5, 3, 2)} for n in names}
    check_root(root, expected, 500, load_files=False)
    assert f"{len(names)} videos: 0 already done, {len(names)} to do" in result.stderr


def test_no_videos_on_a_terminal_names_both_ways(tmp_path):
    import pty

    controller, terminal = pty.openpty()
    try:
        result = run_tool(["--root", tmp_path / "out", *CARD], tmp_path / "logs", timeout=60, stdin=terminal)
    finally:
        os.close(controller)
        os.close(terminal)
    assert result.rc == 2, explain(result)
    line, = result.stderr.strip().splitlines()
    assert "--videos" in line and "standard input" in line, line
    assert not (tmp_path / "out").exists()


def test_listing_counts_what_is_not_a_video(tmp_path):
    import extract_dataset as tool

    for name in ("a.MP4", "b.mts", "c.Mpg", "d.y4m", "e.3g2", "notes.txt", "README", "x.json", "y.json"):
        (tmp_path / name).write_text("x")
    skipped: dict[str, int] = {}
    found = tool.list_videos([str(tmp_path)], skipped)
    assert [Path(p).name for p in found] == ["a.MP4", "b.mts", "c.Mpg", "d.y4m", "e.3g2"]
    assert skipped == {".txt": 1, "(none)": 1, ".json": 2}
    assert tool.skipped_line(skipped) == "skipped 4 files that are not videos: .json 2, (none) 1, .txt 1"
    assert tool.skipped_line({}) is None
