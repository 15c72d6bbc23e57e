"""The continuous-batching loop without HTTP: long prompts interleave with the others'
decoding, a NaN fails only its own request, cancelling frees the row, the queue is bounded,
and a request can start from a Context."""
import contextlib
import threading
import time

import numpy as np
import pytest

from live_server import FILLER, passkey_prompt
from infini_trt.export.errors import InputError
from infini_trt.runtime import SamplingConfig, Session
from infini_trt.runtime.serving.engine import Engine, EngineStopped, QueueFull


@pytest.fixture(scope="module")
def runner(server, shared_cache):
    from infini_trt.runtime import bundled_model, load

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INFINI_TRT_CACHE", str(shared_cache))
        runner = load(bundled_model(), "onnxruntime", log=lambda s: None)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def reader(runner):
    """A second runner of the same export: the engine's reader of prompts' full segments."""
    from infini_trt.runtime import open_runner

    reader = open_runner(runner.manifest.path, "onnxruntime")
    yield reader
    reader.close()


@contextlib.contextmanager
def running(engine):
    """The engine's loop running (started here unless it is), stopped and joined after."""
    if engine._thread is None:
        engine.start()
    try:
        yield engine
    finally:
        engine.stop()
        engine.join()


class Listener:
    """Records every event of several requests, in the order the loop sent them."""

    def __init__(self):
        self.log, self.done = [], threading.Condition()

    def __call__(self, name):
        def on_event(event):
            with self.done:
                self.log.append((name, event))
                self.done.notify_all()
        return on_event

    def text(self, name):
        return "".join(e.text for n, e in self.log if n == name)

    def final(self, name):
        return next((e for n, e in self.log if n == name and e.final), None)

    def wait(self, *names, timeout=30):
        with self.done:
            assert self.done.wait_for(lambda: all(self.final(n) for n in names), timeout)


@pytest.mark.parametrize("with_reader", [False, True], ids=["batch-extend", "reader"])
def test_a_long_prompt_does_not_stall_the_others(runner, reader, reference, tokenizer,
                                                 with_reader):
    long_ids = tokenizer.encode(FILLER * 60)                     # 1,440 tokens: 23 segments
    short_ids = tokenizer.encode("The sky is")
    engine = Engine(runner, tokenizer, max_batch=2, reader=reader if with_reader else None)
    engine, listen = engine.start(), Listener()
    with running(engine):
        engine.submit(long_ids, SamplingConfig(max_new_tokens=6), listen("long"))
        engine.submit(short_ids, SamplingConfig(max_new_tokens=5), listen("short"))
        listen.wait("long", "short")
    order = [(n, e.final) for n, e in listen.log]
    first_long = next(i for i, (n, _) in enumerate(order) if n == "long")
    assert order.index(("short", True)) < first_long     # done before the long one's 1st token
    if not with_reader:                                  # one segment a turn, in the batch
        assert engine.steps >= len(long_ids) // 64
    assert listen.text("long") == reference(long_ids, 6).text
    assert listen.text("short") == reference(short_ids, 5).text
    assert listen.final("short").completion_tokens == 5 and engine.rows_busy == 0


def test_the_batch_decodes_while_the_reader_reads(runner, reference, tokenizer):
    """The reader runs on a thread of its own: a short request is answered in full while
    the reader is held inside a long prompt's first segment (let go only after that)."""
    from helpers import Wrapping
    from infini_trt.runtime import open_runner

    gate = threading.Event()

    class HeldReader(Wrapping):
        def _step(self, ids):                 # every full segment the reader reads
            assert gate.wait(60)
            return self.inner.step(ids)

    inner = open_runner(runner.manifest.path, "onnxruntime")
    held = HeldReader(inner)
    held.weights_sha256 = inner.weights_sha256          # the same model, to load its rows
    long_ids, short_ids = tokenizer.encode(FILLER * 8), tokenizer.encode("The sky is")
    assert len(long_ids) >= 2 * 64
    engine, listen = Engine(runner, tokenizer, max_batch=2, reader=held), Listener()
    with contextlib.closing(inner), running(engine):
        engine.submit(long_ids, SamplingConfig(max_new_tokens=4), listen("long"))
        engine.submit(short_ids, SamplingConfig(max_new_tokens=5), listen("short"))
        listen.wait("short")
        assert engine.reading is not None and listen.final("long") is None
        gate.set()
        listen.wait("long")
    assert listen.text("short") == reference(short_ids, 5).text
    assert listen.text("long") == reference(long_ids, 4).text


