"""Read an extracted dataset: a torch Dataset over every rank and shard of an output root.

    from dataset import VGGTDataset
    ds = VGGTDataset("out", num_points=8192, min_kept_fraction=0.5)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, num_workers=4)
    for batch in loader:
        batch["rgb"], batch["depth"], batch["camera"]["intrinsic"], batch["points"]

The sample list comes from the per-rank index files OUT/<rank>/samples.jsonl (the writer appends
a line only once its sample is visible), so opening a root lists no shard folders and a root that
is still being extracted can be read: it shows the samples committed so far. Filters look at the
index only; no sample file is opened to select samples.

The index is held in columns (numpy arrays: where each line starts, video as an integer code into
a table of names, frame, shard, stem, formats, num_points, kept_fraction, conf_p50, height, width,
shot fields, window ends; about 61 bytes a sample, no Python object per sample, so forked
DataLoader workers share it). The columns are cached in OUT/.index-cache/<rank>.columns and memory-mapped; a later
open reads only the index lines added since (a root being extracted), so opening a root of
millions of samples a second time takes a fraction of a second. The cache is rebuilt when its
index no longer matches it, and skipped (columns built in memory) where the root is read-only. Both shard formats (folders of
files, or .tar shards) and both depth formats (8-bit JPEG, 16-bit PNG) are read, and a sample reads
back the same whichever shard format holds it.

One item is a dict:
    rgb        float32 [3, H, W] in [0, 1] (rgb="float", default) or uint8 [H, W, 3] as stored (rgb="uint8")
    depth      float32 [H, W], z-depth in the model's units; 0 where no depth was stored (a map
               stored with every pixel valid, as VGGT's always are, decodes with no 0)
    camera     the camera.pt dict as written (extrinsic [3, 4], intrinsic [3, 3], window_* ...)
    points     float32 [N, 6]: x y z r g b, N = num_points when given (else as stored)
    num_points int, points stored for this sample (before resampling)
    sample     str, the sample's id "<rank>/<shard>/<stem>" (e.g. "0/000000/0003")
The default collate batches these when all frames share one size (one video resolution) and
num_points is set; the camera's strings become lists.

Every .pt file is read with torch.load(weights_only=True).
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import tarfile
import zlib
from collections import OrderedDict
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image

from sample_format import (CACHE_DIR, DEFAULT_DEPTH_FORMAT, DEFAULT_SHARD_FORMAT, DEPTH_FORMATS, FINISHED,
                           INDEX_NAME, TAR_SUFFIX, decode_depth, iter_records, iter_video_status,
                           line_before, rank_numbers, sample_id)

FIELDS = ("rgb", "depth", "camera", "points")
OPEN_TARS = 16  # tar files kept open per process

# The index columns: name -> dtype. Missing float values are NaN (a filter on them drops the sample).
COLUMNS = {
    "offset": np.int64,  # where the sample's line starts in samples.jsonl
    "video": np.int32,  # code into the rank's table of video names
    "frame_index": np.int32,
    "shard": np.int32,
    "stem": np.int32,
    "flags": np.uint8,  # bit 0: tar shard; bit 1: png16 depth; bits 2-7: digits of the stem
    "num_points": np.int32,
    "kept_fraction": np.float32,
    "conf_p50": np.float32,
    "height": np.int16,
    "width": np.int16,
    "shot_index": np.int32,
    "shot_first_frame": np.int32,
    "shot_last_frame": np.int32,
    "window_first": np.int32,  # the window's first and last frame (min_cut_distance)
    "window_last": np.int32,
}
CACHE_MAGIC = b"VGGTCOL1"
CACHE_VERSION = 2
PARSE_CHUNK = 65536


class VGGTDataset(torch.utils.data.Dataset):
    """All samples of an output root (every rank), in rank order then index order.

    num_points: resample each point cloud to exactly this many points, so batches stack. The
        choice is deterministic per sample (same video and frame -> same points every epoch, in
        any root layout); pass `seed`
        and/or call `set_epoch(e)` to draw other subsets. Fewer stored points than asked: all of
        them, padded by repeating randomly chosen ones. Kept points stay in their stored order.
    rgb: "float" ([3, H, W] in [0, 1]) or "uint8" ([H, W, 3], exactly the decoded JPEG).
    fields: which of rgb, depth, camera, points to read (skip the rest to read less).
    filter: a callable on each index record (a dict: video, frame_index, kept_fraction,
        conf_p10/p50/p90, depth_min/max, num_points, height, width, ...) -> keep it or not. It is
        called once per sample that passes the keyword filters (slow on millions: prefer those).
    min_kept_fraction, min_conf_p50, min_points, videos: the common filters as keywords
        (a record without the key is dropped); all given filters must pass. Vectorised.
    min_shot_frames: keep samples whose shot has at least this many frames (shot_last_frame -
        shot_first_frame + 1). A sample written before its shot ended (shot_last_frame -1) takes
        the shot's range from its video's "shots" in OUT/videos.jsonl; a video with no shot
        information counts as one shot of its "num_frames"; a shot whose length is not known yet
        (video still being extracted) drops the sample.
    min_cut_distance: keep samples whose window stays at least this many frames away from both
        ends of its shot (its cuts or transitions), the shot's range found as for min_shot_frames.
    """

    def __init__(self, root: str, *, num_points: int | None = None, seed: int | None = None,
                 rgb: str = "float", fields: Iterable[str] = FIELDS,
                 filter: Callable[[dict], bool] | None = None,
                 min_kept_fraction: float | None = None, min_conf_p50: float | None = None,
                 min_points: int | None = None, videos: Iterable[str] | None = None,
                 min_shot_frames: int | None = None, ranks: Iterable[int] | None = None,
                 min_cut_distance: int | None = None):
        if rgb not in ("float", "uint8"):
            raise ValueError(f"rgb must be 'float' or 'uint8', got {rgb!r}")
        if num_points is not None and num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        self.fields = tuple(fields)
        unknown = set(self.fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; choose from {FIELDS}")
        self.root, self.num_points, self.seed, self.rgb = root, num_points, seed, rgb
        self.epoch: int | None = None
        if ranks is None:
            if not os.path.isdir(root):
                raise FileNotFoundError(f"no dataset at {root}")
            ranks = rank_numbers(root)
        shots = _video_shots(root) if min_shot_frames is not None or min_cut_distance is not None else None
        wanted = None if videos is None else set(videos)
        self._parts: list[_RankPart] = []
        for rank in ranks:
            path = os.path.join(root, str(rank), INDEX_NAME)
            if not os.path.exists(path):
                continue
            part = _RankPart.open(root, rank)
            cols = part.columns
            keep = np.ones(part.size, bool)
            for key, bound in (("kept_fraction", min_kept_fraction), ("conf_p50", min_conf_p50),
                               ("num_points", min_points)):
                if bound is not None:
                    keep &= cols[key] >= bound  # NaN (no such key) compares False
            if wanted is not None:
                codes = [code for code, name in enumerate(part.videos) if name in wanted]
                keep &= np.isin(cols["video"], np.asarray(codes, np.int32))
            if shots is not None:
                first, last = _shot_ranges(cols, part.videos, shots)  # NaN: not known, dropped
                if min_shot_frames is not None:
                    keep &= last - first + 1 >= min_shot_frames
                if min_cut_distance is not None:
                    keep &= (cols["window_first"] - first >= min_cut_distance) & (
                        last - cols["window_last"] >= min_cut_distance)
            rows = np.flatnonzero(keep)
            if filter is not None:
                rows = np.asarray([row for row in rows.tolist() if filter(part.record(row))], np.int64)
            part.rows = None if len(rows) == part.size else rows.astype(np.int64)
            self._parts.append(part)
        self._starts = np.cumsum([0] + [len(p) for p in self._parts]).astype(np.int64)
        self._tars = _TarReader()

    # ------------------------------------------------------------------ records

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, i: int) -> tuple["_RankPart", int]:
        """Sample i -> (its rank's part, its row in that rank's columns)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        i = int(i) % len(self)
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        part = self._parts[k]
        j = i - int(self._starts[k])
        return part, (j if part.rows is None else int(part.rows[j]))

    def record(self, i: int) -> dict:
        """The index record of sample i, as written (its line is read back; no sample file is read)."""
        part, row = self._locate(i)
        return part.record(row)

    def records(self) -> list[dict]:
        return [self.record(i) for i in range(len(self))]

    def find(self, sample_id: str) -> int:
        """Position of a sample given its id ("0/000000/0003")."""
        try:
            rank, shard, stem = (int(x) for x in sample_id.split("/"))
        except ValueError:
            raise KeyError(f"no sample {sample_id!r} in {self.root} (not an id like 0/000000/0003)") from None
        for k, part in enumerate(self._parts):
            if part.rank != rank:
                continue
            hit = (part.columns["shard"] == shard) & (part.columns["stem"] == stem)
            rows = np.flatnonzero(hit if part.rows is None else hit[part.rows])
            if len(rows):
                return int(self._starts[k] + rows[0])
        raise KeyError(f"no sample {sample_id!r} in {self.root} (after filters)")

    def column(self, name: str) -> np.ndarray:
        """One index column over the samples of this dataset, in order (a new array). Names: see
        COLUMNS; "flags" bit 0 = tar shard, bit 1 = png16 depth."""
        if name not in COLUMNS:
            raise KeyError(f"no column {name!r}; choose from {tuple(COLUMNS)}")
        parts = [p.columns[name] if p.rows is None else p.columns[name][p.rows] for p in self._parts]
        return np.concatenate(parts) if parts else np.zeros(0, COLUMNS[name])

    def samples_per_rank(self) -> dict[int, int]:
        return {p.rank: len(p) for p in self._parts}

    def video_count(self) -> int:
        """Distinct videos among the samples of this dataset."""
        names: set[str] = set()
        for p in self._parts:
            codes = np.unique(p.columns["video"] if p.rows is None else p.columns["video"][p.rows])
            names.update(p.videos[c] for c in codes.tolist())
        return len(names)

    def set_epoch(self, epoch: int) -> None:
        """Draw another point subset per sample for this epoch (with num_points). Call it before
        creating the epoch's DataLoader iterator (workers copy the dataset when it starts;
        with persistent_workers=True they keep their first copy)."""
        self.epoch = int(epoch)

    def _brief(self, i: int) -> dict:
        """What reading sample i needs, from the columns (no index line is parsed)."""
        part, row = self._locate(i)
        cols = part.columns
        flags = int(cols["flags"][row])
        return {"sample": sample_id(part.rank, int(cols["shard"][row]), int(cols["stem"][row]), flags >> 2),
                "video": part.videos[int(cols["video"][row])], "frame_index": int(cols["frame_index"][row]),
                "shard_format": "tar" if flags & 1 else "dir", "depth_format": "png16" if flags & 2 else "jpg"}

    # ------------------------------------------------------------------ samples

    def __getitem__(self, i: int) -> dict:
        record = self._brief(i)
        files = self.read_files(record)
        item: dict = {"sample": record["sample"]}
        camera = None
        if "camera" in self.fields or "depth" in self.fields:
            camera = torch.load(io.BytesIO(files["camera.pt"]), weights_only=True)
        if "rgb" in self.fields:
            pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(files["jpg"])).convert("RGB")))
            item["rgb"] = pixels if self.rgb == "uint8" else pixels.permute(2, 0, 1).float().div_(255)
        if "depth" in self.fields:
            depth_key = _depth_suffix(record)[1:]
            code = np.array(Image.open(io.BytesIO(files[depth_key])))
            item["depth"] = torch.from_numpy(decode_depth(
                code, camera["depth_min"], camera["depth_max"], int(camera.get("depth_levels", 255)),
                all_valid=camera.get("depth_invalid_pixels", -1) == 0))
        if "camera" in self.fields:
            item["camera"] = camera
        if "points" in self.fields:
            points = torch.load(io.BytesIO(files["points.pt"]), weights_only=True).float()
            item["num_points"] = int(points.shape[0])
            item["points"] = points if self.num_points is None else self.resample(points, _identity(record))
        return item

    def read_files(self, record: dict) -> dict[str, bytes]:
        """The raw bytes of the sample's files this dataset reads, keyed by extension
        ("jpg", "depth.jpg" / "depth.png", "camera.pt", "points.pt")."""
        rank, shard, stem = record["sample"].split("/")
        suffixes = []
        if "rgb" in self.fields:
            suffixes.append(".jpg")
        if "depth" in self.fields:
            suffixes.append(_depth_suffix(record))
        if "camera" in self.fields or "depth" in self.fields:
            suffixes.append(".camera.pt")
        if "points" in self.fields:
            suffixes.append(".points.pt")
        if record.get("shard_format", "dir") == "tar":
            path = os.path.join(self.root, rank, shard + TAR_SUFFIX)
            return {s[1:]: self._tars.read(path, stem + s) for s in suffixes}
        files = {}
        for s in suffixes:
            with open(os.path.join(self.root, rank, shard, stem + s), "rb") as f:
                files[s[1:]] = f.read()
        return files

    def resample(self, points: torch.Tensor, identity: str) -> torch.Tensor:
        """Exactly num_points rows, chosen deterministically from (identity, seed, epoch). The
        identity is the sample's video and frame (not where it is stored), so the same sample
        gives the same points in a dir or tar root, on any rank."""
        n, have = self.num_points, points.shape[0]
        if have == 0:
            return torch.zeros(n, points.shape[1] if points.dim() == 2 else 6, dtype=torch.float32)
        key = [zlib.crc32(identity.encode()), 0 if self.seed is None else self.seed + 1,
               0 if self.epoch is None else self.epoch + 1]
        rng = np.random.default_rng(key)
        if have >= n:
            index = rng.choice(have, n, replace=False)
        else:
            index = np.concatenate([np.arange(have), rng.integers(0, have, n - have)])
        return points[torch.from_numpy(np.sort(index))]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tars"] = _TarReader()  # open files stay with their process
        return state


