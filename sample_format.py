"""The on-disk format of an output root, in one place: the Sample record, file names, formats, the
depth codec, the index record and camera.pt fields, index reading, and the resume log.

    OUT/run.json                         the parameters every sample of the root was made with
    OUT/videos.jsonl                     one line per finished / failed video (the driver's markers)
    OUT/.lock                            the running driver's lock
    OUT/<rank>/samples.jsonl             the rank's index: one line per committed sample (the truth)
    OUT/<rank>/<6 digits>/<stem>.*       dir shards (stem: 4 digits, more when files_per_dir > 10000)
    OUT/<rank>/<6 digits>.tar            ... or tar shards holding the same member names
    OUT/<rank>/.tmp/                     files being written (wiped when the rank is opened)
    OUT/<rank>/.lock                     the rank's writer lock
    OUT/<rank>/worker.log                what the rank's processes print
    OUT/.resume/<rank>.jsonl             the rank's resume log (derived from the index, see below)
    OUT/.index-cache/<rank>.columns      the loader's columnar copy of the index (dataset.py)

Both dot-folders are derived from the indexes and can be deleted at any time: the writer rebuilds
its resume log from the index (one full read, said in one line), the loader its cache.

The resume log has one line per *stretch*: consecutive index lines of one video, closed when the
video changes, when the writer flushes (the pipeline does at every video end), every
STRETCH_SAMPLES samples and on close. A line says the stretch's video and highest focal frame and
where the index stood after it (bytes, lines, last slot). So a rank opens by reading the log's last
line and the index after the point it names (the samples committed after that line: at most one
stretch), and a rerun's resume points come from the log (one line per stretch, not per sample).
The index is written first, the log line after: a kill in between leaves the log behind the index,
never ahead; a log that does not match its index (edited, truncated index) is rebuilt.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:  # numpy and torch load only where a function needs them: the driver imports
    import numpy as np  # this module before any work, and stays quick to start
    import torch

# ----------------------------------------------------------------------------- names and formats

INDEX_NAME = "samples.jsonl"
VIDEOS_FILE = "videos.jsonl"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
WORKER_LOG = "worker.log"  # OUT/<rank>/worker.log: everything a rank's processes print
TMP_DIR = ".tmp"
TAR_SUFFIX = ".tar"
RESUME_DIR = ".resume"
CACHE_DIR = ".index-cache"
SHARD_DIGITS = 6
SHARD_FORMATS = ("dir", "tar")
DEFAULT_SHARD_FORMAT = "dir"
DEFAULT_DEPTH_FORMAT = "jpg"
DEFAULT_FILES_PER_DIR = 500
DEFAULT_JPEG_QUALITY = 95
DEPTH_ENCODING = "inverse_depth_linear_uint8"
# depth_format -> (file suffix, code levels, camera.pt "depth_encoding")
DEPTH_FORMATS = {
    "jpg": (".depth.jpg", 255, DEPTH_ENCODING),
    "png16": (".depth.png", 65535, "inverse_depth_linear_uint16"),
}
STRETCH_SAMPLES = 1024  # a resume-log line at least this often: bounds the index tail read on open


def sample_suffixes(depth_format: str = DEFAULT_DEPTH_FORMAT) -> tuple[str, ...]:
    """The four file suffixes of one sample, in commit order (the RGB frame last)."""
    return (".points.pt", ".camera.pt", DEPTH_FORMATS[depth_format][0], ".jpg")


def stem_digits(files_per_dir: int) -> int:
    return max(4, len(str(files_per_dir - 1)))


def sample_id(rank: int, shard: int, stem: int, digits: int = 4) -> str:
    """"<rank>/<shard>/<stem>", e.g. "0/000000/0003": the sample's path under OUT without suffix."""
    return f"{rank}/{shard:0{SHARD_DIGITS}d}/{stem:0{digits}d}"


def index_path(root: str, rank: int) -> str:
    return os.path.join(root, str(rank), INDEX_NAME)


def resume_log_path(root: str, rank: int) -> str:
    return os.path.join(root, RESUME_DIR, f"{rank}.jsonl")


