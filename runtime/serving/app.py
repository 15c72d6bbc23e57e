"""The OpenAI HTTP API in front of the engine (engine.py): FastAPI routes, OpenAI-style
errors, server-sent events, and the uvicorn server that stops cleanly (schemas.py has what a
request may hold).

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream or not),
POST /v1/contexts, GET and DELETE /v1/contexts/{id}, GET /health, GET /metrics (Prometheus),
and FastAPI's /docs and /openapi.json.
Every error is `{"error": {"message", "type", "param", "code"}}` with its HTTP status.

A context (store.py) is a document read once and kept as its row's state: completions and
chat with `"context": id` load it into their row and read only their own prompt after it, so
their `usage.prompt_tokens` counts only those tokens and `usage.context_tokens` the
context's. An unknown id is a 404 (code "context_not_found"), another model's context a 400.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from infini_trt.export.errors import InfiniTrtError, InputError

from ..context import Context
from ..sampling import SamplingConfig
from ..session import model_fingerprint
from .engine import Engine, EngineStopped, Event, QueueFull
from .metrics import ServeMetrics
from .schemas import (APIError, ChatCompletionRequest, ChatTemplate, CompletionRequest,
                      ContextRequest, prompt_list)
from .store import ContextStore, ContextStoreError, UnknownContext

DISCONNECT_POLL_S = 0.25      # how often a non-streamed request looks for its client
RETRY_AFTER_S = 1             # what a 429 tells the client to wait
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "shutdown": "length"}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)


@dataclass(frozen=True)
class Settings:
    model_name: str
    max_prompt_tokens: int | None = None       # None: any length (the memory is constant)
    max_new_tokens: int = 4096                 # the largest max_tokens a request may ask
    chat_max_tokens: int = 256                 # a chat request's max_tokens when it names none


class Disconnected(Exception):
    """The client of a non-streamed request went away."""


class Job:
    """The engine requests of one HTTP request (one per prompt, each after `context` if one
    is given; `read_only`: reading it is all), their events brought to this event loop.
    `cancel()` ends them all (a no-op for those already done)."""

    def __init__(self, engine: Engine, prompts: list[np.ndarray], cfg: SamplingConfig,
                 context: Context | None = None, read_only: bool = False):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.requests = []
        self.context_tokens = None if context is None else context.tokens
        self.cached_tokens = 0         # prompt tokens whose state was in the prefix cache
        extra = {"read_only": read_only} if context is None else {
            "context": context, "text_context": context.text_tail}
        try:
            for i, prompt in enumerate(prompts):
                self.requests.append(engine.submit(prompt, cfg, functools.partial(self._put, i),
                                                   **extra))
        except QueueFull as exc:
            self.cancel()
            raise APIError(429, str(exc), "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineStopped as exc:
            self.cancel()
            raise APIError(503, str(exc), "server_error", code="shutting_down") from None
        except InputError as exc:
            self.cancel()
            raise APIError(400, str(exc), param="prompt") from None
        self.prompt_tokens = sum(len(p) for p in prompts)

    def _put(self, index: int, event: Event) -> None:          # the engine's thread
        self.cached_tokens += event.cached_tokens
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, Event]]:
        """(prompt index, event) until every prompt's last event; with `request`, raise
        Disconnected when its client has gone (a stream learns it from the server)."""
        left, looked = len(self.requests), time.monotonic()
        while left:
            if request is None:
                index, event = await self.queue.get()
            else:
                try:
                    index, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    index, event = -1, None
                if time.monotonic() - looked >= DISCONNECT_POLL_S:
                    looked = time.monotonic()
                    if await request.is_disconnected():
                        raise Disconnected()
                if event is None:
                    continue
            if event.error is not None:
                raise APIError(event.status, event.error,
                               "server_error" if event.status >= 500 else "invalid_request_error")
            left -= event.final
            yield index, event


class EventStream(StreamingResponse):
    """Server-sent events: each chunk of `chunks` (an async generator of dicts), then
    `[DONE]`, or the error's body where the job fails. The generator is closed whichever way
    the response ends (a client gone, the server stopping), and the job cancelled, so that
    its rows are freed."""

    def __init__(self, job: "Job", chunks):
        async def events():
            try:
                async for chunk in chunks:
                    yield sse(chunk)
                yield sse("[DONE]")
            except APIError as exc:
                yield sse(exc.body)
            finally:
                job.cancel()

        super().__init__(events(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(engine: Engine, tokenizer, settings: Settings, metrics: ServeMetrics,
               chat_template: ChatTemplate, store: ContextStore) -> FastAPI:
    app = FastAPI(title="infini-trt", version="1",
                  description="An OpenAI-compatible server for an Infini-attention model, with "
                              "continuous batching and stored contexts.")
    name = settings.model_name
    fingerprint = model_fingerprint(engine.runner)      # what a stored context must match
    metrics.watch_store(store)

    # errors -----------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return error_response(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind,
                                       headers=exc.headers))

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):      # a bug: uvicorn logs the traceback
        return error_response(APIError(500, f"internal error: {exc}", "server_error"))

    # helpers ------------------------------------------------------------------------------
    def check_model(model: str | None) -> None:
        if model is not None and model != name:
            raise APIError(404, f"the model '{model}' does not exist; this server has '{name}'",
                           param="model", code="model_not_found")

    def sampling(body, max_tokens: int | None, default: int) -> SamplingConfig:
        max_tokens = default if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= settings.max_new_tokens:
            raise APIError(400, f"max_tokens must be between 1 and {settings.max_new_tokens}, "
                                f"got {max_tokens}", param="max_tokens", code="invalid_value")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if any(s == "" for s in stop):
            raise APIError(400, "a stop string must not be empty", param="stop")
        if stop and tokenizer is None:
            raise APIError(400, "stop strings need a tokenizer, and this model has none",
                           param="stop")
        return SamplingConfig(max_new_tokens=max_tokens, greedy=body.temperature == 0,
                              temperature=body.temperature or 1.0, top_p=body.top_p,
                              seed=body.seed, eos_id=None if body.ignore_eos else
                              getattr(tokenizer, "eos_id", None),
                              stop=stop)

    def check_length(prompts: list[np.ndarray], param: str) -> None:
        limit = settings.max_prompt_tokens
        for prompt in prompts:
            if limit is not None and len(prompt) > limit:
                raise APIError(400, f"the prompt has {len(prompt):,} tokens, more than this "
                                    f"server takes ({limit:,}, --max-prompt-tokens)",
                               param=param, code="context_length_exceeded")

    async def encode(text: str) -> np.ndarray:
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: give the prompt as token ids",
                           param="prompt")
        return np.asarray(await run_in_threadpool(tokenizer.encode, text), dtype=np.int64)

    async def collect(job: Job, request: Request, n: int):
        """-> ([text of each prompt], [its last event])."""
        texts, finals = [""] * n, [None] * n
        try:
            async for index, event in job.events(request):
                texts[index] += event.text
                if event.final:
                    finals[index] = event
        except Disconnected:
            return None, None
        finally:
            job.cancel()
        return texts, finals

    def usage(job: Job, completion_tokens: int) -> dict:
        out = {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion_tokens,
               "total_tokens": job.prompt_tokens + completion_tokens,
               "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}
        if job.context_tokens is not None:
            out["context_tokens"] = job.context_tokens
        return out

    def not_found(exc: UnknownContext, param: str | None = None) -> APIError:
        return APIError(404, str(exc), param=param, code="context_not_found")

    def store_down(exc: ContextStoreError) -> APIError:
        """The store cannot be read now (a Redis gone away): retryable."""
        return APIError(503, str(exc), "server_error", code="context_store_error",
                        headers={"Retry-After": str(RETRY_AFTER_S)})

    async def stored_context(ctx_id: str | None) -> Context | None:
        """The context a request names (None: none), checked against this model."""
        if ctx_id is None:
            return None
        try:
            context = await run_in_threadpool(store.get, ctx_id)
        except UnknownContext as exc:
            raise not_found(exc, "context") from None
        except ContextStoreError as exc:
            raise store_down(exc) from None
        except InputError as exc:                   # its file is damaged
            raise APIError(400, str(exc), param="context", code="context_unreadable") from None
        try:
            context.check_model(fingerprint, engine.config)
        except InfiniTrtError as exc:
            raise APIError(400, str(exc), param="context", code="context_model_mismatch"
                           ) from None
        return context

    def start(prompts: list[np.ndarray], cfg: SamplingConfig, context: Context | None) -> Job:
        job = Job(engine, prompts, cfg, context)
        if context is not None:
            metrics.context_hits.inc()
        return job

    # routes ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not engine.alive:
            raise APIError(503, "the engine is not running", "server_error")
        return {"status": "ok", "model": name, "rows_busy": engine.rows_busy,
                "rows": engine.max_batch, "queue_length": engine.queue_length}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name)]}

    @app.get("/v1/models/{model}")
    async def model(model: str):
        check_model(model)
        return model_card(name)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        """Text after a prompt (text or token ids; a list of them: one choice each), or
        after a stored context and the prompt (`"context": id`; the prompt may be "")."""
        check_model(body.model)
        body.check_supported()
        cfg = sampling(body, body.max_tokens, 16)
        prompts = [await encode(p) if isinstance(p, str) else np.asarray(p, dtype=np.int64)
                   for p in prompt_list(body.prompt)]
        check_length(prompts, "prompt")
        job = start(prompts, cfg, await stored_context(body.context))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": name,
                    "choices": choices, **extra}

        def choice(index: int, text: str, finish: str | None) -> dict:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

        if body.stream:
            async def stream():
                completion = 0
                async for index, event in job.events():
                    if event.text:
                        yield chunk([choice(index, event.text, None)])
                    if event.finish_reason:
                        completion += event.completion_tokens
                        yield chunk([choice(index, "", FINISH[event.finish_reason])])
                if body.stream_options and body.stream_options.include_usage:
                    yield chunk([], usage=usage(job, completion))
            return EventStream(job, stream())
        texts, finals = await collect(job, request, len(prompts))
        if texts is None:
            return Response(status_code=499)
        choices = [choice(i, t, FINISH[e.finish_reason]) for i, (t, e) in
                   enumerate(zip(texts, finals))]
        return chunk(choices, usage=usage(job, sum(e.completion_tokens for e in finals)))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """The assistant's reply to the messages, rendered with the model's chat template
        (its tokenizer_config.json's) or, without one, the plain template
        "{role}: {content}" a line each, then "assistant:"; with `"context": id`, the
        rendered messages follow the stored context's document."""
        check_model(body.model)
        body.check_supported()
        cfg = sampling(body, body.max_completion_tokens or body.max_tokens,
                       min(settings.chat_max_tokens, settings.max_new_tokens))
        try:
            text = chat_template.render([m.as_dict() for m in body.messages])
        except InfiniTrtError as exc:
            raise APIError(400, str(exc), param="messages") from None
        prompts = [await encode(text)]
        check_length(prompts, "messages")
        job = start(prompts, cfg, await stored_context(body.context))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def reply(choices: list[dict], kind: str = "chat.completion.chunk", **extra) -> dict:
            return {"id": rid, "object": kind, "created": created, "model": name,
                    "choices": choices, **extra}

        def delta(content: str | None, finish: str | None = None, role: bool = False) -> dict:
            d = {"role": "assistant"} if role else {}
            if content is not None:
                d["content"] = content
            return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}

        if body.stream:
            async def stream():
                yield reply([delta("", role=True)])
                async for _, event in job.events():
                    if event.text:
                        yield reply([delta(event.text)])
                    if event.finish_reason:
                        yield reply([delta(None, FINISH[event.finish_reason])])
                        if body.stream_options and body.stream_options.include_usage:
                            yield reply([], usage=usage(job, event.completion_tokens))
            return EventStream(job, stream())
        texts, finals = await collect(job, request, 1)
        if texts is None:
            return Response(status_code=499)
        message = {"role": "assistant", "content": texts[0]}
        return reply([{"index": 0, "message": message, "logprobs": None,
                       "finish_reason": FINISH[finals[0].finish_reason]}], "chat.completion",
                     usage=usage(job, finals[0].completion_tokens))

    @app.post("/v1/contexts")
    async def create_context(body: ContextRequest, request: Request):
        """Read a document (text or token ids) once and keep it: -> its id, tokens, size in
        bytes and creation time. Completions and chat continue it with `"context": id`."""
        check_model(body.model)
        prompts = [await encode(p) if isinstance(p, str) else np.asarray(p, dtype=np.int64)
                   for p in prompt_list(body.prompt)]
        if len(prompts) != 1:
            raise APIError(400, "a context is made from one prompt", param="prompt",
                           code="invalid_value")
        check_length(prompts, "prompt")
        job = Job(engine, prompts, SamplingConfig(max_new_tokens=1), read_only=True)
        texts, finals = await collect(job, request, 1)
        if texts is None:
            return Response(status_code=499)
        ctx_id = store.new_id()
        try:
            await run_in_threadpool(store.put, ctx_id, finals[0].context)
            info = await run_in_threadpool(store.info, ctx_id)
        except ContextStoreError as exc:
            raise APIError(507, str(exc), "server_error", code="context_store_error") from None
        return context_card(ctx_id, info)

    @app.get("/v1/contexts/{ctx_id}")
    async def context_info(ctx_id: str):
        """A stored context's tokens, size in bytes and creation time."""
        try:
            return context_card(ctx_id, await run_in_threadpool(store.info, ctx_id))
        except UnknownContext as exc:
            raise not_found(exc) from None
        except ContextStoreError as exc:
            raise store_down(exc) from None

    @app.delete("/v1/contexts/{ctx_id}")
    async def delete_context(ctx_id: str):
        try:
            deleted = await run_in_threadpool(store.delete, ctx_id)
        except ContextStoreError as exc:
            raise store_down(exc) from None
        if not deleted:
            raise not_found(UnknownContext(f"there is no context {ctx_id!r}"))
        return {"id": ctx_id, "object": "context", "deleted": True}

    return app


def context_card(ctx_id: str, info: dict) -> dict:
    return {"id": ctx_id, "object": "context", "tokens": info["tokens"], "bytes": info["bytes"],
            "created": info["created"]}


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "infini-trt"}


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's validation error -> one OpenAI-style 400 naming the first bad field."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({detail})",
                        code="json_invalid")
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {'.'.join(loc)}",
                        param=".".join(loc), code="unknown_parameter")
    where = ".".join(loc)
    return APIError(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")),
                    param=where or None, code="invalid_value")


# the server --------------------------------------------------------------------------------
class Server(uvicorn.Server):
    """uvicorn, which on SIGTERM/SIGINT first stops the engine (in-flight streams end at once,
    finish_reason "length", then `[DONE]`), lets their responses finish, and returns: the
    process exits 0 (uvicorn would raise the signal again after its graceful shutdown)."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, sockets=None) -> None:
        self.engine.stop()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def make_server(app: FastAPI, engine: Engine, metrics: ServeMetrics,
                log_level: str = "info") -> Server:
    config = uvicorn.Config(metrics.count_requests(app), log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=10)
    return Server(config, engine)
