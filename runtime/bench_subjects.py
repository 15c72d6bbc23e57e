"""The subjects of `bench`: backends of the model being measured and its peers, what each
one's worker opens, and how a name is resolved to it (exports made and cached beforehand, in
the parent process, so that the workers only measure)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from infini_trt.export.config import InfiniConfig
from infini_trt.export.errors import InfiniTrtError
from infini_trt.export.quantize import METHODS as QUANTIZE_METHODS

from . import roofline

BACKENDS = ("torch", "torch:bf16", "torch:fp16", "onnxruntime",
            *(f"onnxruntime:{method}" for method in QUANTIZE_METHODS), "tensorrt")
PEERS = ("infini-transformer-pytorch", "full-attention")


@dataclass
class Subject:
    """What one worker opens: picklable, resolved in the parent (exports made there)."""

    name: str                         # as given: "onnxruntime:int8", "full-attention", ...
    kind: str                         # torch | onnxruntime | tensorrt | lucidrains | full-attention
    path: str | None = None           # checkpoint or export directory
    precision: str = "float32"        # weights: float32 | bfloat16 | float16 | int8
    label: str = ""                   # the runner's description, filled in by the worker
    status: str = "ok"                # ok | skipped
    reason: str = ""
    points: list[dict] = field(default_factory=list)
    interleaved: list | None = None   # its points in bench_measure.interleaved

    @property
    def infini(self) -> bool:
        return self.kind != "full-attention"

    @property
    def restartable(self) -> bool:
        """A runner of this model: its state can be read and restored (`interleaved`)."""
        return self.kind in ("torch", "onnxruntime", "tensorrt")


def open_subject(subject: Subject, cfg: InfiniConfig, threads: int | None = None,
                 seed: int = 0):
    """The runner of one subject (in the worker process): `threads` CPU threads for torch and
    ONNX Runtime [default: all], `seed` for the peers' random weights."""
    if threads:
        torch.set_num_threads(threads)
    if subject.kind == "torch":
        from .runners.torch_runner import TorchRunner

        return TorchRunner.from_checkpoint(subject.path, dtype=subject.precision)
    if subject.kind == "onnxruntime":
        from .runners.ort_runner import OrtRunner

        return OrtRunner(subject.path, threads=threads)
    if subject.kind == "tensorrt":
        from .runners import open_runner

        return open_runner(subject.path, "tensorrt")
    if subject.kind == "lucidrains":
        from .baselines import LucidrainsRunner

        return LucidrainsRunner(cfg, seed=seed)
    from infini_trt.export.model import InfiniLM, init_weights

    from .baselines import FullAttentionRunner

    return FullAttentionRunner(init_weights(InfiniLM(cfg), seed), capacity=1)


def check_name(name: str) -> None:
    """InfiniTrtError unless `name` is a backend or a peer."""
    if name not in BACKENDS and name not in PEERS:
        raise InfiniTrtError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)} "
                             f"(peers: {', '.join(PEERS)})")


def resolve(name: str, model: Path, log: Callable[[str], None]) -> Subject:
    """A subject name -> what its worker opens (exports made here, once, and cached)."""
    from infini_trt.export.manifest import is_export_dir, read_manifest

    from .artifacts import source_checkpoint
    from .cache import cached_export, cached_quantized

    backend, _, variant = name.partition(":")
    check_name(name)
    if name in PEERS:
        return Subject(name, "lucidrains" if name == PEERS[0] else name)
    export = is_export_dir(model)
    if backend == "torch":
        precision = {"bf16": "bfloat16", "fp16": "float16"}.get(variant, "float32")
        missing = roofline.missing_instructions(getattr(torch, precision))
        if missing:
            return Subject(name, "torch", precision=precision, status="skipped",
                           reason=f"{missing}: torch would emulate {variant} matrix products, "
                                  f"tens of times slower than fp32; not measured")
        try:
            path = source_checkpoint(read_manifest(model)) if export else model
        except InfiniTrtError as exc:                # gone, or changed since the export
            return Subject(name, "torch", status="skipped", reason=str(exc))
        return Subject(name, "torch", str(path), precision)
    if backend == "tensorrt":
        from .engine import gpu

        if gpu() is None:
            return Subject(name, "tensorrt", status="skipped",
                           reason="TensorRT runs on a CUDA GPU and none was found")
        return Subject(name, "tensorrt", str(model if export else cached_export(model, log=log)))
    if not export:                                   # one cached export for each method
        directory = cached_export(model, dtype="float32", log=log, quantize=variant or None)
        return Subject(name, "onnxruntime", str(directory), variant or "float32")
    manifest = read_manifest(model)
    if manifest.quantization and manifest.precision != variant:
        return Subject(name, "onnxruntime", status="skipped",
                       reason=f"{model} is an {manifest.precision} export; use "
                              f"onnxruntime:{manifest.precision}")
    directory = cached_quantized(model, variant, log) if variant and not manifest.quantization \
        else model
    return Subject(name, "onnxruntime", str(directory), variant or manifest.dtype)
