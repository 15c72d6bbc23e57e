"""`passkey`: the paper's passkey retrieval grid (Table 3) on the bundled or any model."""
from __future__ import annotations

import json

import click

from .options import BACKEND_CHOICE, DEVICE_CHOICE, OUTPUT_FILE


@click.command(short_help="The passkey retrieval grid (the paper's Table 3).")
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
@click.option("--json", "json_file", type=OUTPUT_FILE, default=None,
              help="Write the full result (every cell and answer) to this JSON file.")
@click.option("--check/--no-check", default=True,
              help="Before the grid, check the exported graph against the float64 PyTorch "
                   "reference over 3 segments (onnxruntime/tensorrt).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar [default: on a terminal].")
def passkey(model: str | None, backend: str, device: str | None, lengths: str, depths: str,
            trials: int, seed: int, json_file: str | None, check: bool,
            progress: bool | None) -> None:
    """Passkey retrieval far beyond the training length: accuracy by length x depth.

    A 5-digit key hidden in filler text at a chosen depth, at least one segment before the
    question, so that only the compressive memory can carry it. Scored as exact match of
    greedy decoding of the 5 digits. MODEL is a checkpoint or export directory [default: the
    bundled passkey model, exported once and cached, run on ONNX Runtime]. The default lengths
    are 1x, 16x, 64x and 256x the bundled model's training length (512 tokens)."""
    from infini_trt.export.files import atomic_file
    from infini_trt.runtime.passkey import open_task, run_passkey
    from infini_trt.runtime.runners import open_runner, prepare

    if model is None:
        from infini_trt.runtime.models import bundled_model

        model = str(bundled_model())
        click.echo(f"model: the bundled passkey model ({model})")
    gen, length_list, depth_list = open_task(model, lengths, depths)   # checks before export
    if backend != "torch":
        model = str(prepare(_export_and_check(model, backend, check), backend))
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


def _export_and_check(model: str, backend: str, check: bool) -> str:
    """The export directory of `model` (exported and cached if it is a checkpoint), after a
    quick parity check of its segment graph with the float64 reference of the checkpoint."""
    from infini_trt.export.errors import InfiniTrtError
    from infini_trt.export.manifest import is_export_dir, read_manifest
    from infini_trt.runtime.export_cache import cached_export, export_settings
    from infini_trt.runtime.validate import validate_export

    if is_export_dir(model):
        export_dir, checkpoint = model, read_manifest(model).source_checkpoint
    else:
        export_dir = str(cached_export(model, log=click.echo, **export_settings(backend)))
        checkpoint = model
    if not check or backend != "onnxruntime":
        return export_dir
    if checkpoint is None:
        click.echo("parity check skipped: the export's checkpoint is not available")
        return export_dir
    report = validate_export(checkpoint, export_dir, segments=2, batch=1, include_torch=False,
                             progress=False)
    backend_report = report.backends[0]
    logits = backend_report.outputs["logits"]
    memory = backend_report.outputs["memory_out"]
    click.echo(f"parity check: {backend_report.backend} vs {report.reference} over "
               f"{report.segments} segments + {report.partial} tokens: logits rel RMS "
               f"{logits.rel_rms:.1e}, memory rel RMS {memory.rel_rms:.1e}, greedy agreement "
               f"{backend_report.greedy_agreement:.0%}: {'ok' if report.passed else 'FAILED'}")
    if not report.passed:
        raise InfiniTrtError("the exported graph does not match the PyTorch reference; run "
                             "`infini-trt validate` for the full report")
    return export_dir


COMMANDS = [passkey]
