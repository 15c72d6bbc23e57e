"""`prefill`: read a document once into a context file."""
from __future__ import annotations

import json

import click

from .options import BACKEND_CHOICE, DEVICE_CHOICE, OUTPUT_FILE, state_option


@click.command(short_help="Read a document once and keep it as a context file.")
@click.argument("model", type=click.Path())
@click.option("--prompt", "prompts", multiple=True, help="The text to read.")
@click.option("--prompt-file", "prompt_files", multiple=True, type=click.Path(dir_okay=False),
              help="Read the text from a file (text, or .npy token ids [T]).")
@click.option("-o", "--output", required=True, type=OUTPUT_FILE,
              help="The context file to write (safetensors).")
@click.option("--backend", type=BACKEND_CHOICE, default="onnxruntime")
@click.option("--device", type=DEVICE_CHOICE, default=None,
              help="Where to run [default: cuda when the backend has it, else cpu].")
@state_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar [default: on a terminal].")
def prefill(model: str, prompts: tuple[str, ...], prompt_files: tuple[str, ...], output: str,
            backend: str, device: str | None, state: str | None, as_json: bool,
            progress: bool | None) -> None:
    """Read a document of any length once and write its context: the model's whole state
    after it, a file whose size does not depend on the document's length.

    `run --state` and `score --state` continue from it on any backend of the same model,
    without reading the document again; --state here appends to a context."""
    import time

    from infini_trt.export.errors import InputError
    from infini_trt.runtime.prompts import read_prompts
    from infini_trt.runtime.resources import format_bytes
    from infini_trt.runtime.runners import open_runner, prepare
    from infini_trt.runtime.session import Session, read_context

    _, texts, _ = read_prompts(model, prompts, prompt_files)
    if len(texts) != 1:
        raise InputError(f"a context holds one sequence; give one prompt (got {len(texts)})")
    context = read_context(state, model) if state else None
    with open_runner(prepare(model, backend, device=device), backend, device=device) as runner:
        runner.load_graphs()
        session = Session(runner)
        if context is not None:
            session.load(0, context)
        started = time.perf_counter()
        session.feed(texts, progress)
        seconds = time.perf_counter() - started
        size = session.save(0).save(output)
    if as_json:
        click.echo(json.dumps({"backend": runner.description, "tokens": len(texts[0]),
                               "seconds": seconds, "tokens_per_s": len(texts[0]) / seconds,
                               "context": output, "bytes": size,
                               "context_tokens": int(session.seen[0])}, indent=2))
        return
    click.echo(f"read {len(texts[0]):,} tokens in {seconds:,.2f} s "
               f"({len(texts[0]) / seconds:,.0f} tokens/s, {runner.description}); "
               f"wrote {output}: {format_bytes(size)}, {int(session.seen[0]):,} tokens of "
               f"context")


COMMANDS = [prefill]
