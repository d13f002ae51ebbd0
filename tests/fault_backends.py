"""Backends that fail the way a GPU does, for `--backend fault_backends:make_oom` and
`--backend fault_backends:make_poisoned` (tests/ on PYTHONPATH), around the oracle model.

make_oom: raises torch.cuda.OutOfMemoryError for any batch above FAULT_OOM_ABOVE windows (default
2), as a GPU too small for the requested --batch-size does.

make_poisoned: the first worker process to build one becomes "poisoned" (it creates the marker
file FAULT_DIR/poisoned first); from its FAULT_GOOD_CALLS+1-th call on (default: its 3rd) every
call raises RuntimeError("CUDA error: an illegal memory access was encountered"), as every CUDA
call does once a context is corrupt. Every other process (the replacement) works normally. Calls
are logged to FAULT_DIR/calls.jsonl: {"pid", "poisoned", "ok", "windows"}.
"""

from __future__ import annotations

import json
import os

import torch

import oracle_backend


class OutOfMemoryAbove:
    def __init__(self, model, limit: int):
        self.model, self.limit = model, limit

    def __call__(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        if frames.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (batch of {frames.shape[0]} windows, "
                f"this device holds {self.limit})")
        return self.model(frames)


def make_oom(device: str = "cpu", **options) -> OutOfMemoryAbove:
    return OutOfMemoryAbove(oracle_backend.make(device, **options), int(os.environ.get("FAULT_OOM_ABOVE", 2)))


class PoisonedContext:
    def __init__(self, model, folder: str, good_calls: int):
        self.model, self.folder, self.good_calls = model, folder, good_calls
        os.makedirs(folder, exist_ok=True)
        try:  # exactly one process ever wins the marker
            os.close(os.open(os.path.join(folder, "poisoned"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            self.poisoned = True
        except FileExistsError:
            self.poisoned = False
        self.calls = 0

    def __call__(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        ok = not (self.poisoned and self.calls > self.good_calls)
        with open(os.path.join(self.folder, "calls.jsonl"), "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "poisoned": self.poisoned, "ok": ok,
                                "windows": int(frames.shape[0])}) + "\n")
        if not ok:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\n"
                               "CUDA kernel errors might be asynchronously reported at some other API call")
        return self.model(frames)


def make_poisoned(device: str = "cpu", **options) -> PoisonedContext:
    return PoisonedContext(oracle_backend.make(device, **options), os.environ["FAULT_DIR"],
                           int(os.environ.get("FAULT_GOOD_CALLS", 2)))
