"""`run`: prefill a prompt of any length, then stream the generated text."""
from __future__ import annotations

import json
import sys

import click

from .options import (BACKEND_CHOICE, DEVICE_CHOICE, OUTPUT_FILE, engine_options,
                      prompt_graph_option, runner_options, state_option, stop_strings)

TEXT_TAIL = 8              # generated ids a saved context keeps for decoding what follows


@click.command()
@click.argument("model", type=click.Path())
@click.option("--prompt", "prompts", multiple=True,
              help="Prompt text. Repeat for a batch of prompts (of any lengths).")
@click.option("--prompt-file", "prompt_files", multiple=True, type=click.Path(dir_okay=False),
              help="Read a prompt from a file: text, or .npy token ids ([T]: one prompt; "
                   "[B, T]: B prompts). Repeatable.")
@click.option("--backend", type=BACKEND_CHOICE, default="onnxruntime")
@click.option("--device", type=DEVICE_CHOICE, default=None,
              help="Where to run [default: cuda when the backend has it, else cpu].")
@click.option("--max-new-tokens", default=64, type=click.IntRange(1))
@click.option("--greedy", is_flag=True, help="Greedy decoding (the default unless "
              "--temperature, --top-k or --top-p is given).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--top-k", type=click.IntRange(0), default=None, help="0: off.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None)
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0)
@click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible).")
@click.option("--stop", "stops", multiple=True, callback=stop_strings,
              help="Stop where this string appears (the text ends before it). Repeatable.")
@click.option("--eos/--no-eos", default=True, help="Stop at the tokenizer's end token.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (tokens, text, timings, peak memory).")
@click.option("--progress/--no-progress", default=None,
              help="Prefill progress bar [default: on a terminal].")
@state_option
@click.option("--save-state", type=OUTPUT_FILE, default=None,
              help="Write the context after the answer (the prompt and the answer in it): a "
                   "later `run --state` goes on from there, a conversation.")
@engine_options
@prompt_graph_option
def run(model: str, prompts: tuple[str, ...], prompt_files: tuple[str, ...], backend: str,
        device: str | None, max_new_tokens: int, greedy: bool, temperature: float | None,
        top_k: int | None, top_p: float | None, repetition_penalty: float, seed: int | None,
        stops: tuple[str, ...], eos: bool, as_json: bool, progress: bool | None,
        state: str | None, save_state: str | None, engine: str | None,
        cuda_graphs: bool, prompt_graph: str | None) -> None:
    """Generate text after a prompt of any length, at constant memory.

    MODEL is a native checkpoint or an export directory. The prompt is prefilled segment by
    segment (with a progress bar), then the text is streamed to stdout as it is generated.
    With --state every prompt continues the context (each its own copy of it); without a
    prompt, the text goes on from where the context ends."""
    import numpy as np

    from infini_trt.export.errors import InputError
    from infini_trt.runtime.generation import generate
    from infini_trt.runtime.prompts import read_prompts
    from infini_trt.runtime.resources import format_bytes
    from infini_trt.runtime.runners import open_runner, prepare
    from infini_trt.runtime.sampling import SamplingConfig
    from infini_trt.runtime.session import Session, read_context

    sample = not greedy and any(v is not None for v in (temperature, top_k, top_p))
    options = runner_options(backend, engine, cuda_graphs, prompt_graph)
    tokenizer, token_lists, sources = read_prompts(model, prompts, prompt_files,
                                                   allow_empty=state is not None)
    context = read_context(state, model) if state else None       # before any work
    if not token_lists:
        token_lists, sources = [np.zeros(0, np.int64)], [f"(the context {state})"]
    if save_state and len(token_lists) > 1:
        raise InputError("--save-state keeps one sequence; give one prompt")
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, greedy=not sample,
                         temperature=temperature or 1.0, top_k=top_k or 0,
                         top_p=top_p or 1.0, repetition_penalty=repetition_penalty,
                         seed=seed, eos_id=tokenizer.eos_id if eos else None, stop=stops)
    stream = not as_json and len(token_lists) == 1
    tails = [context.text_tail if context and len(t) == 0 else [] for t in token_lists]
    with open_runner(prepare(model, backend, device=device), backend, device=device, **options) as runner:
        runner.load_graphs()                               # timings: of the work alone
        session = Session(runner, len(token_lists))
        for row in range(session.batch if context else 0):
            session.load(row, context)
        result = generate(session, token_lists, cfg, tokenizer,
                          on_text=_write if stream else None, progress=progress,
                          feed_last=save_state is not None, text_context=tails)
        if save_state:
            answer = result.sequences[0].token_ids
            size = session.save(0, text_tail=(tails[0] + answer)[-TEXT_TAIL:]).save(save_state)
    if stream:
        _write(0, "\n")
    if save_state:
        click.echo(f"context saved to {save_state}: {int(session.seen[0]):,} tokens, "
                   f"{format_bytes(size)}", err=True)
    if as_json:
        data = result.to_dict()
        for seq, text in zip(data["sequences"], sources):
            seq["prompt"] = text
        click.echo(json.dumps(data, indent=2))
        return
    if len(token_lists) > 1:
        for i, seq in enumerate(result.sequences):
            click.echo(f"--- [{i}] {seq.prompt_tokens:,} prompt tokens, {seq.finish_reason}")
            click.echo(seq.text)
    click.echo(f"[{result.backend}] prefill {result.prompt_tokens:,} tokens at "
               f"{result.prefill_tokens_per_s:,.0f} tokens/s, first token after "
               f"{result.time_to_first_token:.2f} s, decode {result.decode_tokens_per_s:,.1f} "
               f"tokens/s, peak RSS {result.peak_rss_mb:,.0f} MiB", err=True)


def _write(b: int, text: str) -> None:
    """Stream one piece of the text (the generator hands out only final text)."""
    sys.stdout.write(text)
    sys.stdout.flush()


COMMANDS = [run]
