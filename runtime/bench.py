"""`bench`: speed and memory of one model on every backend, beside its peers, in one run.

For each subject (a backend of this model, or a peer) and each context length L:

    prefill   B prompts of L random tokens, streamed as a user's prompt is (`generate.prefill`:
              full segments through the prefill graph, the rest through the K/V cache);
              every call timed -> tokens/s, per-segment latency p50/p95/p99
    TTFT      prefill plus the choice of the first token (greedy)
    decode    D more tokens, one per sequence per call (extend, fold at segment ends), greedy
              -> tokens/s and inter-token latency
    memory    peak RSS of the process over that length (and peak CUDA memory on a GPU)

Then `rounds` rounds in alternation over this model's runners (all open in one process) and
the lengths, from the states that the prompts left (`bench_measure.interleaved`): a few
segments and decoded tokens per runner, length and round, so that a machine that drifts in
speed drifts for every runner and length alike. These are the figures for ratios between
backends and for "is the cost per token flat in the context length".

Each subject runs in a fresh process (`isolate`), so that its peak RSS is its own; it is
warmed up first (every graph it uses, and a fold). The machine's fp32/bf16 matmul rate and memory
bandwidth are measured in the same run (`roofline.py`: bounded probes, bf16 only where the CPU
has instructions for it) and turn the figures into prefill efficiency (model FLOPs/s over the
matmul rate) and decode bandwidth use (bytes moved per token x tokens/s over the bandwidth).
Ratios are taken against PyTorch eager of the same run. Every name and setting is checked, and
every subject resolved, before the first measurement; Ctrl-C kills a subject's process.

Subjects:  torch[:bf16|:fp16]   PyTorch eager (TorchRunner; bf16/fp16 skipped on a CPU without
                                instructions for them, where torch would emulate them)
           onnxruntime          ONNX Runtime on the fp32 export (IO binding)
           onnxruntime:int8     ONNX Runtime on the int8 export (export/quantize.py; also
                                :int8-rows, its faster method)
           tensorrt             TensorRT (needs a CUDA GPU; skipped with the reason otherwise)
Peers:     infini-transformer-pytorch   lucidrains' eager model at the same shape
           full-attention               the quadratic baseline (runtime/baselines.py)
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from infini_trt.export.config import InfiniConfig
from infini_trt.export.errors import InfiniTrtError, InputError
from infini_trt.export.quantize import METHODS as QUANTIZE_METHODS

from . import roofline
from .bench_measure import interleaved, measure, warm_up
from .lengths import length_label

BACKENDS = ("torch", "torch:bf16", "torch:fp16", "onnxruntime",
            *(f"onnxruntime:{method}" for method in QUANTIZE_METHODS), "tensorrt")
PEERS = ("infini-transformer-pytorch", "full-attention")


@dataclass(frozen=True)
class BenchSettings:
    lengths: tuple[int, ...]
    batch: int = 1
    decode_tokens: int = 64
    seed: int = 0
    threads: int | None = None        # CPU threads for torch and ONNX Runtime [default: all]
    budget_s: float = 600.0           # skip a length whose prefill is estimated to take longer
    isolate: bool = True              # each subject in a fresh process
    calibrate_s: float = 1.0          # seconds for each measurement of the machine
    rounds: int = 5                   # `interleaved` rounds over runners x lengths (0: none)
    round_segments: int = 4           # segments prefilled per length and round
    round_decode_tokens: int = 16     # tokens decoded per length and round
    rounds_min_s: float = 10.0        # more rounds while they take less time than this

    def __post_init__(self):
        """InputError for a setting that cannot be measured, before anything is."""
        if not self.lengths or min(self.lengths) < 1:
            raise InputError(f"bad lengths {self.lengths!r}: give one or more token counts >= 1")
        at_least = {"batch": 1, "decode_tokens": 1, "rounds": 0, "round_segments": 1,
                    "round_decode_tokens": 1, "threads": 1}
        for name, least in at_least.items():
            value = getattr(self, name)
            if value is not None and value < least:
                raise InputError(f"bad {name.replace('_', ' ')} {value}: at least {least}")
        for name in ("budget_s", "calibrate_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"bad {name[:-2]} {getattr(self, name)}: give seconds > 0")
        if self.rounds_min_s < 0:
            raise InputError(f"bad rounds_min_s {self.rounds_min_s}: give seconds >= 0")


@dataclass
class Subject:
    """What one worker opens: picklable, resolved in the parent (exports made there)."""

    name: str                         # as given: "onnxruntime:int8", "full-attention", ...
    kind: str                         # torch | onnxruntime | tensorrt | lucidrains | full-attention
    path: str | None = None           # checkpoint or export directory
    precision: str = "float32"        # weights: float32 | bfloat16 | float16 | int8
    label: str = ""                   # the runner's description, filled in by the worker
    status: str = "ok"                # ok | skipped
    reason: str = ""
    points: list[dict] = field(default_factory=list)
    interleaved: list | None = None   # its points in bench_measure.interleaved

    @property
    def infini(self) -> bool:
        return self.kind != "full-attention"

    @property
    def restartable(self) -> bool:
        """A runner of this model: its state can be read and restored (`interleaved`)."""
        return self.kind in ("torch", "onnxruntime", "tensorrt")


# ------------------------------------------------------------------------------ subjects
def open_subject(subject: Subject, cfg: InfiniConfig, settings: BenchSettings):
    """The runner of one subject (in the worker process)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if subject.kind == "torch":
        from .runners.torch_runner import TorchRunner

        return TorchRunner.from_checkpoint(subject.path, dtype=subject.precision)
    if subject.kind == "onnxruntime":
        from .runners.ort_runner import OrtRunner

        return OrtRunner(subject.path, threads=settings.threads)
    if subject.kind == "tensorrt":
        from .runners import open_runner

        return open_runner(subject.path, "tensorrt")
    if subject.kind == "lucidrains":
        from .baselines import LucidrainsRunner

        return LucidrainsRunner(cfg, seed=settings.seed)
    from infini_trt.export.model import InfiniLM, init_weights

    from .baselines import FullAttentionRunner

    return FullAttentionRunner(init_weights(InfiniLM(cfg), settings.seed), capacity=1)


