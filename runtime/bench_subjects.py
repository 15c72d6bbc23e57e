"""The subjects of `bench`: backends of the model being measured and its peers, what each
one's worker opens, and how a name is resolved to it (exports made and cached beforehand, in
the parent process, so that the workers only measure)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from infini_trt.export.config import InfiniConfig
from infini_trt.export.errors import InfiniTrtError
from infini_trt.export.quantize import METHODS as QUANTIZE_METHODS

from . import roofline
from .backends import TORCH_DTYPES, bench_backends

BACKENDS = bench_backends(QUANTIZE_METHODS)
GENAI_PEERS = ("onnxruntime-genai", "onnxruntime-genai:int4")      # runtime/peer_genai.py
PEERS = ("infini-transformer-pytorch", "full-attention", *GENAI_PEERS)


@dataclass
class Subject:
    """What one worker opens: picklable, resolved in the parent (exports made there)."""

    name: str                         # as given: "onnxruntime:int8", "full-attention", ...
    kind: str                         # torch | onnxruntime | tensorrt | lucidrains | full-attention
                                      # | genai
    path: str | None = None           # checkpoint or export directory
    precision: str = "float32"        # weights: float32 | bfloat16 | float16 | int8 | int4
    label: str = ""                   # the runner's description, filled in by the worker
    prompt_graph: str = ""            # onnxruntime: what it reads whole prompt segments with
    status: str = "ok"                # ok | skipped
    reason: str = ""
    points: list[dict] = field(default_factory=list)
    interleaved: list | None = None   # its points in bench_measure.interleaved

    @property
    def infini(self) -> bool:
        return self.kind not in ("full-attention", "genai")

    @property
    def restartable(self) -> bool:
        """A runner of this model: its state can be read and restored (`interleaved`)."""
        return self.kind in ("torch", "onnxruntime", "tensorrt")

    @property
    def resumable(self) -> bool:
        """A runner that keeps a prompt's context in its own process and rewinds to it
        (onnxruntime-genai): it takes part in `interleaved` after its prompts are read
        again there."""
        return self.kind == "genai"


def open_subject(subject: Subject, cfg: InfiniConfig, threads: int | None = None,
                 seed: int = 0, beside_others: bool = False, prompt_graph: str = "auto"):
    """The runner of one subject (in the worker process): `threads` CPU threads for torch and
    ONNX Runtime [default: all], `seed` for the peers' random weights; `beside_others`: it
    takes turns with other runners (the rounds in alternation), so the threads of ONNX
    Runtime's pools (ours and onnxruntime-genai's alike) spin inside a run and stop when it
    returns (a pool left spinning takes a core from the next runner; ours always stop,
    ort_runner.session_options); `prompt_graph`: how our onnxruntime subjects read whole
    prompt segments (OrtRunner)."""
    if threads and subject.kind not in ("onnxruntime", "genai"):     # the others run torch
        import torch                            # (an ONNX Runtime worker never imports it)

        torch.set_num_threads(threads)
    if subject.kind in ("torch", "onnxruntime", "tensorrt"):
        from .runners import open_runner

        options = {"threads": threads, "prompt_graph": prompt_graph} \
            if subject.kind == "onnxruntime" else {}
        dtype = subject.precision if subject.kind == "torch" else None
        return open_runner(subject.path, subject.kind, dtype=dtype, **options)
    if subject.kind == "lucidrains":
        from .baselines import LucidrainsRunner

        return LucidrainsRunner(cfg, seed=seed)
    if subject.kind == "genai":
        from .peer_genai import GenaiRunner

        return GenaiRunner(subject.path, cfg, threads, stop_spinning_after_run=beside_others)
    from infini_trt.export.model import InfiniLM, init_weights

    from .baselines import FullAttentionRunner

    return FullAttentionRunner(init_weights(InfiniLM(cfg), seed), capacity=1)


def check_name(name: str) -> None:
    """InfiniTrtError unless `name` is a backend or a peer."""
    if name not in BACKENDS and name not in PEERS:
        raise InfiniTrtError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)} "
                             f"(peers: {', '.join(PEERS)})")


def resolve(name: str, model: Path, log: Callable[[str], None], seed: int = 0,
            batch: int = 1, context: int = 0, peer_source: str | None = None) -> Subject:
    """A subject name -> what its worker opens (exports made here, once, and cached). The
    onnxruntime-genai peers are built from `peer_source` (a Hugging Face checkpoint) or from
    random weights (`seed`) for `context` tokens; they run at `batch` 1 only."""
    from infini_trt.export.manifest import is_export_dir, read_manifest

    from .artifacts import source_checkpoint
    from .export_cache import cached_export, cached_quantized, export_settings

    backend, _, variant = name.partition(":")
    check_name(name)
    if name in GENAI_PEERS:
        return resolve_genai(name, model, log, seed, batch, context, peer_source)
    if name in PEERS:
        return Subject(name, "lucidrains" if name == PEERS[0] else name)
    export = is_export_dir(model)
    if backend == "torch":
        precision = TORCH_DTYPES.get(variant, "float32")
        missing = roofline.missing_instructions(precision)
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
    if not export:            # one cached export for each method, ONNX Runtime's fastest
        directory = cached_export(model, dtype="float32", log=log, quantize=variant or None,
                                  **export_settings("onnxruntime"))
        return Subject(name, "onnxruntime", str(directory), variant or "float32")
    manifest = read_manifest(model)
    if manifest.quantization and manifest.precision != variant:
        return Subject(name, "onnxruntime", status="skipped",
                       reason=f"{model} is an {manifest.precision} export; use "
                              f"onnxruntime:{manifest.precision}")
    directory = cached_quantized(model, variant, log) if variant and not manifest.quantization \
        else model
    return Subject(name, "onnxruntime", str(directory), variant or manifest.dtype)


def resolve_genai(name: str, model: Path, log: Callable[[str], None], seed: int, batch: int,
                  context: int, peer_source: str | None) -> Subject:
    """An onnxruntime-genai peer: its builder export made here and cached, or skipped with the
    reason (not installed, batch > 1, the builder failed). A --peer-source that is not a
    Hugging Face checkpoint of MODEL's shape is the user's mistake: its error ends the run."""
    from infini_trt.export.errors import MissingDependencyError
    from infini_trt.export.manifest import model_config

    from .peer_genai import PRECISIONS, BuilderError, cached_genai, context_positions

    precision = PRECISIONS[name]
    if batch != 1:
        return Subject(name, "genai", precision=precision, status="skipped",
                       reason="onnxruntime-genai's Generator takes a prompt in one call at "
                              "batch > 1 (bench feeds prompts in segments): run it at --batch 1")
    try:
        directory = cached_genai(model_config(model), precision, seed, context_positions(context),
                                 peer_source, log)
    except (MissingDependencyError, BuilderError) as exc:     # one line (the builder's: its log)
        return Subject(name, "genai", precision=precision, status="skipped",
                       reason=str(exc).splitlines()[0])
    return Subject(name, "genai", str(directory), precision)
