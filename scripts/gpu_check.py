"""GPU checks that need no TensorRT (run by scripts/gpu_check.sh on a CUDA machine).

    1. the Triton memory-update kernel on CUDA vs the float64 reference (linear, delta, odd
       sizes, fp16/bf16 keys and values, outputs poisoned with NaN first);
    2. its ahead-of-time PTX for this GPU, launched through the CUDA driver exactly as
       TensorRT's AOT plugin launches it (input pointers, int32 scalars, output pointers);
    3. the TensorRT JIT plugin's enqueue path (`run_update`) on device pointers wrapped like
       TensorRT's `trtp.Tensor` (bf16 included), on an external stream;
    4. the PyTorch CUDA runner vs the same model stepped through CUDA graphs (one per segment
       length and state-buffer parity), with the reference update and with the kernel;
    5. the kernel's time vs the plain PyTorch update, and its achieved bandwidth vs the
       device's copy bandwidth;
and prints a short table last. Exit code 1 if a check fails.

Every function takes a device: on a CPU with TRITON_INTERPRET=1 the kernel parts run in
Triton's interpreter (how tests/scripts/test_gpu_check.py runs them) and the CUDA-only parts
report "skipped".
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from infini_trt.export import reference
from infini_trt.plugins.memory_update import tensorrt_plugin, triton_kernel
from infini_trt.plugins.memory_update.reference import random_inputs
from infini_trt.runtime.metrics import errors

EPS = 1e-6
TOL = 2e-6            # relative RMS vs float64: all of the kernel's arithmetic is fp32


@dataclass
class Row:
    check: str
    ok: bool | None                # None: skipped
    detail: str


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    bench: list[dict] = field(default_factory=list)

    def add(self, check: str, ok: bool | None, detail: str) -> None:
        self.rows.append(Row(check, ok, detail))
        status = "skip" if ok is None else ("ok" if ok else "FAIL")
        print(f"[{status}] {check}: {detail}", flush=True)

    @property
    def failed(self) -> bool:
        return any(r.ok is False for r in self.rows)

    def table(self) -> str:
        lines = [f"{'check':54s} {'result':6s} detail"]
        for r in self.rows:
            status = "skip" if r.ok is None else ("ok" if r.ok else "FAIL")
            lines.append(f"{r.check:54s} {status:6s} {r.detail}")
        if self.bench:
            lines += ["", f"{'update (B,H,S,dk,dv) rule dtype':54s} {'kernel':>9s} "
                          f"{'torch':>9s} {'speedup':>8s} {'GB/s':>8s} {'of copy':>8s}"]
            for b in self.bench:
                lines.append(f"{b['case']:54s} {b['kernel_ms']:7.3f}ms {b['torch_ms']:7.3f}ms "
                             f"{b['speedup']:7.2f}x {b['gb_s']:8.1f} {b['of_copy']:7.1%}")
        return "\n".join(lines)


def compare(inputs, outputs, rule) -> tuple[float, bool]:
    """(worst relative RMS of memory_out/norm_out vs float64, all finite)."""
    want = reference.memory_update(*(t.double().cpu() for t in inputs), rule, EPS)
    errs = [errors(w, g.cpu()) for w, g in zip(want, outputs)]
    return max(e.rel_rms for e in errs), all(e.finite for e in errs)


KERNEL_CASES = [  # rule, (B, H, S, dk, dv), dtype, empty memory
    ("linear", (2, 3, 37, 20, 12), torch.float32, False),
    ("delta", (2, 3, 37, 20, 12), torch.float32, False),
    ("delta", (1, 2, 200, 72, 80), torch.float32, False),
    ("delta", (1, 2, 9, 16, 16), torch.float32, True),
    ("linear", (2, 4, 1, 64, 64), torch.float16, False),
    ("delta", (3, 8, 300, 64, 64), torch.float16, False),
    ("linear", (2, 8, 1000, 128, 128), torch.bfloat16, False),
    ("delta", (2, 8, 513, 96, 128), torch.bfloat16, False),
]


def kernel_checks(report: Report, device: torch.device, quick: bool = False) -> None:
    cases = KERNEL_CASES[:2] if quick else KERNEL_CASES
    for rule, shape, dtype, empty in cases:
        inputs = random_inputs(*shape, dtype, device, seed=sum(shape), empty=empty)
        outs = (torch.full_like(inputs[0], float("nan")), torch.full_like(inputs[1], float("nan")))
        triton_kernel.memory_update(*inputs, rule, EPS, out=outs)
        err, finite = compare(inputs, outs, rule)
        name = f"kernel {rule} {tuple(shape)} {str(dtype)[6:]}{' empty' if empty else ''}"
        report.add(name, finite and err <= TOL, f"rel RMS {err:.1e} (tol {TOL:.0e})")


def _cuda_driver():
    lib = ctypes.CDLL("libcuda.so.1")
    ptr = ctypes.c_void_p
    lib.cuModuleLoadData.argtypes = [ctypes.POINTER(ptr), ctypes.c_char_p]
    lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(ptr), ptr, ctypes.c_char_p]
    lib.cuModuleUnload.argtypes = [ptr]
    lib.cuLaunchKernel.argtypes = [ptr] + [ctypes.c_uint] * 7 + [ptr, ctypes.POINTER(ptr), ptr]
    return lib


def _check_cu(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with CUDA driver error {status}")


def aot_launch_check(report: Report, device: torch.device) -> None:
    """Load the AOT PTX with the driver and launch it with TensorRT's argument layout."""
    name = "AOT PTX launched like TensorRT (bf16 delta)"
    if device.type != "cuda":
        report.add(name, None, "needs CUDA")
        return
    major, minor = torch.cuda.get_device_capability(device)
    b, h, s, dk, dv = 2, 4, 77, 40, 72
    inputs = random_inputs(b, h, s, dk, dv, torch.bfloat16, device, seed=7)
    outs = [torch.full_like(inputs[0], float("nan")), torch.full_like(inputs[1], float("nan"))]
    kernel = triton_kernel.compile_ptx(torch.bfloat16, "delta", EPS, dk, dv, 10 * major + minor)
    cuda = _cuda_driver()
    module, function = ctypes.c_void_p(), ctypes.c_void_p()
    torch.cuda.synchronize(device)
    _check_cu(cuda.cuModuleLoadData(ctypes.byref(module), kernel.ptx.encode()), "cuModuleLoadData")
    try:
        _check_cu(cuda.cuModuleGetFunction(ctypes.byref(function), module, kernel.name.encode()),
                  "cuModuleGetFunction")
        args = ([ctypes.c_void_p(t.data_ptr()) for t in inputs]
                + [ctypes.c_int32(x) for x in (s, dk, dv)]
                + [ctypes.c_void_p(t.data_ptr()) for t in outs])
        params = (ctypes.c_void_p * len(args))(
            *[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        grid = kernel.config.grid(b * h, dk, dv)
        stream = torch.cuda.current_stream(device).cuda_stream
        _check_cu(cuda.cuLaunchKernel(function, *grid, kernel.num_warps * 32, 1, 1,
                                      kernel.shared_mem, ctypes.c_void_p(stream), params, None),
                  "cuLaunchKernel")
        torch.cuda.synchronize(device)
    finally:
        cuda.cuModuleUnload(module)
    err, finite = compare(inputs, outs, "delta")
    report.add(name, finite and err <= TOL,
               f"sm_{major}{minor}, {kernel.shared_mem} B shared, rel RMS {err:.1e}")


class _TrtTensor:
    """What TensorRT hands a JIT plugin: a device pointer, shape, strides, trt.DataType."""

    class _DataType:
        def __init__(self, name):
            self.name = name

    def __init__(self, t: torch.Tensor):
        names = {torch.float32: "FLOAT", torch.float16: "HALF", torch.bfloat16: "BF16"}
        self.data_ptr, self.shape, self.strides = t.data_ptr(), tuple(t.shape), t.stride()
        self.dtype = self._DataType(names[t.dtype])


def plugin_impl_check(report: Report, device: torch.device) -> None:
    """The JIT plugin's enqueue callback on wrapped device pointers and an external stream."""
    name = "TensorRT JIT impl path (bf16, external stream)"
    if device.type != "cuda":
        report.add(name, None, "needs CUDA")
        return
    inputs = random_inputs(2, 3, 50, 32, 48, torch.bfloat16, device, seed=11)
    views_ok = all(torch.equal(tensorrt_plugin.as_torch(_TrtTensor(t)), t) for t in inputs)
    outs = [torch.full_like(inputs[0], float("nan")), torch.full_like(inputs[1], float("nan"))]
    stream = torch.cuda.Stream(device)
    torch.cuda.synchronize(device)
    tensorrt_plugin.run_update(*[_TrtTensor(t) for t in inputs], [_TrtTensor(t) for t in outs],
                               stream.cuda_stream, "delta", EPS)
    stream.synchronize()
    err, finite = compare(inputs, outs, "delta")
    report.add(name, views_ok and finite and err <= TOL,
               f"zero-copy views {'equal' if views_ok else 'DIFFER'}, rel RMS {err:.1e}")


class GraphedStep:
    """InfiniLM.step replayed from CUDA graphs: one per (segment length, state parity), the
    state in two ping-pong buffers written inside the graph."""

    def __init__(self, model, batch: int, device: torch.device):
        cfg = model.cfg
        self.model, self.batch = model, batch
        self.ids = torch.zeros(batch, cfg.segment_len, dtype=torch.int64, device=device)
        self.memory = [torch.zeros(cfg.memory_shape(batch), device=device) for _ in "ab"]
        self.norm = [torch.zeros(cfg.norm_shape(batch), device=device) for _ in "ab"]
        self.current, self.graphs = 0, {}

    @torch.no_grad()
    def _capture(self, s: int, cur: int):
        ids, nxt = self.ids[:, :s], 1 - cur
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                   # warm-up (kernels' lazy init)
            for _ in range(2):
                self.model.step(ids, self.memory[cur], self.norm[cur])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits, memory, norm = self.model.step(ids, self.memory[cur], self.norm[cur])
            self.memory[nxt].copy_(memory)
            self.norm[nxt].copy_(norm)
        return graph, logits

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        s = ids.shape[1]
        key = (s, self.current)
        if key not in self.graphs:
            self.graphs[key] = self._capture(s, self.current)
        graph, logits = self.graphs[key]
        self.ids[:, :s].copy_(ids)
        graph.replay()
        self.current = 1 - self.current
        return logits.clone()


def runner_graph_check(report: Report, device: torch.device, segments: int = 8) -> None:
    from infini_trt.export import InfiniLM, init_weights, preset
    from infini_trt.runtime.runners.torch_runner import TorchRunner

    for update in ("reference", "kernel"):
        name = f"torch runner: CUDA graphs vs eager ({update} update)"
        if device.type != "cuda":
            report.add(name, None, "needs CUDA")
            continue
        cfg = preset("tiny", segment_len=64, update_rule="delta")
        model = init_weights(InfiniLM(cfg), 0).to(device).eval()
        original = reference.memory_update
        if update == "kernel":
            reference.memory_update = triton_kernel.memory_update
        try:
            eager, graphed = TorchRunner(model, device), GraphedStep(model, 2, device)
            eager.reset(2)
            gen = torch.Generator().manual_seed(3)
            worst = 0.0
            for i in range(segments):
                s = cfg.segment_len if i % 3 else cfg.segment_len // 2 + 1
                ids = torch.randint(0, cfg.vocab_size, (2, s), generator=gen).to(device)
                want, got = eager.step(ids.cpu().numpy()), graphed.step(ids)
                worst = max(worst, float((want - got).abs().max()))
            state = float((eager.memory - graphed.memory[graphed.current]).abs().max())
        finally:
            reference.memory_update = original
        ok = worst <= 1e-5 and state <= 1e-5
        report.add(name, ok, f"{segments} segments, {len(graphed.graphs)} graphs, max |logits "
                             f"diff| {worst:.1e}, max |memory diff| {state:.1e}")


def _time(fn, device: torch.device, iters: int) -> float:
    """Median seconds per call."""
    fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _time(lambda: dst.copy_(src), device, iters)


BENCH_SHAPES = [(1, 8, 1024, 64, 64), (8, 8, 1024, 64, 64), (8, 32, 1024, 128, 128)]


def bench_update(report: Report, device: torch.device, shapes=BENCH_SHAPES, iters: int = 20,
                 copy_bytes: int = 1 << 30) -> None:
    copy = copy_bandwidth(device, copy_bytes, max(3, iters // 2))
    report.add("device copy bandwidth", True,
               f"{copy / 1e9:.1f} GB/s (read + write)")
    for b, h, s, dk, dv in shapes:
        for rule, dtype in (("linear", torch.float32), ("delta", torch.float32),
                            ("linear", torch.bfloat16), ("delta", torch.bfloat16)):
            m, z, k, v = random_inputs(b, h, s, dk, dv, dtype, device, seed=1)
            outs = (torch.empty_like(m), torch.empty_like(z))
            kernel_s = _time(lambda: triton_kernel.memory_update(m, z, k, v, rule, EPS, out=outs),
                             device, iters)
            torch_s = _time(lambda: reference.memory_update(m, z, k, v, rule, EPS), device, iters)
            moved = (2 * m.numel() + 2 * z.numel()) * 4 + (k.numel() + v.numel()) * k.element_size()
            report.bench.append({
                "case": f"({b},{h},{s},{dk},{dv}) {rule} {str(dtype)[6:]}",
                "kernel_ms": kernel_s * 1e3, "torch_ms": torch_s * 1e3,
                "speedup": torch_s / kernel_s, "gb_s": moved / kernel_s / 1e9,
                "of_copy": moved / kernel_s / copy})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (interpreter)")
    parser.add_argument("--quick", action="store_true", help="a few small cases (CPU tests)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 2
    if device.type == "cuda" and triton_kernel.interpreting():
        print("TRITON_INTERPRET=1 is set: unset it to run the kernel on the GPU", file=sys.stderr)
        return 2
    report = Report()
    started = time.perf_counter()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    print(f"infini-trt GPU check on {gpu}; torch {torch.__version__}", flush=True)
    quick = args.quick
    steps = [
        ("kernel vs reference", lambda: kernel_checks(report, device, quick)),
        ("AOT launch", lambda: aot_launch_check(report, device)),
        ("JIT impl", lambda: plugin_impl_check(report, device)),
        ("CUDA graphs", lambda: runner_graph_check(report, device, 3 if quick else 8)),
        ("benchmark", lambda: bench_update(report, device,
                                           [(1, 2, 40, 16, 16)] if quick else BENCH_SHAPES,
                                           1 if quick else 20, 1 << 20 if quick else 1 << 30)),
    ]
    for name, run in steps:
        try:
            run()
        except Exception as exc:                      # report every check, then fail
            report.add(name, False, f"{type(exc).__name__}: {str(exc)[:300]}")
    print(f"\n{time.perf_counter() - started:.0f} s\n{report.table()}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
