"""The decoding caches: the K/V rows of each sequence's current segment, which the decoding
graph (`extend`) reads and which the runner, not the graph, writes (a graph that updated them in
place would export them as constants).

    k_cache (L, B, Hkv, hd, N)   rotated keys, stored transposed (attention reads them as is)
    v_cache (L, B, Hkv, N, hd)

`cache_window` is how many slots a call reads; `DecodeCaches` keeps the caches of a graph
runner (ONNX Runtime, TensorRT) in flat buffers laid out for the current window, as numpy
arrays on the host or torch tensors on a GPU (arrays.py).
"""
from __future__ import annotations

import math

import numpy as np

from infini_trt.export.config import InfiniConfig

from .arrays import ArraySpace, copy_into


def empty_caches(cfg: InfiniConfig, batch: int, dtype, device=None):
    """Zeroed decoding caches of one segment, as torch tensors of `dtype` on `device` (the
    PyTorch runner's): k_cache (L, B, Hkv, hd, N) (rotated keys, transposed) and v_cache
    (L, B, Hkv, N, hd). Layer i's slices are contiguous: they are what `extend` takes."""
    import torch

    shape = (cfg.n_layers, batch, cfg.n_kv_heads, cfg.segment_len, cfg.head_dim)
    return (torch.zeros(shape, dtype=dtype, device=device).transpose(-1, -2).contiguous(),
            torch.zeros(shape, dtype=dtype, device=device))


WINDOW_STEP = 64        # cache slots; windows grow by max(this, segment_len / 16)


