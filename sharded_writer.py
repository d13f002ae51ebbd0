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

Written samples leave the page cache once they are on disk (posix_fadvise DONTNEED: writeback
starts as each file is written, the clean pages are dropped WRITTEN_LAG files later; a tar shard
is advised as a whole after every sample). A dataset is written once and read elsewhere: cached,
it only pushes the videos being decoded out of memory, and on a VM every MB of new page cache is
fresh host memory. Measured on the 2-core VM: a process writing 1.5 MB of files every 25 ms
slowed decoding in another process by 13 %; with its pages dropped, by nothing (NOTES.md).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
from collections import deque
from dataclasses import dataclass

from sample_format import (  # noqa: F401  (re-exported: the format's names, for callers of this module)
    DEFAULT_DEPTH_FORMAT, DEFAULT_FILES_PER_DIR, DEFAULT_JPEG_QUALITY, DEFAULT_SHARD_FORMAT, DEPTH_ENCODING,
    DEPTH_FORMATS, INDEX_NAME, SHARD_DIGITS, SHARD_FORMATS, TAR_SUFFIX, TMP_DIR, ResumeLog, Sample, decode_depth,
    drop_from_page_cache, encode_depth, encode_sample, index_record, mark_top_directory, read_index, resume_points,
    sample_payloads, sample_suffixes, stem_digits, write_payload)

WRITTEN_LAG = 64  # files written after a file before its pages are dropped (written back by then)


# ----------------------------------------------------------------------------- writer


@dataclass(frozen=True, order=True)
class Slot:  # ordered by (shard, stem)
    shard: int
    stem: int


