"""Traced templates kept between exports of the same shape (export/stamp.py).

A template is traced with its weights as graph inputs: what it is depends on the model's
config and dtype, the opset, the memory op, the example sizes and the exporting code and
tools, never on the weights. Tracing is most of an export's time (about 11 of 19 s for
`small` on 2 cores), so an export of another checkpoint of the same shape (a fine-tune, the
same model again, the int4 export beside the fp32 one) takes the templates from here.

An entry is a directory `<cache root>/templates/<key>/` (the export cache's root,
$INFINI_TRT_CACHE or ~/.cache/infini-trt) with one ONNX model per template: its nodes,
constants (initializers) and value infos, and what else the Template holds as JSON in the
model's metadata. ONNX files, not pickles: reading an entry runs no code. An entry that
cannot be read, or that holds other templates than asked for, is traced again and replaced;
an entry that cannot be written costs only the next export's time.
`INFINI_TRT_TEMPLATE_CACHE=0` traces every time.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import InfiniTrtError
from .files import atomic_dir, cache_root, exporter_code_hash
from .manifest import package_version

METADATA = "infini_trt.template"
FORMAT_VERSION = 1


def enabled() -> bool:
    return os.environ.get("INFINI_TRT_TEMPLATE_CACHE", "1") != "0"


def key(parts: dict) -> str:
    """The entry's name for what determines the templates (`parts`: config, dtype, opset,
    memory op, sizes, names), with the exporter's code and the tools' versions."""
    parts = {**parts, "format": FORMAT_VERSION, "code": exporter_code_hash(),
             **{name: package_version(name) for name in ("torch", "onnx", "onnxscript")}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _entry(name: str) -> Path:
    return cache_root() / "templates" / name


def load(name: str, wanted: list[str], template_type) -> dict | None:
    """The templates `wanted` of entry `name`, or None (no entry, or one that cannot be
    read or lacks one of them)."""
    folder = _entry(name)
    templates = {}
    try:
        for piece in wanted:
            model = onnx.load(str(folder / f"{piece}.onnx"))
            meta = json.loads({p.key: p.value for p in model.metadata_props}[METADATA])
            graph = model.graph
            templates[piece] = template_type(
                name=meta["name"], nodes=tuple(graph.node),
                constants={t.name: t for t in graph.initializer},
                value_info={v.name: v for v in graph.value_info},
                opsets={o.domain: o.version for o in model.opset_import},
                ir_version=model.ir_version,
                inputs={k: tuple(v) for k, v in meta["inputs"].items()},
                outputs=tuple(meta["outputs"]), weights=tuple(meta["weights"]),
                per_layer=bool(meta["per_layer"]))
            if templates[piece].name != piece:
                return None
    except (OSError, KeyError, ValueError, TypeError, DecodeError, InfiniTrtError):
        return None                                      # damaged or another kind: trace
    return templates


def store(name: str, templates: dict) -> None:
    """Write the templates as entry `name` (atomically; nothing on failure)."""
    try:
        with atomic_dir(_entry(name), force=True) as tmp:
            for piece, t in templates.items():
                model = onnx.ModelProto(ir_version=t.ir_version, opset_import=[
                    onnx.helper.make_opsetid(d, v) for d, v in t.opsets.items()])
                model.graph.name = piece
                model.graph.node.extend(t.nodes)
                model.graph.initializer.extend(t.constants.values())
                model.graph.value_info.extend(t.value_info.values())
                model.metadata_props.add(key=METADATA, value=json.dumps(
                    {"name": t.name, "inputs": {k: list(v) for k, v in t.inputs.items()},
                     "outputs": list(t.outputs), "weights": list(t.weights),
                     "per_layer": t.per_layer}))
                (tmp / f"{piece}.onnx").write_bytes(model.SerializeToString())
    except (OSError, InfiniTrtError):
        pass