def cache_window(end: int, segment_len: int) -> int:
    """How many of a segment's cache slots to give `extend` when the call's tokens end at
    segment position `end` (the largest start + length of the batch): `end` rounded up to a
    multiple of max(64, segment_len / 16), so that the window changes once every that many
    tokens: a smaller step would save little reading and cost a move of the caches every
    few tokens."""
    step = max(WINDOW_STEP, segment_len // 16)
    return min(segment_len, max(step, -(-end // step) * step))


def write_cache(k_cache, v_cache, k_new, v_new, start, length) -> None:
    """Write new tokens into the decoding caches, in place (the runners' job, not the graph's).

    k_cache (L, B, Hkv, hd, N): rotated keys, stored transposed so that attention reads them
    without a transpose; v_cache (L, B, Hkv, N, hd); k_new, v_new (L, B, Hkv, S, hd) from
    `InfiniLM.extend`. The first length[b] new tokens go to slots start[b] .. on; the rest of
    the S (padding) are dropped. numpy arrays or torch tensors, all four of one kind.
    """
    for b, (s, n) in enumerate(zip(start, length)):
        s, n = int(s), int(n)
        if n:
            k_cache[:, b, :, :, s:s + n] = k_new[:, b, :, :n].swapaxes(-1, -2)
            v_cache[:, b, :, s:s + n] = v_new[:, b, :, :n]


def in_place_pieces(start: np.ndarray, length: np.ndarray, seq: int, segment_len: int,
                    widest: int | None = None) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """How to run `seq` token columns through the in-place extend graph (cached_attention.py)
    -> [(first column, width, start, length)] per call, each at most `widest` columns wide
    (None: as wide as the caches allow; the ONNX Runtime runner reads many tokens in pieces
    of PROMPT_CHUNK, so that its arena holds one piece's activations).

    ONNX Runtime's GroupQueryAttention wants every row's padded chunk to fit in the caches:
    P + width <= segment_len, P being the slots before the row's chunk (start; at least 1,
    also for a row with no real token in the call, which reads one slot and writes none).
    One call where that holds (decoding, a short prompt); otherwise the columns go in
    pieces, each as wide as the rows still reading allow (rows whose real tokens are done
    are given start 0: P = 1), so a row near its segment's end beside a long prompt costs one
    more call, not a bigger cache."""
    # on Python ints: a decoded token's one call, worked out with numpy on arrays of one
    # element, took 50-80 us of a 4 ms token after a run had left the caches cold
    starts, lengths = start.tolist(), length.tolist()
    pieces, first = [], 0
    while first < seq:
        left = [max(n - first, 0) for n in lengths]
        if first and not any(left):            # the rest is padding
            break
        room = min(segment_len - (s + first) if n else segment_len - 1
                   for s, n in zip(starts, left))
        width = max(1, min(seq - first, room, widest or seq))
        pieces.append((first, width,
                       np.array([s + first if n else 0 for s, n in zip(starts, left)], np.int64),
                       np.array([min(n, width) for n in left], np.int64)))
        first += width
    return pieces


def column_pieces(start: np.ndarray, length: np.ndarray, seq: int,
                  widest: int) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """`in_place_pieces` for the portable extend graph, which takes any width: `seq` token
    columns in calls of at most `widest` -> [(first column, width, start, length)]. Each row
    goes on from where its real tokens got to; a row whose tokens are done starts at their end
    and writes nothing (its start stays within the slots it holds: the cache window is fitted
    to the largest start)."""
    pieces = []
    for first in range(0, seq, widest):
        width = min(widest, seq - first)
        pieces.append((first, width, (start + np.minimum(length, first)).astype(np.int64),
                       np.clip(length - first, 0, width).astype(np.int64)))
        if not (length > first + width).any():         # the rest is padding
            break
    return pieces


class DecodeCaches:
    """The decoding state of a graph runner (ONNX Runtime, TensorRT): the K/V caches of the
    current segment (`empty_caches` layout), the buffers the extend graph writes the new
    tokens' rows into, and `write`, which puts those rows into the caches.

    Windowed (an extend graph whose caches have a dynamic `window` axis): the caches hold the
    first `window` slots of the segment (`cache_window` of the tokens' end), so that a token
    early in a segment reads a short cache, not the whole segment's. Each cache lives in one
    flat buffer with every layer at a fixed offset and laid out densely for the current window;
    when the window changes (every max(64, segment_len/16) tokens) the slots in use are moved
    to the new layout through a one-layer scratch buffer. Nothing is allocated after the first
    call; at window N the buffer is the whole (L, B, Hkv, ., .) cache that the fold graph takes.

    In place (the "gqa" decode attention's extend graph, export/cached_attention.py): the keys
    are stored in the values' layout, (L, B, Hkv, N, hd), the graph's inputs and outputs are
    the same whole-segment buffers (its kernel writes the new rows and reads only the slots in
    use), and nothing is written here. `k` is then a transposed view, so that rows are read
    and written (`Runner.read_row`) in the `empty_caches` layout whatever the storage.
    """

    def __init__(self, cfg: InfiniConfig, batch: int, dtype: str, space: ArraySpace,
                 windowed: bool = True, in_place: bool = False):
        """`dtype`: a numpy name ("float32", "float16"); `space`: where the buffers live."""
        self._dims = (cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim)
        self.segment_len, self.space = cfg.segment_len, space
        self.windowed, self.in_place = windowed and not in_place, in_place
        size = int(np.prod(self._dims)) * cfg.segment_len
        self._flat = [space.zeros(size, dtype) for _ in "kv"]
        if not in_place:
            self._scratch = space.empty(size // cfg.n_layers, dtype)
            self._rows = [space.empty(size, dtype) for _ in "kv"]
            self._row_views: dict[int, dict] = {}          # seq -> new_rows' views
        self._layout(cfg.segment_len)

    @classmethod
    def for_graph(cls, spec, cfg: InfiniConfig, batch: int, space: ArraySpace):
        """Caches for the extend graph `spec` (its cache dtype; windowed if it has the axis;
        in place if it takes the tokens' `length`)."""
        cache = spec.input("k_cache_0")
        return cls(cfg, batch, cache.dtype, space, windowed=isinstance(cache.dims[-1], str),
                   in_place="length" in spec.input_names)

    def _layout(self, window: int) -> None:
        """k (L, B, Hkv, hd, window) and v (L, B, Hkv, window, hd) over the flat buffers; each
        layer's slice (the extend graph's input) is contiguous (in place: v's layout for both,
        k a transposed view of it)."""
        layers, batch, heads, hd = self._dims
        stride = batch * heads * hd * self.segment_len           # one layer, at any window
        self.window = window
        rows = (layers, batch, heads, window, hd)
        row_strides = (stride, heads * window * hd, window * hd, hd, 1)
        self.v = self.space.strided(self._flat[1], rows, row_strides)
        if self.in_place:                 # keys stored as rows, read as columns
            keys = self.space.strided(self._flat[0], rows, row_strides)
            self.k = self.space.strided(self._flat[0], (layers, batch, heads, hd, window),
                                        (*row_strides[:3], 1, hd))
        else:
            keys = self.k = self.space.strided(
                self._flat[0], (layers, batch, heads, hd, window),
                (stride, heads * hd * window, hd * window, window, 1))
        self.inputs = {**{f"k_cache_{i}": keys[i] for i in range(layers)},
                       **{f"v_cache_{i}": self.v[i] for i in range(layers)}}
        # the fold graph's: in place, each layer's (io_spec.fold_graph), else stacked
        self.fold_inputs = self.inputs if self.in_place else {"k_cache": keys,
                                                              "v_cache": self.v}
        # in place: the extend graph's cache outputs, bound to its inputs' buffers
        self._written = {**{f"k_cache_out_{i}": keys[i] for i in range(layers)},
                         **{f"v_cache_out_{i}": self.v[i] for i in range(layers)}
                         } if self.in_place else {}

    def fit(self, end: int) -> dict:
        """Make the window hold segment positions 0 .. end-1 (`end`: the largest start + length
        of the call) -> the extend graph's cache inputs."""
        window = cache_window(end, self.segment_len) if self.windowed else self.segment_len
        if window != self.window:
            keep = min(window, self.window)
            old_k, old_v = self.k, self.v
            self._layout(window)
            for i in range(self._dims[0]):
                for old, new in ((old_k[i][..., :keep], self.k[i][..., :keep]),
                                 (old_v[i][:, :, :keep], self.v[i][:, :, :keep])):
                    moving = self._scratch[:math.prod(old.shape)].reshape(old.shape)
                    copy_into(moving, old)
                    copy_into(new, moving)
        return self.inputs

    def reading(self, start: np.ndarray) -> dict:
        """The extend graph's cache inputs for tokens from segment positions `start`: the
        window holds the slots they read (those before each start; a prompt from a segment's
        start reads none). `write` grows it to the new rows after the call."""
        return self.fit(int(start.max()))

    def slots(self, end: int) -> tuple:
        """(k, v) holding at least slots 0 .. end-1, the window never made smaller here (a
        sequence's rows beyond `end` stay)."""
        self.fit(max(end, self.window))
        return self.k, self.v

    def new_rows(self, seq: int) -> dict:
        """The extend graph's outputs besides the logits: {"k_new", "v_new"}, (L, B, Hkv, seq,
        hd) views at fixed addresses; in place, the caches themselves ({"k_cache_out_i": the
        input k_cache_i's buffer, ...}). The same dict for the same `seq`, never changed (an
        IO binding takes it as bound, ort_runner.Binding)."""
        if self.in_place:
            return self._written
        if seq not in self._row_views:
            layers, batch, heads, hd = self._dims
            shape = (layers, batch, heads, seq, hd)
            size = int(np.prod(shape))
            self._row_views[seq] = {"k_new": self._rows[0][:size].reshape(shape),
                                    "v_new": self._rows[1][:size].reshape(shape)}
        return self._row_views[seq]

    def write(self, rows: dict, start: np.ndarray,
              length: np.ndarray) -> None:
        """Put the new rows (`new_rows`) into the caches, the window grown (never made
        smaller) to hold them (in place: the graph wrote them)."""
        if self.in_place:
            return
        self.slots(int((start + length).max()))
        write_cache(self.k, self.v, rows["k_new"], rows["v_new"], start, length)
