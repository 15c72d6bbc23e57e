"""Opening a model on a backend: `prepare` makes what a backend needs (an export, engines),
saying so; `open_runner` opens what is there and makes nothing; `load` is both.

    runner = load("ckpt/", "onnxruntime")          # exports the checkpoint once (cached)
    runner = open_runner("export_dir/", "onnxruntime")
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from infini_trt.export.errors import InfiniTrtError

from ..backends import BACKENDS
from .base import Runner


def _check(model: Path, backend: str) -> None:
    if backend not in BACKENDS:
        raise InfiniTrtError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not model.exists():
        raise InfiniTrtError(f"no such model: {model} (give a checkpoint or an export "
                             f"directory)")


def prepare(model: str | Path, backend: str, dtype: str | None = None,
            log: Callable[[str], None] | None = None, device: str | None = None) -> Path:
    """What `open_runner` needs to open `model` on `backend`, made first where it is not there:
    a checkpoint's export for onnxruntime and tensorrt (kept in the export cache; for
    onnxruntime on the CPU its fastest graphs, `export_cache.export_settings`), and for
    tensorrt engines for this GPU when the export has none. What is made is said to `log`
    (stderr by default: stdout may be a command's JSON). -> the path to open."""
    from infini_trt.export.manifest import is_export_dir, read_manifest

    path = Path(model)
    _check(path, backend)
    if backend == "torch":
        return path
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if not is_export_dir(path):
        from infini_trt.runtime.export_cache import cached_export, export_settings

        path = cached_export(path, dtype=dtype, log=say, **export_settings(backend, device))
    if backend == "tensorrt" and not read_manifest(path).engines:
        from infini_trt.runtime.engine import BuildSettings, build_engines

        say(f"{path} has no TensorRT engine; building one for this GPU ...")
        build_engines(path, BuildSettings(), log=say)
    return path


def open_runner(model: str | Path, backend: str, device: str | None = None,
                dtype: str | None = None, **options) -> Runner:
    """A runner for `model` on `backend`, opening what is there (nothing is exported or
    built: `prepare` does that). torch takes a native checkpoint, or an export directory (its
    source checkpoint, checked against the export's record, in the export's dtype);
    onnxruntime and tensorrt take an export directory."""
    from infini_trt.export.manifest import is_export_dir, read_manifest

    path = Path(model)
    _check(path, backend)
    if backend == "torch":
        from .torch_runner import TorchRunner

        if is_export_dir(path):
            from infini_trt.runtime.artifacts import source_checkpoint

            manifest = read_manifest(path)
            return TorchRunner.from_checkpoint(source_checkpoint(manifest),
                                               device=device or "cpu",
                                               dtype=dtype or manifest.dtype)
        return TorchRunner.from_checkpoint(path, device=device or "cpu", dtype=dtype)
    if not is_export_dir(path):
        raise InfiniTrtError(f"{path} is not an export directory: the {backend} backend runs "
                             f"exported graphs; export it first (`infini-trt export {path} -o "
                             f"DIR`), or open it with infini_trt.runtime.load")
    if backend == "onnxruntime":
        from .ort_runner import OrtRunner

        return OrtRunner(path, device=device, **options)
    from .trt_runner import TrtRunner

    return TrtRunner(path, device=device, **options)


def load(model: str | Path, backend: str = "onnxruntime", device: str | None = None,
         dtype: str | None = None, log: Callable[[str], None] | None = None,
         **options) -> Runner:
    """`prepare` then `open_runner`: a checkpoint or an export directory, ready to run."""
    return open_runner(prepare(model, backend, dtype, log, device), backend, device=device,
                       dtype=dtype if backend == "torch" else None, **options)
