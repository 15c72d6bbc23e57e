"""`passkey`: the paper's passkey retrieval grid (Table 3) on the bundled or any model."""
from __future__ import annotations

import json

import click

from .options import BACKEND_CHOICE, DEVICE_CHOICE


@click.command()
@click.argument("model", required=False, type=click.Path())
@click.option("--backend", type=BACKEND_CHOICE, default="onnxruntime")
@click.option("--device", type=DEVICE_CHOICE, default=None,
              help="Where to run [default: cuda when the backend has it, else cpu].")
@click.option("--lengths", default="512,8K,32K,128K",
              help="Prompt lengths in tokens, K = 1024, M = 1024K (e.g. 1K,4K,16K,64K,256K,1M).")
@click.option("--depths", default="start,middle,end",
              help="Where the key sits: start, middle, end, or fractions between 0 and 1.")
@click.option("--trials", default=5, type=click.IntRange(1), help="Random keys per cell.")
@click.option("--seed", default=0, help="Seed of the keys.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False), default=None,
              help="Write the full result (every cell and answer) to this JSON file.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar [default: on a terminal].")
def passkey(model: str | None, backend: str, device: str | None, lengths: str, depths: str,
            trials: int, seed: int, json_file: str | None, progress: bool | None) -> None:
    """Passkey retrieval far beyond the training length: accuracy by length x depth.

    A 5-digit key hidden in filler text at a chosen depth, at least one segment before the
    question, so that only the compressive memory can carry it. Scored as exact match of
    greedy decoding of the 5 digits. MODEL is a checkpoint or export directory [default: the
    bundled passkey model, exported once and cached, run on ONNX Runtime]. The default lengths
    are 1x, 16x, 64x and 256x the bundled model's training length (512 tokens)."""
    from infini_trt.export.files import atomic_file
    from infini_trt.runtime.passkey import open_task, run_passkey
    from infini_trt.runtime.runners import open_runner

    if model is None:
        from infini_trt.runtime.models import bundled_model

        model = str(bundled_model())
        click.echo(f"model: the bundled passkey model ({model})")
    gen, length_list, depth_list = open_task(model, lengths, depths)   # checks before export
    with open_runner(model, backend, device=device) as runner:
        click.echo(f"backend: {runner.description}; segments of {runner.config.segment_len} "
                   f"tokens; {trials} trials per cell, seed {seed}")
        result = run_passkey(runner, gen, length_list, depth_list, trials, seed, model,
                             progress)
    click.echo(f"passkey retrieval, {result.scoring}:")
    click.echo(result.table())
    if json_file:
        with atomic_file(json_file) as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        click.echo(f"result written to {json_file}")


COMMANDS = [passkey]
