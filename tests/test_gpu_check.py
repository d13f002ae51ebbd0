"""gpu_check.py, the one-shot GPU check, runs here on the CPU with the tiny VGGT (so it cannot rot
before a GPU runs it): every section prints its table and the out-of-memory recovery passes."""

from __future__ import annotations

import pytest

import gpu_check


def test_gpu_check_runs_on_the_cpu_with_a_tiny_model(capsys, one_torch_thread):
    pytest.importorskip("vggt")
    code = gpu_check.main(["--tiny", "--device", "cpu", "--kernel", "3", "--height", "56", "--width", "112",
                           "--batch-sizes", "1", "2", "--extra", "5x2", "--iterations", "1", "--post-batch", "2",
                           "--clip-size", "160x32", "--clip-frames", "12", "--oom-batch", "4",
                           "--compile", "eager"])
    assert code == 0
    out = capsys.readouterr().out
    for heading in ("## forward", "## forward variants", "## post-processing", "## end to end",
                    "## out-of-memory recovery"):
        assert heading in out, out
    forward = out.split("## forward")[1].split("##")[0].splitlines()
    assert any(line.split("|")[:2] == ["    k3 ", "   1 "] for line in forward), forward
    assert any(line.split("|")[:2] == ["    k5 ", "   2 "] for line in forward), forward
    assert "upstream VGGT unpatched" in out
    variants = out.split("## forward variants")[1].split("##")[0].splitlines()
    names = [line.split("|")[0].strip() for line in variants if "|" in line][1:]
    assert names == ["tool: fp32 weights", "bf16 aggregator weights", "torch.compile eager"], variants
    assert "torch.compile graph breaks:" in out
    assert "post-processing:" in out and "ms/window" in out
    e2e = [line.split("|") for line in out.split("## end to end")[1].split("##")[0].splitlines() if "|" in line]
    assert [row[0].strip() for row in e2e[1:]] == ["1", "3"]
    assert [int(row[1]) for row in e2e[1:]] == [10, 4]  # 12 frames, kernel 3: strides 1 and 3
    assert "PASS: done, 8/8 samples" in out