def estimate_seconds(subject: Subject, cfg: InfiniConfig, length: int, batch: int,
                     matmul_rate: float) -> float:
    """A rough prefill time for `length`: scaled from this subject's last point by model
    FLOPs, or (first length) the FLOPs at a quarter of the matmul rate."""
    flops = batch * roofline.prefill_flops(cfg, length, full_attention=not subject.infini)
    last = next((p for p in reversed(subject.points) if "skipped" not in p), None)
    if last is None:
        return flops / (0.25 * matmul_rate)
    done = last["batch"] * roofline.prefill_flops(cfg, last["length"],
                                                   full_attention=not subject.infini)
    return last["prefill_s"] * flops / done


def cache_bytes(subject: Subject, cfg: InfiniConfig, length: int, batch: int) -> int:
    """K/V cache of the full-attention baseline at `length` tokens (0 for Infini)."""
    if subject.infini:
        return 0
    return 2 * cfg.n_layers * batch * cfg.n_kv_heads * length * cfg.head_dim * 4


def run_subject(subject: Subject, cfg: InfiniConfig, settings: BenchSettings,
                matmul_rate: float, log: Callable[[str], None] = print) -> tuple[Subject, dict]:
    """Open, warm up and measure one subject at every length (within the budget) -> the
    subject with its points, and (this model's runners) the states its prompts left, by
    length, for `alternate`."""
    import psutil

    states = {}
    try:
        runner = open_subject(subject, cfg, settings)
    except (InfiniTrtError, ImportError) as exc:
        subject.status, subject.reason = "skipped", str(exc).splitlines()[0]
        log(f"{subject.name}: skipped: {subject.reason}")
        return subject, states
    with runner:
        subject.label = runner.description
        warm_up(runner, settings.batch)
        for length in settings.lengths:
            estimate = estimate_seconds(subject, cfg, length, settings.batch, matmul_rate)
            need = cache_bytes(subject, cfg, length + settings.decode_tokens, settings.batch)
            if estimate > settings.budget_s:
                why = (f"prefill estimated at {estimate:,.3g} s > --budget "
                       f"{settings.budget_s:,.3g} s")
            elif need > 0.8 * psutil.virtual_memory().available:
                why = f"K/V cache of {need / 2**30:,.1f} GiB > 80% of the available memory"
            else:
                why = ""
            if why:
                subject.points.append({"length": length, "batch": settings.batch,
                                       "skipped": why})
                log(f"{subject.name:28s} {length:>9,d} tokens: skipped ({why})")
                continue
            point = measure(runner, length, settings.batch, settings.decode_tokens,
                            settings.seed + length, states if subject.restartable else None)
            subject.points.append(point)
            log(f"{subject.name:28s} {length:>9,d} tokens: prefill "
                f"{point['prefill_tokens_per_s']:>9,.0f} tok/s, decode "
                f"{point['decode_tokens_per_s']:>8,.1f} tok/s, peak RSS "
                f"{point['peak_rss_mb']:>7,.0f} MiB")
    return subject, states