def rank_numbers(root: str) -> list[int]:
    """The ranks that have a folder in the root, in order."""
    if not os.path.isdir(root):
        return []
    return sorted(int(n) for n in os.listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n)))


# ----------------------------------------------------------------------------- the sample record


@dataclass
class Sample:
    """One training sample: the focal frame of one window, on the CPU, ready for the writer.

    All geometry is in the window's world frame (`world_frame`: the camera of the window's
    earliest frame, or of its focal frame), in the model's units (VGGT: up to scale, per window).
    Pixel grid: the model's H x W, pixel centres at integer coordinates.
    """

    video: str
    frame_index: int  # focal frame's index in the video
    timestamp: float  # seconds
    fps: float
    dilation: int
    window_frame_indices: list[int]  # time order, focal in the middle
    window_timestamps: list[float]
    world_frame: str  # "first" | "focal"
    rgb: torch.Tensor  # uint8 [H, W, 3], the focal frame exactly as the model saw it
    depth: torch.Tensor  # float32 [H, W], z-depth of the focal frame along its camera's forward axis
    extrinsic: torch.Tensor  # float32 [3, 4], focal camera, world-to-camera, OpenCV (x right, y down, z forward)
    intrinsic: torch.Tensor  # float32 [3, 3], focal camera, pixels of `rgb`
    window_extrinsics: torch.Tensor  # float32 [S, 3, 4], time order
    window_intrinsics: torch.Tensor  # float32 [S, 3, 3], time order
    points: torch.Tensor  # float32 [N, 6]: x y z (world) r g b (in [0, 1]), from all S frames
    quality: dict[str, float] = field(default_factory=dict)  # confidence percentiles, kept fraction, depth range
    shot_index: int = 0  # the shot's index in the video (0 with --shots off)
    shot_first_frame: int = 0  # first frame of the shot (inclusive)
    shot_last_frame: int = -1  # last frame of the shot (inclusive); -1: not known when written
    #                            (videos.jsonl "shots" has the final boundaries)


# ----------------------------------------------------------------------------- depth codec


def encode_depth(depth: torch.Tensor, levels: int = 255) -> tuple[np.ndarray, float, float]:
    """float depth [H, W] -> (integer image [H, W], depth_min, depth_max).

    Inverse depth mapped linearly onto 1..levels over [1/depth_max, 1/depth_min]: 1 is the
    farthest point, `levels` the nearest; near surfaces, where a VAE cares most, get the finest
    steps. 0 marks pixels with no valid depth (<= 0 or not finite). Codes are rounded half up.
    """
    import numpy as np
    import torch

    dtype = np.uint8 if levels <= 255 else np.uint16
    d = (depth if depth.dtype in (torch.float32, torch.float64) else depth.double()).numpy()
    if d.size:
        # Every pixel valid (VGGT: always): min and max of the map itself (NaN propagates, so the
        # test below fails on any NaN) and no masked copies: four passes over the map in all.
        d_min, d_max = float(d.min()), float(d.max())
        if d_min > 0 and d_max < float("inf"):
            inv_far, inv_near = 1.0 / d_max, 1.0 / d_min
            span = max(inv_near - inv_far, 1e-12)
            if span * 1e7 >= inv_near:  # else scale / d and the offset cancel too much (a near-constant map)
                # code = 1 + (1/d - inv_far) / span * (levels - 1) = scale / d + offset; + 0.5 and the
                # cast's truncation round half up (today's codes but at exact ties). The code is in
                # [1, levels] up to ~1e-9 of a level, so no clip.
                scale = (levels - 1) / span
                code = np.divide(scale, d, dtype=np.float64)
                code += 1.5 - inv_far * scale
                return code.astype(dtype), d_min, d_max
            # a (near-)constant map: the masked path's formula, without its masks (a tenth of its cost)
            code = _inverse_depth_code(d.astype(np.float64, copy=False), inv_far, span, levels)
            return _rounded(code, levels, dtype), d_min, d_max
    d = d.astype(np.float64, copy=False)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(d) & (d > 0)
    if not valid.any():
        return np.zeros(d.shape, dtype), 0.0, 0.0
    d_min, d_max = float(d[valid].min()), float(d[valid].max())
    inv_far, inv_near = 1.0 / d_max, 1.0 / d_min
    span = max(inv_near - inv_far, 1e-12)
    code = np.zeros(d.shape, np.float64)
    code[valid] = _inverse_depth_code(d[valid], inv_far, span, levels)
    return _rounded(code, levels, dtype), d_min, d_max


