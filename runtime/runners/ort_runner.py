"""The ONNX Runtime runner: the exported graphs with IO binding and ping-pong state buffers,
so that the state never makes a round trip through host memory.

Every bound buffer lives where the session runs (arrays.py): numpy arrays on the CPU, so that
an exported model runs with ONNX Runtime and numpy alone, and torch tensors on CUDA. Memory
and norm (and the decoding caches) stay where they are between calls, each call writing the
other buffer of a pair. The token ids, segment positions and fold mask are copied into buffers
allocated once per `reset`, and each graph keeps one IOBinding that is re-bound only where a
buffer's address or shape changed, so a decoding call allocates nothing but the logits it
returns (a fresh array that the caller owns).

The graphs' sessions share the weights that they can share at no cost in speed (one array per
distinct content; ort_weights.py, `share_weights`), and on the CPU one arena for their
activations (`share_cpu_arena`: the graphs run one at a time), without ORT's memory pattern,
so that the arena holds one set of activations. A call of the extend graph with a prompt's
tokens gives back what it grew the arena by (a 1,023-token tail needs several times what a
decoded token does): `bench`'s peak RSS of `small` at 1K went from 870 to 609 MiB after its
warm-up read such a tail (Zen 3, 2026-12-03); the next prompt grows the arena again.

Whole prompt segments go through the prefill graph (`prompt_graph="prefill"`), whose session
holds its own pre-packed copy of the MatMul weights (ORT pre-packs per session; its Python API
has no container to share them), or through the extend graph in chunks, then a fold
(`prompt_graph="extend"`): then one session holds the weights. "auto" (the default) takes the
extend graph where it reads a segment about as fast, an unquantized export with the "gqa"
decode attention, and the prefill graph otherwise: a quantized export's prefill graph has row
GEMMs that read a segment 1.7x faster than its 4-bit decoding graph. `small` at 1K, Intel Xeon
AVX-512, 2 threads, 2026-12-07, `bench` against onnxruntime-genai: fp32 peak RSS 352 MiB
against its 375 (585 through the prefill graph), the first segment's prompt 1.08x its speed in
alternation with the retrieval skipped there (export/empty_memory.py; 0.87-0.97x in three runs
before); int4 through the prefill graph 1.65x its int4, through the extend graph 0.88x
(docs/benchmarks.md).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from infini_trt.export.errors import InfiniTrtError, InputError, MissingDependencyError
from infini_trt.export.io_spec import EXTEND, FOLD, PREFILL, SEGMENT
from infini_trt.export.manifest import read_manifest

from ..arrays import ArraySpace, Staging, address, copy_into, dtype_name, to_host
from ..artifacts import verify_export
from ..kv_cache import DecodeCaches, column_pieces, in_place_pieces
from .base import RowState, Runner
from .ort_weights import SharedWeights


DEFAULT_SHARING = "unpacked"     # ort_weights.POLICIES: shared where it costs no speed
# how whole prompt segments are read (`prompt_graph`): "prefill", the prompt-reading graph (a
# second session, holding its own pre-packed weights), or "extend", the decoding graph in
# chunks of PROMPT_CHUNK tokens then a fold (one session holds the weights); "auto" picks one
# for the export (`choose_prompt_graph`)
PROMPT_GRAPHS = (PREFILL, EXTEND)
AUTO = "auto"
PROMPT_CHUNK = 256                # tokens per extend call of many tokens (a prompt's)
KEPT_LOGITS_BYTES = 1 << 20       # an extend call's logits up to this: one kept array


def choose_prompt_graph(manifest) -> str:
    """What "auto" reads whole prompt segments with: the extend graph for an unquantized export
    with the "gqa" decode attention (one session, about as fast), the prefill graph otherwise (a
    quantized export's row GEMMs; the portable decoding graph, not measured for prompts)."""
    return EXTEND if manifest.decode_attention == "gqa" and not manifest.quantization \
        else PREFILL


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime", "the onnxruntime backend",
                                     "pip install onnxruntime (or onnxruntime-gpu)") from None
    return onnxruntime


