"""Passkey retrieval (the paper's Table 3): accuracy by prompt length x key depth.

Each trial is a prompt of exactly `length` tokens (runtime/passkey_data.py) with a random
5-digit key at a given depth, at least one whole segment before the question, so that only the
compressive memory can carry it there. Scoring is exact match of greedy decoding, computed in
one teacher-forced pass: prompt + answer go through the runner segment by segment, and a trial
is right when the argmax at every answer position is the answer digit (then greedy decoding
would have produced exactly those digits).

Trials of one cell run as one batch; prompts are generated segment by segment, so a
million-token cell needs no more memory than a thousand-token one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from infini_trt.export.errors import InputError

from .lengths import length_label, parse_lengths
from .loop import Timer, progress_bar
from .passkey_data import DEPTHS, PasskeyGenerator
from .resources import peak_rss_bytes
from .runners.base import Runner
from .session import Session

def parse_depths(text: str) -> list[tuple[str, float]]:
    """'start,middle,end' or fractions of the admissible range, e.g. '0,0.25,1'."""
    depths = []
    for item in (t.strip() for t in text.split(",")):
        if item in DEPTHS:
            depths.append((item, DEPTHS[item]))
            continue
        try:
            value = float(item)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:
            raise InputError(f"bad depth {item!r} in --depths; use start, middle, end or a "
                             f"fraction between 0 and 1")
        depths.append((item, value))
    return depths


@dataclass
class Cell:
    """One (length, depth) cell of the grid."""

    length: int
    depth: str
    trials: int
    exact: int                    # trials whose 5 greedy digits are all right
    digits: float                 # fraction of answer digits right (the paper's token level)
    answers: list[str] = field(default_factory=list)   # greedy digits, "key->answer" if wrong

    @property
    def accuracy(self) -> float:
        return self.exact / self.trials


@dataclass
class LengthStats:
    length: int
    tokens: int                   # tokens run at this length, all depths and trials
    seconds: float
    tokens_per_s: float
    peak_rss_mb: float            # the process's peak resident memory after this length


@dataclass
class PasskeyResult:
    model: str
    backend: str
    segment_len: int
    trials: int
    seed: int
    cells: list[Cell]
    lengths: list[LengthStats]
    scoring: str = ("exact match of greedy decoding of the 5 answer digits (teacher-forced "
                    "argmax at every answer position)")

    def accuracy(self, length: int, depth: str) -> float:
        return next(c.accuracy for c in self.cells if c.length == length and c.depth == depth)

    def to_dict(self) -> dict:
        out = asdict(self)
        for cell in out["cells"]:
            cell["accuracy"] = cell["exact"] / cell["trials"]
        return out

    def table(self) -> str:
        """The grid: accuracy by depth (rows) x length (columns), then tokens/s and memory."""
        labels = [length_label(s.length) for s in self.lengths]
        depths = list(dict.fromkeys(c.depth for c in self.cells))
        width = max(9, *(len(label) + 2 for label in labels))
        head = f"{'length':<10}" + "".join(f"{label:>{width}}" for label in labels)
        rows = [head, "-" * len(head)]
        for depth in depths:
            cells = [f"{self.accuracy(s.length, depth):.0%}" for s in self.lengths]
            rows.append(f"{depth:<10}" + "".join(f"{c:>{width}}" for c in cells))
        rows.append(f"{'tokens/s':<10}" + "".join(f"{s.tokens_per_s:>{width},.0f}"
                                                  for s in self.lengths))
        rows.append(f"{'peak MiB':<10}" + "".join(f"{s.peak_rss_mb:>{width},.0f}"
                                                  for s in self.lengths))
        return "\n".join(rows)


def answer_argmax(runner: Runner, prompts: list, progress: bool | None = None,
                  desc: str = "passkey") -> np.ndarray:
    """Stream the prompts (one length) as a batch; -> the argmax at every answer-predicting
    position, (B, answer length). Only one segment of ids and logits exists at a time."""
    length, first = prompts[0].length, prompts[0].answer_start - 1
    n = runner.config.segment_len
    session = Session(runner, len(prompts))
    picked = []
    with progress_bar(len(prompts) * length, desc, progress) as bar:
        for start in range(0, length, n):
            stop = min(start + n, length)
            ids = np.stack([p.window(start, stop) for p in prompts])
            lo, hi = max(first, start), min(stop, length - 1)

            def pick(offset: int, logits: np.ndarray, lo=lo, hi=hi) -> None:
                a, b = lo - start - offset, hi - start - offset       # answer positions
                picked.append(logits[:, max(a, 0):max(b, 0)].argmax(-1))

            session.feed(list(ids), progress=False, on_logits=pick if lo < hi else None)
            bar.update(ids.size)
    return np.concatenate(picked, axis=1)


def run_cell(runner: Runner, gen: PasskeyGenerator, length: int, depth: tuple[str, float],
             trials: int, seed: int, progress: bool | None = None) -> Cell:
    """`trials` prompts with keys drawn from (seed, length, depth); scored by exact match."""
    name, value = depth
    rng = np.random.default_rng([seed, length, int(round(value * 1_000_000))])
    prompts = gen.batch(rng, trials, length, value)
    predicted = answer_argmax(runner, prompts, progress, f"{length_label(length)} {name}")
    wanted = np.stack([p.answer_ids for p in prompts])
    right = predicted == wanted
    answers = []
    for p, row, ok in zip(prompts, predicted, right.all(axis=1)):
        words = [_word(gen, t) for t in row]
        said = "".join(words) if all(len(w) == 1 for w in words) else " ".join(words)
        answers.append(said if ok else f"{p.key}->{said}")
    return Cell(length, name, trials, int(right.all(axis=1).sum()), float(right.mean()), answers)


def _word(gen: PasskeyGenerator, token: int) -> str:
    return gen.decode([int(token)]).strip() if gen.decode else f"<{int(token)}>"


def open_task(model: str | Path, lengths: str, depths: str
              ) -> tuple[PasskeyGenerator, list[int], list[tuple[str, float]]]:
    """The generator for `model` (its tokenizer and segment length) and the parsed grid, with
    every length checked, before anything is exported or run."""
    from infini_trt.export.manifest import model_config

    from .tokenizer import model_tokenizer

    cfg = model_config(model)
    tok = model_tokenizer(model, cfg.vocab_size)
    gen = PasskeyGenerator(tok.encode, cfg.segment_len, tok.decode)
    length_list, depth_list = parse_lengths(lengths), parse_depths(depths)
    for length in length_list:
        gen.key_window(length)
    return gen, length_list, depth_list


def run_passkey(runner: Runner, gen: PasskeyGenerator, lengths: list[int],
                depths: list[tuple[str, float]], trials: int, seed: int = 0,
                model: str = "", progress: bool | None = None) -> PasskeyResult:
    """The grid: every length x depth, `trials` trials each, with tokens/s and peak memory
    per length."""
    if trials < 1:
        raise InputError(f"--trials must be at least 1, got {trials}")
    for length in lengths:
        gen.key_window(length)                          # a length too short: say so up front
    # warm-up outside the timings (backends load each graph on first use): one prompt of a
    # few segments, or of the shortest length asked for if that is too short
    warm_length = min(4 * runner.config.segment_len, min(lengths))
    try:
        gen.key_window(warm_length)
    except InputError:
        warm_length = min(lengths)
    answer_argmax(runner, gen.batch(np.random.default_rng(seed), 1, warm_length, 0.5),
                  progress=False)
    cells, stats = [], []
    for length in lengths:
        with Timer() as timer:
            for depth in depths:
                cells.append(run_cell(runner, gen, length, depth, trials, seed, progress))
        tokens = length * trials * len(depths)
        stats.append(LengthStats(length, tokens, timer.seconds, tokens / timer.seconds,
                                 peak_rss_bytes() / 2 ** 20))
    return PasskeyResult(model, runner.description, runner.config.segment_len, trials, seed,
                         cells, stats)
