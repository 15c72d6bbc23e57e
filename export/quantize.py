"""Reduced precision for ONNX Runtime on the CPU: int8 or int4 projections, state kept in float32.

    export_checkpoint("ckpt/", "out/", quantize="int8")   # or `infini-trt export --quantize int8`
    quantize_export("out_fp32/", "out_int8/", "int8-rows")  # the same, from an fp32 export

Three methods; all quantize every MatMul that has a constant weight (the q/k/v, output, MLP and
LM-head projections) and leave everything else float32: the embedding table, norms, the local
attention (its operands are activations), the decoding caches, and the compressive memory (the
memory-update node, its retrieval and the state M and z).

"int8" (the more accurate): ONNX Runtime's 8-bit weight quantization into `MatMulNBits` nodes:
weights int8, symmetric, one scale per block of 128 input channels of each output channel;
with accuracy_level 4 ONNX Runtime quantizes the activations to int8 per block of 128 as well
and runs integer GEMMs (AVX-512 VNNI / AVX2).

"int8-rows" (the faster): in the graphs that read whole segments (segment, prefill), one
u8 x s8 GEMM per projection with one activation scale per row (token) and one weight scale per
output column, the weights bounded so that CPUs without VNNI compute the same integers
(export/quantize_rows.py); the decoding graph (extend) gets "int8"'s MatMulNBits,
whose fused kernel is faster on one token (there the small nodes that quantize the rows cost
more than the GEMVs). Speed and parity of each method: docs/quantization.md.

"int4" (the fastest decoding, the least accurate): the decoding graph (extend) gets 4-bit
MatMulNBits (BLOCKS["int4"]): weights int4, asymmetric, one scale and one zero point per block
of 32 input channels of each output channel, accuracy_level 4; the graphs that read whole
segments (segment, prefill) get int8-rows' row GEMMs. What ONNX Runtime computes for one
output channel n of a MatMulNBits X (..., K) @ W (K, N) at accuracy_level 4, per block b of
B input channels:

    W[k, n]  = (q[n, b, k] - zero_point[n, b]) * scale[n, b]      q in [0, 2^bits), stored
    s_x      = max|X[row, block b]| / 127                          per row and block, per call
    Y[row,n] = sum_b s_x * scale[n, b] * sum_k round(X[row, k] / s_x) * (q - zero_point)

(round: to nearest; zero_point 2^(bits-1) where symmetric). The integer sums are exact with
VNNI and without (an 8-bit activation times a 4-bit level is at most 255 * 15: AVX2's int16
pair sums cannot saturate); only the order of the float sums over blocks may differ.

(ONNX Runtime's own dynamic quantization, DynamicQuantizeMatMul with per-channel int8 weights
and one activation scale per tensor, was as fast as int8-rows but less accurate: the
activations of the down and output projections carry outliers that one scale per tensor
loses, and a batch's sequences would share that scale; docs/quantization.md#parity.)

bf16 is not offered for ONNX Runtime: its CPU provider has no bfloat16 GEMM on x86 (the runner
refuses bf16 exports on the CPU); bf16 exports (`--dtype bf16`) are for TensorRT, and PyTorch
eager runs bf16 on the CPU (`bench --backends torch:bf16`).

Parity is stated by `validate` with the tolerances of `runtime/validate.py` for each method.
A quantized export is for ONNX Runtime only (MatMulNBits and MatMulIntegerToFloat are ONNX
Runtime contrib ops).
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import InfiniTrtError, MissingDependencyError
from .files import atomic_dir, check_output
from .io_spec import EXTEND, FOLD, PREFILL, SEGMENT

METHODS = ("int8", "int8-rows", "int4")
ROW_GEMM_METHODS = ("int8-rows", "int4")   # row GEMMs in the graphs that read whole segments


@dataclass(frozen=True)
class Blocks:
    """ONNX Runtime's MatMulNBits: weights of `bits` bits in blocks of `block_size` input
    channels of one output channel, each block with its own scale (and, unless `symmetric`,
    its own zero point); `accuracy_level` 4: the activations quantized to int8 per block of
    the same size at every call and integer GEMMs; 0 to 2 (on x86): float32 products of the
    dequantized weights."""

    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int

    def record(self) -> dict:
        scales = "one scale" if self.symmetric else "one scale and zero point"
        return {"op": "MatMulNBits", "bits": self.bits, "block_size": self.block_size,
                "symmetric": self.symmetric, "accuracy_level": self.accuracy_level,
                "weights": f"int{self.bits}, {'' if self.symmetric else 'a'}symmetric, "
                           f"{scales} per {self.block_size} input channels",
                "activations": ("int8 per block, computed per call" if self.accuracy_level == 4
                                else "float32 (the weights dequantized per call)"),
                "tool": "onnxruntime.quantization.matmul_nbits_quantizer"}


BLOCKS = {
    # int8, and int8-rows' decoding graph
    "int8": Blocks(bits=8, block_size=128, symmetric=True, accuracy_level=4),
    # int4's decoding graph: the settings that decoded fastest without losing parity on
    # tiny, `small` and the passkey model (docs/quantization.md#int4). Segments are read with
    # int8-rows' row GEMMs instead (ROW_GEMM_METHODS): 4-bit blocks read them slower than fp32.
    "int4": Blocks(bits=4, block_size=32, symmetric=False, accuracy_level=4),
}


def blocks(method: str) -> Blocks:
    """The MatMulNBits settings of `method` (int8-rows: of its decoding graph)."""
    return BLOCKS["int8" if method == "int8-rows" else method]


def quantization_record(method: str) -> dict:
    """What the manifest records about a quantized export."""
    from .manifest import package_version

    versions = {"onnxruntime": package_version("onnxruntime")}
    nbits = blocks(method).record()
    if method in ROW_GEMM_METHODS:
        from .quantize_rows import LEVELS, OPSET, PAIR_LIMIT

        rows = {"op": "MatMulIntegerToFloat", "bits": 8, "symmetric": True,
                "weights": f"int8 in [-{LEVELS}, {LEVELS}], symmetric, one scale per output "
                           f"channel; |w[2j]| + |w[2j+1]| <= {PAIR_LIMIT} where their signs agree",
                "weights_why": "exact without VNNI too: the AVX2 u8 x s8 kernel adds the "
                               "products of input channels 2j and 2j+1 in int16 (vpmaddubsw), "
                               f"and 255 * {PAIR_LIMIT} <= 32767",
                "activations": "uint8 around 128, one scale per row (token), computed per call",
                "tool": "infini_trt.export.quantize_rows", "onnx_opset": OPSET}
        graphs = {g: rows if row_gemms(method, g) else nbits for g in (SEGMENT, PREFILL, EXTEND)}
        bits = {record["bits"] for record in graphs.values()}
        return {"method": method, **({"bits": bits.pop()} if len(bits) == 1 else {}),
                "graphs": graphs, **versions}
    return {"method": method, **nbits, **versions}


def check_method(method: str, dtype: str) -> None:
    if method not in METHODS:
        raise InfiniTrtError(f"--quantize must be one of {', '.join(METHODS)}, got {method!r}")
    if dtype != "float32":
        raise InfiniTrtError(f"--quantize {method} quantizes float32 weights; export with "
                             f"--dtype fp32 (not {dtype})")


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs every node it quantizes on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def row_gemms(method: str, graph: str) -> bool:
    """Whether `graph` (segment, prefill, extend) gets the row GEMMs of int8-rows (else
    MatMulNBits)."""
    return method in ROW_GEMM_METHODS and graph != EXTEND


def quantize_graph(path: Path, method: str = "int8", graph: str = "segment") -> dict[str, str]:
    """Quantize one ONNX graph file (the export's graph `graph`) in place -> {file name:
    sha256} of what it now is. Its weights, wherever they were (the export's weights file,
    <file>.data), are then the graph's own (`onnx_export.save_onnx`): the weights file is
    left as it is, for the other graphs."""
    from .onnx_export import save_onnx

    model = quantized_model(path, method, graph)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    # unchecked, as before: ORT's quantizers raise the model's opset to 21 and leave the
    # memory-update function's import at the export's (20), which the checker refuses and
    # ONNX Runtime runs
    return save_onnx(model, path, check=False)


def quantized_model(path: Path, method: str, graph: str):
    """The ONNX graph file `path` (the export's graph `graph`) quantized, in memory."""
    import onnx

    check_method(method, "float32")
    model = onnx.load(str(path))
    if row_gemms(method, graph):
        from .quantize_rows import quantize_rows

        quantize_rows(model)
        return model
    return _matmul_nbits(model, blocks(method))


def _matmul_nbits(model, nbits: Blocks):
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer)
    except ImportError:
        raise MissingDependencyError("onnxruntime", f"int{nbits.bits} quantization",
                                     "pip install onnxruntime") from None
    settings = {"bits": nbits.bits, "block_size": nbits.block_size,
                "is_symmetric": nbits.symmetric, "accuracy_level": nbits.accuracy_level}
    config = DefaultWeightOnlyQuantConfig(**settings, op_types_to_quantize=("MatMul",))
    with _quiet():
        quantizer = MatMulNBitsQuantizer(model, **settings, algo_config=config,
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
    return quantizer.model.model


def quantize_graphs(directory: Path, graphs: dict[str, dict], method: str,
                    log: Callable[[str], None]) -> None:
    """Quantize, in `directory`, the graphs that carry weights (all but fold), updating each
    manifest entry's file hashes ({name: {"file", "files", ...}}). Their large initializers
    then go into one new weights file in place of the float one, each distinct tensor once
    (the embedding table and norms that every graph reads, the row GEMMs' int8 weights of the
    segment and prefill graphs), as an unquantized export has them: ONNX Runtime's runner
    maps what it shares from there instead of reading it (runtime/runners/ort_weights.py: the
    embedding table, 65 MB for `small`, becomes resident as prompts touch its pages). A file
    that no graph lists any more (the float weights file, a graph's <file>.data) is
    removed."""
    from .onnx_export import hash_weights_file, save_onnx
    from .weights_file import WeightsFile

    quantized = [name for name in graphs if name != FOLD]
    kept = {file for name, graph in graphs.items() if name not in quantized
            for file in graph["files"]}
    before = {file for graph in graphs.values() for file in graph["files"]}
    # written beside the float files (which the graphs still to quantize read), then moved
    staged = directory / ".quantized"
    staged.mkdir()
    weights = WeightsFile(staged)
    if weights.path.name in kept:
        raise InfiniTrtError(f"cannot quantize: a graph without weights refers to "
                             f"{weights.path.name}")
    for name in quantized:
        log(f"quantizing the {name} graph ({method})")
        model = quantized_model(directory / graphs[name]["file"], method, name)
        weights.take_inline(model.graph)
        # unchecked, as quantize_graph's
        graphs[name]["files"] = save_onnx(model, staged / graphs[name]["file"], weights,
                                          check=False)
        weights.drop_written()
        del model                 # before the next graph is read: one model held at a time
    hash_weights_file(graphs, weights)
    for file in before - kept:
        (directory / file).unlink(missing_ok=True)
    for path in staged.iterdir():
        path.rename(directory / path.name)
    staged.rmdir()


def quantize_export(source: str | Path, output: str | Path, method: str = "int8",
                    force: bool = False, log: Callable[[str], None] = lambda s: None):
    """Write a quantized copy of the float32 export `source` into `output` -> its Manifest.

    The weight-carrying graphs (segment, prefill, extend) are quantized; graphs without
    weights (fold) are copied as they are."""
    from .checkpoint import copy_tokenizer
    from .manifest import read_manifest

    check_output(output, "dir", force, inputs=(source,))
    manifest = read_manifest(source)
    if manifest.quantization:
        raise InfiniTrtError(f"{source} is already quantized ({manifest.quantization['method']})")
    check_method(method, manifest.dtype)
    with atomic_dir(output, force=force, inputs=(source,)) as tmp:
        for file in {file for graph in manifest.graphs.values() for file in graph["files"]}:
            shutil.copyfile(manifest.path / file, tmp / file)
        quantize_graphs(tmp, manifest.graphs, method, log)
        if manifest.tokenizer:
            manifest.tokenizer = copy_tokenizer(manifest.tokenizer_path, tmp)
        manifest.quantization = quantization_record(method)
        manifest.source = {**manifest.source, "quantized_from": str(Path(source).resolve())}
        manifest.path = Path(output)
        manifest.write(tmp)
    return manifest