def session_options(ort, threads: int | None = None, spinning: bool = True):
    """All graph optimisations (ONNX Runtime's fusions: FusedMatMul, MatMulNBits, QuickGelu,
    ...), sequential execution (one graph runs at a time; its kernels use the intra-op pool
    of `threads` threads, default one per physical core). The pool's threads spin between the
    kernels of a run and stop when it returns (`session.force_spinning_stop`): each graph has
    a session and a pool of its own, and a pool left spinning after its run held a core that
    the next graph's pool needed (a fold right after a prompt's last chunk took 43-58 ms
    against 21-27 with this, the chunk after a fold 112-155 against 79-115; decoding 9.5-10.0
    against 8.6-8.9 ms a token; `small`, Intel Xeon, 2 cores, 2026-12-07). `spinning=False`: idle pool
    threads sleep at once, also inside a run, for a process that takes turns with other work
    on the same cores (a spinning pool holds a core the other needs)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if spinning:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def providers_for(ort, device: str | None) -> tuple[list[str], str]:
    """(providers, device) for 'cpu', 'cuda' or None (CUDA when onnxruntime has it)."""
    available = ort.get_available_providers()
    if device in (None, "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"
    if device == "cuda":
        raise InfiniTrtError("this onnxruntime has no CUDA provider; "
                             "pip install onnxruntime-gpu, or use --device cpu")
    return ["CPUExecutionProvider"], "cpu"


def element_type(dtype: str):
    """What IO binding takes as the element type of a dtype name (bf16 has no numpy type)."""
    if dtype == "bfloat16":
        from onnx import TensorProto

        return TensorProto.BFLOAT16
    return np.dtype(dtype).type


class Binding:
    """One graph's session and IOBinding, kept between calls: a name is re-bound only when its
    array's address, shape or dtype changed (ping-pong buffers alternate between two). Every
    array is dense in its shape (the caches' layer slices are).

    What is given again is taken as bound without looking at it: an array object given again
    for the same name (a view's address, shape and dtype never change; the binding holds it,
    so its id is not reused), and a whole group of names given again as the same dict object
    at the same place in the call (the runner's groups, each layer's state or the caches, are
    made once and never changed; a name is in one group). The decoding graph of the "gqa"
    decode attention has some 50 inputs and outputs: working out each one's address and
    dtype name took about 0.3 ms of a 4 ms token."""

    def __init__(self, session, device: str, name: str = "graph"):
        self.session, self.device, self.name = session, device, name
        self.io = session.io_binding()
        self.bound: dict[str, tuple] = {}
        self.arrays: dict[str, object] = {}            # name -> the array last bound to it
        self.groups: tuple = ()                        # the last call's groups, in order

    def run(self, inputs: tuple[dict, ...], outputs: tuple[dict, ...], options=None) -> None:
        """`inputs`, `outputs`: groups of name -> array. `options`: the call's RunOptions
        (None: the defaults)."""
        groups = (*inputs, *outputs)
        binders = (self.io.bind_input,) * len(inputs) + (self.io.bind_output,) * len(outputs)
        for k, (group, bind) in enumerate(zip(groups, binders)):
            if k < len(self.groups) and self.groups[k] is group:
                continue
            for name, array in group.items():
                if self.arrays.get(name) is array:
                    continue
                key = (address(array), tuple(array.shape), array.dtype)
                if self.bound.get(name) != key:
                    bind(name, self.device, 0, element_type(dtype_name(array)), list(key[1]),
                         key[0])
                    self.bound[name] = key
                self.arrays[name] = array
        self.groups = groups
        try:
            self.session.run_with_iobinding(self.io, options)
        except Exception as exc:  # onnxruntime raises its own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InfiniTrtError(f"onnxruntime failed running the {self.name} graph: {first}"
                                 ) from None


_SHARED_ARENA = False                 # the process's one CPU arena is registered


def share_cpu_arena(ort) -> None:
    """Register one CPU arena for the sessions of this process (`session.use_env_allocators`):
    the graphs run one at a time, so that their activations can live in one arena (the
    largest graph's) instead of one arena per session, each grown to its own largest call.
    It grows by what is asked (not to the next power of two)."""
    global _SHARED_ARENA
    if _SHARED_ARENA:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                             ort.OrtMemType.DEFAULT)
    try:
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
    except Exception:      # onnxruntime's own error: one is registered already (the caller's)
        pass
    _SHARED_ARENA = True


class OrtRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, export_dir: str | Path, device: str | None = None,
                 threads: int | None = None, share_weights: str = DEFAULT_SHARING,
                 spinning: bool = True, prompt_graph: str = AUTO):
        """`share_weights`: which weights the graphs' sessions share (ort_weights.POLICIES:
        "all", "unpacked" or "none"); `self.weights` says what each session got and why.
        `spinning`: see `session_options`. `prompt_graph`: PROMPT_GRAPHS or AUTO."""
        if prompt_graph not in (AUTO, *PROMPT_GRAPHS):
            raise InfiniTrtError(f"prompt_graph must be one of "
                                 f"{', '.join((AUTO, *PROMPT_GRAPHS))}, got {prompt_graph!r}")
        self._ort = import_onnxruntime()
        self.manifest = read_manifest(export_dir)
        self.config = self.manifest.config
        self.dtype = self.manifest.dtype
        self.weights_sha256 = self.manifest.source.get("weights_sha256")
        self.providers, self.device = providers_for(self._ort, device)
        self._release = self._ort.RunOptions()          # a run that shrinks the arena after
        self._release.add_run_config_entry("memory.enable_memory_arena_shrinkage",
                                           f"{self.device}:0")
        self.threads, self.spinning = threads, spinning
        if prompt_graph == AUTO:
            prompt_graph = choose_prompt_graph(self.manifest)
        # an export from before prefill (or decoding) graphs reads prompts as it can
        usable = [g for g in (prompt_graph, *PROMPT_GRAPHS) if g in self.manifest.graphs]
        self.prompt_graph = usable[0] if usable else SEGMENT
        # whether the extend graph computes no logits when asked for none (io_spec.extend_graph)
        self._no_rows_allowed = EXTEND in self.manifest.graphs and \
            self.manifest.graph(EXTEND).axes["rows"][0] == 0
        # whether it skips the retrieval while the memory is empty (export/empty_memory.py)
        self._skips_empty = EXTEND in self.manifest.graphs and \
            "memory_empty" in self.manifest.graph(EXTEND).input_names
        if self.dtype == "bfloat16" and self.device == "cpu":
            raise InfiniTrtError("onnxruntime's CPU provider has no bfloat16 kernels; export "
                                 "with --dtype fp32 or fp16 for onnxruntime on the CPU, or run "
                                 "this export with --backend tensorrt")
        if self.manifest.decode_attention == "gqa" and self.device != "cpu":
            # its GroupQueryAttention on CUDA takes fp16 and bf16 only: an fp32 node would run
            # on the CPU, away from the caches it writes in place
            raise InfiniTrtError(f"{export_dir} decodes with GroupQueryAttention over caches "
                                 f"written in place, made for ONNX Runtime's CPU provider; "
                                 f"run it with --device cpu, or export with "
                                 f"--decode-attention portable for CUDA")
        if self.manifest.decode_attention == "gqa" and FOLD in self.manifest.graphs and \
                "k_cache_0" not in self.manifest.graph(FOLD).input_names:
            raise InfiniTrtError(f"{export_dir} was exported by an earlier infini-trt, whose "
                                 f"fold graph takes the caches stacked; export it again")
        self.space = ArraySpace(self.device)          # numpy on the CPU, torch on CUDA
        self.weights = SharedWeights(share_weights, self.device)
        self.sessions: dict = {}
        self.bindings: dict[str, Binding] = {}
        self._kept_logits: dict[tuple, object] = {}   # shape -> array (`_extend_logits`)
        verify_export(self.manifest)       # fail early on a missing, changed or swapped file
        # sessions load on first use: a prompt read by `run` needs the prefill graph, never
        # the segment graph (its session would add its activations, and what of the weights
        # it does not share)

    @property
    def description(self) -> str:
        return f"onnxruntime-{self.device} ({self.manifest.precision})"

    def load_graphs(self) -> None:
        for graph in ((PREFILL,) if self.prompt_graph == PREFILL else ()) + (EXTEND, FOLD):
            if graph in self.manifest.graphs:
                self.session(graph)

    def session(self, graph: str):
        """The InferenceSession of one graph, loaded on first use."""
        if graph not in self.sessions:
            path = self.manifest.graph_file(graph)
            options = session_options(self._ort, self.threads, self.spinning)
            if self.device == "cpu":
                # no memory pattern: with one, the arena kept both the tensors of a shape's
                # first run and the pattern's single block planned from it (twice the
                # activations), and one more block per decoding window size
                options.enable_mem_pattern = False
                share_cpu_arena(self._ort)
                options.add_session_config_entry("session.use_env_allocators", "1")
            source = self.weights.session_source(graph, path, options)
            try:
                self.sessions[graph] = self._ort.InferenceSession(source, options,
                                                                  providers=self.providers)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise InfiniTrtError(f"onnxruntime cannot load {path}: {exc}") from None
        return self.sessions[graph]

    def _run(self, graph: str, inputs: tuple[dict, ...], outputs: tuple[dict, ...],
             release: bool = False) -> None:
        """Run one graph with every input and output bound to an array (zero-copy): groups of
        name -> array (`Binding.run`). `release`: give the arena's free memory back to the
        system after the call (a prompt's many tokens need far more than decoding does)."""
        if graph not in self.bindings:
            self.bindings[graph] = Binding(self.session(graph), self.device, graph)
        self.bindings[graph].run(inputs, outputs, self._release if release else None)

    def _logits(self, shape: tuple):
        """A fresh logits array: the caller keeps it (prefill holds some across calls)."""
        return self.space.empty((*shape, self.config.vocab_size))

    def _extend_logits(self, shape: tuple) -> tuple:
        """(the extend graph's logits output for rows of `shape`, whether it is kept): on the
        host and when small (decoding's), one array for the shape, kept bound, whose values
        the caller gets as a copy; else a fresh one. A fresh array each decoded token, bound
        again, cost about 0.1 ms of a 4 ms token (`small`, int4) after a run had left the
        caches cold; the copy about 20 us."""
        full = (*shape, self.config.vocab_size)
        if self.space.device != "cpu" or 4 * math.prod(full) > KEPT_LOGITS_BYTES:
            return self._logits(shape), False
        if full not in self._kept_logits:
            self._kept_logits[full] = self.space.empty(full)
        return self._kept_logits[full], True

    # state ---------------------------------------------------------------------------------
    def _reset(self, batch: int) -> None:
        """Zero the state. The buffers of a batch of the same size before are used again: a
        new set beside the old ones, which the bindings hold until they are re-bound, had
        raised `bench`'s peak RSS by both caches (32 MiB for `small`). The caches are not
        cleared (every slot is written before a token reads it), only put aside until the
        first extend."""
        cfg, space = self.config, self.space
        self.current = 0
        if getattr(self, "memory", None) and self.memory[0].shape[1] == batch:  # (L, B, ...)
            for pair in (*self.memory, *self.norm):
                pair[...] = 0
            self._spare_caches, self.caches = self.caches or self._spare_caches, None
            self.memory_empty[...] = True
            return
        self._spare_caches = None
        self.memory = [space.zeros(cfg.memory_shape(batch)) for _ in "ab"]
        self.norm = [space.zeros(cfg.norm_shape(batch)) for _ in "ab"]
        # each layer's slices of either pair, made once: the in-place extend and fold graphs'
        # inputs, and (with "_out") the fold graph's outputs
        self._layer_state = [self._layer_slices(memory, norm) for memory, norm in
                             zip(self.memory, self.norm)]
        self._layer_state_out = [self._layer_slices(memory, norm, "_out") for memory, norm in
                                 zip(self.memory, self.norm)]
        self.caches = None            # decoding: allocated on first extend
        self.ids = Staging(space.zeros(batch * cfg.segment_len, "int64"))
        self.logit_rows = Staging(space.zeros(batch * cfg.segment_len, "int64"))
        self.start = Staging(space.zeros(batch, "int64"))
        self.length = Staging(space.zeros(batch, "int64"))
        self.fold_mask = Staging(space.zeros(batch, "bool"))
        # true while every row's memory and norm are zero: the extend graph's layers then skip
        # the retrieval (export/empty_memory.py); one array, bound once, set in place
        self.memory_empty = space.zeros((), "bool")
        self.memory_empty[...] = True

    def _layer_slices(self, memory, norm, out: str = "") -> dict:
        layers = range(self.config.n_layers)
        return {**{f"memory{out}_{i}": memory[i] for i in layers},
                **{f"norm{out}_{i}": norm[i] for i in layers}}

    def _state_tensors(self) -> tuple:
        return self.memory[self.current], self.norm[self.current]

    def _cache_tensors(self, end: int) -> tuple:
        return self._caches().slots(end)

    def _caches(self) -> DecodeCaches:
        if self.caches is None:
            self.caches = self._spare_caches or DecodeCaches.for_graph(
                self.manifest.graph(EXTEND), self.config, self.batch, self.space)
        return self.caches

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.array(to_host(self.memory[self.current])),
                np.array(to_host(self.norm[self.current])))

    def set_state(self, memory: np.ndarray, norm: np.ndarray) -> None:
        self.check_state(memory, norm)
        copy_into(self.memory[self.current], memory)
        copy_into(self.norm[self.current], norm)
        self.memory_empty[...] = not (np.any(memory) or np.any(norm))

    def write_row(self, b: int, row: RowState) -> None:
        super().write_row(b, row)
        if np.any(row.memory) or np.any(row.norm):
            self.memory_empty[...] = False

    # graphs --------------------------------------------------------------------------------
    def _step(self, ids: np.ndarray):
        return self._segment(SEGMENT, ids, "logits", self._logits(ids.shape))

    def _advance(self, ids: np.ndarray):
        if self.prompt_graph == EXTEND and ids.shape[1] == self.config.segment_len:
            return self._advance_by_extend(ids)
        if PREFILL in self.manifest.graphs:              # (a shorter segment: fold takes N)
            return self._segment(PREFILL, ids, "last_logits", self._logits(ids.shape[:1]))
        return super()._advance(ids)

    def _advance_by_extend(self, ids: np.ndarray):
        """A whole segment (every row from position 0) through the decoding graph (`_extend`:
        in chunks of PROMPT_CHUNK tokens), then folded into the state: what the prefill graph
        computes, without its session and its copy of the weights. Each chunk attends to the
        cache that the chunks before it wrote and causally to itself, as the prefill graph's
        blocks of queries do (export/split_attention.py)."""
        batch, n = ids.shape
        last = self._extend(ids, np.zeros(batch, np.int64), np.full(batch, n, np.int64),
                            np.full((batch, 1), n - 1, np.int64))
        self._fold(np.ones(batch, bool))
        return last[:, 0]

    def _segment(self, graph: str, ids: np.ndarray, name: str, logits):
        """One segment through `graph` (segment or prefill), state ping-ponged."""
        cur, nxt = self.current, 1 - self.current
        self._run(graph,
                  ({"input_ids": self.ids.load(ids), "memory": self.memory[cur],
                    "norm": self.norm[cur]},),
                  ({name: logits, "memory_out": self.memory[nxt], "norm_out": self.norm[nxt]},))
        self._state_written()
        return logits

    def _extend(self, ids: np.ndarray, start: np.ndarray, length: np.ndarray,
                rows: np.ndarray, release: bool | None = None):
        """The tokens `ids` through the extend graph, in calls of at most PROMPT_CHUNK
        columns (`column_pieces`; `in_place_pieces` for the in-place graph of the "gqa"
        decode attention, which also splits where a row's chunk would not fit in the
        caches), so that the arena holds one call's activations: a 1,023-token tail in one
        call had grown it by 47-51 MiB. Each call computes the logits of the tokens of `rows`
        that it holds, and none where it holds none (a graph whose `rows` axis allows 0; the
        LM head reads 62 MiB of weights for `small`). `release`: shrink the arena after the
        last call (default: for more than one token). The portable graph returns the new
        tokens' keys and values, written into the caches here; the in-place one writes them
        itself."""
        release = ids.shape[1] > 1 if release is None else release
        if self._caches().in_place:
            pieces = in_place_pieces(start, length, ids.shape[1], self.config.segment_len,
                                     PROMPT_CHUNK)
        else:
            pieces = column_pieces(start, length, ids.shape[1], PROMPT_CHUNK)
        if len(pieces) == 1:
            return self._extend_call(ids, *pieces[0][2:], rows, release)
        logits = self._logits(rows.shape)
        for k, (first, width, piece_start, piece_length) in enumerate(pieces):
            inside = (rows >= first) & (rows < first + width)
            # the columns of `rows` that name a token of this call (one, for a graph that
            # computes at least one row)
            columns = np.flatnonzero(inside.any(axis=0))
            if not columns.size and not self._no_rows_allowed:
                columns = np.zeros(1, np.int64)
            got = self._extend_call(ids[:, first:first + width], piece_start, piece_length,
                                    np.clip(rows[:, columns] - first, 0, width - 1),
                                    release and k == len(pieces) - 1)
            if inside.any():
                logits[self.space.mask(inside)] = got[self.space.mask(inside[:, columns])]
        return logits

    def _extend_call(self, ids: np.ndarray, start: np.ndarray, length: np.ndarray,
                     rows: np.ndarray, release: bool):
        """One call of the extend graph."""
        caches = self.caches.reading(start)
        new = self.caches.new_rows(ids.shape[1])
        logits, kept = self._extend_logits(rows.shape)
        tokens = {"input_ids": self.ids.load(ids), "start": self.start.load(start),
                  "logit_rows": self.logit_rows.load(rows)}
        if self.caches.in_place:          # each layer's state bound apart (no copy)
            tokens["length"] = self.length.load(length)
            if self._skips_empty:
                tokens["memory_empty"] = self.memory_empty
            state = self._layer_state[self.current]
        else:
            state = {"memory": self.memory[self.current], "norm": self.norm[self.current]}
        self._run(EXTEND, (tokens, state, caches), ({"logits": logits}, new), release=release)
        self.caches.write(new, start, length)
        return logits.copy() if kept else logits

    def _fold(self, mask: np.ndarray) -> None:
        if self.caches is None:
            raise InputError("fold() needs a segment in the K/V cache: call extend() first")
        self.caches.fit(self.config.segment_len)          # the whole segment
        cur, nxt = self.current, 1 - self.current
        if self.caches.in_place:          # each layer's caches and state bound apart
            state, state_out = self._layer_state[cur], self._layer_state_out[nxt]
        else:
            state = {"memory": self.memory[cur], "norm": self.norm[cur]}
            state_out = {"memory_out": self.memory[nxt], "norm_out": self.norm[nxt]}
        # the arena given back after: what the fold of a whole segment needs stays otherwise
        # until the next prompt (40 MiB of `bench`'s peak RSS for `small`), and a fold is
        # rare (once a segment)
        self._run(FOLD, (self.caches.fold_inputs, state, {"fold": self.fold_mask.load(mask)}),
                  (state_out,), release=True)
        self._state_written()

    def _state_written(self) -> None:
        """A graph wrote the other buffer of each state pair: it is the current one now, and
        may hold memory."""
        self.current = 1 - self.current
        self.memory_empty[...] = False
