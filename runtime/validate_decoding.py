"""The decoding phase of `validate`: the graphs that compute every generated token and every
prompt tail (`extend`, `fold`) and the context files, against the float64 reference.

Each backend runs one scenario in a Session (runtime/session.py): a prompt of one full segment
and a partial one (the prompt-reading graph, then `extend` for the tail), then tokens decoded
one at a time, teacher-forced (every backend is given the same next token, so that errors are
the graphs' and not a diverging text), across at least one fold. Before the fold, mid-segment,
every row is saved to a context file and loaded into a fresh session, which decodes the rest:
the K/V rows, memory and norm that the file carries must continue exactly. Compared with the
reference: the logits after the prompt and after each decoded token, greedy agreement, and
memory and norm at the snapshot and at the end.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infini_trt.export.errors import InfiniTrtError, InputError

from .metrics import errors
from .runners.base import Runner
from .validate import OUTPUTS, BackendReport, OutputReport

STATES = ("snapshot", "end")          # where memory and norm are compared


@dataclass(frozen=True)
class DecodingPlan:
    segment_len: int
    prompt: int            # tokens read as a prompt: one full segment and a partial one
    decode: int            # tokens then decoded one at a time
    snapshot: int          # decoded tokens before the rows are saved and loaded again

    @classmethod
    def for_segment(cls, segment_len: int, decode_tokens: int) -> "DecodingPlan":
        """`decode_tokens` decoded after a prompt whose partial segment leaves room for half of
        them: the first fold comes after decode_tokens // 2 (at most segment_len - 1) tokens,
        the snapshot halfway to it."""
        if decode_tokens < 2:
            raise InfiniTrtError("--decode-tokens must be at least 2 (a fold and a snapshot "
                                 "need room), or 0 to skip the decoding phase")
        if segment_len < 2:
            raise InfiniTrtError("the decoding phase needs a segment of at least 2 tokens")
        to_fold = min(decode_tokens // 2, segment_len - 1)
        return cls(segment_len, 2 * segment_len - to_fold, decode_tokens, max(1, to_fold // 2))

    @property
    def tokens(self) -> int:
        return self.prompt + self.decode

    @property
    def folds(self) -> int:
        """Folds while decoding (the prompt's own full segment is not counted)."""
        return self.tokens // self.segment_len - self.prompt // self.segment_len

    def describe(self) -> str:
        n = self.segment_len
        return (f"decoding: a prompt of {self.prompt} tokens ({n} + {self.prompt - n}), then "
                f"{self.decode} tokens one at a time (teacher-forced, {self.folds} fold(s));\n"
                f"after {self.snapshot} of them every row saved to a context file and loaded "
                f"into a fresh session")

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt, "decode_tokens": self.decode,
                "snapshot_after": self.snapshot, "folds": self.folds, "states_at": list(STATES)}


@dataclass
class DecodingReport:
    plan: DecodingPlan
    backends: list[BackendReport]

    @property
    def passed(self) -> bool:
        return all(b.passed for b in self.backends)

    def to_dict(self) -> dict:
        return {**self.plan.to_dict(), "passed": self.passed,
                "backends": [b.to_dict() for b in self.backends]}


def decoding_tokens(plan: DecodingPlan, batch: int, vocab_size: int, seed: int,
                    tokens: np.ndarray | None = None, label: str = "") -> np.ndarray:
    """(batch, plan.tokens): the first plan.tokens of each row of `tokens`, or random ones."""
    if tokens is None:
        rng = np.random.default_rng([seed, 1])          # not the segment phase's tokens
        return rng.integers(0, vocab_size, size=(batch, plan.tokens), dtype=np.int64)
    if tokens.shape[1] < plan.tokens:
        raise InputError(f"the decoding phase needs {plan.tokens} tokens per row; {label} "
                         f"gives {tokens.shape[1]} (a longer file, fewer --decode-tokens, or "
                         f"--decode-tokens 0 to skip it)")
    return np.ascontiguousarray(tokens[:, :plan.tokens])


def run_scenario(runner: Runner, ids: np.ndarray, plan: DecodingPlan, workdir: Path,
                 on_logits, on_state, bar=None) -> None:
    """The plan on `runner`: on_logits(i, logits (B, V) float64) after the prompt (i = 0) and
    after each decoded token (i = 1 ..), on_state(j, memory, norm) at STATES[j]."""
    from .context import Context
    from .session import Session

    batch = ids.shape[0]
    session = Session(runner, batch)
    on_logits(0, session.feed(ids[:, :plan.prompt], progress=False).astype(np.float64))
    _tick(bar, ids[:, :plan.prompt].size)
    for i in range(plan.decode):
        if i == plan.snapshot:
            on_state(0, *runner.state())
            paths = []
            for row in range(batch):
                paths.append(workdir / f"row{row}.ctx")
                session.save(row).save(paths[-1])
            session = Session(runner, batch)             # empties every row of the runner
            for row, path in enumerate(paths):
                session.load(row, Context.load(path))
        logits = session.decode(ids[:, plan.prompt + i])
        on_logits(i + 1, logits.astype(np.float64))
        _tick(bar, batch)
    on_state(1, *runner.state())


def validate_decoding(reference: Runner, candidates: list[Runner], plan: DecodingPlan,
                      ids: np.ndarray, tolerances: dict[str, float], min_greedy: float,
                      progress: bool | None = None) -> DecodingReport:
    """Run the plan on the reference, then on each candidate, and compare (see the module)."""
    from .loop import progress_bar

    want_logits: list[np.ndarray] = []
    want_states: list[tuple[np.ndarray, np.ndarray]] = []
    reports = []
    with tempfile.TemporaryDirectory(prefix="infini-trt-validate-") as tmp, \
            progress_bar(ids.size * (1 + len(candidates)), "decoding", progress) as bar:
        run_scenario(reference, ids, plan, Path(tmp),
                     lambda i, logits: want_logits.append(logits),
                     lambda j, memory, norm: want_states.append((memory, norm)), bar)
        for runner in candidates:
            outputs = {"logits": OutputReport("logits", tolerances["logits"], unit="step")}
            for name in OUTPUTS[1:]:
                outputs[name] = OutputReport(name, tolerances[name], unit="state")
            report = BackendReport(runner.description, outputs, min_greedy)

            def on_logits(i, logits, report=report):
                report.outputs["logits"].per_segment.append(errors(want_logits[i], logits))
                report.agree += int((logits.argmax(-1) == want_logits[i].argmax(-1)).sum())
                report.positions += logits.shape[0]

            def on_state(j, memory, norm, report=report):
                for name, want, got in zip(OUTPUTS[1:], want_states[j], (memory, norm)):
                    report.outputs[name].per_segment.append(errors(want, got))

            run_scenario(runner, ids, plan, Path(tmp), on_logits, on_state, bar)
            reports.append(report)
    return DecodingReport(plan, reports)


def _tick(bar, n: int) -> None:
    if bar is not None:
        bar.update(n)