def _identity(record: dict) -> str:
    return f"{record.get('video')}\0{record.get('frame_index')}"


def _depth_suffix(record: dict) -> str:
    return DEPTH_FORMATS[record.get("depth_format", "jpg")][0]


class _TarReader:
    """Random access into .tar shards: each tar's member table is read once per process, members
    are read with pread (no shared file position, so it is safe across DataLoader workers)."""

    def __init__(self):
        self._pid = os.getpid()
        self._open: OrderedDict[str, tuple[int, dict[str, tuple[int, int]]]] = OrderedDict()

    def read(self, path: str, name: str) -> bytes:
        if os.getpid() != self._pid:  # a forked worker: do not use the parent's descriptors
            self._open, self._pid = OrderedDict(), os.getpid()
        if path in self._open:
            self._open.move_to_end(path)
        else:
            with tarfile.open(path, "r:") as tar:
                table = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
            self._open[path] = (os.open(path, os.O_RDONLY), table)
            while len(self._open) > OPEN_TARS:
                os.close(self._open.popitem(last=False)[1][0])
        fd, table = self._open[path]
        if name not in table:
            raise KeyError(f"{path} has no member {name}")
        offset, size = table[name]
        return os.pread(fd, size, offset)

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd, _ in self._open.values():
                try:
                    os.close(fd)
                except OSError:
                    pass


