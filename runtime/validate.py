"""Parity of the exported graphs with the PyTorch reference, over many segments.

Every backend carries its own state from segment to segment (no resets, no shared state), so
errors that accumulate in the recurrence show up. The reference is the PyTorch model of the
same checkpoint in float64. For each backend, output and segment: max abs error, relative RMS
and cosine; greedy next-token agreement; NaN/Inf fails. The input is random tokens (the hard
case for greedy agreement: near-ties), or a token file of the kind the model is deployed on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from infini_trt.export.checkpoint import WEIGHTS_FILE, read_checkpoint
from infini_trt.export.errors import InfiniTrtError, InputError
from infini_trt.export.files import sha256_file
from infini_trt.export.manifest import read_manifest

from .loop import progress_bar
from .metrics import Errors, errors
from .runners.base import Runner

if TYPE_CHECKING:
    from .validate_decoding import DecodingReport

OUTPUTS = ("logits", "memory_out", "norm_out")
# relative RMS against the float64 reference, by the dtype of the exported graph: a margin
# over the worst measured; the figures: docs/quantization.md#tolerances-of-validate
DEFAULT_TOLERANCES = {
    # fp32: float32 arithmetic itself (PyTorch's too): up to 2.9e-5 on the passkey model's prompts
    "float32": {"logits": 1e-4, "memory_out": 5e-5, "norm_out": 1e-5},
    "float16": {"logits": 2e-2, "memory_out": 2e-2, "norm_out": 2e-2},
    "bfloat16": {"logits": 6e-2, "memory_out": 6e-2, "norm_out": 6e-2},
    # int8 (export/quantize.py): about 2x the worst measured (small, random weights: 3.9e-2)
    "int8": {"logits": 8e-2, "memory_out": 5e-2, "norm_out": 5e-3},
    # int8-rows (the same integers with VNNI and AVX2 only): over the worst measured (small 5.8e-2)
    "int8-rows": {"logits": 1e-1, "memory_out": 6e-2, "norm_out": 8e-3},
    # int4: 2-2.5x the worst of its 4-bit decoded tokens (small 3.1e-1; measured on AVX2 only)
    "int4": {"logits": 6e-1, "memory_out": 3e-1, "norm_out": 3e-2},
}
# under the worst greedy agreement measured: random weights (flat logits) are the hard case,
# int8 0.909, int8-rows 0.875, int4 0.50 on small (docs/quantization.md#tolerances-of-validate)
DEFAULT_MIN_GREEDY = {"float32": 0.99, "float16": 0.9, "bfloat16": 0.8, "int8": 0.85,
                      "int8-rows": 0.82, "int4": 0.3}


@dataclass
class OutputReport:
    name: str
    tolerance: float
    per_segment: list[Errors] = field(default_factory=list)   # one per compared point
    unit: str = "segment"         # what a point is: "segment", a decoded "step", a "state"

    @property
    def max_abs(self) -> float:
        return max(e.max_abs for e in self.per_segment)

    @property
    def rel_rms(self) -> float:
        return max(e.rel_rms for e in self.per_segment)

    @property
    def cosine(self) -> float:
        return min(e.cosine for e in self.per_segment)

    @property
    def finite(self) -> bool:
        return all(e.finite for e in self.per_segment)

    @property
    def passed(self) -> bool:
        return self.finite and self.rel_rms <= self.tolerance

    def to_dict(self) -> dict:
        return {"tolerance_rel_rms": self.tolerance, "max_abs": self.max_abs,
                "rel_rms": self.rel_rms, "cosine": self.cosine, "finite": self.finite,
                "passed": self.passed,
                f"per_{self.unit}": [e.to_dict() for e in self.per_segment]}


@dataclass
class BackendReport:
    backend: str
    outputs: dict[str, OutputReport]
    min_greedy: float
    agree: int = 0
    positions: int = 0

    @property
    def greedy_agreement(self) -> float:
        return self.agree / self.positions if self.positions else 1.0

    @property
    def passed(self) -> bool:
        return (all(o.passed for o in self.outputs.values())
                and self.greedy_agreement >= self.min_greedy)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "passed": self.passed,
                "greedy_agreement": self.greedy_agreement, "min_greedy": self.min_greedy,
                "outputs": {k: v.to_dict() for k, v in self.outputs.items()}}


@dataclass
class ValidationReport:
    checkpoint: str
    export: str
    dtype: str
    segments: int
    segment_len: int
    partial: int
    batch: int
    seed: int
    reference: str
    backends: list[BackendReport]
    tokens: str = "random"        # where the input came from: "random" or a token file
    machine: str = ""             # the CPU and its features (cpu.cpu_summary): int8 kernels
                                  # differ between CPUs, and the figures are this CPU's
    decoding: DecodingReport | None = None   # validate_decoding.py; None: not run
    decoding_skipped: str = ""    # why the decoding phase did not run ("" where it did)

    @property
    def input(self) -> str:
        return (f"random tokens (seed {self.seed})" if self.tokens == "random"
                else f"the tokens of {self.tokens}")

    @property
    def passed(self) -> bool:
        return (all(b.passed for b in self.backends)
                and (self.decoding is None or self.decoding.passed))

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "export": self.export, "dtype": self.dtype,
                "segments": self.segments, "segment_len": self.segment_len,
                "partial_segment_tokens": self.partial, "batch": self.batch, "seed": self.seed,
                "tokens": self.tokens, "machine": self.machine, "reference": self.reference,
                "passed": self.passed,
                "backends": [b.to_dict() for b in self.backends],
                "decoding": None if self.decoding is None else self.decoding.to_dict(),
                "decoding_skipped": self.decoding_skipped or None}

    def table(self) -> str:
        lines = [f"reference: {self.reference}; {self.segments} segments of {self.segment_len} "
                 f"+ {self.partial} tokens, batch {self.batch}, {self.input}",
                 f"CPU: {self.machine}", *_backend_rows(self.backends, "first->last seg rel RMS")]
        if self.decoding is not None:
            lines += [self.decoding.plan.describe(),
                      *_backend_rows(self.decoding.backends, "first->last rel RMS")]
        elif self.decoding_skipped:
            lines.append(f"decoding: not checked ({self.decoding_skipped})")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def _backend_rows(backends: list[BackendReport], trend: str) -> list[str]:
    """The table's header and rows for `backends`; `trend` heads the first -> last column."""
    lines = [f"{'backend':26s} {'output':11s} {'max abs':>9s} {'rel RMS':>9s} "
             f"{'tol':>7s} {'cosine':>9s} {trend:>24s}  result"]
    for b in backends:
        for i, (name, o) in enumerate(b.outputs.items()):
            first, last = o.per_segment[0].rel_rms, o.per_segment[-1].rel_rms
            lines.append(f"{b.backend if i == 0 else '':26s} {name:11s} {o.max_abs:9.2e} "
                         f"{o.rel_rms:9.2e} {o.tolerance:7.0e} {o.cosine:9.6f} "
                         f"{first:11.2e} -> {last:9.2e}  "
                         f"{'ok' if o.passed else ('NaN/Inf' if not o.finite else 'FAIL')}")
        lines.append(f"{'':26s} {'greedy':11s} {b.greedy_agreement:>9.2%} agreement "
                     f"(min {b.min_greedy:.0%})  "
                     f"{'ok' if b.greedy_agreement >= b.min_greedy else 'FAIL'}")
    return lines


