"""Continuous batching: one loop, on its own thread, owns the runner and a Session whose rows
are slots for requests (a power of two of them, up to max_batch, that follows the load: the
graphs compute every row at each step). No HTTP here (app.py puts this behind the OpenAI API).

    engine = Engine(runner, tokenizer, max_batch=8, max_queue=64).start()
    request = engine.submit(prompt_ids, SamplingConfig(max_new_tokens=16), on_event)
    ...                                    # on_event(Event) is called from the loop's thread
    request.cancel()                       # the client went away: its row is freed at once
    engine.stop(); engine.join()

Each turn of the loop: free the rows of cancelled requests; give free rows to waiting requests
(`session.reset(row)`, `session.load(row, context)`, or the state of the longest prefix of the
prompt in the prefix cache, prefix_cache.py); one decode step, one token for every row that
has one chosen; then one piece of prompt for every row still reading its prompt, up to the
end of its current segment (at most `segment_len` tokens), so that a long prompt is read a
segment per turn between the decode steps of the others. Full segments go to the reader
(reader.py: a second runner, at batch 1, through the prompt-reading graph, as `run` reads
them, on a thread of its own, so the batch decodes meanwhile), the rest through the K/V
cache graph, `extend`, with the whole batch. At the boundaries the prefix
cache keeps, the row's state is offered to it. A row whose prompt is read, or that decoded a
token, chooses its next token from its own logits with its own seeded generator
(`sampling.next_tokens` on that row alone; greedy rows share one argmax, the same tokens),
and its text grows through its own `TextStream` (the end token adds no text): what a request
gets does not depend on what else is in the batch, and equals what `generation.generate`
gives it alone (same stops, same text). Finished, stopped and cancelled requests free their
row at once.
"""
from __future__ import annotations

import collections
import functools
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np

from infini_trt.export.errors import InfiniTrtError, InputError

from ..runners.base import Runner
from ..sampling import SamplingConfig, next_tokens
from ..session import Session
from ..text_stream import TextStream
from .reader import Reader, ReadJob

IDLE_WAIT_S = 0.1           # how long an idle loop sleeps before looking at its flags again


def _failure(exc: Exception) -> str:
    """What the requests a runner failure ends are told (a bug's traceback goes to stderr)."""
    if isinstance(exc, InfiniTrtError):
        return str(exc)
    traceback.print_exception(exc, file=sys.stderr)
    return f"internal error: {type(exc).__name__}: {exc}"


class QueueFull(InfiniTrtError):
    """Every row is busy and the queue of waiting requests is full."""


class EngineStopped(InfiniTrtError):
    """The engine is stopping (or has stopped) and takes no more requests."""


@dataclass(frozen=True)
class Event:
    """What the loop tells a request: a piece of final text, then one last event with
    `finish_reason` ("eos", "stop", "length", "shutdown": cut short by `stop()`, or
    "context": a `read_only` request's prompt is read, the row is in `context`) and the
    token counts, or one with `error` (and the HTTP status it deserves) instead."""

    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    status: int = 500
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0           # prompt tokens not read: their state was in the prefix cache
    context: object | None = None    # with finish_reason "context": the row as a Context

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class EngineMetrics:
    """What the loop reports; no-ops here (serving/metrics.py records them for Prometheus)."""

    def queue_length(self, n: int) -> None: ...
    def rows_busy(self, n: int) -> None: ...
    def batch_size(self, n: int) -> None: ...
    def admitted(self, prompt_tokens: int) -> None: ...
    def prefix_hit(self, tokens: int) -> None: ...
    def token(self, seconds: float, first: bool) -> None: ...
    def finished(self, reason: str) -> None: ...


