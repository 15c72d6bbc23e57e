"""One copy of an export's weights for all of its ONNX Runtime sessions.

The graphs of an export (segment, prefill, extend) name the same weights, and each
InferenceSession would load its own copy. `SharedWeights` finds every graph's large
initializers (onnx_file.read_graph: from the file, without parsing the model) and keeps ONE
host array per distinct content: for a weight in the export's weights file (which the exporter
wrote once per content, at 4 KiB-aligned offsets) a copy-on-write memory map of its bytes,
nothing read, only the pages that a kernel touches resident (a Gather touches the embedding
rows of the tokens seen: with `small`'s 65 MB embedding mapped, its extend session's process
held 241 MiB instead of 304 read, 2026-12-06). Resident means mapped: a fault maps the
page-cache pages around the one touched as well (Linux's fault-around, which MADV_RANDOM does
not stop), so rows spread over the table map far more than their own pages (64 / 256 / 1,024
random rows of a mapped 65 MB region, the file in the page cache: +9 / +19 / +45 MiB of
RssFile, their own pages 0.1 / 0.5 / 3 MiB; 6.18 kernel, 2026-12-07), and a prompt of 1K
random tokens ends with the whole table resident as if read. For an
inline one (older exports) an aligned array keyed by ONNX type, shape and the
sha256 of the bytes: an initializer is shared only with one of equal content, whatever the
names (the graphs of one export name different constants alike). Each session is then given

  - the graph with those initializers as references to their bytes in the graph file (ORT
    reads from there only what it does not take from us: constants that its optimizers fold
    into new ones, and the initializers this policy leaves to the session), and
  - `SessionOptions.add_initializer(name, OrtValue)` for each shared one: ORT runs on the
    array's buffer as it is (no copy), so the arrays live as long as the sessions (here).

Policies (what to share):

  "unpacked"  only what no kernel pre-packs (embedding tables, norms, ...), pre-packing on:
              each session keeps its own packed MatMul weights, and speed is unchanged.
  "all"       every large initializer, with ORT's pre-packing off. Pre-packing makes a
              per-session copy of each MatMul/Gemm weight in MLAS's layout (and frees the
              original only when the session owns it), so shared weights must stay unpacked
              to exist once. The least memory, but MLAS then packs per call: decoding is
              slower, and much slower for a batch of sequences (prefill is not).
  "none"      nothing (each session loads its graph file as it is).

Either way only initializers whose every use leaves them as they are (SHAREABLE_INPUTS) are
shared: ORT's optimizers rewrite some constants in place, under their own names.

"all" falls back to "unpacked" for a graph where unpacked weights would be far slower
(MatMulNBits computes from unpacked int8 blocks by dequantizing the whole weight per call);
nothing is shared where the sessions do not run on the host (a host array would be copied to
the device anyway) or for a session that saves its optimized model; `reasons` says why.
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infini_trt.export.errors import InfiniTrtError
from infini_trt.export.files import EXPORT_WEIGHTS_FILE

from .onnx_file import GraphFile, Weight, consumers, read_graph

POLICIES = ("all", "unpacked", "none")
ALIGNMENT = 64                         # bytes: MLAS's vector loads, a cache line

# (op type, input index) of the uses that ORT's graph optimizers leave a constant alone at:
# they may replace the node (MatMul -> FusedMatMul, Gemm; a norm fused into
# SkipSimplifiedLayerNormalization) but never rewrite that input. Elsewhere they may rewrite
# an initializer in place under its own name (the transpose optimizer transposes or
# unsqueezes the constant operands of the elementwise ops it pushes a Transpose through),
# and a shared one would then be used in its old layout: those stay with their session.
SHAREABLE_INPUTS = {
    "Gather": (0,), "MatMul": (1,), "Gemm": (1, 2), "MatMulNBits": (1, 2, 3, 5),
    "MatMulIntegerToFloat": (1, 3, 5), "LayerNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1,), "RMSNormalization": (1,),
}
# (op type, input index) whose constant the CPU kernels pre-pack (and then free, when the
# session owns it and no other node reads it)
PREPACKED_INPUTS = {
    "MatMul": (1,), "Gemm": (1,), "FusedMatMul": (1,), "MatMulNBits": (1, 2, 3),
    "MatMulIntegerToFloat": (1,), "DynamicQuantizeMatMul": (1,), "MatMulInteger": (1,),
    "QLinearMatMul": (3,), "Conv": (1,), "FusedConv": (1,), "ConvTranspose": (1,),
    "QLinearConv": (3,), "LSTM": (1, 2), "GRU": (1, 2), "DynamicQuantizeLSTM": (1, 2),
    "Attention": (1,), "QAttention": (1,),
}
# op types that need pre-packed weights to be fast (unpacked, they dequantize per call)
NEEDS_PREPACKING = ("MatMulNBits",)


@dataclass
class Entry:
    """One distinct weight: the host array and the OrtValue over its buffer."""

    array: np.ndarray
    value: object
    names: set[str] = field(default_factory=set)       # "graph:initializer" that use it


@dataclass
class Prepared:
    """What one session is made from: the model's bytes and the initializers it is given."""

    model: bytes
    shared: dict[str, object]           # initializer name -> OrtValue
    folder: Path                        # where the model's external references lie
    disable_prepacking: bool


