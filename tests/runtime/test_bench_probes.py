"""`bench` on any CPU: the machine's probes end within their budget however slow a call is,
bf16 is measured only where the CPU has instructions for it, every option is checked before
anything is measured, and Ctrl-C stops a run at once (its worker killed)."""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
from click.testing import CliRunner

from helpers import random_model
from infini_trt.export import preset, save_checkpoint
from infini_trt.runtime import bench, roofline
from infini_trt.runtime.bench import BenchSettings, run_bench
from infini_trt.runtime.bench_report import table
from infini_trt.runtime.cli import main
from infini_trt.runtime.cpu import cpu_features

TINY = preset("tiny")
N = TINY.segment_len


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint (torch and the peers need no export)."""
    path = tmp_path_factory.mktemp("bench") / "ckpt"
    save_checkpoint(random_model(TINY, dtype=torch.float32), path)
    return path


@pytest.fixture
def slow_mm(monkeypatch):
    """torch.mm as a CPU that emulates it would run it: `rate` FLOP/s (a sleep), so that the
    probe's sizing, not this machine's speed, decides how long it takes."""
    def use(rate: float):
        def mm(a, b, out=None):
            time.sleep(2.0 * a.shape[0] * a.shape[1] * b.shape[1] / rate)
            return out

        monkeypatch.setattr(torch, "mm", mm)     # roofline imports torch where it probes
    return use


@pytest.mark.parametrize("rate", [1e8, 1e10], ids=["emulated-1e8", "fast-1e10"])
def test_matmul_probe_ends_within_its_budget(slow_mm, rate):
    slow_mm(rate)
    t = time.perf_counter()
    probe = roofline.matmul_probe(torch.bfloat16, seconds=0.5)
    took = time.perf_counter() - t
    assert took < 0.5 + 0.1                       # a 2048^3 call would sleep 172 s at 1e8
    assert probe.first == pytest.approx(rate, rel=0.3)
    assert 2.0 * probe.size ** 3 / rate <= 0.25   # no call longer than half the budget
    t = time.perf_counter()
    assert probe(0.0) == pytest.approx(rate, rel=0.3)   # the rounds' call: best of 3
    assert time.perf_counter() - t < 3 * 2.0 * probe.size ** 3 / rate + 0.1


def test_probe_grows_until_a_call_would_overrun():
    """Sizes double while the sizes before predict that the next one fits: a call costing
    1 ms per unit stops at the size whose double would pass half the budget."""
    calls = []

    def make(size):
        return lambda: (calls.append(size), time.sleep(size * 1e-3))

    t = time.perf_counter()
    probe = roofline.Probe(make, float, [2 ** i for i in range(20)], (1, 2), seconds=0.4)
    assert time.perf_counter() - t < 0.4 + 0.05
    assert probe.size in (32, 64) and max(calls) == probe.size
    assert probe.first == pytest.approx(1e3, rel=0.3)


def test_bandwidth_probe_ends_within_its_budget():
    t = time.perf_counter()
    probe = roofline.bandwidth_probe(seconds=0.2)
    assert time.perf_counter() - t < 0.2 + 0.1
    assert probe.first > 1e8 and probe.size >= 1 << 22


def no_reduced_precision():
    return dict(cpu_features(), bf16=False, fp16=False)


def test_no_bf16_instructions_no_bf16_figures(ckpt, monkeypatch, tmp_path):
    """On a CPU without bf16 (or fp16) instructions: no bf16 probe, the report says so, and
    torch:bf16 / torch:fp16 are skipped with the reason; table, JSON and plot still work."""
    monkeypatch.setattr(roofline, "cpu_features", no_reduced_precision)
    measure = roofline.matmul_probe

    def fp32_only(dtype=torch.float32, *args, **kwargs):
        assert dtype == torch.float32, f"a {dtype} probe ran"
        return measure(dtype, *args, **kwargs)

    monkeypatch.setattr(roofline, "matmul_probe", fp32_only)
    settings = BenchSettings(lengths=(N,), decode_tokens=1, isolate=False, threads=1,
                             calibrate_s=0.05, rounds=0)
    report = run_bench(ckpt, ["torch", "torch:bf16", "torch:fp16"], settings,
                       log=lambda s: None)
    json.dumps(report)
    limits = report["limits"]
    assert limits["matmul_bf16_flops_per_s"] is None
    assert limits["bf16_not_measured"] == "no bf16 instructions on this CPU; not measured"
    assert limits["start"]["matmul_bf16_flops_per_s"] is None
    assert report["machine"]["cpu_features"]["bf16"] is False
    torch_fp32, bf16, fp16 = report["subjects"]
    assert torch_fp32["status"] == "ok" and torch_fp32["points"][0]["prefill_efficiency"] > 0
    for subject, name in ((bf16, "bf16"), (fp16, "fp16")):
        assert subject["status"] == "skipped" and not subject["points"]
        assert subject["reason"].startswith(f"no {name} instructions on this CPU")
    text = table(report)
    assert "bf16 - (no bf16 instructions on this CPU; not measured)" in text
    assert "torch:bf16: skipped: no bf16 instructions" in text
    pytest.importorskip("matplotlib")
    from infini_trt.runtime.bench_report import plot

    plot(report, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture
def no_probe(monkeypatch):
    """Fails the test if the machine is measured."""
    def probe(*args, **kwargs):
        pytest.fail("the machine was measured before the options were checked")

    for name in ("matmul_probe", "bandwidth_probe"):
        monkeypatch.setattr(roofline, name, probe)


@pytest.mark.parametrize("args, message", [
    (["--backends", "torch,foo"], "unknown backend 'foo'"),
    (["--peers", "lucidrains"], "unknown backend 'lucidrains'"),
    (["--backends", "none", "--peers", "none"], "nothing to measure"),
    (["--lengths", "4K,4X"], "bad length '4X'"),
    (["--lengths", "0"], "bad length '0'"),
    (["--batch", "0"], "Invalid value for '--batch'"),
], ids=["backend", "peer", "nothing", "length", "zero-length", "batch"])
def test_bench_rejects_bad_options_before_measuring(ckpt, no_probe, args, message):
    result = CliRunner().invoke(main, ["bench", str(ckpt), "--no-isolate", *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and "measuring" not in result.output


def test_bench_settings_are_checked():
    for bad in ({"lengths": ()}, {"lengths": (64, 0)}, {"lengths": (64,), "batch": 0},
                {"lengths": (64,), "calibrate_s": 0.0}, {"lengths": (64,), "rounds": -1}):
        with pytest.raises(bench.InputError):
            BenchSettings(**bad)


def test_subjects_are_resolved_before_the_machine_is_measured(ckpt, monkeypatch):
    events = []
    resolve, probe = bench.resolve, roofline.matmul_probe
    monkeypatch.setattr(bench, "resolve", lambda *a: events.append("resolve") or resolve(*a))
    monkeypatch.setattr(roofline, "matmul_probe",
                        lambda *a, **k: events.append("probe") or probe(*a, **k))
    settings = BenchSettings(lengths=(N,), decode_tokens=1, isolate=False, threads=1,
                             calibrate_s=0.05, rounds=0)
    run_bench(ckpt, ["full-attention", "torch"], settings, log=lambda s: None)
    assert events[:2] == ["resolve", "resolve"] and "probe" in events[2:]


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals and /proc: Linux")
@pytest.mark.parametrize("group", [False, True], ids=["to-bench", "to-process-group"])
def test_ctrl_c_stops_bench_at_once(ckpt, group):
    """SIGINT while a worker prefills a long prompt: bench ends within seconds with exit code
    130 and one line, and no process it started is left. Sent to bench alone, the worker must
    be killed (not waited for); sent to the process group (a terminal's Ctrl-C), the worker
    must not print a traceback of its own."""
    command = [sys.executable, "-m", "infini_trt.runtime.cli", "bench", str(ckpt),
               "--backends", "torch", "--peers", "none", "--lengths", f"{N},1M",
               "--decode-tokens", "1", "--calibrate", "0.05", "--rounds", "0",
               "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        lines = queue.Queue()
        threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + 120
        while "tokens: prefill" not in lines.get(timeout=max(0.0, deadline - time.monotonic())):
            pass                                    # the first length done: 1M under way
        started = psutil.Process(process.pid).children(recursive=True)
        assert started, "no worker process"
        time.sleep(0.5)
        t = time.monotonic()
        if group:
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        took = time.monotonic() - t
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert took < 5, f"bench took {took:.1f} s to stop"
    assert process.returncode == 130
    assert "interrupted" in stderr and "Traceback" not in stderr and "Warning" not in stderr
    _, alive = psutil.wait_procs(started, timeout=5)
    assert not alive, f"left running: {alive}"