class Request:
    """One sequence to generate: its prompt, sampling settings and where it is. Made by
    `Engine.submit`; the caller keeps it only to `cancel()` it."""

    def __init__(self, engine: "Engine", prompt: np.ndarray, cfg: SamplingConfig,
                 on_event: Callable[[Event], None], context=None, text_context=(),
                 read_only: bool = False):
        self.engine, self.prompt, self.cfg, self.on_event = engine, prompt, cfg, on_event
        self.context, self.text_context = context, list(text_context)
        self.read_only = read_only            # read the prompt, end with the row as a Context
        self.submitted = time.perf_counter()
        self.cancelled = False
        self.done = False
        self.row: int | None = None
        self.fed = 0                          # prompt tokens fed so far
        self.pending: int | None = None       # the token chosen last, to be fed next
        self.token_ids: list[int] = []
        self.last_token_at = 0.0
        self.stream: TextStream | None = None
        self.generator: np.random.Generator | None = None
        self.seen: np.ndarray | None = None      # (1, V) bool, for a repetition penalty
        self.prefix_keys: list[str] = []      # the prefix cache's keys of its prompt
        self.prefix_tokens = 0                # prompt tokens its row started with from there

    def cancel(self) -> None:
        """Stop generating (the caller went away); no more events. Safe from any thread,
        any number of times, also after the request ended."""
        self.engine._cancel(self)


