"""`export`: a checkpoint to ONNX."""
from __future__ import annotations

import click

from infini_trt.export.io_spec import DECODE_ATTENTIONS
from infini_trt.export.quantize import METHODS as QUANTIZE_METHODS

from .options import DTYPE_CHOICE, OUTPUT_DIR


@click.command(short_help="Export a checkpoint to ONNX graphs and a manifest.")
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--output", required=True, type=OUTPUT_DIR,
              help="Export directory to write (model.onnx, manifest.json).")
@click.option("--dtype", type=DTYPE_CHOICE, default=None,
              help="Compute dtype of the graph [default: the checkpoint's]. State stays fp32.")
@click.option("--memory-op", type=click.Choice(["plugin", "portable"]), default="plugin",
              help="plugin: one custom node per layer (+ its ONNX function); "
                   "portable: plain ONNX ops.")
@click.option("--opset", default=20, type=click.IntRange(18, 23),
              help="ONNX opset. 23: each rotation (RoPE) is one RotaryEmbedding node, about "
                   "5% faster in ONNX Runtime (TensorRT-RTX parses it; docs/design.md).")
@click.option("--quantize", type=click.Choice(QUANTIZE_METHODS), default=None,
              help="Quantized projections for ONNX Runtime on the CPU, activations "
                   "quantized per call; state, caches and attention stay fp32. int8: weights "
                   "and activations per block of 128 channels (the more accurate); int8-rows: "
                   "one scale per weight column and per activation row (the faster with "
                   "AVX-512 VNNI; docs/quantization.md); int4: int8-rows for prompts, 4-bit "
                   "weights (blocks of 32) for decoded tokens (the fastest decoding, the least "
                   "accurate). int8 and int8-rows compute the same on every x86 CPU.")
@click.option("--decode-attention", type=click.Choice(DECODE_ATTENTIONS), default="portable",
              help="portable: the decoding graph in plain ONNX ops, for every runtime; gqa: "
                   "each layer's attention to the cache as one com.microsoft "
                   "GroupQueryAttention that writes the cache in place, faster per decoded "
                   "token, for ONNX Runtime only (docs/design.md).")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
def export(checkpoint: str, output: str, dtype: str | None, memory_op: str, opset: int,
           quantize: str | None, decode_attention: str, force: bool) -> None:
    """Export a checkpoint to ONNX: the segment step (model.onnx), the same step returning
    the last token's logits only, for reading prompts (prefill.onnx), the decoding graphs
    (extend.onnx, fold.onnx) and manifest.json (config, I/O table, versions, hashes)."""
    from infini_trt.export.onnx_export import export_checkpoint

    manifest = export_checkpoint(checkpoint, output, dtype=dtype, memory_op_mode=memory_op,
                                 opset=opset, force=force, log=click.echo, quantize=quantize,
                                 decode_attention=decode_attention)
    files = ", ".join(dict.fromkeys(f for g in manifest.graphs.values() for f in g["files"]))
    click.echo(f"wrote {output}: {files}, manifest.json ({manifest.precision}, "
               f"memory op: {memory_op}, opset {opset}, decode attention: "
               f"{decode_attention})")
    from infini_trt.runtime.cli import end_now

    end_now()                      # all is written and closed: skip the interpreter's teardown


COMMANDS = [export]