def test_nan_logits_fail_only_their_request(runner, reference, tokenizer, monkeypatch):
    engine, listen = Engine(runner, tokenizer, max_batch=4), Listener()
    victim_ids, other_ids = tokenizer.encode("The grass is"), tokenizer.encode("The sun is")
    decode = Session.decode

    def poisoned(session, tokens, active=None):   # the engine's session (it is resized)
        logits = decode(session, tokens, active).copy()
        for row, request in enumerate(engine.slots if session is engine.session else ()):
            if request is not None and list(request.prompt) == victim_ids:
                logits[row, 3] = float("nan")
        return logits

    monkeypatch.setattr(Session, "decode", poisoned)
    engine.start()
    with running(engine):
        engine.submit(victim_ids, SamplingConfig(max_new_tokens=8), listen("victim"))
        engine.submit(other_ids, SamplingConfig(max_new_tokens=8), listen("other"))
        listen.wait("victim", "other")
    victim = listen.final("victim")
    assert victim.error and "NaN" in victim.error and victim.status == 500
    assert listen.final("other").finish_reason == "length"
    assert listen.text("other") == reference(other_ids, 8).text
    assert engine.rows_busy == 0


def test_cancelling_frees_the_row_at_once(runner, tokenizer):
    engine, listen = Engine(runner, tokenizer, max_batch=2).start(), Listener()
    with running(engine):
        request = engine.submit(tokenizer.encode("The sky is"),
                                SamplingConfig(max_new_tokens=4000), listen("a"))
        with listen.done:
            assert listen.done.wait_for(lambda: len(listen.log) >= 3, 10)
        request.cancel()
        deadline = time.monotonic() + 5
        while engine.rows_busy:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        seen = len(listen.log)
        time.sleep(0.1)
        assert len(listen.log) == seen and listen.final("a") is None   # nothing after cancel
        request.cancel()                                               # twice: harmless
    assert len(request.token_ids) < 4000


def test_the_queue_is_bounded_and_stop_answers_everyone(runner, tokenizer):
    engine, listen = Engine(runner, tokenizer, max_batch=1, max_queue=1), Listener()
    ids, cfg = tokenizer.encode("The sky is"), SamplingConfig(max_new_tokens=2)
    engine.submit(ids, cfg, listen("a"))          # will take the free row
    engine.submit(ids, cfg, listen("b"))          # will wait
    with pytest.raises(QueueFull):
        engine.submit(ids, cfg, listen("c"))
    engine.stop()
    engine.start()                                # the loop stops at once: both are answered
    engine.join(10)
    assert {listen.final(n).status for n in "ab"} == {503}
    with pytest.raises(EngineStopped):
        engine.submit(ids, cfg, listen("d"))


def test_bad_prompts_are_refused_before_queueing(runner, tokenizer):
    engine = Engine(runner, tokenizer, max_batch=1)
    with pytest.raises(InputError, match="outside the vocabulary"):
        engine.submit([1, 54], SamplingConfig(), lambda e: None)
    with pytest.raises(InputError, match="empty"):
        engine.submit([], SamplingConfig(), lambda e: None)
    assert engine.queue_length == 0


def test_a_request_continues_a_context(runner, reference, tokenizer):
    """A Context (a prefilled document) loaded into a row: the question after it, and the
    text after it with no prompt at all, as generate() gives them from that context."""
    from infini_trt.runtime import generate, open_runner

    document = tokenizer.encode(passkey_prompt("86420", 3, 2).rsplit("What", 1)[0])
    question = tokenizer.encode("What is the pass key? The pass key is")
    alone = Session(runner)
    alone.feed([document])
    context = alone.save(0)

    def from_context(ids, n):
        session = Session(runner)
        session.load(0, context)
        return generate(session, [np.asarray(ids, np.int64)], SamplingConfig(max_new_tokens=n),
                        tokenizer).sequences[0].text

    expected = {"q": from_context(question, 7), "none": from_context([], 7)}
    own = open_runner(runner.manifest.path, "onnxruntime")      # the engine's own runner
    engine, listen = Engine(own, tokenizer, max_batch=3).start(), Listener()
    with contextlib.closing(own), running(engine):   # the engine stops first
        engine.submit(question, SamplingConfig(max_new_tokens=7), listen("q"), context=context)
        engine.submit([], SamplingConfig(max_new_tokens=7), listen("none"), context=context)
        engine.submit(question, SamplingConfig(max_new_tokens=7), listen("fresh"))
        listen.wait("q", "none", "fresh")
    assert {n: listen.text(n) for n in expected} == expected
    assert listen.text("fresh") == reference(question, 7).text
    assert np.isfinite(alone.last_logits()).all()


