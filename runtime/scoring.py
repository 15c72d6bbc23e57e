"""Teacher-forced scoring: logits and perplexity of a token sequence of any length."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from infini_trt.export.errors import InfiniTrtError, InputError
from infini_trt.export.files import atomic_file

from .loop import Timer
from .resources import format_bytes, peak_rss_bytes
from .runners.base import Runner
from .session import Session


@dataclass
class ScoreResult:
    backend: str
    batch: int
    tokens: int                 # per sequence
    predicted: int              # positions with a next token, all sequences
    nll: float                  # mean negative log-likelihood (nats/token)
    perplexity: float
    seconds: float
    tokens_per_s: float
    peak_rss_mb: float

    def to_dict(self) -> dict:
        return asdict(self)


def read_tokens(path: str | Path, tokenizer=None, vocab_size: int | None = None
                ) -> tuple[np.ndarray, bool]:
    """A token file -> (ids (B, T) int64, was_1d). `.npy` holds ints ([T] or [B, T]); any
    other file is text, encoded with `tokenizer`. With `vocab_size`, ids outside
    [0, vocab_size) are refused (checked before the cast to int64, which would wrap)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a token file (.npy ids or text)")
    if not path.is_file():
        raise InputError(f"no such token file: {path}")
    if path.suffix == ".npy":
        try:
            ids = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{path} is not a readable .npy file ({exc})") from None
        if not isinstance(ids, np.ndarray):                 # np.load opened an .npz archive
            ids.close()
            raise InputError(f"{path} is an .npz archive, not a .npy array; write the ids "
                             f"with numpy.save")
        if ids.dtype.kind not in "iu":
            raise InputError(f"{path} holds {ids.dtype} values; token ids must be integers")
        if ids.ndim not in (1, 2) or ids.size == 0:
            raise InputError(f"{path} must hold token ids of shape [T] or [B, T], got "
                             f"{list(ids.shape)}")
        bad = ids[(ids < 0) | (ids >= vocab_size)] if vocab_size is not None else ids[:0]
        if bad.size:
            raise InputError(f"{path}: token id {int(bad.flat[0])} is outside the vocabulary "
                             f"[0, {vocab_size})")
        if ids.dtype.kind == "u" and ids.max() > np.iinfo(np.int64).max:
            raise InputError(f"{path}: token id {int(ids.max())} is outside any vocabulary")
        return (ids[None] if ids.ndim == 1 else ids).astype(np.int64), ids.ndim == 1
    if tokenizer is None:
        raise InputError(f"{path} is text, and this model has no tokenizer")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is neither .npy nor UTF-8 text") from None
    ids = tokenizer.encode(text)
    if not ids:
        raise InputError(f"{path} holds no tokens")
    return np.asarray(ids, dtype=np.int64)[None], True


def logits_bytes(tokens: np.ndarray, vocab_size: int) -> int:
    """Size of the float32 logits of every token of `tokens` (B, T)."""
    return 4 * tokens.size * vocab_size


def check_logits_room(path: str | Path, nbytes: int) -> None:
    """Refuse a --logits-out that the disk it lands on has no room for, before the work."""
    import shutil

    parent = Path(path).resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if nbytes > free:
        raise InputError(f"the logits need {format_bytes(nbytes)} and {parent} has "
                         f"{format_bytes(free)} free; score fewer tokens or write elsewhere")


def score(target: Runner | Session, tokens: np.ndarray, logits_out: str | Path | None = None,
          squeeze: bool = False, progress: bool | None = None) -> ScoreResult:
    """Stream `tokens` (B, T) through a runner (new sequences) or a Session (its rows go on
    from where they are, e.g. a loaded context); mean NLL of each next token, perplexity,
    throughput. A session's rows that have last logits predict the first token too. With
    `logits_out` every logit is written to a .npy file ((B,) T, V)."""
    session = target if isinstance(target, Session) else Session(target, tokens.shape[0])
    runner = session.runner
    batch, total = tokens.shape
    if batch != session.batch:
        raise InputError(f"{batch} rows of tokens for a session of {session.batch}")
    if total < 2:
        raise InputError("scoring needs at least 2 tokens")
    if logits_out is not None:
        check_logits_room(logits_out, logits_bytes(tokens, runner.config.vocab_size))
    nll_sum, predicted = 0.0, 0
    known = [b for b in range(batch) if session.last[b] is not None]
    if known:                                       # the context predicts the first token
        nll_sum += negative_log_likelihood(session.last_logits()[known], tokens[known, 0])
        predicted += len(known)

    def on_logits(start: int, logits: np.ndarray) -> None:
        nonlocal nll_sum, predicted
        if not np.isfinite(logits).all():
            raise InfiniTrtError(f"{runner.description} produced NaN or infinite logits "
                                 f"in the segment at token {start:,}; the model or its "
                                 f"export is broken (check it with `infini-trt validate`)")
        s = logits.shape[1]
        targets = tokens[:, start + 1:start + s + 1]
        n = targets.shape[1]
        if n:
            nll_sum += negative_log_likelihood(logits[:, :n], targets)
            predicted += batch * n
        if out is not None:
            out.write(start, logits)

    with Timer() as timer, _LogitsFile(logits_out, tokens.shape, runner.config.vocab_size,
                                       squeeze) as out:
        session.feed(list(tokens), progress=progress, on_logits=on_logits, desc="score")
    nll = nll_sum / predicted
    return ScoreResult(runner.description, batch, total, predicted, nll, float(np.exp(nll)),
                       timer.seconds, batch * total / timer.seconds, peak_rss_bytes() / 2**20)


def negative_log_likelihood(logits: np.ndarray, targets: np.ndarray,
                            rows: int = 256) -> float:
    """The summed -log p(target) of logits (..., V) at targets (...): logsumexp less the
    target's logit, `rows` positions at a time (so the exponentials of a whole segment never
    exist at once), the sums in float64."""
    flat = logits.reshape(-1, logits.shape[-1])
    wanted = np.asarray(targets).reshape(-1)
    total = 0.0
    for i in range(0, len(flat), rows):
        block, chosen = flat[i:i + rows], wanted[i:i + rows]
        top = block.max(axis=-1, keepdims=True)
        log_sum = np.log(np.exp(block - top).sum(axis=-1, dtype=np.float64)) + top[:, 0]
        total += float((log_sum - block[np.arange(len(block)), chosen]).sum())
    return total


class _LogitsFile:
    """A .npy written segment by segment (memory-mapped), renamed into place on success."""

    def __init__(self, path, shape, vocab, squeeze):
        self.path, self.shape, self.vocab, self.squeeze = path, shape, vocab, squeeze

    def __enter__(self):
        if self.path is None:
            return None
        self._atomic = atomic_file(self.path)
        tmp = self._atomic.__enter__()
        shape = (*self.shape, self.vocab)
        self.array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                               shape=shape[1:] if self.squeeze else shape)
        return self

    def write(self, start: int, logits: np.ndarray) -> None:
        if self.squeeze:
            self.array[start:start + logits.shape[1]] = logits[0]
        else:
            self.array[:, start:start + logits.shape[1]] = logits

    def __exit__(self, *exc):
        if self.path is None:
            return False
        self.array.flush()
        del self.array
        return self._atomic.__exit__(*exc)