def alternate(subjects: list[Subject], states: dict, cfg: InfiniConfig,
              settings: BenchSettings) -> dict:
    """`interleaved` over the given subjects (all open at once, in this process) from the
    states their prompts left."""
    runners = {}
    try:
        for subject in subjects:
            runners[subject.name] = open_subject(subject, cfg, settings)
            warm_up(runners[subject.name], settings.batch)
        return interleaved(runners, states, settings.rounds, settings.round_segments,
                           settings.round_decode_tokens, settings.seed, settings.rounds_min_s,
                           settings.calibrate_s)
    finally:
        for runner in runners.values():
            runner.close()


def _die_with_parent() -> None:
    """In a worker (Linux): be sent SIGTERM when the process that started it dies. Without it,
    a bench killed with SIGTERM left its worker finishing the runs alone, loading the machine
    under the next measurement."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))          # PR_SET_PDEATHSIG


def _start_worker() -> None:
    """A worker's setup: it dies with its parent (`_die_with_parent`), and its progress bars
    (off in bench) lock with a thread lock: tqdm's default lock is a named semaphore, which a
    worker killed on Ctrl-C leaves behind for the resource tracker to warn about."""
    import threading

    from tqdm import tqdm

    _die_with_parent()
    tqdm.set_lock(threading.RLock())


def _isolated(fn, *args):
    """fn(*args) in a fresh (spawned) process, which dies with this one and is killed, not
    waited for, when this one is interrupted (ProcessPoolExecutor's own exit would wait for
    the worker to finish its subject). The worker starts with Ctrl-C ignored, so that a
    terminal's SIGINT (sent to the whole process group) stops the parent only, which kills
    the worker, instead of printing the worker's traceback."""
    import multiprocessing
    import signal
    import threading
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(1, mp_context=context, initializer=_start_worker)
    main = threading.current_thread() is threading.main_thread()
    interrupted = False
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:                                    # the worker is spawned here, inheriting SIG_IGN
            future = pool.submit(fn, *args)
        finally:
            if main:
                signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
        return future.result()
    except BrokenProcessPool:
        raise InfiniTrtError("the benchmark process died (out of memory?)") from None
    except BaseException:                       # KeyboardInterrupt, Terminated: stop it now
        interrupted = True
        _kill_workers(pool)
        raise
    finally:
        pool.shutdown(wait=not interrupted, cancel_futures=True)


def _kill_workers(pool) -> None:
    """Kill a ProcessPoolExecutor's worker processes (Python 3.14 has pool.kill_workers();
    before it, its table of processes is the only handle)."""
    if hasattr(pool, "kill_workers"):
        pool.kill_workers()
        return
    for process in list((pool._processes or {}).values()):
        process.kill()
        process.join(5)