def _inverse_depth_code(d: np.ndarray, inv_far: float, span: float, levels: int) -> np.ndarray:
    """float64 depth -> its unrounded code, 1 (farthest) .. levels (nearest)."""
    return 1 + (1.0 / d - inv_far) / span * (levels - 1)


def _rounded(code: np.ndarray, levels: int, dtype) -> np.ndarray:
    """Unrounded float64 codes (overwritten) -> integer codes, rounded half up, within [0, levels]."""
    import numpy as np

    return np.clip(np.floor(code + 0.5, out=code), 0, levels, out=code).astype(dtype)


def decode_depth(code: np.ndarray, depth_min: float, depth_max: float, levels: int = 255,
                 all_valid: bool = False) -> np.ndarray:
    """Inverse of encode_depth: integer image -> float32 depth [H, W], 0 where no depth was stored.

    all_valid: the map had no invalid pixel (camera.pt "depth_invalid_pixels" == 0, always so for
    VGGT), so a 0 read back can only be JPEG noise on the farthest level: decode it as depth_max
    instead of "no depth"."""
    import numpy as np

    code = code.astype(np.float64)
    if depth_max <= 0:
        return np.zeros(code.shape, np.float32)
    inv_far, inv_near = 1.0 / depth_max, 1.0 / depth_min
    inv = inv_far + (np.clip(code, 1, levels) - 1) / (levels - 1) * (inv_near - inv_far)
    return (1.0 / inv if all_valid else np.where(code > 0, 1.0 / inv, 0.0)).astype(np.float32)


# ----------------------------------------------------------------------------- fields of a sample


def sample_fields(sample: Sample) -> dict:
    """What the index record and camera.pt both say about a sample (same names, same values)."""
    return {
        "video": sample.video,
        "frame_index": int(sample.frame_index),
        "timestamp": float(sample.timestamp),
        "dilation": sample.dilation,
        "height": int(sample.rgb.shape[0]),
        "width": int(sample.rgb.shape[1]),
        "shot_index": int(sample.shot_index),
        "shot_first_frame": int(sample.shot_first_frame),
        "shot_last_frame": int(sample.shot_last_frame),
    }


def index_record(sample: Sample, rank: int, shard: int, stem: int, digits: int, shard_format: str,
                 depth_format: str, extra: dict | None = None) -> dict:
    """The sample's line in OUT/<rank>/samples.jsonl."""
    fields = sample_fields(sample)
    return {
        "sample": sample_id(rank, shard, stem, digits),
        "rank": rank,
        "shard": shard,
        "stem": stem,
        "video": fields.pop("video"),
        "frame_index": fields.pop("frame_index"),
        "timestamp": sample.timestamp,
        "window_frame_indices": sample.window_frame_indices,
        "dilation": fields.pop("dilation"),
        "num_points": int(sample.points.shape[0]),
        **{k: v for k, v in fields.items() if k != "timestamp"},
        **{k: round(float(v), 6) for k, v in sample.quality.items()},
        "shard_format": shard_format,
        "depth_format": depth_format,
        **(extra or {}),
    }


def camera_record(sample: Sample, depth_code: np.ndarray, depth_min: float, depth_max: float,
                  depth_format: str) -> dict:
    """camera.pt: cameras, provenance and what turns the stored depth image back into depth."""
    import numpy as np
    import torch

    _, levels, encoding = DEPTH_FORMATS[depth_format]
    return {
        **sample_fields(sample),
        "extrinsic": sample.extrinsic.float().contiguous(),
        "intrinsic": sample.intrinsic.float().contiguous(),
        "fps": float(sample.fps),
        "world_frame": sample.world_frame,
        "window_frame_indices": torch.tensor(sample.window_frame_indices, dtype=torch.int64),
        "window_timestamps": torch.tensor(sample.window_timestamps, dtype=torch.float64),
        "window_extrinsics": sample.window_extrinsics.float().contiguous(),
        "window_intrinsics": sample.window_intrinsics.float().contiguous(),
        "depth_encoding": encoding,
        "depth_levels": levels,
        "depth_min": depth_min,
        "depth_max": depth_max,
        "depth_invalid_pixels": int(depth_code.size - np.count_nonzero(depth_code)),  # 0: every pixel has depth
    }


