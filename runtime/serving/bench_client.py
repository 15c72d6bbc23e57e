"""The client side of `infini-trt bench-serve`: streamed completions timed chunk by chunk
(asyncio + httpx, many at once), and the server's own histograms read from GET /metrics.

What a stream tells: each SSE chunk carrying text is the text of one or more new tokens (the
server sends text once it is final); a model without a tokenizer sends no text at all, only
the last chunk (finish_reason) and the usage, so that for it only the time to the first chunk
of a max_tokens=1 request, and the server's histograms, say when a token came.
"""
from __future__ import annotations

import asyncio
import json
import math
import re
import time
from dataclasses import dataclass, field

from .bench_server import ServerError

TIMEOUT_S = 3600.0            # a 64K-token prompt on a 58M model reads for minutes


@dataclass
class Timing:
    """One streamed completion, times from time.perf_counter()."""

    sent: float
    first_chunk: float | None = None          # the first SSE data chunk, whatever it holds
    token_times: list[float] = field(default_factory=list)   # chunks carrying text
    end: float = 0.0
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)

    @property
    def ttft(self) -> float | None:
        """Sent -> the first chunk carrying a token's text (None: the stream had none)."""
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def first_chunk_s(self) -> float:
        return self.first_chunk - self.sent

    @property
    def gaps(self) -> list[float]:
        """Between successive chunks carrying text."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def completion_tokens(self) -> int:
        return int(self.usage.get("completion_tokens", 0))

    @property
    def cached_tokens(self) -> int | None:
        details = self.usage.get("prompt_tokens_details") or {}
        return details.get("cached_tokens")


def completion_body(prompt: list[int], max_tokens: int, context: str | None = None) -> bytes:
    """A greedy streamed completion of token ids that runs to max_tokens (ignore_eos), with
    the usage in its last chunk; JSON-encoded here so that encoding is not timed."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if context is not None:
        body["context"] = context
    return json.dumps(body).encode()


async def stream_completion(http, body: bytes) -> Timing:
    """POST /v1/completions with `body` (completion_body) -> its Timing; ServerError for an
    error status or an error in the stream."""
    timing = Timing(sent=time.perf_counter())
    async with http.stream("POST", "/v1/completions", content=body,
                           headers={"Content-Type": "application/json"}) as response:
        if response.status_code != 200:
            await response.aread()
            raise ServerError(f"POST /v1/completions: {response.status_code} "
                              f"{_error_message(response.text)}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            now, data = time.perf_counter(), line[len("data: "):]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise ServerError(f"a stream ended with an error: "
                                  f"{event['error'].get('message')}")
            if timing.first_chunk is None:
                timing.first_chunk = now
            for choice in event.get("choices") or ():
                if choice.get("text"):
                    timing.token_times.append(now)
                if choice.get("finish_reason"):
                    timing.finish_reason = choice["finish_reason"]
            if event.get("usage"):
                timing.usage = event["usage"]
    timing.end = time.perf_counter()
    if timing.first_chunk is None:
        raise ServerError("a stream ended without a chunk")
    return timing


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]


async def _run_streams(url: str, bodies: list[list[bytes]]) -> tuple[list[list[Timing]], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 2,
                          max_keepalive_connections=len(bodies) + 2)
    timeout = httpx.Timeout(TIMEOUT_S, connect=30.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        async def one_stream(requests: list[bytes]) -> list[Timing]:
            return [await stream_completion(http, body) for body in requests]

        tasks = [asyncio.ensure_future(one_stream(requests)) for requests in bodies]
        start = time.perf_counter()
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return results, time.perf_counter() - start


def run_streams(url: str, bodies: list[list[bytes]]) -> tuple[list[list[Timing]], float]:
    """len(bodies) streams at once, each sending its requests one after the other ->
    (each stream's Timings, the wall time from the first request sent to the last ended)."""
    return asyncio.run(_run_streams(url, bodies))


def post_json(url: str, path: str, body: dict) -> dict:
    """A plain POST (e.g. /v1/contexts) -> its JSON; ServerError unless 200."""
    import httpx

    response = httpx.post(f"{url}{path}", json=body, timeout=httpx.Timeout(TIMEOUT_S,
                                                                           connect=30.0))
    if response.status_code != 200:
        raise ServerError(f"POST {path}: {response.status_code} "
                          f"{_error_message(response.text)}")
    return response.json()


# the server's histograms ------------------------------------------------------------------------
TTFT_METRIC = "infini_trt_time_to_first_token_seconds"
ITL_METRIC = "infini_trt_inter_token_latency_seconds"
_BUCKET = re.compile(r'^(\w+)_bucket\{le="([^"]+)"\} (\S+)$', re.M)


def scrape_histograms(url: str) -> dict[str, list[tuple[float, float]]]:
    """GET /metrics -> {histogram name: [(upper bound, cumulative count)]}."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    found: dict[str, list[tuple[float, float]]] = {}
    for name, le, count in _BUCKET.findall(text):
        found.setdefault(name, []).append((float(le), float(count)))
    return found


def histogram_delta(after: list[tuple[float, float]], before: list[tuple[float, float]] | None
                    ) -> list[tuple[float, float]]:
    """The observations between two scrapes of one histogram."""
    if not before:
        return after
    return [(le, a - b) for (le, a), (_, b) in zip(after, before)]


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket the rank falls in (0 is the
    first bucket's lower bound; in the +Inf bucket, the largest finite bound). None: empty."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower
