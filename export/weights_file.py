"""One file of large weights for all the graphs of an export (`weights.bin`).

The segment, prefill and extend graphs use the same weights. Saved inline, each graph file
carried its own copy (three copies of the model on disk, each serialized, written and hashed
once per graph: about 2.5 s per graph for `small`). Here every distinct large tensor is
written once into one file, at an offset aligned to ALIGNMENT bytes, and each graph refers to
it as standard ONNX external data (location, offset, length), which ONNX Runtime, TensorRT's
parser, onnx.load and runtime/runners/onnx_file.py read.

While a graph is being built, a large initializer is a *pending* reference: data_location
EXTERNAL with the one entry ("location", PENDING + key), its values an array held here
(`tensor`, `array`). `place(graph)` writes what the graph refers to that is not written yet
and turns its pending references into real ones; inline initializers (the constants that a
trace made) stay in their graph. `finish()` closes the file and returns its sha256, hashed
while written.

Keys: a parameter's key is its name (given once per export by `stamp.weight_tensors`); a
tensor computed from pending ones (`export/onnx_export.fold_weight_parts`: a weight's
transposed parts) is keyed by its content's type and sha256 (`keep`), so that equal results
of different nodes (the same weight transposed by the segment's and the decoding's layer
template) are stored once. What a folded node computed is remembered by a digest of the
node and its inputs (`derived`): a later graph with the same node finds it without
computing it again.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx

from .files import EXPORT_WEIGHTS_FILE as WEIGHTS_FILE

ALIGNMENT = 4096            # bytes: a page, so that a reader may map each tensor by itself
INLINE_BYTES = 1024         # initializers up to this size stay in the graph (ONNX's default)
PENDING = "\0pending:"      # the location of a reference not yet written (never a file name)


def _key_of(tensor: onnx.TensorProto) -> str | None:
    """The key of a pending reference, or None for any other tensor."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location" and entry.value.startswith(PENDING):
            return entry.value[len(PENDING):]
    return None


def _reference(tensor: onnx.TensorProto, entries: dict[str, str]) -> None:
    """Make `tensor` an external reference with `entries` (its bytes, if any, dropped)."""
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)


class WeightsFile:
    """The weights file of one export being written into `directory` (see the module
    docstring). Nothing is created until a graph refers to a tensor."""

    def __init__(self, directory: str | os.PathLike, name: str = WEIGHTS_FILE):
        self.path = Path(directory) / name
        self.arrays: dict[str, np.ndarray] = {}           # key -> values (C-contiguous)
        self.types: dict[str, int] = {}                   # key -> ONNX data type
        self.placed: dict[str, tuple[int, int]] = {}      # key -> (offset, length) in the file
        self.derived: dict[str, tuple[str, tuple]] = {}   # a computation -> (key, shape)
        self._file = None
        self._size = 0
        self._digest = hashlib.sha256()

    # ---------------------------------------------------------------- pending references
    def tensor(self, name: str, key: str, array: np.ndarray, data_type: int
               ) -> onnx.TensorProto:
        """A pending reference named `name` to `array` (kept as it is, not copied, when
        C-contiguous) of ONNX type `data_type`, stored under `key`."""
        if key not in self.arrays and key not in self.placed:
            self.arrays[key] = np.ascontiguousarray(array)
            self.types[key] = data_type
        tensor = onnx.TensorProto(name=name, dims=list(array.shape), data_type=data_type)
        _reference(tensor, {"location": PENDING + key})
        return tensor

    def keep(self, array: np.ndarray, data_type: int) -> str:
        """Store `array` (of ONNX type `data_type`) under its content's key -> that key.
        Arrays of equal bytes and type share one entry whatever their shapes (the entry's
        shape is the first one's: take the shape from the tensor, not the entry)."""
        array = np.ascontiguousarray(array)
        digest = hashlib.sha256(array.reshape(-1).view(np.uint8)).hexdigest()
        key = f"sha256:{data_type}:{digest}"
        if key not in self.arrays and key not in self.placed:
            self.arrays[key], self.types[key] = array, data_type
        return key

    def take_inline(self, graph: onnx.GraphProto) -> None:
        """Make each inline initializer of `graph` over INLINE_BYTES a pending reference,
        keyed by its content (a graph written by another tool: a quantizer's)."""
        from onnx import numpy_helper

        for tensor in graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL and \
                    len(tensor.raw_data) > INLINE_BYTES:
                array = numpy_helper.to_array(tensor)
                key = self.keep(array, tensor.data_type)
                tensor.CopyFrom(self.tensor(tensor.name, key, array, tensor.data_type))

    def array(self, tensor: onnx.TensorProto) -> np.ndarray | None:
        """The values of a pending reference (None for any other tensor; KeyError for one
        whose values were dropped, `drop_written`)."""
        key = _key_of(tensor)
        return None if key is None else self.arrays[key]

    key = staticmethod(_key_of)     # the key of a pending reference (None for any other)

    # ---------------------------------------------------------------- writing
    def place(self, graph: onnx.GraphProto) -> bool:
        """Write the tensors that `graph`'s pending references refer to and that are not in
        the file yet; each pending reference becomes a real one. Inline initializers stay
        where they are (the constants that a trace made: a graph without weights, like the
        fold graph, needs no weights file). -> whether the graph refers to the file."""
        refers = False
        for tensor in graph.initializer:
            key = _key_of(tensor)
            if key is None:
                continue
            if key not in self.placed:
                self._write(key)
            offset, length = self.placed[key]
            _reference(tensor, {"location": self.path.name, "offset": str(offset),
                                "length": str(length)})
            refers = True
        if self._file is not None:
            self._file.flush()
        return refers

    def _write(self, key: str) -> None:
        if self._file is None:
            self._file = open(self.path, "wb")
        padding = -self._size % ALIGNMENT
        if padding:
            self._file.write(bytes(padding))
            self._digest.update(bytes(padding))
            self._size += padding
        data = self.arrays[key].reshape(-1).view(np.uint8)
        self._file.write(data)
        self._digest.update(data)
        self.placed[key] = (self._size, data.nbytes)
        self._size += data.nbytes

    def drop_written(self) -> None:
        """Let go of the values of what is in the file already (a graph referring to them
        again is still placed: by key)."""
        for key in self.placed:
            self.arrays.pop(key, None)

    def finish(self) -> str | None:
        """Close the file -> its sha256, or None when no graph referred to it (no file)."""
        if self._file is None:
            return None
        self._file.close()
        self._file = None
        return self._digest.hexdigest()
