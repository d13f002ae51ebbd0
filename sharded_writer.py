"""Sharded sample writer: one rank's samples into OUT/<rank>/<6-digit shard>/<4-digit stem>.*

    OUT/<rank>/000000/0000.jpg          focal RGB, the model's pixel grid
    OUT/<rank>/000000/0000.depth.jpg    focal depth, 8-bit inverse depth (see encode_depth)
    OUT/<rank>/000000/0000.camera.pt    cameras + provenance + depth range (torch.load(weights_only=True))
    OUT/<rank>/000000/0000.points.pt    float32 [N, 6]: x y z r g b
    OUT/<rank>/samples.jsonl            one line per committed sample (the index), beside the shards

Every file is written under OUT/<rank>/.tmp/ and renamed into its shard folder; the index line is
appended only after all four renames, so the index is the truth: on opening, anything in the shard
folders past the last indexed sample (left by a kill between renames) is removed, and numbering
continues after the last indexed sample. Existing files are never overwritten.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from streaming_vggt import Sample

SUFFIXES = (".points.pt", ".camera.pt", ".depth.jpg", ".jpg")  # rename order: the RGB frame last
INDEX_NAME = "samples.jsonl"
TMP_DIR = ".tmp"
DEPTH_ENCODING = "inverse_depth_linear_uint8"


# ----------------------------------------------------------------------------- depth codec


def encode_depth(depth: torch.Tensor, levels: int = 255) -> tuple[np.ndarray, float, float]:
    """float depth [H, W] -> (integer image [H, W], depth_min, depth_max).

    Inverse depth mapped linearly onto 1..levels over [1/depth_max, 1/depth_min]: 1 is the
    farthest point, `levels` the nearest; near surfaces, where a VAE cares most, get the finest
    steps. 0 marks pixels with no valid depth (<= 0 or not finite).
    """
    d = depth.double().numpy()
    valid = np.isfinite(d) & (d > 0)
    if not valid.any():
        return np.zeros(d.shape, np.uint8 if levels <= 255 else np.uint16), 0.0, 0.0
    d_min, d_max = float(d[valid].min()), float(d[valid].max())
    inv_far, inv_near = 1.0 / d_max, 1.0 / d_min
    span = max(inv_near - inv_far, 1e-12)
    code = np.zeros(d.shape, np.float64)
    code[valid] = 1 + (1.0 / d[valid] - inv_far) / span * (levels - 1)
    dtype = np.uint8 if levels <= 255 else np.uint16
    return np.clip(np.rint(code), 0, levels).astype(dtype), d_min, d_max


def decode_depth(code: np.ndarray, depth_min: float, depth_max: float, levels: int = 255) -> np.ndarray:
    """Inverse of encode_depth: integer image -> float32 depth [H, W], 0 where no depth was stored."""
    code = code.astype(np.float64)
    if depth_max <= 0:
        return np.zeros(code.shape, np.float32)
    inv_far, inv_near = 1.0 / depth_max, 1.0 / depth_min
    inv = inv_far + (np.clip(code, 1, levels) - 1) / (levels - 1) * (inv_near - inv_far)
    return np.where(code > 0, 1.0 / inv, 0.0).astype(np.float32)


# ----------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class Slot:
    shard: int
    stem: int


class ShardedWriter:
    """Writes one rank's samples; reopening the same (root, rank) continues after the last one.

    Only one process may write a rank at a time (the orchestrator guarantees it with a lock).
    """

    def __init__(self, root: str, rank: int, files_per_dir: int = 500, jpeg_quality: int = 95):
        if files_per_dir < 1:
            raise ValueError(f"files_per_dir must be >= 1, got {files_per_dir}")
        self.rank_dir = os.path.join(root, str(rank))
        self.rank = rank
        self.files_per_dir = files_per_dir
        self.stem_digits = max(4, len(str(files_per_dir - 1)))
        self.jpeg_quality = jpeg_quality
        self.tmp_dir = os.path.join(self.rank_dir, TMP_DIR)
        self.index_path = os.path.join(self.rank_dir, INDEX_NAME)
        os.makedirs(self.rank_dir, exist_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # temp files of a killed run
        os.makedirs(self.tmp_dir)
        records = read_index(self.index_path, repair=True)
        self.last_focal: dict[str, int] = {}  # video -> highest focal frame written (resume point)
        last = Slot(0, -1)
        for r in records:
            last = max(last, Slot(r["shard"], r["stem"]), key=lambda s: (s.shard, s.stem))
            self.last_focal[r["video"]] = max(self.last_focal.get(r["video"], -1), r["frame_index"])
        self._next = self._after(last)
        self.removed_orphans = self._remove_unindexed_after(last)
        self._index = open(self.index_path, "a", encoding="utf-8")
        self.samples_written = 0

    def _after(self, slot: Slot) -> Slot:
        if slot.stem + 1 < self.files_per_dir:
            return Slot(slot.shard, slot.stem + 1)
        return Slot(slot.shard + 1, 0)

    def shard_dir(self, shard: int) -> str:
        return os.path.join(self.rank_dir, f"{shard:06d}")

    def stem_name(self, stem: int) -> str:
        return f"{stem:0{self.stem_digits}d}"

    def _remove_unindexed_after(self, last: Slot) -> int:
        """Delete sample files at or after the next free slot: pieces of a sample whose index line
        was never written (a kill between renames). Earlier shards are complete and left alone."""
        removed = 0
        for name in sorted(os.listdir(self.rank_dir)):
            if not (name.isdigit() and len(name) == 6 and int(name) >= last.shard):
                continue
            shard = int(name)
            for file in os.listdir(self.shard_dir(shard)):
                stem = file.split(".", 1)[0]
                if stem.isdigit() and (shard, int(stem)) > (last.shard, last.stem):
                    os.remove(os.path.join(self.shard_dir(shard), file))
                    removed += 1
        return removed

    def write(self, sample: Sample, extra: dict | None = None) -> dict:
        """Encode and commit one sample; returns its index record."""
        slot = self._next
        shard_dir, stem = self.shard_dir(slot.shard), self.stem_name(slot.stem)
        os.makedirs(shard_dir, exist_ok=True)
        payloads = encode_sample(sample, self.jpeg_quality)
        tmp_paths = []
        for suffix in SUFFIXES:
            tmp = os.path.join(self.tmp_dir, stem + suffix)
            with open(tmp, "wb") as f:
                f.write(payloads[suffix])
            tmp_paths.append(tmp)
        for suffix, tmp in zip(SUFFIXES, tmp_paths):
            final = os.path.join(shard_dir, stem + suffix)
            if os.path.exists(final):  # never clobber: the index and the folders disagree
                raise FileExistsError(f"refusing to overwrite {final}")
            os.rename(tmp, final)
        record = {
            "sample": f"{self.rank}/{slot.shard:06d}/{stem}",
            "rank": self.rank,
            "shard": slot.shard,
            "stem": slot.stem,
            "video": sample.video,
            "frame_index": sample.frame_index,
            "timestamp": sample.timestamp,
            "window_frame_indices": sample.window_frame_indices,
            "dilation": sample.dilation,
            "num_points": int(sample.points.shape[0]),
            "height": int(sample.rgb.shape[0]),
            "width": int(sample.rgb.shape[1]),
            **{k: round(float(v), 6) for k, v in sample.quality.items()},
            **(extra or {}),
        }
        self._index.write(json.dumps(record) + "\n")
        self._index.flush()  # the sample exists once this line does
        self.last_focal[sample.video] = max(self.last_focal.get(sample.video, -1), sample.frame_index)
        self._next = self._after(slot)
        self.samples_written += 1
        return record

    def close(self) -> None:
        self._index.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def encode_sample(sample: Sample, jpeg_quality: int = 95) -> dict[str, bytes]:
    """Sample -> bytes of its four files, keyed by suffix."""
    depth_code, depth_min, depth_max = encode_depth(sample.depth)
    camera = {
        "extrinsic": sample.extrinsic.float().contiguous(),
        "intrinsic": sample.intrinsic.float().contiguous(),
        "height": int(sample.rgb.shape[0]),
        "width": int(sample.rgb.shape[1]),
        "video": sample.video,
        "frame_index": sample.frame_index,
        "timestamp": float(sample.timestamp),
        "fps": float(sample.fps),
        "dilation": sample.dilation,
        "world_frame": sample.world_frame,
        "window_frame_indices": torch.tensor(sample.window_frame_indices, dtype=torch.int64),
        "window_timestamps": torch.tensor(sample.window_timestamps, dtype=torch.float64),
        "window_extrinsics": sample.window_extrinsics.float().contiguous(),
        "window_intrinsics": sample.window_intrinsics.float().contiguous(),
        "depth_encoding": DEPTH_ENCODING,
        "depth_min": depth_min,
        "depth_max": depth_max,
    }
    return {
        ".jpg": _jpeg(sample.rgb.numpy(), jpeg_quality),
        ".depth.jpg": _jpeg(depth_code, jpeg_quality),
        ".camera.pt": _torch_bytes(camera),
        ".points.pt": _torch_bytes(sample.points.float().contiguous()),
    }


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def read_index(path: str, repair: bool = False) -> list[dict]:
    """Records of an index file. A last line cut short by a kill is dropped (and cut from the file
    when `repair`): that sample counts as never committed, so the writer removes its files and the
    resumed video writes it again."""
    if not os.path.exists(path):
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_bytes += len(line)
    if repair and good_bytes != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records
