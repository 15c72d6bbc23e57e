"""`bench`: speed and memory of one model on every backend, beside its peers, in one run.

For each subject (a backend of this model, or a peer) and each context length L:

    prefill   B prompts of L random tokens, streamed as a user's prompt is (`Session.feed`:
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
                                :int8-rows, its faster method, and :int4, 4-bit decoding)
           tensorrt             TensorRT (needs a CUDA GPU; skipped with the reason otherwise)
Peers:     infini-transformer-pytorch   lucidrains' eager model at the same shape
           full-attention               the quadratic baseline (runtime/baselines.py)
           onnxruntime-genai[:int4]     a Llama of the same shape exported by onnxruntime-genai's
                                        model builder (fp32 or int4) and run by its Generator
                                        (runtime/peer_genai.py; batch 1), on random weights or
                                        on the Hugging Face checkpoint MODEL was converted from
                                        (`peer_source`). Its K/V cache grows with the context:
                                        a length whose cache would not fit in memory is
                                        skipped, as for full-attention. It takes part in the
                                        rounds in alternation: its prompts are read again in
                                        the rounds' process, and each visit rewinds to them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from infini_trt.export.config import InfiniConfig
from infini_trt.export.errors import InfiniTrtError, InputError

from . import roofline
from .bench_measure import empty_context, interleaved, measure, replay_prompt, warm_up
from .bench_report import gflops
from .bench_subjects import GENAI_PEERS, Subject, check_name, open_subject, resolve
from .isolate import run_isolated
from .lengths import length_label

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
    peer_source: str | None = None    # the Hugging Face checkpoint MODEL was converted from:
                                      # the onnxruntime-genai peers run it (else random weights)
    prompt_graph: str = "auto"        # how the onnxruntime subjects read whole prompt segments

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


def round_room(settings: BenchSettings, segment_len: int) -> int:
    """Tokens a context-keeping peer adds after a prompt in the rounds in alternation: the
    warm and timed segments, or a segment's worth of positions and the decoded tokens."""
    return max(settings.round_segments, 1) * segment_len + segment_len \
        + settings.round_decode_tokens + 1


def context_needed(settings: BenchSettings, segment_len: int) -> int:
    """The longest context a peer with a growing K/V cache holds in this run: the longest
    prompt and what is decoded after it (`measure`), or what the rounds add to it."""
    extra = max(settings.decode_tokens + 1, round_room(settings, segment_len)
                if settings.rounds else 0)
    return max(settings.lengths) + extra


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
    """K/V cache of a full-attention peer (the baseline, onnxruntime-genai) at `length`
    tokens, float32 (0 for Infini)."""
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
        runner = open_subject(subject, cfg, settings.threads, settings.seed,
                              prompt_graph=settings.prompt_graph)
    except (InfiniTrtError, ImportError) as exc:
        subject.status, subject.reason = "skipped", str(exc).splitlines()[0]
        log(f"{subject.name}: skipped: {subject.reason}")
        return subject, states
    with runner:
        subject.label = runner.description
        subject.prompt_graph = getattr(runner, "prompt_graph", "")   # what "auto" picked
        warm_up(runner, settings.batch)
        for length in settings.lengths:
            estimate = estimate_seconds(subject, cfg, length, settings.batch, matmul_rate)
            need = cache_bytes(subject, cfg, length + settings.decode_tokens, settings.batch)
            limit = getattr(runner, "context_limit", None)
            if limit is not None and length + settings.decode_tokens + 1 > limit:
                why = (f"{length + settings.decode_tokens + 1:,d} tokens > the model's context "
                       f"length {limit:,d}")
            elif estimate > settings.budget_s:
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


def rounds_lengths(subject: Subject, segment_len: int) -> list[int]:
    """The lengths a context-keeping peer takes up in the rounds: those it measured whose
    prompts end on a segment boundary (as the states ours keep)."""
    return [p["length"] for p in subject.points
            if "skipped" not in p and p["length"] % segment_len == 0]