def test_a_read_only_request_ends_with_its_row_as_a_context(runner, reader, tokenizer):
    """read_only: the prompt is read beside other requests, nothing is generated, and the
    Context it ends with is the one the same document read alone gives, bit for bit (its
    full segments on the reader, as `run` reads them; its tail in the batch)."""
    from infini_trt.runtime import open_runner

    document = tokenizer.encode(passkey_prompt("31337", 3, 1).rsplit("What", 1)[0])
    assert len(document) > 64 and len(document) % 64
    alone = Session(runner)
    want = alone.feed([document])[0]
    own = open_runner(runner.manifest.path, "onnxruntime")
    engine = Engine(own, tokenizer, max_batch=2, reader=reader)
    engine, listen = engine.start(), Listener()
    with contextlib.closing(own), running(engine):   # the engine stops first
        engine.submit(tokenizer.encode("The sky is"), SamplingConfig(max_new_tokens=9),
                      listen("other"))
        engine.submit(document, SamplingConfig(max_new_tokens=4), listen("doc"),
                      read_only=True)
        listen.wait("doc", "other")
        with pytest.raises(InputError, match="empty"):
            engine.submit([], SamplingConfig(max_new_tokens=4), listen("x"), read_only=True)
    final = listen.final("doc")
    assert final.finish_reason == "context" and final.completion_tokens == 0
    assert listen.text("doc") == "" and final.prompt_tokens == len(document)
    context = final.context
    assert context.tokens == len(document) and context.position == len(document) % 64
    assert np.array_equal(context.last_logits, want)
    expected = alone.save(0)
    for name in ("memory", "norm", "k", "v"):
        assert np.array_equal(getattr(context.state, name), getattr(expected.state, name)), name


@pytest.mark.parametrize("with_reader", [False, True], ids=["batch-extend", "reader"])
def test_a_prompt_starts_from_the_longest_stored_prefix(runner, reader, reference, tokenizer,
                                                        tmp_path, with_reader):
    """With a prefix cache: a document and a question keep the state at the prompt's last two
    boundaries; the document and another question start from the one inside the document
    (cached_tokens), with the answer it has alone, and a read-only request from there ends
    with the Context that reading it alone gives, bit for bit; a prompt of whole segments
    whose end is a kept boundary starts there and chooses its first token at once."""
    from infini_trt.runtime import open_runner
    from infini_trt.runtime.serving.engine import EngineMetrics
    from infini_trt.runtime.serving.prefix_cache import PrefixCache
    from infini_trt.runtime.serving.store import DirectoryStore
    from infini_trt.runtime.session import model_fingerprint

    hits = []

    class Hits(EngineMetrics):
        def prefix_hit(self, tokens):
            hits.append(tokens)

    n = 64
    document = tokenizer.encode(passkey_prompt("52719", 4, 3).rsplit("What", 1)[0])
    first = document + tokenizer.encode("What is the pass key? The pass key is")
    second = document + tokenizer.encode("The pass key is")
    own = open_runner(runner.manifest.path, "onnxruntime")
    cache = PrefixCache(DirectoryStore(tmp_path / "prefixes"),
                        {"model": model_fingerprint(own), "runner": own.description}, n)
    expected = max(b for b in cache.boundaries(len(first)) if b <= len(document))
    assert expected >= 2 * n and len(first) % n
    whole = first[:expected]
    engine = Engine(own, tokenizer, max_batch=2, metrics=Hits(), prefixes=cache,
                    reader=reader if with_reader else None)
    engine, listen = engine.start(), Listener()
    cfg = SamplingConfig(max_new_tokens=7)
    with contextlib.closing(own), running(engine):   # the engine stops first
        engine.submit(first, cfg, listen("first"))
        listen.wait("first")
        cache.flush()
        assert cache.store.usage()[0] == 2
        engine.submit(second, cfg, listen("second"))
        engine.submit(second, cfg, listen("read"), read_only=True)
        engine.submit(whole, cfg, listen("whole"))    # all of it at a boundary that is kept
        listen.wait("second", "read", "whole")
    cache.close()
    assert hits == [expected] * 3
    assert [listen.final(name).cached_tokens for name in ("first", "second", "read", "whole")
            ] == [0, expected, expected, expected]
    for name, ids in (("first", first), ("second", second), ("whole", whole)):
        assert listen.text(name) == reference(ids, 7).text, name
    # on the reader, the bits of reading it alone; through `extend` in a batch of two, the
    # rounding of another matrix shape (ONNX Runtime's kernels block by the batch)
    def same(got, want):                  # reader: exact; extend: 1e-5 of the largest value
        if with_reader:
            return np.array_equal(got, want)
        scale = max(1.0, float(np.abs(want).max(initial=0)))
        return got.shape == want.shape and float(np.abs(got - want).max(initial=0)) <= 1e-5 * scale
    alone = Session(runner)
    want = alone.feed([second])[0]
    context = listen.final("read").context
    assert context.tokens == len(second) and same(context.last_logits, want)
    for name in ("memory", "norm", "k", "v"):
        got, want = getattr(context.state, name), getattr(alone.save(0).state, name)
        assert same(got, want), (name, float(np.abs(got - want).max(initial=0)))


