"""`infini-trt serve`: an OpenAI-compatible HTTP server with continuous batching.

    engine.py   the loop that owns the runner: requests join and leave a batch of rows
    app.py      the OpenAI API in front of it (FastAPI), and the uvicorn server
    schemas.py  what requests may hold, OpenAI-style errors, the chat template
    metrics.py  the Prometheus metrics
    store.py    where contexts are kept (a directory by default), by id
    redis_store.py  the same in a Redis server that several servers share
    prefix_cache.py  prompts' states at segment boundaries, so a prefix is not read twice

    with open_service(bundled_model(), "onnxruntime") as service:     # model, engine, app
        server = make_server(service.app, service.engine, service.metrics)
        server.run(sockets=[listen("127.0.0.1", 8000)])

FastAPI, uvicorn and prometheus-client are the `serve` extra (`pip install "infini-trt[serve]"`);
nothing here imports them until a server is made.
"""
from __future__ import annotations

import contextlib
import importlib.util
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from infini_trt.export.errors import InfiniTrtError, MissingDependencyError

if TYPE_CHECKING:
    from .store import ContextStore

EXTRA = ("fastapi", "uvicorn", "prometheus_client")


def require_extra() -> None:
    """MissingDependencyError, naming the extra, where a package of it is not installed."""
    for module in EXTRA:
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(module.replace("_", "-"), "infini-trt serve",
                                         'pip install "infini-trt[serve]"')


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or one line saying why not:
    bound before the model is loaded, so that a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise InfiniTrtError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


@dataclass
class Service:
    engine: object          # engine.Engine
    app: object             # fastapi.FastAPI
    metrics: object         # metrics.ServeMetrics
    model_name: str
    store: object           # store.ContextStore
    prefixes: object = None  # prefix_cache.PrefixCache, or None


@contextlib.contextmanager
def open_service(model: str | Path | None = None, backend: str = "onnxruntime",
                 device: str | None = None, max_batch: int = 8, max_queue: int = 64,
                 max_prompt_tokens: int | None = None, max_new_tokens: int = 4096,
                 context_store: str | Path | ContextStore | None = None,
                 context_store_bytes: int = 1 << 30,
                 prefix_cache: str | Path | ContextStore | None = None,
                 prefix_cache_bytes: int = 1 << 30,
                 log: Callable[[str], None] | None = None, **options) -> Iterator[Service]:
    """The model (the bundled one when None) prepared and opened on `backend` twice (the
    batch's runner, and the reader of prompts' full segments: engine.py), its engine running
    and the app in front of it; on exit the engine stops and the runners close.
    `context_store`: a store.ContextStore, a redis:// or rediss:// URL (a RedisStore), or the
    directory of a DirectoryStore of `context_store_bytes` (None: store.default_store_path()),
    made before the model loads. `prefix_cache` the same for the prefix cache (None: the
    namespace PREFIXES of a RedisStore's server, the directory `prefixes` inside a
    DirectoryStore's, else in store.default_store_path()); `prefix_cache_bytes` 0: none."""
    require_extra()
    from ..models import bundled_model
    from ..runners import open_runner, prepare
    from ..session import model_fingerprint
    from ..tokenizer import tokenizer_of
    from .app import Settings, create_app
    from .engine import Engine
    from .metrics import ServeMetrics
    from .schemas import ChatTemplate
    from .prefix_cache import PrefixCache
    from .redis_store import PREFIXES, RedisStore, is_redis_url
    from .store import ContextStore, DirectoryStore, default_store_path

    if is_redis_url(context_store):
        context_store = RedisStore(context_store, context_store_bytes)
    elif not isinstance(context_store, ContextStore):
        context_store = DirectoryStore(context_store or default_store_path(),
                                       context_store_bytes)
    if prefix_cache_bytes and not isinstance(prefix_cache, ContextStore):
        if is_redis_url(prefix_cache):
            prefix_cache = RedisStore(prefix_cache, prefix_cache_bytes, PREFIXES)
        elif prefix_cache is None and isinstance(context_store, RedisStore):
            prefix_cache = context_store.namespaced(PREFIXES, prefix_cache_bytes)
        else:
            base = getattr(context_store, "path", None) or default_store_path()
            prefix_cache = DirectoryStore(prefix_cache or Path(base) / "prefixes",
                                          prefix_cache_bytes)
    model = Path(model) if model is not None else bundled_model()
    try:
        tokenizer = tokenizer_of(model)
    except InfiniTrtError:
        tokenizer = None                     # token ids only (a small vocabulary, no file)
    template = ChatTemplate.of(model)
    settings = Settings(model_name=model.resolve().name, max_prompt_tokens=max_prompt_tokens,
                        max_new_tokens=max_new_tokens)
    prepared = prepare(model, backend, log=log, device=device)
    # the decoding runner is never given a whole segment (the reader reads those), so on ONNX
    # Runtime it needs no prefill session: the process holds one pre-packed copy of the
    # weights fewer
    decoding = {**options, "prompt_graph": "extend"} if backend == "onnxruntime" else options
    with open_runner(prepared, backend, device=device, **decoding) as runner, \
            open_runner(prepared, backend, device=device, **options) as reader:
        runner.load_graphs()
        reader.load_graphs()
        metrics = ServeMetrics(max_batch)
        prefixes = None if not prefix_cache_bytes else PrefixCache(
            prefix_cache, {"model": model_fingerprint(runner), "runner": runner.description},
            runner.config.segment_len)
        engine = Engine(runner, tokenizer, max_batch, max_queue, metrics, reader=reader,
                        prefixes=prefixes).start()
        try:
            app = create_app(engine, tokenizer, settings, metrics, template, context_store)
            yield Service(engine, app, metrics, settings.model_name, context_store, prefixes)
        finally:
            engine.stop()
            engine.join()
            if prefixes is not None:
                prefixes.close()


def serve(model: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
          backend: str = "onnxruntime", log_level: str = "info", **service_options) -> None:
    """Serve `model` on host:port until SIGTERM or SIGINT (then in-flight streams end cleanly
    and this returns)."""
    require_extra()
    from .app import make_server

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    sock = listen(host, port)
    try:
        with open_service(model, backend, log=say, **service_options) as service:
            bound = sock.getsockname()
            say(f"infini-trt: contexts kept in {service.store}")
            if service.prefixes is not None:
                say(f"infini-trt: prefix cache in {service.prefixes}")
            say(f"infini-trt: serving '{service.model_name}' ({service.engine.runner.description},"
                f" {service.engine.max_batch} rows) at http://{_url_host(bound[0])}:{bound[1]}/v1")
            make_server(service.app, service.engine, service.metrics, log_level).run(
                sockets=[sock])
    finally:
        sock.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
