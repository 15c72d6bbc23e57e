"""A decoding session: B independent sequences (rows) on one runner, with the segment
bookkeeping that every caller of `extend` and `fold` would otherwise repeat.

    session = Session(runner, batch=2)
    last = session.feed([prompt_a, prompt_b])      # any lengths -> (B, V) last-token logits
    last = session.decode(next_ids)                # one token per active row -> (B, V)
    context = session.save(0)                      # row 0 as a value (see context.py)
    session.load(1, context)                       # row 1 continues from it: a fork

The session owns each row's segment position, tokens seen and last logits. Feeding folds a
segment into memory exactly when it completes; full segments that every row has go through
the prompt-reading graph (`advance`), everything else through the K/V cache (`extend`). A row
can be reset, loaded or left idle while the others go on: rows never see each other.
Inputs are numpy (or lists), logits come back as float32 numpy arrays (the runner contract).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from infini_trt.export.errors import InputError

from .loop import progress_bar
from .runners.base import Runner, RowState


class Session:
    def __init__(self, runner: Runner, batch: int = 1):
        self.runner = runner
        self.config = runner.config
        runner.reset(batch)
        self.batch = batch
        self.position = np.zeros(batch, dtype=np.int64)    # next token's segment position
        self.seen = np.zeros(batch, dtype=np.int64)        # tokens of each row so far
        self.last: list[np.ndarray | None] = [None] * batch   # logits after the last token

    # rows ---------------------------------------------------------------------------------
    def reset(self, row: int | None = None) -> None:
        """Empty one row (M = z = 0, position 0), or every row."""
        if row is None:
            self.runner.reset(self.batch)
            self.position[:], self.seen[:] = 0, 0
            self.last = [None] * self.batch
            return
        self._check_row(row)
        self.runner.write_row(row, RowState.empty(self.config))
        self.position[row], self.seen[row], self.last[row] = 0, 0, None

    def save(self, row: int, text_tail=()):
        """Row `row` as a Context (runtime/context.py): its state, position, tokens seen and
        last logits, the runner's model fingerprint, and `text_tail` (generated ids whose text
        is not final yet)."""
        from .context import Context

        self._check_row(row)
        state = self.runner.read_row(row, int(self.position[row]))
        last = self.last[row]
        return Context(state=state, tokens=int(self.seen[row]),
                       last_logits=None if last is None else np.array(last, np.float32),
                       fingerprint=model_fingerprint(self.runner), made_by=self.runner.description,
                       text_tail=list(text_tail), config=self.config.to_dict())

    def load(self, row: int, context) -> None:
        """Make row `row` continue from `context`, refused if it is another model's."""
        self._check_row(row)
        context.check_model(model_fingerprint(self.runner), self.config)
        self.runner.write_row(row, context.state)
        self.position[row], self.seen[row] = context.state.position, context.tokens
        self.last[row] = (None if context.last_logits is None else
                          np.array(context.last_logits, np.float32))

    # tokens -------------------------------------------------------------------------------
    def feed(self, rows: Sequence | np.ndarray, progress: bool | None = None,
             on_logits: Callable[[int, np.ndarray], None] | None = None,
             wants_logits: Callable[[int, int], bool] | None = None,
             desc: str = "prefill") -> np.ndarray:
        """Run tokens into the rows: rows[b] is row b's next tokens (any number, none or None
        for a row that waits) -> the logits after each row's last token, (B, V) (a row given
        nothing keeps its last logits; rows that never had a token get zeros).

        on_logits(start, logits (B, S, V)): every token's logits, for a rectangular feed
        (every row the same number of tokens, from the same position); start counts from the
        first token fed. wants_logits(start, stop): False where on_logits need not be called
        for tokens start .. stop-1 (those segments then go through the prompt-reading graph)."""
        tokens = [np.asarray([] if r is None else r, dtype=np.int64).reshape(-1) for r in rows]
        if len(tokens) != self.batch:
            raise InputError(f"give tokens for each of the {self.batch} rows, got {len(tokens)}")
        lengths = np.array([len(t) for t in tokens])
        vocab = self.config.vocab_size
        for t in tokens:
            if t.size and (t.min() < 0 or t.max() >= vocab):
                bad = int(t.min() if t.min() < 0 else t.max())
                raise InputError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        if on_logits is not None and (len(set(lengths)) > 1 or len(set(self.position)) > 1):
            raise InputError("on_logits needs every row fed the same tokens count from the "
                             "same segment position")
        n, done = self.config.segment_len, np.zeros(self.batch, dtype=np.int64)
        with progress_bar(int(lengths.sum()), desc, progress) as bar:
            while (done < lengths).any():
                left = lengths - done
                if (self.position == 0).all() and (left >= n).all():
                    self._segment(tokens, done, on_logits, wants_logits)
                    take = np.full(self.batch, n)
                else:
                    take = np.minimum(left, n - self.position)
                    self._extend(tokens, done, take, on_logits)
                done += take
                bar.update(int(take.sum()))
        return self.last_logits()

    def decode(self, tokens, active=None) -> np.ndarray:
        """One token for each active row (tokens (B,); active (B,) bool, default all) -> the
        logits after it, (B, V) (inactive rows keep theirs)."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        active = np.ones(self.batch, bool) if active is None else np.asarray(active, bool)
        if tokens.shape != (self.batch,) or active.shape != (self.batch,):
            raise InputError(f"decode takes one token and one active flag per row "
                             f"({self.batch}), got {tokens.shape} and {active.shape}")
        given = tokens[active]
        if given.size and (given.min() < 0 or given.max() >= self.config.vocab_size):
            raise InputError(f"a token id is outside the vocabulary [0, "
                             f"{self.config.vocab_size})")
        self._extend(tokens[:, None], np.zeros(self.batch, np.int64), active.astype(np.int64),
                     None)
        return self.last_logits()

    def last_logits(self) -> np.ndarray:
        """(B, V): the logits after each row's last token (zeros for a row without one)."""
        if any(x is None for x in self.last):
            zero = np.zeros(self.config.vocab_size, np.float32)
            return np.stack([zero if x is None else x for x in self.last])
        return np.array(self.last)              # (np.stack: twice the time, a decoded token)

    # the graphs ---------------------------------------------------------------------------
    def _segment(self, tokens, done, on_logits, wants_logits) -> None:
        """A full segment of every row through the segment graph (all logits wanted) or the
        prompt-reading one; its memory update is the graph's, so the rows stay at 0."""
        n = self.config.segment_len
        ids = np.stack([t[d:d + n] for t, d in zip(tokens, done)])
        start = int(done[0])
        want = on_logits is not None and (wants_logits is None or wants_logits(start, start + n))
        logits = self.runner.step(ids) if want else self.runner.advance(ids)
        last = logits[:, -1] if want else logits
        if want:
            on_logits(start, logits)
        self.last = [last[b] for b in range(self.batch)]
        self.seen += n

    def _extend(self, tokens, done, take, on_logits) -> None:
        """The next `take[b]` tokens of each row through the K/V cache, then a fold of the rows
        whose segment that completes."""
        ids = np.zeros((self.batch, int(take.max())), dtype=np.int64)
        for b, (t, d, k) in enumerate(zip(tokens, done, take)):
            ids[b, :k] = t[d:d + k]
        if on_logits is None:                  # the LM head on each row's last token only
            last = self.runner.extend_checked(ids, self.position, take, last_only=True)
        else:
            logits = self.runner.extend_checked(ids, self.position, take)
            on_logits(int(done[0]), logits)
            last = logits[np.arange(self.batch), np.maximum(take - 1, 0)]
        for b in np.flatnonzero(take):
            self.last[b] = last[b]
        self.position += take
        self.seen += take
        full = self.position == self.config.segment_len
        self.runner.fold(full)
        self.position[full] = 0

    def _check_row(self, row: int) -> None:
        if not 0 <= row < self.batch:
            raise InputError(f"row {row} is outside the session's {self.batch} rows")