@dataclass(frozen=True)
class Picture:
    """An image file's contents before encoding: uint8 [H, W, 3] or [H, W] (or uint16 [H, W] for
    PNG) pixels, the PIL format name and its save options. Encoded when written (see save)."""

    pixels: np.ndarray
    format: str  # "JPEG" or "PNG"
    options: tuple[tuple[str, int], ...] = ()

    def save(self, f) -> None:
        """Encode into the open binary file `f`. Into a real file PIL encodes without holding the
        GIL (encode_to_file); into a BytesIO it holds it throughout (~1 ms a 518x294 JPEG, time the
        decoder thread cannot run Python)."""
        from PIL import Image

        Image.fromarray(self.pixels).save(f, format=self.format, **dict(self.options))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.save(buffer)
        return buffer.getvalue()


def _jpeg(pixels: np.ndarray, quality: int) -> Picture:
    return Picture(pixels, "JPEG", (("quality", quality),))


def _png(pixels: np.ndarray) -> Picture:
    """Lossless PNG; a uint16 array becomes a 16-bit grayscale PNG (PIL mode I;16)."""
    return Picture(pixels, "PNG")


def sample_payloads(sample: Sample, jpeg_quality: int = DEFAULT_JPEG_QUALITY,
                    depth_format: str = DEFAULT_DEPTH_FORMAT) -> dict[str, Picture | dict | torch.Tensor]:
    """Sample -> the contents of its four files, keyed by suffix, not yet encoded: the images
    (".jpg", ".depth.jpg" or ".depth.png") as Pictures, and what torch.save writes for the others
    (".camera.pt": the camera record, ".points.pt": float32 [N, 6]). write_payload / encode_sample
    finish them."""
    depth_suffix, levels, _ = DEPTH_FORMATS[depth_format]
    depth_code, depth_min, depth_max = encode_depth(sample.depth, levels)
    return {
        ".jpg": _jpeg(sample.rgb.numpy(), jpeg_quality),
        depth_suffix: _jpeg(depth_code, jpeg_quality) if depth_format == "jpg" else _png(depth_code),
        ".camera.pt": camera_record(sample, depth_code, depth_min, depth_max, depth_format),
        ".points.pt": sample.points.float().contiguous(),
    }


def encode_sample(sample: Sample, jpeg_quality: int = DEFAULT_JPEG_QUALITY,
                  depth_format: str = DEFAULT_DEPTH_FORMAT) -> dict[str, bytes]:
    """Sample -> bytes of its four files, keyed by suffix (".jpg", ".depth.jpg" or ".depth.png",
    ".camera.pt", ".points.pt")."""
    return {suffix: payload.to_bytes() if isinstance(payload, Picture) else _torch_bytes(payload)
            for suffix, payload in sample_payloads(sample, jpeg_quality, depth_format).items()}


def write_payload(path: str, payload: Picture | dict | torch.Tensor, start_writeback: bool = False) -> None:
    """Write one file of sample_payloads at `path` (created or truncated), the same bytes
    encode_sample gives, encoded straight into the open file: a Picture by PIL, a torch object by
    torch.save (no copy in memory; a file object, not the path, so that the archive inside is named
    "archive" as for bytes, not after the file). `start_writeback`: queue the file for the disk
    now (see drop_from_page_cache), so that a later drop_from_page_cache finds its pages clean."""
    with open(path, "wb") as f:
        if isinstance(payload, Picture):
            payload.save(f)
        else:
            import torch

            torch.save(payload, f)
        if start_writeback:
            f.flush()
            drop_from_page_cache(f.fileno())


