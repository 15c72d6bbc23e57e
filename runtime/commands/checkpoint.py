"""`init` and `inspect`: native checkpoints."""
from __future__ import annotations

import json

import click

from .options import DTYPE_CHOICE


@click.command()
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


@click.command()
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


COMMANDS = [init, inspect]
