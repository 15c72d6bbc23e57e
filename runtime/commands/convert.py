"""`convert`: a checkpoint trained elsewhere -> a native checkpoint."""
from __future__ import annotations

import click

from .options import DTYPE_CHOICE, OUTPUT_DIR


@click.command(short_help="Import a checkpoint trained elsewhere (lucidrains, Hugging Face).")
@click.option("--from", "source", required=True, type=click.Choice(["lucidrains", "hf"]),
              help="lucidrains: an infini-transformer-pytorch InfiniTransformer state_dict; "
                   "hf: a Hugging Face Llama/Mistral/Qwen2 checkpoint directory.")
@click.argument("src", type=click.Path())
@click.option("-o", "--output", required=True, type=OUTPUT_DIR,
              help="Checkpoint directory to write.")
@click.option("--model-args", type=click.Path(dir_okay=False), default=None,
              help="lucidrains: JSON of the InfiniTransformer constructor arguments.")
@click.option("--segment-len", type=click.IntRange(1), default=None,
              help="Segment length N [default: lucidrains 512 (InfiniTransformerWrapper's), "
                   "hf 2048 or max_position_embeddings if smaller].")
@click.option("--gate-init", type=float, default=None,
              help="hf: beta of the new per-head gates; sigmoid(beta) is the memory's weight "
                   "[default: -5, memory weight 0.0067, still trainable].")
@click.option("--update", "update_rule", type=click.Choice(["linear", "delta"]), default=None,
              help="hf: memory update rule [default: linear]. lucidrains: from --model-args.")
@click.option("--dtype", type=DTYPE_CHOICE, default=None,
              help="Weight dtype [default: the source's].")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
def convert(source: str, src: str, output: str, model_args: str | None, segment_len: int | None,
            gate_init: float | None, update_rule: str | None, dtype: str | None,
            force: bool) -> None:
    """Convert SRC, a checkpoint trained elsewhere, into a native checkpoint.

    \b
      infini-trt convert --from lucidrains model.pt --model-args args.json -o ckpt
      infini-trt convert --from hf ./Llama-dir -o ckpt [--gate-init X] [--segment-len N]
    """
    from infini_trt.export.errors import InfiniTrtError

    if source == "lucidrains":
        from infini_trt.export.convert.lucidrains import WRAPPER_SEGMENT_LEN, convert_lucidrains

        if model_args is None:
            raise InfiniTrtError("--from lucidrains needs --model-args ARGS.json (the "
                                 "InfiniTransformer constructor arguments)")
        for name, value in (("--gate-init", gate_init), ("--update", update_rule)):
            if value is not None:
                raise InfiniTrtError(f"{name} is for --from hf; a lucidrains checkpoint has its "
                                     f"own gates and update rule")
        cfg = convert_lucidrains(src, model_args, output, segment_len or WRAPPER_SEGMENT_LEN,
                                 dtype, force)
    else:
        from infini_trt.export.convert.hf import DEFAULT_GATE_INIT, convert_hf

        if model_args is not None:
            raise InfiniTrtError("--model-args is for --from lucidrains; a Hugging Face "
                                 "checkpoint has its config.json")
        cfg = convert_hf(src, output, DEFAULT_GATE_INIT if gate_init is None else gate_init,
                         segment_len, update_rule or "linear", dtype, force)
    click.echo(f"wrote {output}: from {source} {src}, {cfg.num_parameters():,} parameters, "
               f"{cfg.n_layers} layers, segment {cfg.segment_len}, {cfg.update_rule} memory")


COMMANDS = [convert]
