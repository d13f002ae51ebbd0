"""Shared test setup: product modules (repo root) and test helpers (tests/) import by plain name,
e.g. `import window`, `import videos`, however pytest is started."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


@pytest.fixture
def one_torch_thread():
    """torch CPU ops on one thread for the test: on a small shared machine, intra-op threads
    waiting for each other made frame resizing ~10x slower than running single-threaded."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