# ----------------------------------------------------------------------------- the columnar index


class _RankPart:
    """One rank's index as columns (memory-mapped from its cache when there is one), its table of
    video names, and the rows the filters kept (None: all)."""

    def __init__(self, root: str, rank: int, columns: dict[str, np.ndarray], videos: list[str], index_bytes: int):
        self.root, self.rank = root, rank
        self.columns, self.videos, self.index_bytes = columns, videos, index_bytes
        self.size = len(columns["offset"])
        self.rows: np.ndarray | None = None
        self.path = os.path.join(root, str(rank), INDEX_NAME)
        self._fd: tuple[int, int] | None = None  # (pid, descriptor) for reading lines back

    def __len__(self) -> int:
        return self.size if self.rows is None else len(self.rows)

    @classmethod
    def open(cls, root: str, rank: int) -> "_RankPart":
        """The rank's columns: the cache, brought up to date by reading only the index lines added
        since it was written (all of them when there is no usable cache)."""
        index = os.path.join(root, str(rank), INDEX_NAME)
        cache = os.path.join(root, CACHE_DIR, f"{rank}.columns")
        cached = _read_cache(cache, index)
        if cached is None:
            columns, videos, start, lines = {k: np.zeros(0, t) for k, t in COLUMNS.items()}, [], 0, 0
        else:
            columns, videos, start, lines = cached
        new, videos, end, added = _parse_index(index, start, lines, videos)
        if added or cached is None:
            # old columns + new chunks go to the cache file as they are (no copy of the whole in
            # memory), then come back memory-mapped; only a root that cannot take it is joined here
            pieces = {k: ([columns[k]] if len(columns[k]) else []) + new[k] for k in COLUMNS}
            written = _write_cache(cache, index, pieces, videos, end, lines + added)
            if written is not None:
                columns = written[0]  # memory-mapped: shared by every process that opens the root
            else:
                columns = {k: np.concatenate(pieces[k]) if pieces[k] else np.zeros(0, COLUMNS[k]) for k in COLUMNS}
        return cls(root, rank, columns, videos, end)

    def record(self, row: int) -> dict:
        """The index line of a row, read back from samples.jsonl."""
        start = int(self.columns["offset"][row])
        end = int(self.columns["offset"][row + 1]) if row + 1 < self.size else self.index_bytes
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
        return json.loads(os.pread(self._fd[1], end - start, start))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"] = None
        return state

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None and fd[0] == os.getpid():
            try:
                os.close(fd[1])
            except OSError:
                pass