def model_fingerprint(runner: Runner) -> dict:
    """What a context must match to be loaded into `runner`: the model's config and the
    sha256 of the checkpoint's weights (`runner.weights_sha256`)."""
    return _fingerprint(runner.config, getattr(runner, "weights_sha256", None))


def path_fingerprint(model) -> dict:
    """`model_fingerprint` of what `model` (a checkpoint or an export directory) would open,
    without opening it: a context can be checked before any export or load."""
    from infini_trt.export.manifest import is_export_dir, read_manifest

    from .artifacts import file_sha256

    if is_export_dir(model):
        manifest = read_manifest(model)
        return _fingerprint(manifest.config, manifest.source.get("weights_sha256"))
    from infini_trt.export.checkpoint import WEIGHTS_FILE, read_checkpoint   # (torch)

    ckpt = read_checkpoint(model)
    return _fingerprint(ckpt.config, file_sha256(ckpt.path / WEIGHTS_FILE))


def _fingerprint(config, weights_sha256: str | None) -> dict:
    import hashlib
    import json

    text = json.dumps(config.to_dict(), sort_keys=True).encode()
    return {"config_sha256": hashlib.sha256(text).hexdigest(), "weights_sha256": weights_sha256}


def read_context(path, model):
    """A context file, checked against `model` (a path) before any work -> Context."""
    from infini_trt.export.manifest import model_config

    from .context import Context

    context = Context.load(path)
    context.check_model(path_fingerprint(model), model_config(model))
    return context
