"""`validate`: parity of the exported graphs with the reference."""
from __future__ import annotations

import json

import click

from .options import OUTPUT_FILE


@click.command(short_help="Check the exported graphs against the float64 reference.")
@click.argument("checkpoint", type=click.Path())
@click.option("--onnx", "export_dir", required=True, type=click.Path(),
              help="Export directory of this checkpoint.")
@click.option("--segments", default=8, type=click.IntRange(1), help="Full segments to run.")
@click.option("--batch", default=2, type=click.IntRange(1), help="Sequences per step.")
@click.option("--seed", default=0, help="Seed of the random tokens.")
@click.option("--tokens", "tokens_file", type=click.Path(dir_okay=False), default=None,
              help="Validate on these tokens instead of random ones: text (encoded with the "
                   "model's tokenizer, cut into --batch rows) or .npy ids ([T], or [B, T] "
                   "rows); at most --segments segments of each row are run.")
@click.option("--decode-tokens", default=32, show_default=True, type=click.IntRange(0),
              help="Tokens decoded one at a time in the decoding phase (extend and fold graphs, "
                   "a context saved and loaded halfway); 0 skips it.")
@click.option("--tol", "tolerances", multiple=True, metavar="[OUTPUT=]REL_RMS",
              help="Relative-RMS tolerance, per output (logits, memory_out, norm_out) or for "
                   "all [default: by dtype; fp32: 1e-4 logits, 5e-5 memory, 1e-5 norm]. "
                   "Repeatable.")
@click.option("--min-greedy", type=click.FloatRange(0, 1), default=None,
              help="Minimum greedy next-token agreement [default: by dtype, 0.99 for fp32].")
@click.option("--engine", type=click.Path(dir_okay=False), default=None,
              help="Also compare TensorRT: an engine that `infini-trt build` recorded in the "
                   "export (its segment engine file).")
@click.option("--cuda-graphs", is_flag=True,
              help="Run the TensorRT engine through CUDA graphs (with --engine).")
@click.option("--report", type=OUTPUT_FILE, default=None,
              help="Write the full report (per segment) as JSON.")
@click.option("--progress/--no-progress", default=None)
def validate(checkpoint: str, export_dir: str, segments: int, batch: int, seed: int,
             tokens_file: str | None, decode_tokens: int, tolerances: tuple[str, ...],
             min_greedy: float | None,
             engine: str | None, cuda_graphs: bool, report: str | None,
             progress: bool | None) -> None:
    """Compare PyTorch, ONNX Runtime (and TensorRT with --engine) with the float64 reference
    over many segments.

    Each backend carries its own state across all segments; odd segments go through the
    prompt-reading graph (last token's logits only), the others through the segment graph.
    Then the decoding phase: in a session, a prompt ending mid-segment, then --decode-tokens
    tokens one at a time (teacher-forced) across a fold, every row saved to a context file and
    loaded into a fresh session halfway; logits after each token and memory/norm compared.
    Random tokens are the hard case for greedy agreement (a model is unsure of what follows
    them: near-ties); --tokens gives text of the kind the model is deployed on.
    Exits 1 if any output is outside its tolerance, has NaN/Inf, or greedy agreement is too
    low."""
    from infini_trt.export.files import atomic_file
    from infini_trt.runtime.validate import parse_tolerances, validate_export

    extra = []
    if engine is not None:
        from infini_trt.runtime.runners.trt_runner import TrtRunner

        extra.append(TrtRunner(export_dir, engine=engine, cuda_graphs=cuda_graphs))
    result = validate_export(checkpoint, export_dir, segments, batch, seed,
                             parse_tolerances(list(tolerances)), min_greedy, extra=extra,
                             progress=progress, log=click.echo, tokens_file=tokens_file,
                             decode_tokens=decode_tokens)
    click.echo(result.table())
    if report:
        with atomic_file(report) as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        click.echo(f"report written to {report}")
    if not result.passed:
        raise SystemExit(1)


COMMANDS = [validate]