class Engine:
    def __init__(self, runner: Runner, tokenizer=None, max_batch: int = 8,
                 max_queue: int = 64, metrics: EngineMetrics | None = None,
                 reader: Runner | None = None, prefixes=None):
        if max_batch < 1 or max_queue < 0:
            raise InputError("max_batch must be at least 1 and max_queue at least 0")
        self.runner, self.tokenizer = runner, tokenizer
        self.config = runner.config
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics or EngineMetrics()
        # the session's batch follows the load (`_fit_batch`): the graphs compute every row
        # of it at each step, busy or not, so one stream on a 64-row batch would pay for 64
        self.session = Session(runner, batch=1)
        self._cond = threading.Condition()
        # full segments of prompts are read on `reader` (another runner of the same model) at
        # batch 1 through the prompt-reading graph, as `run` reads them, on a thread of its
        # own (reader.py), instead of through the K/V-cache graph with the whole batch (7x the
        # work at batch 8, and the batch would wait for it)
        self.reader = None if reader is None else Reader(reader, self._cond)
        self.reading: Request | None = None      # whose row is in the reader now
        self.prefixes = prefixes                 # a prefix_cache.PrefixCache, or None
        self.slots: list[Request | None] = [None]     # one per row of the session
        self.waiting: collections.deque[Request] = collections.deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0                         # turns of the loop that ran the model

    # the caller's side (any thread) -----------------------------------------------------------
    def start(self) -> "Engine":
        if self.reader is not None:
            self.reader.start()
        self._thread = threading.Thread(target=self._run, name="infini-trt-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, prompt, cfg: SamplingConfig, on_event: Callable[[Event], None],
               context=None, text_context=(), read_only: bool = False) -> Request:
        """Queue a request: `prompt` token ids (empty only with a `context`, a
        runtime/context.py Context to continue from; `text_context`: its `text_tail`).
        Raises InputError (bad ids), QueueFull or EngineStopped; on_event(Event) is then
        called from the loop's thread with the text as it becomes final, and a last event.
        `read_only`: generate nothing; the last event (finish_reason "context") carries the
        row after the prompt as a Context (what POST /v1/contexts keeps)."""
        ids = np.asarray(prompt, dtype=np.int64).reshape(-1)
        vocab = self.config.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            bad = int(ids.min() if ids.min() < 0 else ids.max())
            raise InputError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        if ids.size == 0 and (read_only or context is None or context.last_logits is None):
            raise InputError("the prompt is empty")
        if cfg.stop and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer")
        request = Request(self, ids, cfg, on_event, context, text_context, read_only)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self.waiting) + 1 - self._free_rows() > self.max_queue:
                raise QueueFull(f"every row is busy and {len(self.waiting)} requests are "
                                f"waiting (the most the queue takes); try again shortly")
            self.waiting.append(request)
            self.metrics.queue_length(len(self.waiting))
            self._cond.notify_all()      # the reader waits on it too
        return request

    def stop(self) -> None:
        """Stop the loop: requests in rows end at once with finish_reason "shutdown" (their
        text so far), waiting ones with an error; nothing is taken after this."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()      # the reader waits on it too

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def rows_busy(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    def _cancel(self, request: Request) -> None:
        with self._cond:
            if request.done or request.cancelled:
                return
            request.cancelled = True
            if request.row is None and request in self.waiting:
                self.waiting.remove(request)
                request.done = True
                self.metrics.queue_length(len(self.waiting))
                self.metrics.finished("cancelled")
            self._cond.notify_all()      # the reader waits on it too

    def _free_rows(self) -> int:
        return self.max_batch - self.rows_busy

    # the loop (its own thread) ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._turn():
                pass
        except BaseException as exc:                     # pragma: no cover - a bug
            traceback.print_exc(file=sys.stderr)
            self._fail_rows(f"the engine stopped: {exc}")
        finally:
            if self.reader is not None:
                self.reader.stop()
            with self._cond:
                self._stopping = True
                waiting, self.waiting = list(self.waiting), collections.deque()
            for row, request in enumerate(self.slots):
                if request is not None:
                    self._finish(row, "shutdown")
            for request in waiting:
                self._end(request, Event(error="the server is shutting down", status=503))
            self.metrics.queue_length(0)

    def _turn(self) -> bool:
        """One turn of the loop -> False once it is to stop."""
        with self._cond:
            if self._stopping:
                return False
            for row, request in enumerate(self.slots):
                if request is not None and request.cancelled:
                    self._free(row, "cancelled")
            wanted = min(self.max_batch, self.rows_busy + len(self.waiting))
        try:
            self._fit_batch(wanted)              # outside the lock: it moves rows
        except Exception as exc:                 # a runner failure: every row is suspect
            self._fail_rows(_failure(exc))
        with self._cond:
            starting = []
            while self.waiting and None in self.slots:
                row = self.slots.index(None)
                request = self.waiting.popleft()
                request.row, self.slots[row] = row, request
                starting.append(request)
            self.metrics.queue_length(len(self.waiting))
            self.metrics.rows_busy(self.rows_busy)
        worked = bool(starting)
        try:
            for request in starting:
                self._start(request)
            worked = self._decode_step() | worked
            worked = self._prefill_step() | worked
        except Exception as exc:                 # a runner failure: every row is suspect
            self._fail_rows(_failure(exc))
        if worked:
            self.steps += 1
        else:                                    # idle, or every busy row is in the reader
            with self._cond:
                self._cond.wait_for(self._news, IDLE_WAIT_S)
        return True

    def _fit_batch(self, wanted: int) -> None:
        """Resize the session's batch for `wanted` rows: up to the next power of two when they
        do not fit, down when a quarter of it would do (so that a load near a size does not
        resize it back and forth). The busy rows move (as Contexts, exactly) to the front."""
        size = len(self.slots)
        fit = 1 << max(0, wanted - 1).bit_length()               # 1, 2, 4, 8, ...
        fit = min(self.max_batch, fit)
        if not (fit > size or (fit < size and wanted <= size // 4)):
            return
        busy = [(q, self.session.save(r)) for r, q in enumerate(self.slots) if q is not None]
        self.session = Session(self.runner, batch=fit)
        slots: list[Request | None] = [None] * fit
        for row, (q, context) in enumerate(busy):
            self.session.load(row, context)
            q.row, slots[row] = row, q
        with self._cond:
            self.slots = slots
        self.metrics.batch_size(fit)

    def _news(self) -> bool:
        """Something for the loop to do (read under the condition's lock)."""
        return (self._stopping or (bool(self.waiting) and self.rows_busy < self.max_batch)
                or any(q is not None and q.cancelled for q in self.slots)
                or (self.reader is not None and self.reader.finished))

    def _start(self, request: Request) -> None:
        """Give `request` its row: empty, or its context, or the state of the longest prefix
        of its prompt in the prefix cache; a prompt read already (a context and no prompt, or
        all of it in the cache) chooses its first token at once (from the last logits)."""
        row, cfg = request.row, request.cfg
        try:
            if request.context is None:
                self.session.reset(row)
                self._start_from_prefix(request)
            else:
                self.session.load(row, request.context)
        except InfiniTrtError as exc:
            self._free(row, "error", Event(error=str(exc), status=400))
            return
        vocab = self.config.vocab_size
        if cfg.seed is not None or not cfg.greedy:     # its own (fresh entropy without a seed)
            request.generator = np.random.default_rng(cfg.seed)
        if cfg.repetition_penalty != 1.0:
            request.seen = np.zeros((1, vocab), dtype=bool)
            request.seen[0, request.prompt] = True
        if self.tokenizer is not None:
            request.stream = TextStream(self.tokenizer, cfg.stop, request.text_context)
        self.metrics.admitted(len(request.prompt))
        if request.fed == len(request.prompt):
            self._prompt_read([row])

    def _start_from_prefix(self, request: Request) -> None:
        """Start the row from the prefix cache's longest stored prefix of its prompt."""
        cache = self.prefixes
        if cache is None or len(request.prompt) < self.config.segment_len:
            return
        request.prefix_keys = cache.keys(request.prompt)
        hit = cache.lookup(request.prefix_keys)
        if hit is None:
            return
        tokens, context = hit
        if context.tokens != tokens or context.position != 0:
            return                                   # not what this cache writes: a miss
        try:
            self.session.load(request.row, context)
        except InfiniTrtError:                       # another model's (not with these keys)
            self.session.reset(request.row)
            return
        request.fed = request.prefix_tokens = tokens
        self.metrics.prefix_hit(tokens)

    def _keep_prefix(self, request: Request, fed: int, session: Session, row: int = 0) -> None:
        """After a piece of prompt (`fed` of its tokens read, in `session`'s `row`; also on
        the reader's thread): offer the row's state to the prefix cache when that is at a
        boundary that the cache keeps."""
        cache, n = self.prefixes, self.config.segment_len
        if (cache is None or not request.prefix_keys or fed % n
                or fed not in cache.boundaries(len(request.prompt))):
            return
        cache.offer(request.prefix_keys[fed // n - 1], session.save(row))

    def _decode_step(self) -> bool:
        """One token into every row that has one chosen, then the next token of each ->
        whether there was any."""
        rows = [r for r, q in enumerate(self.slots) if q is not None and q.pending is not None]
        if not rows:
            return False
        tokens = np.zeros(len(self.slots), dtype=np.int64)
        active = np.zeros(len(self.slots), dtype=bool)
        for r in rows:
            tokens[r], active[r] = self.slots[r].pending, True
            self.slots[r].pending = None
        self._choose(rows, self.session.decode(tokens, active))
        return True

    def _exchange_with_reader(self) -> tuple[bool, int | None]:
        """Take back the reader's job if it is done (its row loaded back into the batch), and
        give it the next one if it is free: the first row at a segment start with a full
        segment left (it reads all its full segments) -> (whether anything changed hands, the
        row whose prompt is then read to the end, or None)."""
        n, job, read, changed = self.config.segment_len, self.reader.take(), None, False
        if job is not None:
            q, changed, self.reading = job.request, True, None
            if not q.cancelled and q.row is not None and self.slots[q.row] is q:
                if job.error is not None:
                    self._free(q.row, "error", Event(error=_failure(job.error)))
                else:
                    self.session.load(q.row, job.result)
                    q.fed = job.fed
                    read = q.row if q.fed == len(q.prompt) else None
        if not self.reader.busy:
            q = next((q for r, q in enumerate(self.slots) if q is not None
                      and self.session.position[r] == 0 and len(q.prompt) - q.fed >= n), None)
            if q is not None:
                stop = q.fed + (len(q.prompt) - q.fed) // n * n
                self.reader.submit(ReadJob(q, self.session.save(q.row), q.fed, stop,
                                           functools.partial(self._keep_prefix, q)))
                self.reading, changed = q, True
        return changed, read

    def _prefill_step(self) -> bool:
        """The next piece of every prompt still being read, up to its row's segment end (full
        segments go to the reader where there is one); a row whose prompt is then read
        chooses its first token -> whether there was anything to do."""
        n = self.config.segment_len
        changed, read_there = (False, None) if self.reader is None else \
            self._exchange_with_reader()
        done = [] if read_there is None else [read_there]
        pieces: list[np.ndarray | None] = [None] * len(self.slots)
        for r, q in enumerate(self.slots):
            if q is not None and q.fed < len(q.prompt) and q is not self.reading:
                room = n - int(self.session.position[r])
                if self.reader is not None and room == n and len(q.prompt) - q.fed >= n:
                    continue                           # waits for the reader
                pieces[r] = q.prompt[q.fed:q.fed + room]
        rows = [r for r, p in enumerate(pieces) if p is not None]
        if rows:
            self.session.feed(pieces, progress=False)
        for r in rows:
            self.slots[r].fed += len(pieces[r])
            self._keep_prefix(self.slots[r], self.slots[r].fed, self.session, r)
        self._prompt_read([r for r in rows + done
                           if self.slots[r].fed == len(self.slots[r].prompt)])
        return changed or bool(rows + done)

    def _prompt_read(self, rows: list[int]) -> None:
        """These rows have read their whole prompt: a read_only request ends with its row as
        a Context, the others choose their first token."""
        for r in rows:
            request = self.slots[r]
            if request.read_only:
                self._free(r, "context", Event(
                    finish_reason="context", prompt_tokens=len(request.prompt),
                    cached_tokens=request.prefix_tokens, context=self.session.save(r)))
        self._choose([r for r in rows if self.slots[r] is not None], self.session.last_logits())

    def _choose(self, rows: list[int], logits: np.ndarray) -> None:
        """The next token of the request in each of `rows` from its logits (logits[row], of
        (B, V)): emit its text, then finish the request or keep the token to feed. Greedy
        rows share one argmax (the same tokens as one each)."""
        if not rows:
            return
        mine = logits[rows]
        finite = np.isfinite(mine).all(axis=-1).tolist()
        greedy = mine.argmax(axis=-1).tolist()
        for i, row in enumerate(rows):
            request = self.slots[row]
            if not finite[i]:
                self._free(row, "error", Event(
                    error=f"{self.runner.description} produced NaN or infinite logits; the "
                          f"model or its export is broken (check it with `infini-trt "
                          f"validate`)"))
                continue
            cfg = request.cfg
            if cfg.greedy and request.seen is None:
                token = greedy[i]
            else:
                token = int(next_tokens(mine[i:i + 1], cfg, request.seen, request.generator)[0])
            self._take(row, token)

    def _take(self, row: int, token: int) -> None:
        request = self.slots[row]
        cfg = request.cfg
        now = time.perf_counter()
        first = not request.token_ids
        self.metrics.token(now - (request.submitted if first else request.last_token_at), first)
        request.last_token_at = now
        request.token_ids.append(token)
        if request.seen is not None:
            request.seen[0, token] = True
        stream = request.stream
        eos = cfg.eos_id is not None and token == cfg.eos_id
        if stream is not None and not eos:           # the end token is no text (as generate)
            self._emit(request, Event(text=stream.push(token)))
        reason = ("eos" if eos else
                  "stop" if stream is not None and stream.stopped else
                  "length" if len(request.token_ids) >= cfg.max_new_tokens else None)
        if reason:
            self._finish(row, reason)
        else:
            request.pending = token

    def _finish(self, row: int, reason: str) -> None:
        request = self.slots[row]
        stream = request.stream
        if stream is not None:
            self._emit(request, Event(text=stream.finish()))
        self._free(row, reason, Event(finish_reason=reason, prompt_tokens=len(request.prompt),
                                      completion_tokens=len(request.token_ids),
                                      cached_tokens=request.prefix_tokens))

    def _free(self, row: int, outcome: str, event: Event | None = None) -> None:
        """Row `row` is free again (its state is replaced when it is next given out)."""
        request = self.slots[row]
        self.slots[row] = None
        if event is not None:
            self._end(request, event)
        request.done = True
        self.metrics.finished(outcome)
        self.metrics.rows_busy(self.rows_busy)

    def _fail_rows(self, message: str) -> None:
        self.reading = None
        for row, request in enumerate(self.slots):
            if request is not None:
                self._free(row, "error", Event(error=message))
        with self._cond:
            self.slots = [None] * self.session.batch   # also after a resize that failed
        try:
            self.session.reset()
        except Exception:                        # pragma: no cover - the runner is gone
            traceback.print_exc(file=sys.stderr)

    def _end(self, request: Request, event: Event) -> None:
        self._emit(request, event)
        request.done = True

    def _emit(self, request: Request, event: Event) -> None:
        if request.cancelled or (not event.text and not event.final):
            return
        try:
            request.on_event(event)
        except Exception:                        # the listener is gone (its loop closed)
            request.cancelled = True