def drop_from_page_cache(fd: int) -> None:
    """posix_fadvise(DONTNEED) on a whole file: Linux drops its clean cached pages and starts
    writing the dirty ones back, so a second call once they are on disk drops those too. A no-op
    where the call does not exist; errors are ignored (advice only)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000  # linux/fs.h


def mark_top_directory(path: str) -> bool:
    """Flag the folder `path` as the top of a directory hierarchy (`chattr +T`), so that ext4 puts
    each folder made in it in a block group of its own choosing, with free inodes and few folders,
    instead of beside its parent. Why: ext4 without a journal skips every inode deleted in the
    last 1-6 minutes when it allocates one (`recently_deleted`), scanning the parent's group from
    its start for each new file; after a few thousand files were deleted there (an old output
    folder removed, a test run), creating each file of a sample cost 0.3-1 ms of CPU, against
    0.02 ms in a folder of a fresh group (NOTES.md). Advice only: False where the file system or
    platform has no such flag (nothing else changes)."""
    try:
        import fcntl
        import struct

        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (ImportError, OSError):
        return False
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("i", 0)))[0]
        if not flags & _FS_TOPDIR_FL:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", flags | _FS_TOPDIR_FL))
        return True
    except OSError:  # ENOTTY / EOPNOTSUPP / EPERM: a file system without the flag
        return False
    finally:
        os.close(fd)


def _torch_bytes(obj) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- JSON Lines files

READ_CHUNK = 1 << 20


def complete_chunks(path: str, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(offset, block) of the file from byte `start`, read about READ_CHUNK bytes at a time (memory
    does not grow with the file), each block holding only whole lines (each ends with a newline).
    A last line without its newline (cut by a kill while being appended) is never yielded."""
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        offset, rest = start, b""
        while chunk := f.read(READ_CHUNK):
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            body, rest = data[:cut], data[cut:]
            if body:
                yield offset, body
                offset += len(body)


def complete_lines(path: str, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(offset, line without its newline) of every whole line from byte `start`, in order (see
    complete_chunks). The line's end is offset + len(line) + 1."""
    for offset, body in complete_chunks(path, start):
        for line in body.split(b"\n")[:-1]:
            yield offset, line
            offset += len(line) + 1


def iter_records(path: str, start: int = 0, repair: bool = False, first_line: int = 1) -> Iterator[tuple[int, dict]]:
    """(end offset, record) of an index-like JSON Lines file from byte `start` (line number
    `first_line`). A last line cut short by a kill is dropped (and cut from the file when
    `repair`): that sample counts as never committed. A bad line anywhere else is damage, not a
    kill: an error, so that nothing after it is ever treated as uncommitted and deleted."""
    if not os.path.exists(path):
        return
    size = os.path.getsize(path)
    good = start
    number = first_line - 1
    for offset, line in complete_lines(path, start):
        number += 1
        try:
            record = json.loads(line)
        except ValueError as e:  # JSONDecodeError is a ValueError
            if offset + len(line) + 1 >= size:  # the last line: a kill mid-append
                break
            raise _damaged(path, number, offset, e) from e
        good = offset + len(line) + 1
        yield good, record
    if repair and good != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good)


def _damaged(path: str, number: int, offset: int, error: Exception) -> ValueError:
    """The error for a bad line `number` (at byte `offset`) that is not the file's last line."""
    total = number - 1 + sum(1 for _ in complete_lines(path, offset)) + (0 if _ends_with_newline(path) else 1)
    return ValueError(f"{path}: line {number} of {total} is damaged ({error}); repair or remove that line, then rerun")


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_index(path: str, repair: bool = False) -> list[dict]:
    """Every record of an index file (see iter_records). Holds them all: for small files and
    tests; the writer, driver and loader read indexes incrementally."""
    return [record for _, record in iter_records(path, repair=repair)]


def line_before(path: str, end: int) -> bytes | None:
    """The complete line that ends exactly at byte `end` (with its newline), or None."""
    if end <= 0:
        return None
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < end:
            return None
        span = 4096
        while True:
            begin = max(0, end - span)
            f.seek(begin)
            data = f.read(end - begin)
            if not data.endswith(b"\n"):
                return None
            cut = data.rfind(b"\n", 0, len(data) - 1)
            if cut >= 0 or begin == 0:
                return data[cut + 1:]
            span *= 4