class ShardedWriter:
    """Writes one rank's samples; reopening the same (root, rank) continues after the last one.

    Only one process may write a rank at a time (the orchestrator guarantees it with a lock).
    """

    def __init__(self, root: str, rank: int, files_per_dir: int = DEFAULT_FILES_PER_DIR,
                 jpeg_quality: int = DEFAULT_JPEG_QUALITY, shard_format: str = DEFAULT_SHARD_FORMAT,
                 depth_format: str = DEFAULT_DEPTH_FORMAT):
        if files_per_dir < 1:
            raise ValueError(f"files_per_dir must be >= 1, got {files_per_dir}")
        if shard_format not in SHARD_FORMATS:
            raise ValueError(f"shard_format must be one of {SHARD_FORMATS}, got {shard_format!r}")
        if depth_format not in DEPTH_FORMATS:
            raise ValueError(f"depth_format must be one of {tuple(DEPTH_FORMATS)}, got {depth_format!r}")
        self.shard_format, self.depth_format = shard_format, depth_format
        self.root = root
        self.rank_dir = os.path.join(root, str(rank))
        self.rank = rank
        self.files_per_dir = files_per_dir
        self.stem_digits = stem_digits(files_per_dir)
        self.jpeg_quality = jpeg_quality
        self.tmp_dir = os.path.join(self.rank_dir, TMP_DIR)
        self.index_path = os.path.join(self.rank_dir, INDEX_NAME)
        os.makedirs(self.rank_dir, exist_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # temp files of a killed run
        # every file is created in .tmp: made under a top directory, it lands in a block group of
        # its own, not in one whose recently deleted inodes slow each create (mark_top_directory)
        mark_top_directory(self.rank_dir)
        os.makedirs(self.tmp_dir)
        # Where the rank stands, from the resume log's last line and the index lines after it (the
        # index's half-written last line, if any, is cut): nothing is read per sample written before.
        self._log = ResumeLog(root, rank)
        for key, found, wanted in (("shard_format", {f[0] for f in self._log.formats}, shard_format),
                                   ("depth_format", {f[1] for f in self._log.formats}, depth_format)):
            if found - {wanted}:
                raise ValueError(f"{self.rank_dir} holds samples with {key} {sorted(found)}, this writer "
                                 f"was asked for {wanted!r}: one root holds one format")
        last = Slot(*self._log.last_slot) if self._log.last_slot is not None else Slot(0, -1)
        # A tar shard is never appended to once committed: a reopened tar writer starts a new one.
        self._next = self._after(last) if shard_format == "dir" or last.stem < 0 else Slot(last.shard + 1, 0)
        self.removed_orphans = self._remove_unindexed_after(last)
        self._index = open(self.index_path, "a", encoding="utf-8")
        self.samples_written = 0  # passed to write() by this writer (tar: committed or in the open shard)
        self.samples_committed = 0  # of those, visible and indexed
        self._tar: tarfile.TarFile | None = None  # the open tar shard, built under .tmp/
        self._tar_shard = -1
        self._pending: list[dict] = []  # index records of the open tar shard
        self._shard_made = -1  # dir shards: the shard folder this writer last created
        self._written: deque[str] = deque()  # dir shards: the last files written, to drop from the page cache

    @property
    def last_focal(self) -> dict[str, int]:
        """video -> highest focal frame in this rank's index (sample_format.resume_points, which
        reads the rank's resume log). For inspection: the pipeline resumes from VideoTask.after_focal."""
        return resume_points(self.root, ranks=[self.rank])

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
        if self.shard_format == "tar":
            payloads = encode_sample(sample, self.jpeg_quality, self.depth_format)
            record = self._record(slot, stem, sample, extra)
            self._add_to_tar(slot, stem, payloads)
            self._pending.append(record)
            self._next = self._after(slot)
            self.samples_written += 1
            if self._next.shard != slot.shard:
                self.flush()
            return record
        contents = sample_payloads(sample, self.jpeg_quality, self.depth_format)
        record = self._record(slot, stem, sample, extra)
        shard_dir = self.shard_dir(slot.shard)
        if slot.shard != self._shard_made:  # once per shard, not per sample
            os.makedirs(shard_dir, exist_ok=True)
            self._shard_made = slot.shard
        suffixes = sample_suffixes(self.depth_format)
        tmp_paths, renamed = [], []
        try:
            for suffix in suffixes:
                tmp = os.path.join(self.tmp_dir, stem + suffix)
                tmp_paths.append(tmp)
                write_payload(tmp, contents[suffix], start_writeback=True)  # .pt: torch.save into the file
            for suffix, tmp in zip(suffixes, tmp_paths):
                final = os.path.join(shard_dir, stem + suffix)
                if os.path.exists(final):  # never clobber: the index and the folders disagree
                    raise FileExistsError(f"refusing to overwrite {final}")
                os.rename(tmp, final)
                renamed.append(final)
            self._commit([record])  # the sample exists once this line does
            self._drop_written(renamed)
        except OSError:
            # A failed write, rename or index write (disk full, NFS): take the pieces back so the
            # slot is free again and the next sample can be written; this one is reported as failed.
            for path in renamed + tmp_paths:
                if os.path.exists(path):
                    os.remove(path)
            raise
        self._next = self._after(slot)
        self.samples_written += 1
        return record

    def _drop_written(self, paths: list[str]) -> None:
        """Remember `paths` (just written); drop the files written WRITTEN_LAG files before them
        from the page cache."""
        self._written.extend(paths)
        while len(self._written) > WRITTEN_LAG:
            try:
                fd = os.open(self._written.popleft(), os.O_RDONLY)
            except OSError:  # removed meanwhile: nothing to drop
                continue
            try:
                drop_from_page_cache(fd)
            finally:
                os.close(fd)

    def _record(self, slot: Slot, stem: str, sample: Sample, extra: dict | None) -> dict:
        return index_record(sample, self.rank, slot.shard, slot.stem, self.stem_digits, self.shard_format,
                            self.depth_format, extra)

    def _commit(self, records: list[dict]) -> None:
        """Append the index lines of visible samples, in one write."""
        if not records:
            return
        size = self._index.tell()
        lines = [(json.dumps(r) + "\n").encode() for r in records]
        try:
            self._index.write(b"".join(lines).decode())
            self._index.flush()
        except OSError:
            self._index.truncate(size)  # no half line for the next record to be glued to
            raise
        ends, end = [], size
        for line in lines:
            end += len(line)
            ends.append(end)
        self._log.committed(records, ends)  # after the index: the log is never ahead of it
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
            self._tar.fileobj.flush()
            drop_from_page_cache(self._tar.fileobj.fileno())  # the earlier samples' pages: written back by now
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
        Call it before reporting a video finished (its samples must be visible by then). Either
        way the rank's resume log gets a line for what is committed."""
        if self._tar is None:
            self._log.checkpoint()
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
        self._log.checkpoint()
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
