"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own, so that two
servers in one process (the tests) count apart."""
from __future__ import annotations

from .engine import EngineMetrics

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                120.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/contexts", "/health",
             "/metrics")


class ServeMetrics(EngineMetrics):
    """Counters, histograms and gauges named infini_trt_*; the engine reports into them."""

    def __init__(self, max_batch: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("infini_trt_requests", "HTTP requests, by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.finished_total = Counter(
            "infini_trt_generations_finished", "Generations ended, by reason (eos, stop, "
            "length, shutdown, cancelled: the client went away, error)", ["reason"],
            registry=registry)
        self.prompt_tokens = Counter("infini_trt_prompt_tokens",
                                     "Prompt tokens of the generations begun", registry=registry)
        self.generation_tokens = Counter("infini_trt_generation_tokens", "Tokens generated",
                                         registry=registry)
        self.ttft = Histogram("infini_trt_time_to_first_token_seconds",
                              "From a request's arrival to its first token (queue included)",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("infini_trt_inter_token_latency_seconds",
                             "Between two tokens of one generation", buckets=ITL_BUCKETS,
                             registry=registry)
        self.busy = Gauge("infini_trt_batch_rows_busy", "Rows of the batch holding a request",
                          registry=registry)
        self.rows = Gauge("infini_trt_batch_rows", "Rows of the batch (--max-batch)",
                          registry=registry)
        self.computed = Gauge("infini_trt_batch_rows_computed",
                              "Rows the graphs compute at each step (a power of two that "
                              "follows the load, up to --max-batch)", registry=registry)
        self.queue = Gauge("infini_trt_queue_length", "Requests waiting for a row",
                           registry=registry)
        self.context_hits = Counter("infini_trt_context_hits",
                                    "Requests that continued a stored context",
                                    registry=registry)
        self.prefix_hits = Counter("infini_trt_prefix_cache_hits",
                                   "Prompts that began from a state in the prefix cache",
                                   registry=registry)
        self.prefix_tokens = Counter("infini_trt_prefix_cache_tokens",
                                     "Prompt tokens not read again: their state was in the "
                                     "prefix cache", registry=registry)
        self.contexts_stored = Gauge("infini_trt_contexts_stored",
                                     "Contexts in the context store", registry=registry)
        self.context_bytes = Gauge("infini_trt_context_store_bytes",
                                   "Bytes of the contexts in the context store",
                                   registry=registry)
        self.rows.set(max_batch)
        self.computed.set(1)

    # EngineMetrics -----------------------------------------------------------------------
    def queue_length(self, n: int) -> None:
        self.queue.set(n)

    def rows_busy(self, n: int) -> None:
        self.busy.set(n)

    def batch_size(self, n: int) -> None:
        self.computed.set(n)

    def admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def prefix_hit(self, tokens: int) -> None:
        self.prefix_hits.inc()
        self.prefix_tokens.inc(tokens)

    def token(self, seconds: float, first: bool) -> None:
        self.generation_tokens.inc()
        (self.ttft if first else self.itl).observe(seconds)

    def finished(self, reason: str) -> None:
        self.finished_total.labels(reason=reason).inc()

    def watch_store(self, store) -> None:
        """The store's gauges are read from it at each scrape (other processes may share
        it)."""
        def usage(i: int) -> float:
            try:
                return store.usage()[i]
            except Exception:                  # a store gone away (Redis): not a number now
                return float("nan")

        self.contexts_stored.set_function(lambda: usage(0))
        self.context_bytes.set_function(lambda: usage(1))

    # HTTP --------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """-> (the text exposition, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def count_requests(self, app):
        """ASGI middleware: count each HTTP request by endpoint and status (a pure ASGI
        wrapper: it leaves streamed responses alone)."""
        counter = self.requests

        async def counted(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            status = [500]

            async def send_status(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_status)
            finally:
                path = scope.get("path", "")
                endpoint = (path if path in ENDPOINTS else "/v1/contexts/{id}"
                            if path.startswith("/v1/contexts/") else "other")
                counter.labels(endpoint=endpoint, status=str(status[0])).inc()

        return counted