# ------------------------------------------------------------------------------ resolving
def quantized_export(export_dir: Path, method: str, log: Callable[[str], None]) -> Path:
    """The quantized copy (`method`) of an fp32 export, made once and kept in the export
    cache."""
    from infini_trt.export.manifest import is_export_dir, package_version
    from infini_trt.export.quantize import quantize_export

    from .cache import cache_root

    key = hashlib.sha256(json.dumps(
        {"manifest": (export_dir / "manifest.json").read_text(), "method": method,
         "onnxruntime": package_version("onnxruntime")}).encode()).hexdigest()[:20]
    target = cache_root() / "quantized" / key
    if not is_export_dir(target):
        log(f"quantizing {export_dir} ({method}) into {target} (cached for next time) ...")
        quantize_export(export_dir, target, method, force=True, log=log)
    return target


def check_name(name: str) -> None:
    """InfiniTrtError unless `name` is a backend or a peer."""
    if name not in BACKENDS and name not in PEERS:
        raise InfiniTrtError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)} "
                             f"(peers: {', '.join(PEERS)})")


def resolve(name: str, model: Path, log: Callable[[str], None]) -> Subject:
    """A subject name -> what its worker opens (exports made here, once, and cached)."""
    from infini_trt.export.manifest import is_export_dir, read_manifest

    from .cache import cached_export

    backend, _, variant = name.partition(":")
    check_name(name)
    if name in PEERS:
        return Subject(name, "lucidrains" if name == PEERS[0] else name)
    export = is_export_dir(model)
    if backend == "torch":
        precision = {"bf16": "bfloat16", "fp16": "float16"}.get(variant, "float32")
        missing = roofline.missing_instructions(getattr(torch, precision))
        if missing:
            return Subject(name, "torch", precision=precision, status="skipped",
                           reason=f"{missing}: torch would emulate {variant} matrix products, "
                                  f"tens of times slower than fp32; not measured")
        path = read_manifest(model).source_checkpoint if export else model
        if path is None:
            return Subject(name, "torch", status="skipped",
                           reason=f"{model} was exported from a checkpoint that is not here")
        return Subject(name, "torch", str(path), precision)
    if backend == "tensorrt":
        from .engine import gpu

        if gpu() is None:
            return Subject(name, "tensorrt", status="skipped",
                           reason="TensorRT runs on a CUDA GPU and none was found")
        return Subject(name, "tensorrt", str(model if export else cached_export(model, log=log)))
    directory = model if export else cached_export(model, dtype="float32", log=log)
    manifest = read_manifest(directory)
    if manifest.quantization and manifest.precision != variant:
        return Subject(name, "onnxruntime", status="skipped",
                       reason=f"{model} is an {manifest.precision} export; use "
                              f"onnxruntime:{manifest.precision}")
    if variant and not manifest.quantization:
        directory = quantized_export(Path(directory), variant, log)
    return Subject(name, "onnxruntime", str(directory), variant or manifest.dtype)


# ------------------------------------------------------------------------------ the run
RATES = ("matmul_fp32_flops_per_s", "matmul_bf16_flops_per_s", "memory_read_bytes_per_s")


def _limits(seconds: float, log: Callable[[str], None]) -> dict:
    """The machine's fp32 and bf16 matmul rates and memory read bandwidth, measured now,
    each within `seconds` (with the problem size each probe chose); the bf16 rate is None,
    and "bf16_not_measured" says why, where torch has no bf16 instructions on this CPU."""
    fp32 = roofline.matmul_probe(torch.float32, seconds)
    limits = {"matmul_fp32_flops_per_s": fp32.first, "matmul_fp32_n": fp32.size}
    missing = roofline.missing_instructions(torch.bfloat16)
    if missing:
        limits |= {"matmul_bf16_flops_per_s": None,
                   "bf16_not_measured": f"{missing}; not measured"}
        bf16 = f"bf16 matmul: {limits['bf16_not_measured']}"
    else:
        probe = roofline.matmul_probe(torch.bfloat16, seconds)
        limits |= {"matmul_bf16_flops_per_s": probe.first, "matmul_bf16_n": probe.size}
        bf16 = f"bf16 matmul {probe.first / 1e9:,.0f} GFLOP/s (n={probe.size})"
    memory = roofline.bandwidth_probe(seconds)
    limits |= {"memory_read_bytes_per_s": memory.first, "memory_read_bytes": memory.size}
    log(f"fp32 matmul {fp32.first / 1e9:,.0f} GFLOP/s (n={fp32.size}), {bf16}, memory "
        f"{memory.first / 1e9:,.1f} GB/s ({memory.size >> 20} MiB)")
    return limits