def test_the_batch_follows_the_load_and_moving_rows_changes_nothing(runner, reference,
                                                                    tokenizer):
    """The session computes a power of two of rows, up to max_batch: one request runs at
    batch 1; five more join it mid-generation (its row, mid-segment, moves to a batch of 8);
    when they are done the batch shrinks again. Every answer is the one it has alone."""
    from infini_trt.runtime.serving.engine import EngineMetrics

    sizes = []

    class Sizes(EngineMetrics):
        def batch_size(self, n):
            sizes.append(n)

    engine, listen = Engine(runner, tokenizer, max_batch=8, metrics=Sizes()), Listener()
    first = tokenizer.encode(FILLER * 3)                 # more than a segment
    others = [tokenizer.encode(text) for text in ("The sky is", "The sun is", "The grass is",
                                                   "Here we go.", "There and back")]
    assert len(first) > 64
    with running(engine):
        engine.submit(first, SamplingConfig(max_new_tokens=40), listen("first"))
        deadline = time.monotonic() + 30
        while sum(n == "first" and bool(e.text) for n, e in listen.log) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert len(engine.slots) == 1
        for i, ids in enumerate(others):
            engine.submit(ids, SamplingConfig(max_new_tokens=6), listen(i))
        listen.wait("first", *range(len(others)))
        engine.submit(others[0], SamplingConfig(max_new_tokens=3), listen("alone"))
        listen.wait("alone")
    assert max(sizes) == 8 and sizes[-1] == 1 and all(n & (n - 1) == 0 for n in sizes)
    assert listen.text("first") == reference(first, 40).text
    for i, ids in enumerate(others):
        assert listen.text(i) == reference(ids, 6).text, i
    assert listen.text("alone") == reference(others[0], 3).text


def test_a_request_wakes_an_idle_loop_at_once(runner, reader, reference, tokenizer,
                                              monkeypatch):
    """The loop and the reader wait on one condition: a new request must wake the loop, not
    only the reader (with notify() instead of notify_all() it slept out its timeout)."""
    from infini_trt.runtime.serving import engine as engine_module

    monkeypatch.setattr(engine_module, "IDLE_WAIT_S", 60.0)
    engine, listen = Engine(runner, tokenizer, max_batch=2, reader=reader), Listener()
    with running(engine):
        time.sleep(0.2)                            # both threads are waiting now
        for i in range(3):
            engine.submit(tokenizer.encode("The sky is"), SamplingConfig(max_new_tokens=2),
                          listen(i))
            listen.wait(i, timeout=10)
            time.sleep(0.1)
    assert listen.text(0) == reference(tokenizer.encode("The sky is"), 2).text
