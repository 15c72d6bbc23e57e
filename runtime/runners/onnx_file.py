"""Where an ONNX file keeps its initializers' bytes, read without parsing them into memory.

    graph = read_graph("export/prefill.onnx")
    graph.weights       # [Weight(name, data_type, dims, file, offset, length)], the large ones
    graph.model         # the ModelProto's bytes with every one of those as external data

An export's graphs refer to their weights in the export's one weights file (weights.bin,
export/weights_file.py); older exports carry them inline (raw_data) or beside the graph
(<file>.data). To
give ONNX Runtime one copy of them for several graphs, the runner must know each large
initializer's bytes and hand ORT the graph without them. `onnx.load` would parse the whole
file (every weight) into a ModelProto first; this walks the protobuf wire format instead:
only the fields' headers are read, the weights' bytes are skipped over and recorded as
(file, offset, length). Every other byte of the model is kept as it is; the large
initializers become references to where their bytes already are (the graph file itself, at
the raw_data's offset), so the returned model is valid on its own: ORT reads from there what
it does not get from the caller.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

from infini_trt.export.errors import InfiniTrtError

# ONNX field numbers (onnx.proto3)
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER = 1, 5
NODE_INPUT, NODE_OP_TYPE, NODE_ATTRIBUTE = 1, 4, 5
ATTRIBUTE_GRAPH, ATTRIBUTE_GRAPHS = 6, 11
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_NAME, TENSOR_RAW_DATA = 1, 2, 8, 9
TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 13, 14
ENTRY_KEY, ENTRY_VALUE = 1, 2
EXTERNAL = 1                          # TensorProto.DataLocation.EXTERNAL

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Weight:
    """One initializer's bytes: `length` bytes at `offset` of `file` (a path relative to the
    graph's directory), of ONNX type `data_type` and shape `dims`."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class GraphFile:
    path: Path
    model: bytes                      # the ModelProto, large initializers as external data
    weights: tuple[Weight, ...]


