"""The `infini-trt` command line: a thin click group, each command one library call.

Heavy and optional imports (onnxruntime, tensorrt, triton) happen inside the commands, so
`infini-trt --help` works on a machine with only the base install.
"""
from __future__ import annotations

import json
import sys

import click

from infini_trt.export.errors import InfiniTrtError


class Group(click.Group):
    """A click group that turns any InfiniTrtError into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InfiniTrtError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"],
                                          "show_default": True})
@click.version_option(package_name="infini-trt")
def main() -> None:
    """infini-trt: Infini-attention models from a PyTorch checkpoint to fast, validated
    ONNX Runtime and TensorRT deployments that stream inputs of any length at constant
    memory."""


DTYPE_CHOICE = click.Choice(["fp32", "fp16", "bf16"])


@main.command()
@click.option("--preset", "preset_name", required=True,
              type=click.Choice(["tiny", "small"]), help="Model shape.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Checkpoint directory to write.")
@click.option("--seed", default=0, help="Seed of the random weights.")
@click.option("--dtype", default="fp32", type=DTYPE_CHOICE, help="Weight dtype.")
@click.option("--update-rule", type=click.Choice(["linear", "delta"]), default=None,
              help="Memory update rule (default: the preset's).")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
def init(preset_name: str, output: str, seed: int, dtype: str, update_rule: str | None,
         force: bool) -> None:
    """Write a checkpoint with random weights for a preset shape."""
    from infini_trt.export import InfiniLM, init_weights, preset, save_checkpoint
    from infini_trt.export.checkpoint import dtype_from_name

    overrides = {"update_rule": update_rule} if update_rule else {}
    cfg = preset(preset_name, **overrides)
    model = init_weights(InfiniLM(cfg), seed).to(dtype_from_name(dtype))
    save_checkpoint(model, output, force=force)
    click.echo(f"wrote {output}: preset {preset_name}, {cfg.num_parameters():,} parameters, "
               f"{dtype}, seed {seed}")


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(checkpoint: str, as_json: bool) -> None:
    """Load and validate a checkpoint, and describe it."""
    from infini_trt.export import load_checkpoint, read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    model = load_checkpoint(checkpoint)
    cfg = ckpt.config
    n_params = sum(p.numel() for p in model.parameters())
    state_bytes = 4 * (cfg.n_layers * cfg.n_kv_heads * cfg.dk * (cfg.dv + 1))
    info = {"path": str(ckpt.path), "dtype": str(ckpt.dtype).replace("torch.", ""),
            "parameters": n_params, "state_bytes_per_sequence": state_bytes,
            "tokenizer": str(ckpt.tokenizer_path) if ckpt.tokenizer_path else "byte-level",
            "config": cfg.to_dict()}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{ckpt.path}: {n_params:,} parameters ({info['dtype']}), "
               f"{cfg.n_layers} layers, segment {cfg.segment_len}, {cfg.update_rule} memory")
    click.echo(f"  memory state per sequence: {state_bytes:,} bytes (constant in the length)")
    click.echo(f"  tokenizer: {info['tokenizer']}")
    for key, value in cfg.to_dict().items():
        click.echo(f"  {key:16s} {value}")


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Export directory to write (model.onnx, manifest.json).")
@click.option("--dtype", type=DTYPE_CHOICE, default=None,
              help="Compute dtype of the graph [default: the checkpoint's]. State stays fp32.")
@click.option("--memory-op", type=click.Choice(["plugin", "portable"]), default="plugin",
              help="plugin: one custom node per layer (+ its ONNX function); "
                   "portable: plain ONNX ops.")
@click.option("--opset", default=20, type=click.IntRange(18, 23), help="ONNX opset.")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
def export(checkpoint: str, output: str, dtype: str | None, memory_op: str, opset: int,
           force: bool) -> None:
    """Export a checkpoint to an ONNX segment-step graph with its manifest."""
    from infini_trt.export.onnx_export import export_checkpoint

    manifest = export_checkpoint(checkpoint, output, dtype=dtype, memory_op_mode=memory_op,
                                 opset=opset, force=force, log=click.echo)
    files = ", ".join(f for g in manifest.graphs.values() for f in g["files"])
    click.echo(f"wrote {output}: {files}, manifest.json ({manifest.dtype}, "
               f"memory op: {memory_op}, opset {opset})")


BACKEND_CHOICE = click.Choice(["torch", "onnxruntime", "tensorrt"])


@main.command()
@click.argument("model", type=click.Path())
@click.option("--tokens", "token_file", required=True, type=click.Path(),
              help=".npy of int token ids ([T] or [B,T]), or a text file.")
@click.option("--backend", type=BACKEND_CHOICE, default="onnxruntime")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where to run [default: cuda when the backend has it, else cpu].")
@click.option("--logits-out", type=click.Path(dir_okay=False), default=None,
              help="Write all logits to this .npy file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar [default: on a terminal].")
def score(model: str, token_file: str, backend: str, device: str | None,
          logits_out: str | None, as_json: bool, progress: bool | None) -> None:
    """Teacher-forced logits and perplexity of a token sequence of any length.

    MODEL is a native checkpoint or an export directory."""
    from infini_trt.runtime.runners import open_runner
    from infini_trt.runtime.score import read_tokens, score as run_score
    from infini_trt.runtime.tokenizer import load_tokenizer

    with open_runner(model, backend, device=device) as runner:
        tokenizer_path = _tokenizer_path(model)
        tokens, was_1d = read_tokens(token_file, _lazy_tokenizer(tokenizer_path, runner))
        result = run_score(runner, tokens, logits_out, squeeze=was_1d, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"{result.backend}: {result.tokens:,} tokens x {result.batch}, perplexity "
               f"{result.perplexity:.4f} (NLL {result.nll:.4f} nats/token), "
               f"{result.tokens_per_s:,.0f} tokens/s, peak RSS {result.peak_rss_mb:,.0f} MiB")
    if logits_out:
        click.echo(f"logits written to {logits_out}")


def _tokenizer_path(model: str):
    from pathlib import Path

    from infini_trt.export.manifest import is_export_dir, read_manifest

    if is_export_dir(model):
        return read_manifest(model).tokenizer_path
    candidate = Path(model) / "tokenizer.json"
    return candidate if candidate.is_file() else None


class _lazy_tokenizer:
    """The model's tokenizer, loaded only if a text file needs it."""

    def __init__(self, path, runner):
        self.path, self.runner = path, runner

    def encode(self, text: str):
        from infini_trt.runtime.tokenizer import load_tokenizer

        return load_tokenizer(self.path, self.runner.config.vocab_size).encode(text)


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--onnx", "export_dir", required=True, type=click.Path(),
              help="Export directory of this checkpoint.")
