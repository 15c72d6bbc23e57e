"""`init` and `inspect`: native checkpoints."""
from __future__ import annotations

import json

import click

from .options import DTYPE_CHOICE, OUTPUT_DIR


@click.command()
@click.option("--preset", "preset_name", required=True,
              type=click.Choice(["tiny", "small"]), help="Model shape.")
@click.option("-o", "--output", required=True, type=OUTPUT_DIR,
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
    from infini_trt.export.files import check_output

    check_output(output, "dir", force)
    overrides = {"update_rule": update_rule} if update_rule else {}
    cfg = preset(preset_name, **overrides)
    model = init_weights(InfiniLM(cfg), seed).to(dtype_from_name(dtype))
    save_checkpoint(model, output, force=force)
    click.echo(f"wrote {output}: preset {preset_name}, {cfg.num_parameters():,} parameters, "
               f"{dtype}, seed {seed}")


@click.command(short_help="Check a checkpoint or an export, and describe it.")
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(model: str, as_json: bool) -> None:
    """Load and check MODEL, and describe it.

    A checkpoint: its config, every tensor (names, shapes, dtype, finite values) and its
    tokenizer. An export directory: its manifest, the hashes of its graph files, its
    tokenizer and the checkpoint it was made from."""
    from infini_trt.export.manifest import is_export_dir

    info = _describe_export(model) if is_export_dir(model) else _describe_checkpoint(model)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    cfg = info["config"]
    if info["kind"] == "export":
        source = info["source"] or "an unknown checkpoint"
        click.echo(f"{info['path']}: export ({info['precision']}, memory op "
                   f"{info['memory_op']}, opset {info['opset']}) of {source}")
        click.echo(f"  graphs: {', '.join(info['graphs'])} (every file matches its sha256)")
        click.echo(f"  engines: {', '.join(info['engines']) or 'none'}")
    else:
        click.echo(f"{info['path']}: {info['parameters']:,} parameters ({info['dtype']}), "
                   f"{cfg['n_layers']} layers, segment {cfg['segment_len']}, "
                   f"{cfg['update_rule']} memory")
    click.echo(f"  memory state per sequence: {info['state_bytes_per_sequence']:,} bytes "
               f"(constant in the length)")
    click.echo(f"  tokenizer: {info['tokenizer']}")
    for key, value in cfg.items():
        click.echo(f"  {key:16s} {value}")


def _state_bytes(cfg) -> int:
    return 4 * (cfg.n_layers * cfg.n_kv_heads * cfg.dk * (cfg.dv + 1))


def _tokenizer(path, cfg) -> str:
    """The tokenizer's name, after loading it (a broken tokenizer.json fails here)."""
    from infini_trt.runtime.tokenizer import load_tokenizer

    if path is None and cfg.vocab_size < 256:
        return "none (token ids only)"
    return load_tokenizer(path, cfg.vocab_size).name


def _describe_checkpoint(path: str) -> dict:
    from infini_trt.export import load_checkpoint, read_checkpoint

    ckpt = read_checkpoint(path)
    model = load_checkpoint(path)
    return {"kind": "checkpoint", "path": str(ckpt.path),
            "dtype": str(ckpt.dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in model.parameters()),
            "state_bytes_per_sequence": _state_bytes(ckpt.config),
            "tokenizer": _tokenizer(ckpt.tokenizer_path, ckpt.config),
            "config": ckpt.config.to_dict()}


def _describe_export(path: str) -> dict:
    from infini_trt.export.manifest import read_manifest
    from infini_trt.runtime.artifacts import verify_export

    manifest = read_manifest(path)
    verify_export(manifest)
    return {"kind": "export", "path": str(manifest.path), "precision": manifest.precision,
            "memory_op": manifest.memory_op, "opset": manifest.opset,
            "graphs": {name: graph["file"] for name, graph in manifest.graphs.items()},
            "engines": sorted(manifest.engines), "source": manifest.source.get("checkpoint"),
            "state_bytes_per_sequence": _state_bytes(manifest.config),
            "tokenizer": _tokenizer(manifest.tokenizer_path, manifest.config),
            "config": manifest.config.to_dict()}


COMMANDS = [init, inspect]
