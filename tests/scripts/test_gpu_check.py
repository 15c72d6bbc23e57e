"""scripts/gpu_check.py on the CPU: the kernel checks and the benchmark run in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1); the CUDA-only checks say "skip"."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from infini_trt.plugins.memory_update import triton_kernel

SCRIPT = Path(__file__).parents[2] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    pytest.importorskip("triton")
    if not triton_kernel.interpreting():
        pytest.skip("Triton was imported without TRITON_INTERPRET=1")
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module                  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quick_run_on_cpu_prints_the_table_last(gpu_check, capsys):
    assert gpu_check.main(["--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    table = out[out.rindex("check "):]
    assert "kernel linear (2, 3, 37, 20, 12) float32" in table
    assert "kernel delta (2, 3, 37, 20, 12) float32" in table
    assert table.count(" skip ") == 4                    # AOT launch, JIT impl, 2 x CUDA graphs
    assert "FAIL" not in out
    assert "(1,2,40,16,16) delta bfloat16" in table.splitlines()[-1]


def test_a_wrong_kernel_fails_the_check(gpu_check, monkeypatch):
    def wrong(memory, norm, key, value, rule, eps, out):
        out[0].copy_(memory)
        out[1].copy_(norm)
        return out

    monkeypatch.setattr(gpu_check.triton_kernel, "memory_update", wrong)
    report = gpu_check.Report()
    gpu_check.kernel_checks(report, torch.device("cpu"), quick=True)
    assert report.failed and all(r.ok is False for r in report.rows)


def test_graphed_step_needs_cuda(gpu_check):
    report = gpu_check.Report()
    gpu_check.runner_graph_check(report, torch.device("cpu"))
    assert [r.ok for r in report.rows] == [None, None]
