"""Exports of checkpoints made on demand and kept in a cache, keyed by everything that
determines their bytes (weights and config hashes, dtype, memory op, opset, tool versions)."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

from infini_trt.export.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_checkpoint
from infini_trt.export.files import sha256_file
from infini_trt.export.manifest import is_export_dir, package_version


def cache_root() -> Path:
    """$INFINI_TRT_CACHE, else ~/.cache/infini-trt."""
    root = os.environ.get("INFINI_TRT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "infini-trt"


def exporter_code_hash() -> str:
    """sha256 of the exporter's own source (export/ and plugins/): an export made by other
    code is another export, even at the same version number."""
    import infini_trt.export
    import infini_trt.plugins

    digest = hashlib.sha256()
    for package in (infini_trt.export, infini_trt.plugins):
        for root in package.__path__:
            for path in sorted(Path(root).rglob("*.py")):
                digest.update(path.read_bytes())
    return digest.hexdigest()


def export_key(checkpoint: Path, dtype: str | None, memory_op: str, opset: int) -> str:
    parts = {"code": exporter_code_hash(), "weights": sha256_file(checkpoint / WEIGHTS_FILE),
             "config": sha256_file(checkpoint / CONFIG_FILE),
             "dtype": dtype, "memory_op": memory_op, "opset": opset,
             "infini-trt": package_version("infini-trt"), "torch": package_version("torch"),
             "onnx": package_version("onnx")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def cached_export(checkpoint: str | Path, dtype: str | None = None, memory_op: str = "plugin",
                  opset: int = 20, log: Callable[[str], None] | None = None) -> Path:
    """The export directory of `checkpoint`, exporting it first if the cache has none. What
    the export says goes to `log`, by default stderr (stdout may be a command's JSON)."""
    from infini_trt.export.onnx_export import export_checkpoint

    ckpt = read_checkpoint(checkpoint)
    target = cache_root() / "exports" / export_key(ckpt.path, dtype, memory_op, opset)
    if not is_export_dir(target):
        say = log or (lambda s: print(s, file=sys.stderr, flush=True))
        say(f"exporting {ckpt.path} to {target} (cached for next time) ...")
        export_checkpoint(ckpt.path, target, dtype=dtype, memory_op_mode=memory_op,
                          opset=opset, force=True, log=say)
    return target
