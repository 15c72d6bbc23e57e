"""The manifest (`manifest.json`) that every export directory carries: what was exported, from
what, with which tools, and the hashes of its files. Engines built later are recorded in it.

The manifest carries a hash of its own content (all but the engine records, which `build`
adds later and which carry their own hashes): an edited manifest (a segment length or
vocabulary that its graphs were not made for) is refused instead of run. The graph files are
checked against their recorded hashes by whoever loads them (`runtime/artifacts.py`)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import InfiniConfig
from .errors import InfiniTrtError
from .files import inside
from .io_spec import GraphSpec

MANIFEST_FILE = "manifest.json"
FORMAT, FORMAT_VERSION = "infini-trt-export", 3    # 3: extend takes logit_rows
CONTENT_HASH = "content_sha256"
UNHASHED = ("engines", CONTENT_HASH)             # written after the export, or the hash itself


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


@dataclass
class Manifest:
    path: Path                                   # the export directory
    config: InfiniConfig
    dtype: str                                   # weights/compute dtype of the graphs
    memory_op: str                               # "plugin" | "portable"
    opset: int
    graphs: dict[str, dict[str, Any]]            # name -> {"file", "files": {name: sha256}, "io"}
    plugin: dict[str, Any] | None = None
    tokenizer: str | None = None                 # file name inside the export dir
    source: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    engines: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None   # export/quantize.py: int8 weights (ORT only)
    decode_attention: str = "portable"           # io_spec.DECODE_ATTENTIONS ("gqa": ORT only)

    @property
    def precision(self) -> str:
        """The dtype of the graphs, or the quantization method ("int8") when quantized."""
        return self.quantization["method"] if self.quantization else self.dtype

    def graph(self, name: str) -> GraphSpec:
        if name not in self.graphs:
            raise InfiniTrtError(f"{self.path} has no '{name}' graph (it has: "
                                 f"{', '.join(self.graphs)}); re-export with this infini-trt")
        return GraphSpec.from_dict(self.graphs[name]["io"])

    def graph_file(self, name: str) -> Path:
        self.graph(name)
        return inside(self.path, self.graphs[name]["file"])

    def graph_files(self) -> dict[Path, str]:
        """Every file of every graph (weights' external data included) -> its recorded sha256."""
        return {inside(self.path, file): digest for graph in self.graphs.values()
                for file, digest in graph["files"].items()}

    @property
    def source_checkpoint(self) -> Path | None:
        """The checkpoint this was exported from, if it is still there."""
        source = self.source.get("checkpoint")
        return Path(source) if source and Path(source).is_dir() else None

    @property
    def tokenizer_path(self) -> Path | None:
        return inside(self.path, self.tokenizer) if self.tokenizer else None

    def to_dict(self) -> dict[str, Any]:
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": self.versions,
                "config": self.config.to_dict(), "dtype": self.dtype,
                "memory_op": self.memory_op, "opset": self.opset, "plugin": self.plugin,
                "tokenizer": self.tokenizer, "source": self.source, "graphs": self.graphs,
                "engines": self.engines, "quantization": self.quantization,
                "decode_attention": self.decode_attention}
        return {**data, CONTENT_HASH: content_hash(data)}

    def write(self, directory: Path | None = None) -> Path:
        target = (directory or self.path) / MANIFEST_FILE
        target.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return target


def content_hash(data: dict[str, Any]) -> str:
    """sha256 of a manifest's JSON content, all but the fields in UNHASHED."""
    hashed = {k: v for k, v in data.items() if k not in UNHASHED}
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def model_config(path: str | Path) -> InfiniConfig:
    """The config of a native checkpoint or an export directory, without loading weights."""
    if is_export_dir(path):
        return read_manifest(path).config
    from .checkpoint import read_checkpoint

    return read_checkpoint(path).config


def read_manifest(path: str | Path) -> Manifest:
    """Read an export directory's manifest, with one clear message for each way it can fail."""
    path = Path(path)
    if not path.exists():
        raise InfiniTrtError(f"no such export directory: {path}")
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise InfiniTrtError(f"{path} is not an infini-trt export (no {MANIFEST_FILE}); "
                             f"create one with `infini-trt export`")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InfiniTrtError(f"{file} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InfiniTrtError(f"{file} is not an infini-trt export manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise InfiniTrtError(f"{file}: format_version {data.get('format_version')!r} is not "
                             f"supported (this infini-trt reads {FORMAT_VERSION}); export the "
                             f"checkpoint again with this infini-trt")
    if data.get(CONTENT_HASH) != content_hash(data):
        raise InfiniTrtError(f"{file} was changed after the export (its content hash does not "
                             f"match): its graphs may not be what it describes; export again "
                             f"instead of editing a manifest")
    try:
        manifest = Manifest(path=path, config=InfiniConfig.from_dict(data["config"]),
                            dtype=data["dtype"], memory_op=data["memory_op"],
                            opset=data["opset"], graphs=data["graphs"], plugin=data["plugin"],
                            tokenizer=data.get("tokenizer"), source=data.get("source", {}),
                            versions=data.get("versions", {}), engines=data.get("engines", {}),
                            quantization=data.get("quantization"),
                            decode_attention=data.get("decode_attention", "portable"))
    except KeyError as exc:
        raise InfiniTrtError(f"{file}: missing field {exc}") from None
    except InfiniTrtError as exc:
        raise InfiniTrtError(f"{file}: {exc}") from None
    for name, graph in manifest.graphs.items():
        if not manifest.graph_file(name).is_file():
            raise InfiniTrtError(f"{path}: the {name} graph file {graph['file']} is missing; "
                                 f"export again")
        manifest.graph_files()                        # every file name stays inside path
    return manifest
