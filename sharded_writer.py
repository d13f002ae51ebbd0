"""Sharded sample writer: one rank's samples into OUT/<rank>/<6-digit shard>/<4-digit stem>.*

    OUT/<rank>/000000/0000.jpg          focal RGB, the model's pixel grid
    OUT/<rank>/000000/0000.depth.jpg    focal depth, 8-bit inverse depth (see encode_depth)
                      0000.depth.png    ... or, with depth_format="png16", lossless 16-bit
    OUT/<rank>/000000/0000.camera.pt    cameras + provenance + depth range (torch.load(weights_only=True))
    OUT/<rank>/000000/0000.points.pt    float32 [N, 6]: x y z r g b
    OUT/<rank>/samples.jsonl            one line per committed sample (the index), beside the shards

Every file is written under OUT/<rank>/.tmp/ and renamed into its shard folder; the index line is
appended only after all four renames, so the index is the truth: on opening, anything in the shard
folders past the last indexed sample (left by a kill between renames) is removed, and numbering
continues after the last indexed sample. Existing files are never overwritten.

shard_format="tar" writes each shard as one file OUT/<rank>/<6 digits>.tar holding the same member
names (webdataset convention: key = member name up to its first dot). The open shard is built as
OUT/<rank>/.tmp/<6 digits>.tar and renamed into place when it holds `files_per_dir` samples or on
flush() / close(); its index lines are buffered and appended only after that rename, so here too
the index lists only visible samples. A kill loses the open shard, which the resume writes again.
A reopened tar writer starts a new shard (a committed tar is never appended to), so callers that
flush() at each video end (the pipeline does, before reporting the video done) get shards that
end at video boundaries.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from streaming_vggt import Sample

SUFFIXES = (".points.pt", ".camera.pt", ".depth.jpg", ".jpg")  # rename order: the RGB frame last
INDEX_NAME = "samples.jsonl"
TMP_DIR = ".tmp"
DEPTH_ENCODING = "inverse_depth_linear_uint8"
SHARD_FORMATS = ("dir", "tar")
# depth_format -> (file suffix, code levels, camera.pt "depth_encoding")
DEPTH_FORMATS = {
    "jpg": (".depth.jpg", 255, DEPTH_ENCODING),
    "png16": (".depth.png", 65535, "inverse_depth_linear_uint16"),
}
TAR_SUFFIX = ".tar"


def sample_suffixes(depth_format: str = "jpg") -> tuple[str, ...]:
    """The four file suffixes of one sample, in commit order (the RGB frame last)."""
    return (".points.pt", ".camera.pt", DEPTH_FORMATS[depth_format][0], ".jpg")


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
    every = bool(valid.all())  # VGGT: always; then no masked copies (same codes, a third of the time)
    d_min, d_max = (float(d.min()), float(d.max())) if every else (float(d[valid].min()), float(d[valid].max()))
    inv_far, inv_near = 1.0 / d_max, 1.0 / d_min
    span = max(inv_near - inv_far, 1e-12)
    if every:
        code = np.divide(1.0, d)
        code -= inv_far
        code /= span
        code *= levels - 1
        code += 1
    else:
        code = np.zeros(d.shape, np.float64)
        code[valid] = 1 + (1.0 / d[valid] - inv_far) / span * (levels - 1)
    dtype = np.uint8 if levels <= 255 else np.uint16
    return np.clip(np.rint(code, out=code), 0, levels, out=code).astype(dtype), d_min, d_max


def decode_depth(code: np.ndarray, depth_min: float, depth_max: float, levels: int = 255,
                 all_valid: bool = False) -> np.ndarray:
    """Inverse of encode_depth: integer image -> float32 depth [H, W], 0 where no depth was stored.

    all_valid: the map had no invalid pixel (camera.pt "depth_invalid_pixels" == 0, always so for
    VGGT), so a 0 read back can only be JPEG noise on the farthest level: decode it as depth_max
    instead of "no depth"."""
    code = code.astype(np.float64)
    if depth_max <= 0:
        return np.zeros(code.shape, np.float32)
    inv_far, inv_near = 1.0 / depth_max, 1.0 / depth_min
    inv = inv_far + (np.clip(code, 1, levels) - 1) / (levels - 1) * (inv_near - inv_far)
    return (1.0 / inv if all_valid else np.where(code > 0, 1.0 / inv, 0.0)).astype(np.float32)


# ----------------------------------------------------------------------------- writer


@dataclass(frozen=True, order=True)
class Slot:  # ordered by (shard, stem)
    shard: int
    stem: int


class ShardedWriter:
    """Writes one rank's samples; reopening the same (root, rank) continues after the last one.

    Only one process may write a rank at a time (the orchestrator guarantees it with a lock).
    """

    def __init__(self, root: str, rank: int, files_per_dir: int = 500, jpeg_quality: int = 95,
                 shard_format: str = "dir", depth_format: str = "jpg"):
        if files_per_dir < 1:
            raise ValueError(f"files_per_dir must be >= 1, got {files_per_dir}")
        if shard_format not in SHARD_FORMATS:
            raise ValueError(f"shard_format must be one of {SHARD_FORMATS}, got {shard_format!r}")
        if depth_format not in DEPTH_FORMATS:
            raise ValueError(f"depth_format must be one of {tuple(DEPTH_FORMATS)}, got {depth_format!r}")
        self.shard_format, self.depth_format = shard_format, depth_format
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
        for key, wanted in (("shard_format", shard_format), ("depth_format", depth_format)):
            found = {r.get(key, "dir" if key == "shard_format" else "jpg") for r in records}
            if found - {wanted}:
                raise ValueError(f"{self.rank_dir} holds samples with {key} {sorted(found)}, this writer "
                                 f"was asked for {wanted!r}: one root holds one format")
        self.last_focal: dict[str, int] = {}  # video -> highest focal frame written (resume point)
        last = Slot(0, -1)
        for r in records:
            last = max(last, Slot(r["shard"], r["stem"]))
            self.last_focal[r["video"]] = max(self.last_focal.get(r["video"], -1), r["frame_index"])
        # A tar shard is never appended to once committed: a reopened tar writer starts a new one.
        self._next = self._after(last) if shard_format == "dir" or last.stem < 0 else Slot(last.shard + 1, 0)
        self.removed_orphans = self._remove_unindexed_after(last)
        self._index = open(self.index_path, "a", encoding="utf-8")
        self.samples_written = 0  # passed to write() by this writer (tar: committed or in the open shard)
        self.samples_committed = 0  # of those, visible and indexed
        self._tar: tarfile.TarFile | None = None  # the open tar shard, built under .tmp/
        self._tar_shard = -1
        self._pending: list[dict] = []  # index records of the open tar shard

    def _after(self, slot: Slot) -> Slot:
        if slot.stem + 1 < self.files_per_dir:
            return Slot(slot.shard, slot.stem + 1)
        return Slot(slot.shard + 1, 0)

    def shard_dir(self, shard: int) -> str:
        return os.path.join(self.rank_dir, f"{shard:06d}")

    def tar_path(self, shard: int) -> str:
        return os.path.join(self.rank_dir, f"{shard:06d}{TAR_SUFFIX}")

    def stem_name(self, stem: int) -> str:
        return f"{stem:0{self.stem_digits}d}"

    def _remove_unindexed_after(self, last: Slot) -> int:
        """Delete sample files at or after the next free slot: pieces of a sample whose index line
        was never written (a kill between renames, or between a tar's rename and its index lines).
        Earlier shards are complete and left alone."""
        removed = 0
        for name in sorted(os.listdir(self.rank_dir)):
            if name.endswith(TAR_SUFFIX) and len(name) == 6 + len(TAR_SUFFIX) and name[:6].isdigit():
                if int(name[:6]) >= last.shard:
                    removed += self._trim_tar(int(name[:6]), last)
                continue
            if not (name.isdigit() and len(name) == 6 and int(name) >= last.shard):
                continue
            shard = int(name)
            for file in os.listdir(self.shard_dir(shard)):
                stem = file.split(".", 1)[0]
                if stem.isdigit() and (shard, int(stem)) > (last.shard, last.stem):
                    os.remove(os.path.join(self.shard_dir(shard), file))
                    removed += 1
        return removed

    def _trim_tar(self, shard: int, last: Slot) -> int:
        """A committed tar past the index (kill after its rename, before its index lines): remove
        it, or, for the last indexed shard, keep only its indexed members (atomic rewrite)."""
        path = self.tar_path(shard)
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            keep = [m for m in members if shard == last.shard and _member_stem(m.name) <= last.stem]
            if len(keep) == len(members):
                return 0
            if keep:
                tmp = os.path.join(self.tmp_dir, os.path.basename(path))
                with tarfile.open(tmp, "w") as out:
                    for m in keep:
                        out.addfile(m, tar.extractfile(m))
        if keep:
            os.replace(tmp, path)
        else:
            os.remove(path)
        return len(members) - len(keep)

    def write(self, sample: Sample, extra: dict | None = None) -> dict:
        """Encode one sample and commit it (tar: add it to the open shard, committed by flush() or
        when the shard is full); returns its index record."""
        slot = self._next
        stem = self.stem_name(slot.stem)
        payloads = encode_sample(sample, self.jpeg_quality, self.depth_format)
        record = self._record(slot, stem, sample, extra)
        if self.shard_format == "tar":
            self._add_to_tar(slot, stem, payloads)
            self._pending.append(record)
            self._next = self._after(slot)
            self.samples_written += 1
            if self._next.shard != slot.shard:
                self.flush()
            return record
        shard_dir = self.shard_dir(slot.shard)
        os.makedirs(shard_dir, exist_ok=True)
        suffixes = sample_suffixes(self.depth_format)
        tmp_paths = []
        for suffix in suffixes:
            tmp = os.path.join(self.tmp_dir, stem + suffix)
            with open(tmp, "wb") as f:
                f.write(payloads[suffix])
            tmp_paths.append(tmp)
        renamed = []
        try:
            for suffix, tmp in zip(suffixes, tmp_paths):
                final = os.path.join(shard_dir, stem + suffix)
                if os.path.exists(final):  # never clobber: the index and the folders disagree
                    raise FileExistsError(f"refusing to overwrite {final}")
                os.rename(tmp, final)
                renamed.append(final)
            self._commit([record])  # the sample exists once this line does
        except OSError:
            # A failed rename or index write (disk full, NFS): take the pieces back so the slot is
            # free again and the next sample can be written; this one is reported as failed.
            for path in renamed + tmp_paths:
                if os.path.exists(path):
                    os.remove(path)
            raise
        self._next = self._after(slot)
        self.samples_written += 1
        return record

    def _record(self, slot: Slot, stem: str, sample: Sample, extra: dict | None) -> dict:
        return {
            "sample": f"{self.rank}/{slot.shard:06d}/{stem}",
            "rank": self.rank,
            "shard": slot.shard,
            "stem": slot.stem,
            "video": sample.video,
            "frame_index": sample.frame_index,
            "timestamp": sample.timestamp,
            "window_frame_indices": sample.window_frame_indices,
            "dilation": sample.dilation,
            "shot_index": sample.shot_index,
            "shot_first_frame": sample.shot_first_frame,
            "shot_last_frame": sample.shot_last_frame,
            "num_points": int(sample.points.shape[0]),
            "height": int(sample.rgb.shape[0]),
            "width": int(sample.rgb.shape[1]),
            **{k: round(float(v), 6) for k, v in sample.quality.items()},
            "shard_format": self.shard_format,
            "depth_format": self.depth_format,
            **(extra or {}),
        }

    def _commit(self, records: list[dict]) -> None:
        """Append the index lines of visible samples, in one write."""
        if not records:
            return
        size = self._index.tell()
        try:
            self._index.write("".join(json.dumps(r) + "\n" for r in records))
            self._index.flush()
        except OSError:
            self._index.truncate(size)  # no half line for the next record to be glued to
            raise
        for r in records:
            self.last_focal[r["video"]] = max(self.last_focal.get(r["video"], -1), r["frame_index"])
        self.samples_committed += len(records)

    # ------------------------------------------------------------------ tar shards

    def _add_to_tar(self, slot: Slot, stem: str, payloads: dict[str, bytes]) -> None:
        try:
            if self._tar is None:
                if os.path.exists(self.tar_path(slot.shard)):  # never clobber
                    raise FileExistsError(f"refusing to overwrite {self.tar_path(slot.shard)}")
                self._tar_shard = slot.shard
                self._tar = tarfile.open(os.path.join(self.tmp_dir, f"{slot.shard:06d}{TAR_SUFFIX}"), "w")
            now = int(time.time())
            for suffix in reversed(sample_suffixes(self.depth_format)):  # webdataset groups by key: .jpg first
                info = tarfile.TarInfo(stem + suffix)
                info.size, info.mtime, info.mode = len(payloads[suffix]), now, 0o644
                self._tar.addfile(info, io.BytesIO(payloads[suffix]))
        except OSError:
            self._discard_open_shard()
            raise

    def _discard_open_shard(self) -> None:
        """After a failed tar write: drop the open shard (its samples were never indexed) and
        reuse its number, so the index and the visible files stay in step."""
        if self._tar is not None:
            try:
                self._tar.close()
            except OSError:
                pass
            self._tar = None
        tmp = os.path.join(self.tmp_dir, f"{self._tar_shard:06d}{TAR_SUFFIX}")
        if os.path.exists(tmp):
            os.remove(tmp)
        if self._tar_shard >= 0:
            self._next = Slot(self._tar_shard, 0)
        self.samples_written -= len(self._pending)
        self._pending, self._tar_shard = [], -1

    def flush(self) -> list[dict]:
        """Commit the open tar shard: rename it into place, then append its index lines. Returns
        the records committed now. Dir shards commit every sample as it is written: a no-op.
        Call it before reporting a video finished (its samples must be visible by then)."""
        if self._tar is None:
            return []
        shard = self._tar_shard
        tmp, final = self._tar.name, self.tar_path(shard)
        try:
            self._tar.close()
            self._tar = None
            if os.path.exists(final):
                raise FileExistsError(f"refusing to overwrite {final}")
            os.rename(tmp, final)  # the shard is visible ...
        except OSError:
            self._discard_open_shard()
            raise
        committed, self._pending = self._pending, []
        self._commit(committed)  # ... and only now indexed
        self._tar_shard = -1
        self._next = Slot(shard + 1, 0)
        return committed

    def close(self) -> None:
        """Commit the open tar shard (if any) and close the index."""
        try:
            self.flush()
        finally:
            self._index.close()
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _member_stem(name: str) -> int:
    stem = os.path.basename(name).split(".", 1)[0]
    return int(stem) if stem.isdigit() else -1


def encode_sample(sample: Sample, jpeg_quality: int = 95, depth_format: str = "jpg") -> dict[str, bytes]:
    """Sample -> bytes of its four files, keyed by suffix (".jpg", ".depth.jpg" or ".depth.png",
    ".camera.pt", ".points.pt")."""
    depth_suffix, levels, encoding = DEPTH_FORMATS[depth_format]
    depth_code, depth_min, depth_max = encode_depth(sample.depth, levels)
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
        "shot_index": sample.shot_index,
        "shot_first_frame": sample.shot_first_frame,
        "shot_last_frame": sample.shot_last_frame,
        "window_frame_indices": torch.tensor(sample.window_frame_indices, dtype=torch.int64),
        "window_timestamps": torch.tensor(sample.window_timestamps, dtype=torch.float64),
        "window_extrinsics": sample.window_extrinsics.float().contiguous(),
        "window_intrinsics": sample.window_intrinsics.float().contiguous(),
        "depth_encoding": encoding,
        "depth_levels": levels,
        "depth_min": depth_min,
        "depth_max": depth_max,
        "depth_invalid_pixels": int((depth_code == 0).sum()),  # 0: every pixel has depth
    }
    return {
        ".jpg": _jpeg(sample.rgb.numpy(), jpeg_quality),
        depth_suffix: _jpeg(depth_code, jpeg_quality) if depth_format == "jpg" else _png(depth_code),
        ".camera.pt": _torch_bytes(camera),
        ".points.pt": _torch_bytes(sample.points.float().contiguous()),
    }


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    """Lossless PNG; a uint16 array becomes a 16-bit grayscale PNG (PIL mode I;16)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def read_index(path: str, repair: bool = False) -> list[dict]:
    """Records of an index file. A last line cut short by a kill is dropped (and cut from the file
    when `repair`): that sample counts as never committed, so the writer removes its files and the
    resumed video writes it again. A bad line anywhere else is damage, not a kill: an error, so
    that nothing after it is ever treated as uncommitted and deleted."""
    if not os.path.exists(path):
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no line end")
            records.append(json.loads(line))
        except ValueError as e:  # JSONDecodeError is a ValueError
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} of {len(lines)} is damaged ({e}); "
                             f"repair or remove that line, then rerun") from e
        good_bytes += len(line)
    if repair and good_bytes != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records
