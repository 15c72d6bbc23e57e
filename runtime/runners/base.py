"""The runner contract and the input checks shared by every backend."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from infini_trt.export.config import InfiniConfig
from infini_trt.export.errors import InputError

from ..arrays import copy_into, host_logits, to_host

@dataclass
class RowState:
    """One sequence's whole decoding state, as host arrays: memory (L, Hkv, dk, dv) and norm
    (L, Hkv, dk), and the K/V rows of its current segment, k (L, Hkv, hd, P) (rotated keys,
    transposed as the caches hold them) and v (L, Hkv, P, hd), P being its position in the
    segment. Its size depends on P < segment_len only, never on the tokens seen."""

    memory: np.ndarray
    norm: np.ndarray
    k: np.ndarray
    v: np.ndarray

    @property
    def position(self) -> int:
        return int(self.k.shape[-1])

    @classmethod
    def empty(cls, cfg: InfiniConfig, dtype=np.float32) -> "RowState":
        layers, heads, hd = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
        return cls(np.zeros((layers, heads, cfg.dk, cfg.dv), dtype),
                   np.zeros((layers, heads, cfg.dk), dtype),
                   np.zeros((layers, heads, hd, 0), dtype), np.zeros((layers, heads, 0, hd), dtype))


class Runner:
    """Runs the segment step of one model and carries its state (memory, norm) between calls.

    Subclasses implement `_reset`, `_step`, `state` and `set_state` (decoding: `_extend`,
    `_fold`; `_advance` where they can do better than `_step`); the public methods check their
    input first, so that every backend refuses bad input with the same clear message, and
    return logits as float32 numpy arrays on the host, whatever the backend computes them as
    (its `_step` etc. may return torch tensors, on any device).
    """

    backend = "?"
    config: InfiniConfig
    dtype: str = "float32"          # compute dtype of the weights/graph
    batch: int = 0
    weights_sha256: str | None = None   # of the checkpoint the weights come from (contexts)

    # lifecycle ---------------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    @property
    def description(self) -> str:
        return f"{self.backend} ({self.dtype})"

    def load_graphs(self) -> None:
        """Load now every graph that reading prompts and decoding use (graph runners load
        them on first use), so that the timings that follow are of the work alone."""

    # the contract ------------------------------------------------------------------------
    def reset(self, batch: int) -> None:
        """Start `batch` new sequences: M_0 = z_0 = 0."""
        if batch < 1:
            raise InputError(f"batch must be at least 1, got {batch}")
        self.batch = batch
        self._reset(batch)

    def step(self, input_ids) -> np.ndarray:
        """One segment for every sequence: input_ids (B, S), 1 <= S <= segment_len ->
        float32 logits (B, S, V), a numpy array that the caller owns. Advances the state."""
        ids = self.check_ids(input_ids)
        return host_logits(self._step(ids))

    def advance(self, input_ids) -> np.ndarray:
        """`step` for reading a prompt: the same state update, the logits of the last token
        only, (B, V). Backends with a prefill graph skip the LM head on the other tokens."""
        ids = self.check_ids(input_ids)
        return host_logits(self._advance(ids))

    def extend(self, input_ids, start, length, last_only: bool = False) -> np.ndarray:
        """Decoding: continue each sequence's current segment from its K/V cache.

        input_ids (B, S) are tokens at segment positions start[b] .. start[b]+S-1, of which the
        first length[b] are real (the rest padding: their logits mean nothing and they are not
        written); start + length <= segment_len. -> float32 logits (B, S, V); with last_only,
        those after each sequence's last real token only, (B, V) (the LM head skips the
        others; a row of length 0 gets its first token's, which mean nothing). The caches
        live in the runner; `reset` empties them; memory and norm are read, not changed."""
        ids = self.check_ids(input_ids)
        start = self._check_positions("start", start)
        length = self._check_positions("length", length)
        if (start + length > self.config.segment_len).any():
            raise InputError(f"start + length must not pass the segment length "
                             f"{self.config.segment_len}")
        if (length > ids.shape[1]).any():
            raise InputError("length must not exceed the number of tokens given")
        return self.extend_checked(ids, start, length, last_only)

    def extend_checked(self, ids: np.ndarray, start: np.ndarray, length: np.ndarray,
                       last_only: bool = False) -> np.ndarray:
        """`extend` without its checks, for a caller that makes its arguments as `extend`
        passes them on (`Session`): ids an int64 (B, S) array of tokens in the vocabulary,
        start and length int64 (B,) and not negative, start + length <= segment_len,
        length <= S. The checks were a fifth of the Python of a decoded token."""
        b, s = ids.shape
        rows = (np.maximum(length - 1, 0)[:, None] if last_only else
                np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)))
        logits = host_logits(self._extend(ids, start, length, np.ascontiguousarray(rows)))
        return logits[:, 0] if last_only else logits

    def fold(self, mask) -> None:
        """Decoding: write the full segment in the caches into memory for the sequences where
        mask (B,) is true; the caller then starts their next segment at position 0."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.batch,):
            raise InputError(f"fold mask must have shape ({self.batch},), got {mask.shape}")
        if mask.any():
            self._fold(mask)

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """The current (memory, norm) as host arrays."""
        raise NotImplementedError

    def set_state(self, memory: np.ndarray, norm: np.ndarray) -> None:
        raise NotImplementedError

    # rows --------------------------------------------------------------------------------
    def read_row(self, b: int, position: int) -> RowState:
        """Sequence b's state: memory, norm and the first `position` K/V slots of its segment
        (copies; the runner goes on unchanged)."""
        self._check_row(b, position)
        memory, norm = self._state_tensors()
        k, v = self._cache_tensors(position)
        parts = (memory[:, b], norm[:, b], k[:, b, :, :, :position], v[:, b, :, :position])
        return RowState(*(np.array(to_host(t)) for t in parts))

    def write_row(self, b: int, row: RowState) -> None:
        """Make sequence b's state `row` (the other sequences are left as they are); its next
        token goes to segment position row.position."""
        cfg = self.config
        self._check_row(b, row.position)
        layers, heads, hd = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
        want = {"memory": (layers, heads, cfg.dk, cfg.dv), "norm": (layers, heads, cfg.dk),
                "k": (layers, heads, hd, row.position), "v": (layers, heads, row.position, hd)}
        for name, shape in want.items():
            got = getattr(row, name).shape
            if tuple(got) != shape:
                raise InputError(f"a row's {name} must have shape {shape}, got {tuple(got)}")
        memory, norm = self._state_tensors()
        k, v = self._cache_tensors(row.position)
        p = row.position
        for dst, src in ((memory[:, b], row.memory), (norm[:, b], row.norm),
                         (k[:, b, :, :, :p], row.k), (v[:, b, :, :p], row.v)):
            copy_into(dst, src)

    def _check_row(self, b: int, position: int) -> None:
        if not self.batch:
            raise InputError("call reset(batch) before reading or writing rows")
        if not 0 <= b < self.batch:
            raise InputError(f"row {b} is outside the batch of {self.batch}")
        if not 0 <= position < self.config.segment_len:
            raise InputError(f"a row's segment position must be in [0, "
                             f"{self.config.segment_len}), got {position}")

    def _state_tensors(self) -> tuple:
        """The current memory (L, B, ...) and norm, as arrays (numpy or torch) that may be
        written in place."""
        raise NotImplementedError(f"the {self.backend} runner has no row access")

    def _cache_tensors(self, end: int) -> tuple:
        """The K/V caches (`kv_cache.empty_caches` layout) holding at least slots 0 .. end-1
        of every sequence, made if there are none yet; never fewer slots than they hold."""
        raise NotImplementedError(f"the {self.backend} runner has no row access")

    def _reset(self, batch: int) -> None:
        raise NotImplementedError

    def _step(self, ids: np.ndarray):
        raise NotImplementedError

    def _advance(self, ids: np.ndarray):
        return self._step(ids)[:, -1]

    def _extend(self, ids: np.ndarray, start: np.ndarray, length: np.ndarray,
                rows: np.ndarray):
        raise NotImplementedError(f"the {self.backend} runner does not decode")

    def _fold(self, mask: np.ndarray) -> None:
        raise NotImplementedError(f"the {self.backend} runner does not decode")

    # checks ------------------------------------------------------------------------------
    def check_ids(self, input_ids) -> np.ndarray:
        """-> int64 array (B, S), or InputError with what is wrong."""
        ids = to_host(input_ids)
        if not self.batch:
            raise InputError("call reset(batch) before step()")
        if ids.dtype.kind not in "iu":
            raise InputError(f"input_ids must be integers, got {ids.dtype}")
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise InputError(f"input_ids must have shape (batch={self.batch}, seq), "
                             f"got {tuple(ids.shape)}")
        n = self.config.segment_len
        if not 1 <= ids.shape[1] <= n:
            raise InputError(f"a segment step takes 1 to {n} tokens (segment_len), got "
                             f"{ids.shape[1]}; longer inputs are streamed segment by segment")
        low, high = (ids.min(), ids.max()) if ids.size else (0, 0)
        if low < 0 or high >= self.config.vocab_size:
            bad = int(low if low < 0 else high)
            raise InputError(f"token id {bad} is outside the vocabulary [0, "
                             f"{self.config.vocab_size})")
        return np.ascontiguousarray(ids, dtype=np.int64)

    def _check_positions(self, name: str, values) -> np.ndarray:
        arr = np.asarray(values)
        if arr.dtype.kind not in "iu" or arr.shape != (self.batch,):
            raise InputError(f"{name} must be {self.batch} integers, got {arr.dtype} "
                             f"{tuple(arr.shape)}")
        if (arr < 0).any():
            raise InputError(f"{name} must not be negative")
        return arr.astype(np.int64)

    def check_state(self, memory: np.ndarray, norm: np.ndarray) -> None:
        cfg, b = self.config, self.batch
        for name, arr, shape in (("memory", memory, cfg.memory_shape(b)),
                                 ("norm", norm, cfg.norm_shape(b))):
            if tuple(arr.shape) != tuple(shape):
                raise InputError(f"{name} must have shape {tuple(shape)}, got {tuple(arr.shape)}")


def select_rows(logits, rows: np.ndarray):
    """logits (B, S, V) of every token -> those of the tokens `rows` (B, R): (B, R, V), for a
    runner whose `_extend` computes them all (numpy arrays or torch tensors)."""
    batch = np.arange(rows.shape[0])[:, None]
    if isinstance(logits, np.ndarray):
        return logits[batch, rows]
    import torch

    return logits[torch.from_numpy(batch).to(logits.device),
                  torch.from_numpy(rows).to(logits.device)]