def _parse_index(index: str, start: int, lines: int, videos: list[str]
                 ) -> tuple[dict[str, list[np.ndarray]], list[str], int, int]:
    """Columns of the index lines from byte `start` (line `lines` + 1) to the last complete line,
    as chunks: (column -> arrays, the video table extended, end offset, lines read). Parsed in
    chunks, so the Python objects of one chunk at most exist at a time."""
    codes = {name: code for code, name in enumerate(videos)} if start else {}
    videos = list(videos) if start else []
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in COLUMNS}
    buffer: dict[str, list] = {k: [] for k in COLUMNS}
    end, added = start, 0
    nan = math.nan

    def spill() -> None:
        for k, values in buffer.items():
            chunks[k].append(np.asarray(values, COLUMNS[k]))
            values.clear()

    for line_end, r in iter_records(index, start, first_line=lines + 1):
        video = r.get("video")
        code = codes.get(video)
        if code is None:
            code = codes[video] = len(videos)
            videos.append(video)
        sample = r["sample"]
        digits = len(sample) - sample.rfind("/") - 1
        flags = (r.get("shard_format", DEFAULT_SHARD_FORMAT) == "tar") | (
            (r.get("depth_format", DEFAULT_DEPTH_FORMAT) == "png16") << 1) | (digits << 2)
        b = buffer
        b["offset"].append(end)
        b["video"].append(code)
        b["frame_index"].append(r.get("frame_index", -1))
        b["shard"].append(r["shard"])
        b["stem"].append(r["stem"])
        b["flags"].append(flags)
        b["num_points"].append(r.get("num_points", -1))
        b["kept_fraction"].append(r.get("kept_fraction", nan))
        b["conf_p50"].append(r.get("conf_p50", nan))
        b["height"].append(r.get("height", 0))
        b["width"].append(r.get("width", 0))
        b["shot_index"].append(r.get("shot_index", 0))
        b["shot_first_frame"].append(r.get("shot_first_frame", 0))
        b["shot_last_frame"].append(r.get("shot_last_frame", -1))
        window = r.get("window_frame_indices") or [r.get("frame_index", -1)]
        b["window_first"].append(window[0])
        b["window_last"].append(window[-1])
        end = line_end
        added += 1
        if len(b["offset"]) >= PARSE_CHUNK:
            spill()
    if buffer["offset"]:
        spill()
    return chunks, videos, end, added