def last_complete_line(path: str) -> tuple[int, bytes] | None:
    """(end offset, line) of the file's last line that ends with a newline, or None."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        span = 4096
        while size:
            begin = max(0, size - span)
            f.seek(begin)
            data = f.read(size - begin)
            end = data.rfind(b"\n")
            if end >= 0:
                cut = data.rfind(b"\n", 0, end)
                if cut >= 0 or begin == 0:
                    return begin + end + 1, data[cut + 1:end + 1]
            if begin == 0:
                return None
            span *= 4
    return None


def iter_video_status(root: str, repair: bool = False) -> Iterator[dict]:
    """The lines of OUT/videos.jsonl, in order (`repair`: cut a last line left half-written by a
    kill; only while holding the root's lock)."""
    for _, record in iter_records(os.path.join(root, VIDEOS_FILE), repair=repair):
        yield record


FINISHED = ("done", "no_windows")


# ----------------------------------------------------------------------------- the resume log


@dataclass
class Stretch:
    """One line of a rank's resume log: consecutive index lines of one video, and where the index
    stood after them."""

    video: str
    last_focal: int  # highest focal frame of the stretch
    samples: int  # index lines in the stretch
    index_bytes: int  # the index's size after the stretch
    index_lines: int  # the index's line count after the stretch
    shard: int  # slot of the stretch's last sample
    stem: int
    shard_format: str = DEFAULT_SHARD_FORMAT
    depth_format: str = DEFAULT_DEPTH_FORMAT

    def line(self) -> str:
        return json.dumps(self.__dict__) + "\n"


def _stretch(line: bytes) -> Stretch | None:
    try:
        return Stretch(**json.loads(line))
    except (ValueError, TypeError):
        return None


def _matches(stretch: Stretch, index: str) -> bool:
    """Does the index hold, ending exactly at stretch.index_bytes, the stretch's last sample?"""
    line = line_before(index, stretch.index_bytes)
    if line is None:
        return False
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return (record.get("shard"), record.get("stem"), record.get("video")) == (
        stretch.shard, stretch.stem, stretch.video)


def valid_log_end(root: str, rank: int) -> Stretch | None:
    """The last line of the rank's resume log when it agrees with the rank's index, else None (no
    log, an empty one, or one that does not describe this index)."""
    last = last_complete_line(resume_log_path(root, rank))
    if last is None:
        return None
    stretch = _stretch(last[1])
    if stretch is None or not _matches(stretch, index_path(root, rank)):
        return None
    return stretch


def needs_upgrade(root: str, rank: int) -> bool:
    """Will the rank's writer build its resume log from a full read of its index on opening?"""
    index = index_path(root, rank)
    return os.path.exists(index) and os.path.getsize(index) > 0 and valid_log_end(root, rank) is None


class _StretchBuilder:
    """Turns index records (in order, with the index size after each) into Stretch lines."""

    def __init__(self, lines: int = 0):
        self.open: Stretch | None = None
        self.lines = lines

    def add(self, record: dict, end: int) -> Stretch | None:
        """Add one committed record; returns a stretch that closed because the video changed."""
        closed = None
        if self.open is not None and self.open.video != record["video"]:
            closed, self.open = self.open, None
        self.lines += 1
        s = self.open
        if s is None:
            s = self.open = Stretch(record["video"], record["frame_index"], 0, end, self.lines, record["shard"],
                                    record["stem"], record.get("shard_format", DEFAULT_SHARD_FORMAT),
                                    record.get("depth_format", DEFAULT_DEPTH_FORMAT))
        s.last_focal = max(s.last_focal, record["frame_index"])
        s.samples += 1
        s.index_bytes, s.index_lines, s.shard, s.stem = end, self.lines, record["shard"], record["stem"]
        return closed

    def close(self) -> Stretch | None:
        closed, self.open = self.open, None
        return closed


class ResumeLog:
    """The writer's side of a rank's resume log (the writer holds the rank's lock).

    Opening brings the log level with the index: the index lines after the log's last stretch are
    read (the index's last line is cut if a kill left it half-written) and logged; a root written
    before the log existed, or a log that does not match its index, is rebuilt by one full read of
    the index, said in one line on stderr. After opening: `lines` (samples indexed), `last_slot`
    ((shard, stem) of the last one, None when empty), `formats` (shard and depth formats seen in
    the stretches read).
    """

    def __init__(self, root: str, rank: int):
        self.root, self.rank = root, rank
        self.path = resume_log_path(root, rank)
        self.index = index_path(root, rank)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.formats: set[tuple[str, str]] = set()
        self.last_slot: tuple[int, int] | None = None
        self.lines = 0
        self._failed = False
        end = valid_log_end(root, rank)
        index_size = os.path.getsize(self.index) if os.path.exists(self.index) else 0
        if end is None and index_size > 0:
            kind = "an older root without one" if not os.path.exists(self.path) else "it does not match the index"
            print(f"{os.path.join(root, str(rank))}: building the resume log {self.path} ({kind}): "
                  f"one full read of {INDEX_NAME}", file=sys.stderr)
        if end is None:
            self._reset()
            start = 0
        else:
            self._cut_log_tail()
            self.formats.add((end.shard_format, end.depth_format))
            self.last_slot, self.lines = (end.shard, end.stem), end.index_lines
            start = end.index_bytes
        pending: list[Stretch] = []
        for stretch in scan_stretches(self.index, start, self.lines, repair=True):
            pending.append(stretch)
            if len(pending) >= 256:
                self._append(pending)
                pending = []
        self._append(pending)
        self._builder = _StretchBuilder(self.lines)

    def _reset(self) -> None:
        """An empty log (atomically), to be rebuilt from the index."""
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8"):
            pass
        os.replace(tmp, self.path)

    def _cut_log_tail(self) -> None:
        """Cut a half-written last log line (a kill while appending)."""
        last = last_complete_line(self.path)
        size = os.path.getsize(self.path)
        if last is not None and last[0] != size:
            with open(self.path, "r+b") as f:
                f.truncate(last[0])

    def _append(self, stretches: list[Stretch]) -> None:
        """Log stretches. The log only speeds things up (the index is the truth): after a failed
        append (taken back) nothing more is logged by this writer, so the log never has a gap;
        the next open reads the longer index tail instead."""
        if not stretches:
            return
        for s in stretches:
            self.formats.add((s.shard_format, s.depth_format))
            self.last_slot, self.lines = (s.shard, s.stem), s.index_lines
        if self._failed:
            return
        try:
            with open(self.path, "ab") as f:
                size = f.tell()
                try:
                    f.write("".join(s.line() for s in stretches).encode())
                    f.flush()
                except OSError:
                    f.truncate(size)
                    raise
        except OSError as e:
            self._failed = True
            print(f"{self.path}: cannot append ({e}); the next start reads more of {INDEX_NAME}", file=sys.stderr)

    def committed(self, records: Iterable[dict], ends: Iterable[int]) -> None:
        """Records just appended to the index (ends: the index size after each)."""
        done = []
        for record, end in zip(records, ends):
            closed = self._builder.add(record, end)
            if closed is not None:
                done.append(closed)
            if self._builder.open.samples >= STRETCH_SAMPLES:
                done.append(self._builder.close())
        self._append(done)

    def checkpoint(self) -> None:
        """Log the open stretch (at a video end, a flush, a close)."""
        s = self._builder.close()
        if s is not None:
            self._append([s])


_VIDEO_FIELD = re.compile(rb'"video": "([^"\\\n]*)"')  # json.dumps' own separators, no escapes
_FRAME_FIELD = re.compile(rb'"frame_index": (-?[0-9]+)[,}]')


def scan_stretches(path: str, start: int = 0, lines: int = 0, repair: bool = False) -> Iterator[Stretch]:
    """The stretches of an index from byte `start` (after `lines` lines), as the writer would have
    logged them (a new one when the video changes and every STRETCH_SAMPLES samples). Fast (an
    upgrade reads millions of lines): a chunk whose every line holds one "video" and one
    "frame_index" as json.dumps writes them is read with two regular expressions, and a line is
    parsed in full only where a stretch ends; any other chunk is parsed line by line. A bad last line is a kill (dropped, and cut when `repair`); a bad
    line elsewhere is an error, as in iter_records."""
    if not os.path.exists(path):
        return
    size = os.path.getsize(path)
    key, focal, count, end, last_line = None, -1, 0, start, b""
    number = lines

    def close() -> Stretch:
        record = json.loads(last_line)
        return Stretch(record["video"], focal, count, end, number, record["shard"], record["stem"],
                       record.get("shard_format", DEFAULT_SHARD_FORMAT),
                       record.get("depth_format", DEFAULT_DEPTH_FORMAT))

    for offset, body in complete_chunks(path, start):
        chunk_lines = body.split(b"\n")
        chunk_lines.pop()
        n = len(chunk_lines)
        videos, frames = _VIDEO_FIELD.findall(body), _FRAME_FIELD.findall(body)
        if not (len(videos) == len(frames) == n and body.count(b"}\n") == n):
            videos, frames = [], []
            for i, line in enumerate(chunk_lines):
                try:
                    record = json.loads(line)
                    video, frame = record["video"], int(record["frame_index"])
                except (ValueError, KeyError, TypeError) as e:
                    line_end = offset + sum(len(x) + 1 for x in chunk_lines[:i + 1])
                    if line_end >= size:  # the file's last line: a kill mid-append
                        chunk_lines = chunk_lines[:i]
                        break
                    raise _damaged(path, number + i + 1, line_end - len(line) - 1, e) from e
                videos.append(video)
                frames.append(frame)
        ends = list(itertools.accumulate(map(len, chunk_lines)))  # + i + 1 newlines
        i = 0
        for video, group in itertools.groupby(videos):  # runs of one video: no work per line
            run_end = i + sum(1 for _ in group)
            while i < run_end:
                if count and (video != key or count >= STRETCH_SAMPLES):
                    yield close()
                    count, focal = 0, -1
                take = min(run_end - i, STRETCH_SAMPLES - count)
                focal = max(focal, max(map(int, frames[i:i + take])))
                key, count, number = video, count + take, number + take
                i += take
                end, last_line = offset + ends[i - 1] + i, chunk_lines[i - 1]
    if count:
        yield close()
    if repair and end != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(end)


def resume_points(root: str, ranks: Iterable[int] | None = None, skip: Iterable[str] = (),
                  only: Iterable[str] | None = None) -> dict[str, int]:
    """video -> highest focal frame written, over the given ranks (default all). The one place
    that says where a video resumes: the driver calls it before handing videos out and when a
    worker dies; the writer's `last_focal` is this, for its rank.

    Reads each rank's resume log (one line per stretch of one video, not per sample) and the index
    lines after it; a rank whose log is missing or does not match its index (a root from before
    the log, being upgraded by its writer) is read in full. Read only. `skip`: videos not wanted
    (e.g. the finished ones); `only`: the videos wanted. Memory: one entry per wanted video."""
    skip = skip if isinstance(skip, (set, frozenset, dict)) else set(skip)
    only = None if only is None else set(only)
    last: dict[str, int] = {}

    def note(video: str, focal: int) -> None:
        if video in skip or (only is not None and video not in only):
            return
        if focal > last.get(video, -1):
            last[video] = focal

    for rank in (rank_numbers(root) if ranks is None else ranks):
        index = index_path(root, rank)
        if not os.path.exists(index):
            continue
        end = valid_log_end(root, rank)
        start, first = 0, 1
        if end is not None:
            for _, line in complete_lines(resume_log_path(root, rank)):
                stretch = _stretch(line)
                if stretch is None:  # a damaged log line: read the whole index instead
                    start, first = 0, 1
                    break
                note(stretch.video, stretch.last_focal)
                if stretch.index_bytes >= end.index_bytes:
                    start, first = end.index_bytes, end.index_lines + 1
                    break
        for stretch in scan_stretches(index, start, first - 1):
            note(stretch.video, stretch.last_focal)
    return last
