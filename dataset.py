"""Read an extracted dataset: a torch Dataset over every rank and shard of an output root.

    from dataset import VGGTDataset
    ds = VGGTDataset("out", num_points=8192, min_kept_fraction=0.5)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, num_workers=4)
    for batch in loader:
        batch["rgb"], batch["depth"], batch["camera"]["intrinsic"], batch["points"]

The sample list comes from the per-rank index files OUT/<rank>/samples.jsonl (the writer appends
a line only once its sample is visible), so opening a root lists no shard folders and a root that
is still being extracted can be read: it shows the samples committed so far. Filters look at the
index records only; no sample file is opened to select samples. Both shard formats (folders of
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
import os
import tarfile
import zlib
from collections import OrderedDict
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image

from sharded_writer import DEPTH_FORMATS, INDEX_NAME, TAR_SUFFIX, decode_depth

FIELDS = ("rgb", "depth", "camera", "points")
OPEN_TARS = 16  # tar files kept open per process


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
        conf_p10/p50/p90, depth_min/max, num_points, height, width, ...) -> keep it or not.
    min_kept_fraction, min_conf_p50, min_points, videos: the common filters as keywords
        (a record without the key is dropped); all given filters must pass.
    min_shot_frames: keep samples whose shot (--shots detect) holds at least this many frames;
    min_cut_distance: keep samples whose window stays at least this many frames away from both
        ends of its shot (its cuts or transitions). Both read the shot's final boundaries from
        OUT/videos.jsonl (a sample written while its shot was still going on records
        shot_last_frame -1); a sample whose shot is not known there is dropped.
    """

    def __init__(self, root: str, *, num_points: int | None = None, seed: int | None = None,
                 rgb: str = "float", fields: Iterable[str] = FIELDS,
                 filter: Callable[[dict], bool] | None = None,
                 min_kept_fraction: float | None = None, min_conf_p50: float | None = None,
                 min_points: int | None = None, videos: Iterable[str] | None = None,
                 ranks: Iterable[int] | None = None, min_shot_frames: int | None = None,
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
        tests = []
        for key, bound in (("kept_fraction", min_kept_fraction), ("conf_p50", min_conf_p50),
                           ("num_points", min_points)):
            if bound is not None:
                tests.append(lambda r, key=key, bound=bound: r.get(key, -math.inf) >= bound)
        if videos is not None:
            wanted = set(videos)
            tests.append(lambda r: r.get("video") in wanted)
        if min_shot_frames is not None or min_cut_distance is not None:
            tests.append(_shot_filter(root, min_shot_frames or 0, min_cut_distance or 0))
        if filter is not None:
            tests.append(filter)

        # The kept index lines, as one bytes blob + offsets: no per-sample Python objects, so
        # DataLoader workers share it without copy-on-access growth.
        blob, offsets = bytearray(), [0]
        for path in self._index_paths(ranks):
            for line in _complete_lines(path):
                record = json.loads(line)
                if all(test(record) for test in tests):
                    blob += line
                    offsets.append(len(blob))
        self._blob = bytes(blob)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._tars = _TarReader()
        self._ids: dict[str, int] | None = None

    def _index_paths(self, ranks: Iterable[int] | None) -> list[str]:
        if ranks is None:
            if not os.path.isdir(self.root):
                raise FileNotFoundError(f"no dataset at {self.root}")
            ranks = sorted(int(n) for n in os.listdir(self.root) if n.isdigit())
        paths = [os.path.join(self.root, str(rank), INDEX_NAME) for rank in ranks]
        return [p for p in paths if os.path.exists(p)]

    # ------------------------------------------------------------------ records

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def record(self, i: int) -> dict:
        """The index record of sample i (no sample file is read)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        i %= len(self)
        return json.loads(self._blob[self._offsets[i]:self._offsets[i + 1]])

    def records(self) -> list[dict]:
        return [self.record(i) for i in range(len(self))]

    def find(self, sample_id: str) -> int:
        """Position of a sample given its id ("0/000000/0003")."""
        if self._ids is None:
            self._ids = {self.record(i)["sample"]: i for i in range(len(self))}
        if sample_id not in self._ids:
            raise KeyError(f"no sample {sample_id!r} in {self.root} (after filters)")
        return self._ids[sample_id]

    def set_epoch(self, epoch: int) -> None:
        """Draw another point subset per sample for this epoch (with num_points). Call it before
        creating the epoch's DataLoader iterator (workers copy the dataset when it starts;
        with persistent_workers=True they keep their first copy)."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ samples

    def __getitem__(self, i: int) -> dict:
        record = self.record(i)
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


def _shot_filter(root: str, min_frames: int, min_distance: int) -> Callable[[dict], bool]:
    """A record filter on its shot's final boundaries (videos.jsonl "shots", by shot_index)."""
    shots: dict[str, list] = {}
    path = os.path.join(root, "videos.jsonl")
    if os.path.exists(path):
        for line in _complete_lines(path):
            record = json.loads(line)
            if record.get("status") == "done" and "shots" in record:
                shots[record["video"]] = record["shots"]

    def keep(r: dict) -> bool:
        video_shots, index = shots.get(r.get("video")), r.get("shot_index")
        if video_shots is None or index is None or not 0 <= index < len(video_shots):
            return False
        first, last = video_shots[index]
        frames = r.get("window_frame_indices") or [r["frame_index"]]
        return (last - first + 1 >= min_frames and frames[0] - first >= min_distance
                and last - frames[-1] >= min_distance)

    return keep


def _identity(record: dict) -> str:
    return f"{record.get('video')}\0{record.get('frame_index')}"


def _depth_suffix(record: dict) -> str:
    return DEPTH_FORMATS[record.get("depth_format", "jpg")][0]


def _complete_lines(path: str) -> list[bytes]:
    """The index's lines, without a last line cut short by a kill (like sharded_writer.read_index)."""
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        lines.pop()
    return [line for line in lines if line.strip()]


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