def _line_check(index: str, end: int) -> int:
    line = line_before(index, end)
    return -1 if line is None else zlib.crc32(line)


def _read_cache(cache: str, index: str):
    """(columns, videos, index bytes, lines) from a cache that still describes the index, else None.
    Read with os-level calls: memory-mapped, nothing copied."""
    try:
        fd = os.open(cache, os.O_RDONLY)
    except OSError:
        return None
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as probe:
            if probe[:8] != CACHE_MAGIC:
                return None
            length = int.from_bytes(probe[8:16], "little")
            header = json.loads(probe[16:16 + length])
        if header.get("version") != CACHE_VERSION or set(header["columns"]) != set(COLUMNS):
            return None
        end = header["index_bytes"]
        if end and (not os.path.exists(index) or _line_check(index, end) != header["last_line_crc"]):
            return None  # the index was rewritten or cut: this cache is not its copy
        buffer = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        lines, base = header["lines"], _data_start(length)
        columns = {k: np.frombuffer(buffer, COLUMNS[k], lines, base + header["columns"][k]) for k in COLUMNS}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        os.close(fd)
    return columns, header["videos"], end, lines


def _data_start(header_length: int) -> int:
    """Where a cache file's columns begin: after magic, length and header, 64-byte aligned."""
    return (16 + header_length + 63) // 64 * 64


