"""`score`: teacher-forced logits and perplexity."""
from __future__ import annotations

import json

import click

from .options import (BACKEND_CHOICE, DEVICE_CHOICE, OUTPUT_FILE, engine_options,
                      runner_options, state_option)


@click.command(short_help="Teacher-forced logits and perplexity, any length.")
@click.argument("model", type=click.Path())
@click.option("--tokens", "token_file", required=True, type=click.Path(),
              help=".npy of int token ids ([T] or [B,T]), or a text file (tokenized with the "
                   "model's tokenizer).")
@click.option("--backend", type=BACKEND_CHOICE, default="onnxruntime")
@click.option("--device", type=DEVICE_CHOICE, default=None,
              help="Where to run [default: cuda when the backend has it, else cpu].")
@click.option("--logits-out", type=OUTPUT_FILE, default=None,
              help="Write all logits to this .npy file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar [default: on a terminal].")
@state_option
@engine_options
def score(model: str, token_file: str, backend: str, device: str | None,
          logits_out: str | None, as_json: bool, progress: bool | None, state: str | None,
          engine: str | None, cuda_graphs: bool) -> None:
    """Teacher-forced logits and perplexity of a token sequence of any length.

    MODEL is a native checkpoint or an export directory (a checkpoint is exported first, and
    the export cached, for the onnxruntime and tensorrt backends). With --state every row
    continues that context, whose last logits predict the first token."""
    from infini_trt.export.files import check_output
    from infini_trt.export.manifest import model_config
    from infini_trt.runtime.resources import format_bytes
    from infini_trt.runtime.runners import open_runner, prepare
    from infini_trt.runtime.scoring import check_logits_room, logits_bytes, read_tokens
    from infini_trt.runtime.scoring import score as run_score
    from infini_trt.runtime.session import Session, read_context
    from infini_trt.runtime.tokenizer import LazyTokenizer, model_tokenizer

    options = runner_options(backend, engine, cuda_graphs)
    vocab = model_config(model).vocab_size
    tokens, was_1d = read_tokens(token_file, LazyTokenizer(lambda: model_tokenizer(model, vocab)),
                                 vocab)
    if logits_out:
        check_output(logits_out, "file", inputs=(token_file,))
        size = logits_bytes(tokens, vocab)
        check_logits_room(logits_out, size)
        click.echo(f"writing {tokens.size:,} x {vocab:,} float32 logits ({format_bytes(size)}) "
                   f"to {logits_out}", err=True)
    context = read_context(state, model) if state else None       # before any work
    with open_runner(prepare(model, backend, device=device), backend, device=device, **options) as runner:
        session = Session(runner, tokens.shape[0])
        for row in range(session.batch if context else 0):
            session.load(row, context)
        result = run_score(session, tokens, logits_out, squeeze=was_1d, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"{result.backend}: {result.tokens:,} tokens x {result.batch}, perplexity "
               f"{result.perplexity:.4f} (NLL {result.nll:.4f} nats/token), "
               f"{result.tokens_per_s:,.0f} tokens/s, peak RSS {result.peak_rss_mb:,.0f} MiB")
    if logits_out:
        click.echo(f"logits written to {logits_out}")


COMMANDS = [score]