def alternate(subjects: list[Subject], states: dict, cfg: InfiniConfig,
              settings: BenchSettings) -> dict:
    """`interleaved` over the given subjects (all open at once, in this process) from the
    states their prompts left, and from an empty context (length 0: `empty_context`); a
    context-keeping peer reads its prompts again here first (untimed; a length whose K/V
    cache would not fit in memory is left out, "left_out")."""
    import psutil

    runners, states, left_out = {}, dict(states), []
    room = round_room(settings, cfg.segment_len)
    try:
        for subject in subjects:
            runner = runners[subject.name] = open_subject(subject, cfg, settings.threads,
                                                          settings.seed, beside_others=True,
                                                          prompt_graph=settings.prompt_graph)
            warm_up(runner, settings.batch)
            states[subject.name] = {0: empty_context(runner, settings.batch, settings.seed,
                                                     room),
                                    **states.get(subject.name, {})}
            if not subject.resumable:
                continue
            limit = getattr(runner, "context_limit", None)
            for length in rounds_lengths(subject, cfg.segment_len):
                need = cache_bytes(subject, cfg, length + room, settings.batch)
                if limit is not None and length + room > limit:
                    left_out.append(f"{subject.name} {length_label(length)}: {length + room:,d}"
                                    f" tokens > the model's context length {limit:,d}")
                elif need > 0.8 * psutil.virtual_memory().available:
                    left_out.append(f"{subject.name} {length_label(length)}: K/V cache of "
                                    f"{need / 2**30:,.1f} GiB > 80% of the available memory")
                else:
                    states[subject.name][length] = replay_prompt(
                        runner, length, settings.batch, settings.seed + length, room)
        result = interleaved(runners, states, settings.rounds, settings.round_segments,
                             settings.round_decode_tokens, settings.seed, settings.rounds_min_s,
                             settings.calibrate_s)
        return result | {"left_out": left_out}
    finally:
        for runner in runners.values():
            runner.close()


# ------------------------------------------------------------------------------ the run
RATES = ("matmul_fp32_flops_per_s", "matmul_bf16_flops_per_s", "memory_read_bytes_per_s")


def _limits(seconds: float, log: Callable[[str], None]) -> dict:
    """The machine's fp32 and bf16 matmul rates and memory read bandwidth, measured now,
    each within `seconds` (with the problem size each probe chose); the bf16 rate is None,
    and "bf16_not_measured" says why, where torch has no bf16 instructions on this CPU."""
    import torch

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
        bf16 = f"bf16 matmul {gflops(probe.first)} GFLOP/s (n={probe.size})"
    memory = roofline.bandwidth_probe(seconds)
    limits |= {"memory_read_bytes_per_s": memory.first, "memory_read_bytes": memory.size}
    log(f"fp32 matmul {gflops(fp32.first)} GFLOP/s (n={fp32.size}), {bf16}, memory "
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
    if settings.peer_source and not set(names) & set(GENAI_PEERS):
        raise InputError("--peer-source is the checkpoint the onnxruntime-genai peers run; "
                         "add them to --peers")
    model = Path(model)
    cfg = model_config(model)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    context = context_needed(settings, cfg.segment_len)
    resolved = [resolve(name, model, log, settings.seed, settings.batch, context,
                        settings.peer_source) for name in names]
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
            subject, kept = (run_isolated(run_subject, *args) if settings.isolate
                             else run_subject(*args))
        except InfiniTrtError as exc:
            subject.status, subject.reason, kept = "skipped", str(exc), {}
            log(f"{subject.name}: skipped: {exc}")
        if kept:
            states[subject.name] = kept
        resolved[i] = subject
    together = [s for s in resolved if s.name in states
                or (s.resumable and rounds_lengths(s, cfg.segment_len))]
    alternation = None
    if settings.rounds and together:
        lengths = set().union(*states.values(), *(rounds_lengths(s, cfg.segment_len)
                                                  for s in together if s.resumable))
        log(f"{settings.rounds}+ rounds over {', '.join(s.name for s in together)} x "
            f"{', '.join(length_label(n) for n in sorted(lengths))} in alternation ...")
        args = (together, states, cfg, settings)
        try:
            alternation = run_isolated(alternate, *args) if settings.isolate else alternate(*args)
        except InfiniTrtError as exc:
            alternation = None
            log(f"the rounds in alternation failed: {exc}")
        for line in (alternation or {}).get("left_out", []):
            log(f"rounds in alternation: left out {line}")
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