def _best_limits(start: dict, end: dict) -> dict:
    """The limits of a run measured at its start and end: {"start", "end"} and each rate the
    higher of the two (None where neither measured it)."""
    best = {key: max((x for x in (start[key], end[key]) if x is not None), default=None)
            for key in RATES}
    if "bf16_not_measured" in end:
        best["bf16_not_measured"] = end["bf16_not_measured"]
    return {"start": start, "end": end} | best


def run_bench(model: str | Path, subjects: list[str], settings: BenchSettings,
              log: Callable[[str], None] = print) -> dict:
    """Measure every subject at every length -> the report (a JSON-able dict; see
    bench_report.py for the derived figures, table and plot).

    Every name is checked and every subject resolved (an export made and cached where one
    is needed) before the machine is measured, so that a mistake ends the run at once."""
    from infini_trt.export.manifest import model_config

    names = list(dict.fromkeys(subjects))
    if not names:
        raise InputError("nothing to measure: give at least one backend or peer")
    for name in names:
        check_name(name)
    model = Path(model)
    cfg = model_config(model)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    resolved = [resolve(name, model, log) for name in names]
    machine = roofline.describe_machine()
    log(f"CPU: {machine['cpu_summary']}")
    log("measuring the machine: fp32 and bf16 matmul rate, memory bandwidth ...")
    limits = _limits(settings.calibrate_s, log)
    states = {}
    for i, subject in enumerate(resolved):
        if subject.status != "ok":
            log(f"{subject.name}: skipped: {subject.reason}")
            continue
        args = (subject, cfg, settings, limits["matmul_fp32_flops_per_s"])
        try:
            subject, kept = (_isolated(run_subject, *args) if settings.isolate
                             else run_subject(*args))
        except InfiniTrtError as exc:
            subject.status, subject.reason, kept = "skipped", str(exc), {}
            log(f"{subject.name}: skipped: {exc}")
        if kept:
            states[subject.name] = kept
        resolved[i] = subject
    together, alternation = [s for s in resolved if s.name in states], None
    if settings.rounds and together:
        log(f"{settings.rounds}+ rounds over {', '.join(s.name for s in together)} x "
            f"{', '.join(length_label(n) for n in sorted(set().union(*states.values())))} "
            f"in alternation ...")
        args = (together, states, cfg, settings)
        try:
            alternation = _isolated(alternate, *args) if settings.isolate else alternate(*args)
        except InfiniTrtError as exc:
            alternation = None
            log(f"the rounds in alternation failed: {exc}")
        for subject in together:
            subject.interleaved = (alternation or {}).get("points", {}).get(subject.name)
    machine["load_average_end"] = roofline.describe_machine()["load_average"]
    log("measuring the machine again (the best of both runs is its limit) ...")
    limits = _best_limits(limits, _limits(settings.calibrate_s, log))
    from .bench_report import derive

    return derive({"model": str(model), "config": cfg.to_dict(),
                   "parameters": cfg.num_parameters(), "settings": asdict(settings),
                   "machine": machine, "limits": limits,
                   "alternation": ({k: v for k, v in alternation.items() if k != "points"}
                                   if alternation else None),
                   "subjects": [asdict(s) | {"infini": s.infini} for s in resolved]})