def _write_cache(cache: str, index: str, columns: dict[str, list[np.ndarray]], videos: list[str], end: int,
                 lines: int):
    """Write the cache (each column given as pieces) atomically and map it back; None when the
    root cannot take it (read-only)."""
    offsets, position = {}, 0  # of each column after the header, 64-byte aligned
    for k in COLUMNS:
        position = (position + 63) // 64 * 64
        offsets[k] = position
        position += sum(piece.nbytes for piece in columns[k])
    header = {"version": CACHE_VERSION, "index_bytes": end, "lines": lines,
              "last_line_crc": _line_check(index, end) if end else -1, "columns": offsets, "videos": videos}
    text = json.dumps(header).encode()
    base = _data_start(len(text))
    tmp = f"{cache}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, CACHE_MAGIC + len(text).to_bytes(8, "little") + text + b"\0" * (base - 16 - len(text)))
            for k in COLUMNS:
                pad = base + offsets[k] - os.lseek(fd, 0, os.SEEK_CUR)
                os.write(fd, b"\0" * pad)
                for piece in columns[k]:
                    data = memoryview(np.ascontiguousarray(piece, COLUMNS[k])).cast("B")
                    while len(data):
                        data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        os.replace(tmp, cache)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
        return None
    return _read_cache(cache, index)


# ----------------------------------------------------------------------------- shots


def _video_shots(root: str) -> dict[str, tuple[int, list]]:
    """video -> (num_frames or -1, shots [[first, last], ...] or []) from OUT/videos.jsonl."""
    info: dict[str, tuple[int, list]] = {}
    for r in iter_video_status(root):
        if r.get("status") in FINISHED:
            info[r["video"]] = (int(r.get("num_frames") or -1), r.get("shots") or [])
    return info


def _shot_ranges(cols: dict[str, np.ndarray], videos: list[str], shots: dict[str, tuple[int, list]]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's shot as float (first, last) frames, NaN where not known yet: the sample's own
    when it was written after its shot ended, else its video's "shots" in videos.jsonl by
    shot_index, else (no shot information) the whole video."""
    first = cols["shot_first_frame"].astype(np.float64)
    last = np.where(cols["shot_last_frame"] >= 0, cols["shot_last_frame"], np.nan).astype(np.float64)
    unknown = np.flatnonzero(np.isnan(last))
    if len(unknown) == 0:
        return first, last
    counts = np.zeros(len(videos), np.int64)
    frames = np.full(len(videos), -1, np.int64)
    flat_first: list[int] = []
    flat_last: list[int] = []
    for code, name in enumerate(videos):
        num_frames, video_shots = shots.get(name, (-1, []))
        frames[code] = num_frames
        counts[code] = len(video_shots)
        flat_first += [int(a) for a, _ in video_shots]
        flat_last += [int(b) for _, b in video_shots]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(videos) else np.zeros(0, np.int64)
    table_first, table_last = np.asarray(flat_first + [0], np.float64), np.asarray(flat_last + [0], np.float64)
    code = cols["video"][unknown].astype(np.int64)
    index = cols["shot_index"][unknown].astype(np.int64)
    has_shots = (counts[code] > 0) & (index >= 0) & (index < counts[code])
    whole = (counts[code] == 0) & (frames[code] > 0) & (index == 0)  # no shot information: one shot
    new_first, new_last = np.full(len(unknown), np.nan), np.full(len(unknown), np.nan)
    at = starts[code[has_shots]] + index[has_shots]
    new_first[has_shots], new_last[has_shots] = table_first[at], table_last[at]
    new_first[whole], new_last[whole] = 0, frames[code[whole]] - 1
    first[unknown], last[unknown] = new_first, new_last
    return first, last
