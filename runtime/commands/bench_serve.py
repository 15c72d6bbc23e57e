"""`bench-serve`: the server's throughput and latency as its clients see them."""
from __future__ import annotations

import json

import click

from .options import BACKEND_CHOICE, OUTPUT_FILE


class Streams(click.ParamType):
    """Comma-separated numbers of streams: 1,4,16,64."""

    name = "list"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            levels = tuple(int(v) for v in str(value).split(","))
        except ValueError:
            levels = ()
        if not levels or min(levels) < 1:
            self.fail(f"{value!r} is not a list of numbers of streams; write e.g. 1,4,16,64",
                      param, ctx)
        return levels


class Tokens(click.ParamType):
    """A number of tokens: 65536, 64K, 1M (K = 1024); 0 allowed."""

    name = "tokens"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        from infini_trt.export.errors import InputError
        from infini_trt.runtime.lengths import parse_length

        if str(value).strip() == "0":
            return 0
        try:
            return parse_length(str(value))
        except InputError:
            self.fail(f"{value!r} is not a number of tokens; write e.g. 65536, 64K, 1M",
                      param, ctx)


@click.command("bench-serve", short_help="Tokens/s and time to first token of `serve`.")
@click.argument("model", required=False, type=click.Path())
@click.option("--concurrency", type=Streams(), default="1,4,16,64",
              help="Numbers of streams at once, one level each.")
@click.option("--prompt-tokens", default=32, type=click.IntRange(1),
              help="Random token ids in each request's prompt.")
@click.option("--max-tokens", default=64, type=click.IntRange(1),
              help="Tokens each request generates (ignore_eos: always all of them).")
@click.option("--requests-per-stream", default=3, type=click.IntRange(1),
              help="Requests each stream sends, one after the other.")
@click.option("--document-tokens", type=Tokens(), default="64K",
              help="The document of the context phase (0: none).")
@click.option("--question-tokens", default=16, type=click.IntRange(1),
              help="The question asked after the document.")
@click.option("--document-runs", default=3, type=click.IntRange(1),
              help="Requests timed for each row of the document phase.")
@click.option("--backend", type=BACKEND_CHOICE, default="onnxruntime")
@click.option("--max-batch", default=None, type=click.IntRange(1),
              help="The server's rows [default: the largest concurrency].")
@click.option("--fit-batch", is_flag=True,
              help="A server per level, of as many rows as streams (and of 1 for the "
                   "document phase), instead of one of --max-batch rows for all.")
@click.option("--seed", default=0, help="Seed of the random prompts.")
@click.option("--json", "json_file", type=OUTPUT_FILE, default=None,
              help="Write every figure as JSON.")
def bench_serve(model: str | None, concurrency: tuple[int, ...], prompt_tokens: int,
                max_tokens: int, requests_per_stream: int, document_tokens: int,
                question_tokens: int, document_runs: int, backend: str,
                max_batch: int | None, fit_batch: bool, seed: int, json_file: str | None
                ) -> None:
    """Start `infini-trt serve MODEL` in its own process on 127.0.0.1 and measure it through
    its OpenAI API: aggregate tokens/s, time to first token p50/p99 and inter-token latency
    at each concurrency (streams of greedy completions of random token ids, each generating
    --max-tokens tokens); then time to first token for a question about a document read with
    it (a miss), after its stored context (a hit), and sent again (the prefix cache).

    MODEL is a native checkpoint or an export directory [default: the bundled passkey
    model]. The server keeps its contexts in a temporary directory, removed at the end, and
    is stopped with SIGTERM whichever way this ends. Progress goes to stderr, the tables
    (Markdown) to stdout. Needs the serve extra: pip install "infini-trt[serve]"."""
    from infini_trt.export.files import atomic_file
    from infini_trt.runtime.serving.bench import ServeBenchSettings, run_serve_bench
    from infini_trt.runtime.serving.bench_report import table

    settings = ServeBenchSettings(concurrency, prompt_tokens, max_tokens, requests_per_stream,
                                  document_tokens, question_tokens, document_runs, backend,
                                  max_batch, seed, fit_batch)
    report = run_serve_bench(model, settings, log=lambda text: click.echo(text, err=True))
    click.echo(table(report))
    if json_file:
        with atomic_file(json_file) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_file}", err=True)


COMMANDS = [bench_serve]