def parse_tolerances(items: list[str]) -> dict[str, float]:
    """['logits=1e-4', 'memory_out=1e-3'] -> dict; a bare number sets every output."""
    out: dict[str, float] = {}
    for item in items:
        name, _, value = item.rpartition("=")
        names = [name] if name else list(OUTPUTS)
        for n in names:
            if n not in OUTPUTS:
                raise InfiniTrtError(f"--tol: unknown output {n!r}; outputs are "
                                     f"{', '.join(OUTPUTS)}")
            try:
                out[n] = float(value)
            except ValueError:
                raise InfiniTrtError(f"--tol: {value!r} is not a number") from None
            if not np.isfinite(out[n]) or out[n] <= 0:
                raise InfiniTrtError(f"--tol: {value!r} must be a finite positive number")
    return out


def limits(dtype: str, tolerances: dict[str, float] | None = None,
           min_greedy: float | None = None) -> tuple[dict[str, float], float]:
    """The tolerances (relative RMS, per output) and minimum greedy agreement for `dtype`,
    the given ones in place of the defaults."""
    tol = {**DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES["float32"]), **(tolerances or {})}
    return tol, DEFAULT_MIN_GREEDY.get(dtype, 0.99) if min_greedy is None else min_greedy


def check_export_matches(checkpoint: Path, export_dir: Path) -> None:
    """Refuse to compare an export with a checkpoint it was not made from."""
    ckpt, manifest = read_checkpoint(checkpoint), read_manifest(export_dir)
    if ckpt.config != manifest.config:
        raise InfiniTrtError(f"{export_dir} was exported from a model with another config "
                             f"than {checkpoint}")
    exported = manifest.source.get("weights_sha256")
    if exported and exported != sha256_file(ckpt.path / WEIGHTS_FILE):
        raise InfiniTrtError(f"{export_dir} was exported from other weights than {checkpoint}")