def shareable(uses: set[tuple[str, int]]) -> bool:
    """Whether every use of a constant leaves it as it is (SHAREABLE_INPUTS)."""
    return bool(uses) and all(i in SHAREABLE_INPUTS.get(op, ()) for op, i in uses)


def prepacked(uses: set[tuple[str, int]]) -> bool:
    """Whether every use of a constant is one that a kernel pre-packs (ORT then frees it)."""
    return bool(uses) and all(i in PREPACKED_INPUTS.get(op, ()) for op, i in uses)


# numpy dtypes of the ONNX tensor types (TensorProto.DataType) that have one: bfloat16, the
# float8 and 4-bit types have none (their initializers stay with their session)
_NUMPY_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32",
                 7: "int64", 9: "bool", 10: "float16", 11: "float64", 12: "uint32",
                 13: "uint64", 14: "complex64", 15: "complex128"}


def _numpy_dtype(data_type: int):
    """The numpy dtype of an ONNX type, or None (bfloat16, float8, int4: no numpy array)."""
    name = _NUMPY_DTYPES.get(data_type)
    return None if name is None else np.dtype(name)


def _aligned_empty(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes]


class SharedWeights:
    """The weights of one export's graphs, one array per distinct content (see the module
    docstring). `session_source(graph, path, options)` -> what that graph's session is made
    from; `policies` and `reasons` say what each session got and why; `entries` hold the
    arrays (keep this object as long as the sessions)."""

    def __init__(self, policy: str = "unpacked", device: str = "cpu"):
        if policy not in POLICIES:
            raise InfiniTrtError(f"weight sharing must be one of {', '.join(POLICIES)}, got "
                                 f"{policy!r}")
        self.requested = policy
        self.policy = policy if device == "cpu" and sys.byteorder == "little" else "none"
        self.reasons: dict[str, str] = {}            # graph -> why it got another policy
        if self.policy != policy:
            self.reasons["*"] = (f"weights are shared on the CPU only (sessions on {device})"
                                 if device != "cpu" else "ONNX's raw data is little-endian")
        self.policies: dict[str, str] = {}           # graph -> the policy its session got
        self.entries: dict[tuple, Entry] = {}
        self._at: dict[tuple, Entry] = {}            # (file, offset, length, type) -> entry
        self._maps: dict[Path, np.ndarray] = {}      # weights file -> its pages, mapped

    def session_source(self, graph: str, path: str | Path, options) -> str | bytes:
        """What to make `graph`'s InferenceSession from: the model's bytes, the shared weights
        given to `options` (its SessionOptions); or the file's path where nothing is shared."""
        if options.optimized_model_filepath and self.policy != "none":
            # the saved model would refer to the graph file for every shared weight
            self.reasons[graph] = "its session saves the optimized model, whole"
            prepared = None
        else:
            prepared = self.prepare(graph, path)
        if prepared is None:
            self.policies[graph] = "none"
            return os.fspath(path)
        self.apply(prepared, options)
        return prepared.model

    def prepare(self, graph: str, path: str | Path) -> Prepared | None:
        """The model and shared initializers for `graph`'s session, or None to load the file
        as it is (policy "none")."""
        if self.policy == "none":
            return None
        parsed = read_graph(path)
        uses = consumers(parsed.model, str(path))
        policy = self.policy
        slow = sorted({op for op, _ in set().union(*uses.values())} & set(NEEDS_PREPACKING))
        if policy == "all" and slow:
            policy = "unpacked"
            self.reasons[graph] = (f"{', '.join(slow)} needs its weights pre-packed (per "
                                   f"session) to be fast")
        self.policies[graph] = policy
        shared = {}
        for weight in parsed.weights:
            dtype, used = _numpy_dtype(weight.data_type), uses.get(weight.name, set())
            if dtype is None or not shareable(used) or (policy == "unpacked" and
                                                         prepacked(used)):
                continue
            shared[weight.name] = self._entry(graph, parsed, weight, dtype).value
        return Prepared(parsed.model, shared, parsed.path.parent,
                        disable_prepacking=policy == "all")

    def apply(self, prepared: Prepared, options) -> None:
        """Give `options` (the session's) the shared initializers and the settings that go
        with them."""
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         os.fspath(prepared.folder))
        if prepared.disable_prepacking:
            options.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in prepared.shared.items():
            options.add_initializer(name, value)

    @property
    def nbytes(self) -> int:
        """Bytes held for all sessions together."""
        return sum(e.array.nbytes for e in self.entries.values())

    def _entry(self, graph: str, parsed: GraphFile, weight: Weight, dtype) -> Entry:
        """The entry of `weight`'s content. A weight in the export's weights file (whose every
        region the exporter wrote once for one content, aligned) is that file's pages,
        memory-mapped: nothing is read, and only the pages a kernel touches become resident
        (a Gather reads the embedding rows of the tokens seen). Any other (inline raw_data, a
        graph's own .data file) is read into an aligned array, kept only when no entry has
        that content yet. A place that was read already is not read again."""
        from onnxruntime import OrtValue

        count = int(np.prod(weight.dims, dtype=np.int64))
        if count * dtype.itemsize != weight.length:
            raise InfiniTrtError(f"initializer {weight.name!r}: {weight.length} bytes for "
                                 f"shape {list(weight.dims)} of {dtype}")
        file = self._file(parsed, weight)
        place = (file, weight.offset, weight.length, weight.data_type)
        entry = self._at.get(place)
        if entry is None or entry.array.shape != tuple(weight.dims):
            if file.name == EXPORT_WEIGHTS_FILE and weight.offset % ALIGNMENT == 0:
                key, raw = ("mapped", *place, weight.dims), None      # mapped if new
            else:
                raw = _aligned_empty(weight.length)
                with open(file, "rb") as f:
                    self._read(f, weight, memoryview(raw))
                key = (weight.data_type, weight.dims, hashlib.sha256(raw).hexdigest())
            if key not in self.entries:
                raw = self._mapped(file, weight) if raw is None else raw
                array = raw.view(dtype).reshape(weight.dims)
                self.entries[key] = Entry(array, OrtValue.ortvalue_from_numpy(array))
            entry = self._at[place] = self.entries[key]
        entry.names.add(f"{graph}:{weight.name}")
        return entry

    def _mapped(self, file: Path, weight: Weight) -> np.ndarray:
        """`weight`'s bytes in `file`, which is mapped once, whole and copy-on-write (ORT
        never writes to a shared initializer, SHAREABLE_INPUTS; were it to, the write would
        stay in this process)."""
        if file not in self._maps:
            size = file.stat().st_size
            if size == 0:
                raise InfiniTrtError(f"{file} is empty")
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="c", shape=(size,))
        mapped = self._maps[file]
        if weight.offset + weight.length > mapped.size:
            raise InfiniTrtError(f"{file} ends inside initializer {weight.name!r}")
        return mapped[weight.offset:weight.offset + weight.length]

    @staticmethod
    def _read(f, weight: Weight, into: memoryview) -> None:
        got = os.preadv(f.fileno(), [into], weight.offset)
        if got != len(into):
            raise InfiniTrtError(f"{f.name} ends inside initializer {weight.name!r}")

    def _file(self, parsed: GraphFile, weight: Weight) -> Path:
        file = (parsed.path.parent / weight.file).resolve()
        if parsed.path.parent.resolve() not in file.parents:
            raise InfiniTrtError(f"{parsed.path}: initializer {weight.name!r} points outside "
                                 f"its directory ({weight.file})")
        return file
