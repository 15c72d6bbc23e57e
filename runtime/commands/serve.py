"""`serve`: an OpenAI-compatible HTTP server with continuous batching."""
from __future__ import annotations

import re

import click

from .options import (BACKEND_CHOICE, DEVICE_CHOICE, engine_options, prompt_graph_option,
                      runner_options)

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ByteSize(click.ParamType):
    """A size in bytes: 1073741824, 512M, 2G (K, M, G, T: powers of 1024; a trailing B or
    iB is allowed)."""

    name = "size"

    def __init__(self, zero: bool = False):
        self.zero = zero                       # whether 0 is a size (it turns a thing off)

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", str(value), re.I)
        if not match or (int(match.group(1)) == 0 and not self.zero):
            self.fail(f"{value!r} is not a size; write e.g. 1073741824, 512M, 2G", param, ctx)
        return int(match.group(1)) * UNITS[match.group(2).upper()]


@click.command()
@click.argument("model", required=False, type=click.Path())
@click.option("--host", default="127.0.0.1",
              help="Address to listen on (loopback: only this machine can connect).")
@click.option("--port", default=8000, type=click.IntRange(0, 65535), help="0: a free port.")
@click.option("--backend", type=BACKEND_CHOICE, default="onnxruntime")
@click.option("--device", type=DEVICE_CHOICE, default=None,
              help="Where to run [default: cuda when the backend has it, else cpu].")
@click.option("--max-batch", default=8, type=click.IntRange(1),
              help="Rows of the batch: requests generated at once.")
@click.option("--max-queue", default=64, type=click.IntRange(0),
              help="Requests that may wait for a row; more get 429 (Retry-After).")
@click.option("--max-prompt-tokens", default=None, type=click.IntRange(1),
              help="Refuse longer prompts (400) [default: no limit].")
@click.option("--max-new-tokens", default=4096, type=click.IntRange(1),
              help="The largest max_tokens a request may ask for.")
@click.option("--context-store", type=click.Path(), default=None, metavar="DIR|URL",
              help="The directory that keeps contexts (POST /v1/contexts), made if need be, "
                   "or a Redis server that several servers share, redis://HOST:PORT/DB "
                   "(rediss:// for TLS; keys under infini-trt:contexts:, the prefix cache's "
                   "under infini-trt:prefixes:; pip install \"infini-trt[redis]\") "
                   "[default: $INFINI_TRT_CACHE/contexts, else ~/.cache/infini-trt/contexts].")
@click.option("--context-store-bytes", type=ByteSize(), default="1G", show_default=True,
              help="The most bytes of contexts it keeps (the least recently used go first); "
                   "K, M, G: powers of 1024.")
@click.option("--prefix-cache-bytes", type=ByteSize(zero=True), default="1G", show_default=True,
              help="The most bytes the prefix cache keeps (a prompt's state at its last two "
                   "segment boundaries, so that a prompt beginning with the same tokens, a "
                   "document sent again, starts there), in the directory 'prefixes' of the "
                   "context store (in its Redis: under infini-trt:prefixes:); 0: no prefix "
                   "cache.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info",
                                                "debug"]), default="info")
@engine_options
@prompt_graph_option
@click.option("--ray", "on_ray", is_flag=True,
              help="Serve as a Ray Serve application: --replicas engines behind Ray's proxy "
                   "(needs the ray extra: pip install \"infini-trt[ray]\").")
@click.option("--replicas", default=2, type=click.IntRange(1), show_default=True,
              help="--ray: how many engines (replicas) serve.")
@click.option("--address", default=None, metavar="auto|ray://HOST:PORT",
              help="--ray: the Ray cluster to deploy on [default: a local Ray instance on "
                   "127.0.0.1, stopped on exit].")
def serve(model: str | None, host: str, port: int, backend: str, device: str | None,
          max_batch: int, max_queue: int, max_prompt_tokens: int | None, max_new_tokens: int,
          context_store: str | None, context_store_bytes: int, prefix_cache_bytes: int,
          log_level: str,
          engine: str | None, cuda_graphs: bool, prompt_graph: str | None,
          on_ray: bool, replicas: int, address: str | None) -> None:
    """Serve a model over the OpenAI HTTP API, many clients at once.

    MODEL is a native checkpoint or an export directory [default: the bundled passkey
    model]; its model id is the directory's name. Endpoints: GET /v1/models, POST
    /v1/completions and /v1/chat/completions (streamed as server-sent events with "stream":
    true; temperature 0 is greedy, and a greedy answer equals `infini-trt run MODEL --greedy`),
    GET /health, GET /metrics (Prometheus), GET /docs. max_tokens defaults to 16 for
    completions (as OpenAI's) and to 256 for chat. Chat uses the checkpoint's chat
    template (tokenizer_config.json beside tokenizer.json), else the plain one: each message
    as "role: content" on its own line, then "assistant:".

    Contexts: POST /v1/contexts reads a document once and keeps its state (a small file,
    whatever the document's length) under an id; completions and chat with "context": ID
    (the OpenAI client's extra_body) continue from it, reading only their own prompt, also
    after a restart; GET and DELETE /v1/contexts/ID. The store is bounded by
    --context-store-bytes: the least recently used contexts are removed first. Without a
    context, a prompt that begins with the same full segments as an earlier one starts from
    the prefix cache (usage.prompt_tokens_details.cached_tokens counts what was not read).

    Requests join the running batch between decode steps, and long prompts are read a
    segment per step between the other rows' tokens. SIGTERM or Ctrl-C stops it: streams in
    flight end at once (finish_reason "length"), exit code 0. Needs the serve extra: pip
    install "infini-trt[serve]"."""
    from infini_trt.runtime.serving import serve as run_server

    options = runner_options(backend, engine, cuda_graphs, prompt_graph)
    start = run_server
    if on_ray:
        from infini_trt.runtime.serving import require_extra
        from infini_trt.runtime.serving.ray_serve import require_ray, serve_on_ray

        require_extra()
        require_ray()
        start = serve_on_ray
        options.update(replicas=replicas, address=address)
    elif replicas != 2 or address is not None:
        raise click.UsageError("--replicas and --address go with --ray")
    else:
        options["log_level"] = log_level
    start(model, host=host, port=port, backend=backend,
          device=device, max_batch=max_batch, max_queue=max_queue,
          max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
          context_store=context_store, context_store_bytes=context_store_bytes,
          prefix_cache_bytes=prefix_cache_bytes, **options)


COMMANDS = [serve]