def validate(reference: Runner, candidates: list[Runner], segments: int = 8, batch: int = 2,
             seed: int = 0, tolerances: dict[str, float] | None = None,
             min_greedy: float | None = None, dtype: str = "float32",
             progress: bool | None = None, labels: tuple[str, str] = ("", ""),
             tokens: np.ndarray | None = None, tokens_label: str = "random"
             ) -> ValidationReport:
    """Run `reference` and every candidate over `segments` full segments plus a partial one
    of random tokens (or over `tokens` (B, T), as they are), each carrying its own state, and
    compare. Odd segments go through `advance` (the prefill graph: only the last token's
    logits are compared there), the others through `step`, so that both graphs are checked on
    the same carried state."""
    cfg = reference.config
    if segments < 1:
        raise InfiniTrtError("--segments must be at least 1")
    n = cfg.segment_len
    if tokens is None:
        rng = np.random.default_rng(seed)
        partial = int(rng.integers(1, n)) if n > 1 else 0
        tokens = rng.integers(0, cfg.vocab_size, size=(batch, segments * n + partial),
                              dtype=np.int64)
    batch, (segments, partial) = tokens.shape[0], divmod(tokens.shape[1], n)
    tol, greedy = limits(dtype, tolerances, min_greedy)
    reports = [BackendReport(c.description, {o: OutputReport(o, tol[o]) for o in OUTPUTS}, greedy)
               for c in candidates]
    for runner in (reference, *candidates):
        runner.reset(batch)
    with progress_bar(tokens.size * (1 + len(candidates)), "validate", progress) as bar:
        for start in range(0, tokens.shape[1], n):
            ids = tokens[:, start:start + n]
            ref_logits = reference.step(ids).astype(np.float64)
            ref_state = reference.state()
            bar.update(ids.size)
            ref_next = ref_logits.argmax(-1)
            prefill = (start // n) % 2 == 1
            want_logits, want_next = ((ref_logits[:, -1], ref_next[:, -1]) if prefill
                                      else (ref_logits, ref_next))
            for runner, report in zip(candidates, reports):
                logits = (runner.advance if prefill else runner.step)(ids)
                state = runner.state()
                bar.update(ids.size)
                for name, want, got in zip(OUTPUTS, (want_logits, *ref_state),
                                           (logits, *state)):
                    report.outputs[name].per_segment.append(errors(want, got))
                report.agree += int((logits.argmax(-1) == want_next).sum())
                report.positions += want_next.size
    from .cpu import cpu_summary

    return ValidationReport(labels[0], labels[1], dtype, segments, n, partial, batch, seed,
                            reference.description, reports, tokens_label, cpu_summary())


def validation_tokens(path: str | Path, tokenizer, batch: int, segments: int,
                      segment_len: int, vocab_size: int | None = None) -> np.ndarray:
    """The tokens of a file (text, or .npy ids [T] or [B, T]) to validate on -> (B, T): a
    stream of tokens is cut into `batch` rows of equal length, a [B, T] file keeps its rows;
    each row is cut to `segments` segments (the file's tokens as they are when it has fewer,
    the last segment partial). Ids outside [0, vocab_size) are refused."""
    from .scoring import read_tokens

    ids, stream = read_tokens(path, tokenizer, vocab_size)
    if stream:
        per_row = ids.shape[1] // batch
        if per_row < 1:
            raise InputError(f"{path} holds {ids.shape[1]} tokens, fewer than --batch {batch}")
        ids = ids[:, :batch * per_row].reshape(batch, per_row)
    return np.ascontiguousarray(ids[:, :segments * segment_len])


def validate_export(checkpoint: str | Path, export_dir: str | Path, segments: int = 8,
                    batch: int = 2, seed: int = 0, tolerances: dict[str, float] | None = None,
                    min_greedy: float | None = None, include_torch: bool = True,
                    extra: list[Runner] | None = None, progress: bool | None = None,
                    log: Callable[[str], None] = lambda s: None,
                    tokens_file: str | Path | None = None,
                    decode_tokens: int = 32) -> ValidationReport:
    """validate() with the float64 PyTorch reference of `checkpoint`, PyTorch in the export's
    dtype, ONNX Runtime on `export_dir`, and any `extra` runners (TensorRT); on random tokens,
    or on the tokens of `tokens_file` (validation_tokens); then, unless decode_tokens is 0,
    the decoding phase (validate_decoding.py) with `decode_tokens` tokens decoded."""
    from .runners.ort_runner import OrtRunner
    from .runners.torch_runner import TorchRunner
    from .validate_decoding import DecodingPlan, decoding_tokens, validate_decoding

    checkpoint, export_dir = Path(checkpoint), Path(export_dir)
    check_export_matches(checkpoint, export_dir)
    manifest = read_manifest(export_dir)
    cfg, dtype = manifest.config, manifest.precision
    plan = DecodingPlan.for_segment(cfg.segment_len, decode_tokens) if decode_tokens else None
    missing = [g for g in ("extend", "fold") if g not in manifest.graphs]
    skipped = ("--decode-tokens 0" if not decode_tokens else
               f"the export has no {' or '.join(missing)} graph" if missing else "")
    if missing:
        plan = None
    tokens = decode_ids = None
    if tokens_file is not None:
        from .tokenizer import LazyTokenizer, model_tokenizer

        tokenizer = LazyTokenizer(lambda: model_tokenizer(export_dir, cfg.vocab_size))
        wanted = max(segments, 0 if plan is None else -(-plan.tokens // cfg.segment_len))
        rows = validation_tokens(tokens_file, tokenizer, batch, wanted, cfg.segment_len,
                                 cfg.vocab_size)             # the file read once, both phases
        tokens = np.ascontiguousarray(rows[:, :segments * cfg.segment_len])
        if plan is not None:
            decode_ids = decoding_tokens(plan, batch, cfg.vocab_size, seed, rows,
                                         str(tokens_file))
    elif plan is not None:
        decode_ids = decoding_tokens(plan, batch, cfg.vocab_size, seed)
    reference = TorchRunner.from_checkpoint(checkpoint, dtype="float64")
    candidates: list[Runner] = []
    if include_torch:
        candidates.append(TorchRunner.from_checkpoint(checkpoint, dtype=manifest.dtype))
    candidates.append(OrtRunner(export_dir))
    candidates.extend(extra or [])
    log(f"comparing {', '.join(c.description for c in candidates)} with "
        f"{reference.description} ...")
    try:
        report = validate(reference, candidates, segments, batch, seed, tolerances, min_greedy,
                          dtype, progress, labels=(str(checkpoint), str(export_dir)),
                          tokens=tokens, tokens_label=str(tokens_file or "random"))
        report.decoding_skipped = skipped
        if plan is not None:
            report.decoding = validate_decoding(reference, candidates, plan, decode_ids,
                                                *limits(dtype, tolerances, min_greedy), progress)
        return report
    finally:
        for runner in (reference, *candidates):
            runner.close()