@click.option("--segments", default=8, type=click.IntRange(1), help="Full segments to run.")
@click.option("--batch", default=2, type=click.IntRange(1), help="Sequences per step.")
@click.option("--seed", default=0, help="Seed of the random tokens.")
@click.option("--tol", "tolerances", multiple=True, metavar="[OUTPUT=]REL_RMS",
              help="Relative-RMS tolerance, per output (logits, memory_out, norm_out) or for "
                   "all [default: by dtype, 1e-5 for fp32]. Repeatable.")
@click.option("--min-greedy", type=click.FloatRange(0, 1), default=None,
              help="Minimum greedy next-token agreement [default: by dtype, 0.99 for fp32].")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Write the full report (per segment) as JSON.")
@click.option("--progress/--no-progress", default=None)
def validate(checkpoint: str, export_dir: str, segments: int, batch: int, seed: int,
             tolerances: tuple[str, ...], min_greedy: float | None, report: str | None,
             progress: bool | None) -> None:
    """Compare PyTorch and ONNX Runtime with the float64 reference over many segments.

    Each backend carries its own state across all segments. Exits 1 if any output is
    outside its tolerance, has NaN/Inf, or greedy agreement is too low."""
    from infini_trt.export.files import atomic_file
    from infini_trt.runtime.validate import parse_tolerances, validate_export

    result = validate_export(checkpoint, export_dir, segments, batch, seed,
                             parse_tolerances(list(tolerances)), min_greedy,
                             progress=progress, log=click.echo)
    click.echo(result.table())
    if report:
        with atomic_file(report) as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        click.echo(f"report written to {report}")
    if not result.passed:
        raise SystemExit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
