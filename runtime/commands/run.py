"""`run`: prefill a prompt of any length, then stream the generated text."""
from __future__ import annotations

import json
import sys

import click

from .options import (BACKEND_CHOICE, DEVICE_CHOICE, engine_options, runner_options,
                      stop_strings)


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
@engine_options
def run(model: str, prompts: tuple[str, ...], prompt_files: tuple[str, ...], backend: str,
        device: str | None, max_new_tokens: int, greedy: bool, temperature: float | None,
        top_k: int | None, top_p: float | None, repetition_penalty: float, seed: int | None,
        stops: tuple[str, ...], eos: bool, as_json: bool, progress: bool | None,
        engine: str | None, cuda_graphs: bool) -> None:
    """Generate text after a prompt of any length, at constant memory.

    MODEL is a native checkpoint or an export directory. The prompt is prefilled segment by
    segment (with a progress bar), then the text is streamed to stdout as it is generated."""
    from infini_trt.export.errors import InputError
    from infini_trt.export.manifest import model_config
    from infini_trt.runtime.generate import generate
    from infini_trt.runtime.runners import open_runner, prepare
    from infini_trt.runtime.sampling import SamplingConfig
    from infini_trt.runtime.score import read_tokens
    from infini_trt.runtime.tokenizer import model_tokenizer

    if not prompts and not prompt_files:
        raise InputError("give --prompt TEXT or --prompt-file FILE")
    sample = not greedy and any(v is not None for v in (temperature, top_k, top_p))
    options = runner_options(backend, engine, cuda_graphs)
    vocab = model_config(model).vocab_size
    tokenizer = model_tokenizer(model, vocab)            # the prompts are read before the work
    token_lists = [tokenizer.encode(p) for p in prompts]
    sources = list(prompts)
    for file in prompt_files:
        rows = read_tokens(file, tokenizer, vocab)[0]
        token_lists += list(rows)
        sources += [file if len(rows) == 1 else f"{file}[{i}]" for i in range(len(rows))]
    if any(len(t) == 0 for t in token_lists):
        raise InputError("a prompt is empty")
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, greedy=not sample,
                         temperature=temperature or 1.0, top_k=top_k or 0,
                         top_p=top_p or 1.0, repetition_penalty=repetition_penalty,
                         seed=seed, eos_id=tokenizer.eos_id if eos else None, stop=stops)
    stream = not as_json and len(token_lists) == 1
    with open_runner(prepare(model, backend), backend, device=device, **options) as runner:
        result = generate(runner, token_lists, cfg, tokenizer,
                          on_text=_write if stream else None, progress=progress)
    if stream:
        _write(0, "\n")
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