class _Wire:
    """Reads protobuf fields from a buffer (an mmap: only the bytes looked at are read)."""

    def __init__(self, buffer, path: Path):
        self.buffer, self.path = buffer, path

    def varint(self, pos: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            if pos >= len(self.buffer):
                raise self.error("a varint runs past the end of the file")
            byte = self.buffer[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, pos
            shift += 7
            if shift > 63:
                raise self.error("a varint is longer than 10 bytes")

    def fields(self, start: int, end: int):
        """(number, wire type, value or (payload start, payload end), field start, field end)
        for each field in [start, end)."""
        pos = start
        while pos < end:
            first = pos
            tag, pos = self.varint(pos)
            number, wire = tag >> 3, tag & 7
            if wire == VARINT:
                value, pos = self.varint(pos)
            elif wire == FIXED64:
                value, pos = None, pos + 8
            elif wire == FIXED32:
                value, pos = None, pos + 4
            elif wire == LEN:
                size, pos = self.varint(pos)
                value, pos = (pos, pos + size), pos + size
            else:
                raise self.error(f"unsupported protobuf wire type {wire}")
            if pos > end:
                raise self.error("a field runs past the end of its message")
            yield number, wire, value, first, pos

    def error(self, what: str) -> InfiniTrtError:
        return InfiniTrtError(f"{self.path} is not a readable ONNX file: {what}")


def _key(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, LEN) + _varint(len(payload)) + payload


def _string_entry(key: str, value: str) -> bytes:
    return _len_field(TENSOR_EXTERNAL_DATA, _len_field(ENTRY_KEY, key.encode())
                      + _len_field(ENTRY_VALUE, value.encode()))


def consumers(model: bytes, label: str = "the model") -> dict[str, set[tuple[str, int]]]:
    """{value name: {(op type, input index)}} over a ModelProto's nodes and those of their
    subgraphs (an If's branches, a Loop's body), read from the wire format: without onnx,
    whose import costs a runner ~1 s and 17 MiB."""
    wire = _Wire(model, Path(label))
    found: dict[str, set[tuple[str, int]]] = {}

    def text(value) -> str:
        return bytes(model[slice(*value)]).decode()

    def graph(start: int, end: int) -> None:
        for number, kind, value, *_ in wire.fields(start, end):
            if number == GRAPH_NODE and kind == LEN:
                node(*value)

    def node(start: int, end: int) -> None:
        inputs, op, subgraphs = [], "", []
        for number, kind, value, *_ in wire.fields(start, end):
            if kind != LEN:
                continue
            if number == NODE_INPUT:
                inputs.append(text(value))
            elif number == NODE_OP_TYPE:
                op = text(value)
            elif number == NODE_ATTRIBUTE:
                subgraphs += [v for n, k, v, *_ in wire.fields(*value)
                              if k == LEN and n in (ATTRIBUTE_GRAPH, ATTRIBUTE_GRAPHS)]
        for i, name in enumerate(inputs):
            found.setdefault(name, set()).add((op, i))
        for sub in subgraphs:
            graph(*sub)

    for number, kind, value, *_ in wire.fields(0, len(model)):
        if number == MODEL_GRAPH and kind == LEN:
            graph(*value)
    return found


def read_graph(path: str | Path, min_bytes: int = 1024) -> GraphFile:
    """The graph at `path` with its initializers of at least `min_bytes` bytes (inline raw_data
    or external data) listed and turned into external references; smaller ones and those held
    in typed fields (float_data, ...) stay inline."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        wire = _Wire(buffer, path)
        parts, weights = [], []
        for number, kind, value, first, last in wire.fields(0, len(buffer)):
            if number == MODEL_GRAPH and kind == LEN:
                parts.append(_len_field(MODEL_GRAPH,
                                        _graph(wire, *value, path.name, min_bytes, weights)))
            else:
                parts.append(bytes(buffer[first:last]))
    return GraphFile(path, b"".join(parts), tuple(weights))


def _graph(wire: _Wire, start: int, end: int, file: str, min_bytes: int,
           weights: list) -> bytes:
    parts = []
    for number, kind, value, first, last in wire.fields(start, end):
        if number == GRAPH_INITIALIZER and kind == LEN:
            tensor, weight = _tensor(wire, *value, file, min_bytes)
            parts.append(_len_field(GRAPH_INITIALIZER, tensor) if weight
                         else bytes(wire.buffer[first:last]))
            if weight:
                weights.append(weight)
        else:
            parts.append(bytes(wire.buffer[first:last]))
    return b"".join(parts)


def _tensor(wire: _Wire, start: int, end: int, file: str, min_bytes: int
            ) -> tuple[bytes, Weight | None]:
    """(the TensorProto rewritten as an external reference, its Weight), or (b"", None) for
    an initializer left as it is."""
    buffer = wire.buffer
    kept, dims, data_type, name, raw, external, location = [], [], 0, "", None, {}, 0
    for number, kind, value, first, last in wire.fields(start, end):
        if number == TENSOR_RAW_DATA and kind == LEN:
            raw = value
            continue
        if number == TENSOR_EXTERNAL_DATA and kind == LEN:
            entry = {n: bytes(buffer[slice(*v)]).decode() for n, k, v, *_ in
                     wire.fields(*value) if k == LEN}
            external[entry.get(ENTRY_KEY, "")] = entry.get(ENTRY_VALUE, "")
            continue
        if number == TENSOR_DATA_LOCATION and kind == VARINT:
            location = value
            continue
        if number == TENSOR_DIMS:
            if kind == VARINT:
                dims.append(value)
            elif kind == LEN:                                   # packed
                pos = value[0]
                while pos < value[1]:
                    dim, pos = wire.varint(pos)
                    dims.append(dim)
        elif number == TENSOR_DATA_TYPE and kind == VARINT:
            data_type = value
        elif number == TENSOR_NAME and kind == LEN:
            name = bytes(buffer[slice(*value)]).decode()
        kept.append(bytes(buffer[first:last]))
    dims = tuple(d - (1 << 64) if d >= 1 << 63 else d for d in dims)
    if location == EXTERNAL and "location" in external:
        where = (external["location"], int(external.get("offset", 0)),
                 int(external["length"]) if "length" in external else None)
    elif raw is not None:
        where = (file, raw[0], raw[1] - raw[0])
    else:
        return b"", None
    if where[2] is None or where[2] < min_bytes or (raw is not None and location == EXTERNAL):
        return b"", None
    weight = Weight(name, data_type, dims, *where)
    reference = (_key(TENSOR_DATA_LOCATION, VARINT) + _varint(EXTERNAL)
                 + _string_entry("location", weight.file)
                 + _string_entry("offset", str(weight.offset))
                 + _string_entry("length", str(weight.length)))
    return b"".join(kept) + reference, weight
