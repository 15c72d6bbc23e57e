"""The Redis context store (runtime/serving/redis_store.py) on a real redis-server started here:
the store's contract, run on it and on the directory store alike (bit-for-bit round trip,
bad ids, LRU order and the bound, a damaged value refused, whole values only, threads); what
only a shared store must do (clients that evict at once, one LRU order across clients,
namespaces, bytes lost under the metadata); URLs and a missing redis-py as one line; and two
servers on one Redis, the second continuing the first's context as `infini-trt run --greedy`
answers the whole prompt, and sharing its prefix cache; a Redis that goes away mid-run."""
import contextlib
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from live_server import RunningServer, passkey_prompt
from infini_trt.export.errors import InfiniTrtError, InputError, MissingDependencyError
from infini_trt.runtime.cli import main
from infini_trt.runtime.context import Context
from infini_trt.runtime.runners.base import RowState
from infini_trt.runtime.serving.redis_store import (CONTEXTS, PREFIXES, RedisStore,
                                                    is_redis_url)
from infini_trt.runtime.serving.store import (ContextStoreError, DirectoryStore,
                                              UnknownContext)


def fake_context(tokens: int, seed: int = 0, layers=1, heads=1, dk=2, vocab=5) -> Context:
    """A context at a segment boundary (no K/V rows) of random memory, norm and logits."""
    rng = np.random.default_rng(seed)
    state = RowState(rng.standard_normal((layers, heads, dk, dk)).astype(np.float32),
                     rng.standard_normal((layers, heads, dk)).astype(np.float32),
                     np.zeros((layers, heads, dk, 0), np.float32),
                     np.zeros((layers, heads, 0, dk), np.float32))
    return Context(state=state, tokens=tokens, last_logits=rng.standard_normal(vocab).astype(
        np.float32), fingerprint={"config_sha256": "c", "weights_sha256": "w"}, made_by="test",
        text_tail=[], config={})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server of its own on 127.0.0.1 (no persistence), started and stopped here."""

    def __init__(self, root):
        redis = pytest.importorskip("redis", reason="redis-py is not installed "
                                    "(pip install \"infini-trt[redis]\")")
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.redis, self.root, self.proc = redis, root, None
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.root)],
            stdout=open(self.root / "redis.log", "ab"), stderr=subprocess.STDOUT)
        client, deadline = self.client(), time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    break
                except self.redis.ConnectionError:
                    assert self.proc.poll() is None, (self.root / "redis.log").read_text()
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.02)
        except BaseException:
            self.stop()                          # none is left running
            raise
        finally:
            client.close()

    def client(self):
        return self.redis.Redis(host="127.0.0.1", port=self.port, retry=None)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The session's Redis, emptied."""
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(params=["directory", "redis"])
def open_store(request, tmp_path):
    """open_store(max_bytes) -> a new store object on the same storage each call (as another
    process, or a restart, would open it)."""
    if request.param == "directory":
        return lambda max_bytes=1 << 30: DirectoryStore(tmp_path / "s", max_bytes)
    url = request.getfixturevalue("redis_url")
    return lambda max_bytes=1 << 30: RedisStore(url, max_bytes)


def stored_bytes(store, ctx_id) -> bytes:
    if isinstance(store, RedisStore):
        return store.client.get(store.key(ctx_id))
    return store.file(ctx_id).read_bytes()


def replace_bytes(store, ctx_id, data: bytes) -> None:
    """Change a stored context's bytes behind the store's back."""
    if isinstance(store, RedisStore):
        store.client.set(store.key(ctx_id), data)
    else:
        store.file(ctx_id).write_bytes(data)


def everything(store) -> list:
    """What the store's storage holds: file names, or Redis keys."""
    if isinstance(store, RedisStore):
        return sorted(store.client.keys("*"))
    return sorted(p.name for p in store.path.iterdir())


@pytest.fixture(scope="module")
def contexts():
    """Three contexts of the same size (40, 72 and 104 tokens)."""
    return [fake_context(n, seed=n) for n in (40, 72, 104)]


# the contract, on both stores ---------------------------------------------------------------
def test_a_context_is_kept_bit_for_bit(open_store, contexts):
    store, want = open_store(), contexts[1]
    ctx_id = store.new_id()
    size = store.put(ctx_id, want)
    assert size == len(stored_bytes(store, ctx_id)) == len(want.to_bytes())
    got = store.get(ctx_id)
    for name in ("memory", "norm", "k", "v"):
        assert np.array_equal(getattr(got.state, name), getattr(want.state, name)), name
    assert np.array_equal(got.last_logits, want.last_logits) and got.tokens == 72
    info = store.info(ctx_id)
    assert info["tokens"] == 72 and info["bytes"] == size
    assert abs(info["created"] - time.time()) < 60
    assert store.ids() == [ctx_id] and store.usage() == (1, size)
    assert store.delete(ctx_id) and not store.delete(ctx_id)
    with pytest.raises(UnknownContext, match="no context"):
        store.get(ctx_id)
    with pytest.raises(UnknownContext):
        store.info(ctx_id)
    assert store.ids() == [] and store.usage() == (0, 0)


def test_ids_it_does_not_make_are_refused_and_touch_nothing(open_store, contexts):
    store = open_store()
    before = everything(store)
    for bad in ("../x", "x", "ctx-../../x", "CTX-" + "a" * 24, "ctx-" + "A" * 24, "lru",
                "total", None):
        with pytest.raises(InputError, match="not a context id"):
            store.put(bad, contexts[0])
        with pytest.raises(UnknownContext):
            store.get(bad)
        with pytest.raises(UnknownContext):
            store.info(bad)
        assert store.delete(bad) is False
    assert everything(store) == before and store.usage() == (0, 0)


def test_the_least_recently_used_go_first_and_the_order_survives_a_reopen(open_store,
                                                                         contexts):
    size = len(contexts[0].to_bytes())
    store = open_store(2 * size + size // 2)                 # fits two
    a, b, c, d = (store.new_id() for _ in range(4))
    store.put(a, contexts[0])
    store.put(b, contexts[1])
    store.get(a)                                  # a is now used after b
    store.put(c, contexts[2])                     # three do not fit: b goes
    assert set(store.ids()) == {a, c} and store.usage() == (2, 2 * size)
    store.get(a)                                  # c is now the least recently used
    reopened = open_store(store.max_bytes)
    assert reopened.info(c)["tokens"] == 104      # reading info is not a use
    reopened.put(d, contexts[0])
    assert set(reopened.ids()) == {a, d}
    assert reopened.get(a).tokens == 40
    one = open_store(size + size // 2)            # fits one: a put keeps its own context
    one.put(b, contexts[1])
    assert one.ids() == [b] and one.usage() == (1, size)
    with pytest.raises(ContextStoreError, match="more than the store holds"):
        open_store(size - 1).put(c, contexts[0])
    assert one.ids() == [b]


def test_a_damaged_context_is_refused_and_a_put_replaces_it(open_store, contexts):
    store = open_store()
    ctx_id = store.new_id()
    store.put(ctx_id, contexts[0])
    data = bytearray(stored_bytes(store, ctx_id))
    data[-1] ^= 0xFF                                         # a tensor byte: sha256 fails
    replace_bytes(store, ctx_id, bytes(data))
    with pytest.raises(InputError, match=f"stored context {ctx_id}"):
        store.get(ctx_id)
    replace_bytes(store, ctx_id, bytes(data[:100]))          # cut short
    with pytest.raises(InputError, match=f"stored context {ctx_id}"):
        store.info(ctx_id)
    store.put(ctx_id, contexts[2])
    assert store.get(ctx_id).tokens == 104 and store.usage()[0] == 1


def test_a_reader_sees_one_whole_context_or_the_other(open_store, contexts):
    """One id replaced over and over (contexts of two sizes) while another thread reads it."""
    store = open_store()
    small, large = contexts[0], fake_context(72, seed=1, dk=16)
    ctx_id = store.new_id()
    store.put(ctx_id, small)
    done, seen = threading.Event(), []

    def write():
        for i in range(60):
            store.put(ctx_id, (small, large)[i % 2])
        done.set()

    writer = threading.Thread(target=write)
    other = open_store()                          # its own lock: reads interleave with writes
    writer.start()
    while not done.is_set():
        seen.append(other.get(ctx_id).tokens)     # from_bytes checks the tensors' sha256
    writer.join()
    assert set(seen) <= {40, 72} and seen
    assert store.usage() == (1, len(large.to_bytes()))


def test_threads_at_once(open_store, contexts):
    store = open_store()
    size = store.put(store.new_id(), contexts[0])
    store.max_bytes = 4 * size
    errors = []

    def work(k):
        try:
            for i in range(6):
                ctx_id = store.new_id()
                store.put(ctx_id, contexts[(k + i) % 3])
                with contextlib.suppress(UnknownContext):    # another thread's put evicted it
                    assert store.get(ctx_id).tokens == (40, 72, 104)[(k + i) % 3]
        except Exception as exc:                             # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and store.usage() == (4, 4 * size)


# what a shared store must do ----------------------------------------------------------------
def consistent(store) -> tuple[int, int]:
    """usage() checked against the bytes' keys themselves -> usage()."""
    keys = [k.decode() for k in store.client.keys(store.namespace + "ctx-*")]
    assert sorted(k[len(store.namespace):] for k in keys) == store.ids()
    assert store.usage() == (len(keys), sum(store.client.strlen(k) for k in keys))
    return store.usage()


@pytest.mark.parametrize("fits", [1, 3])
def test_two_clients_evicting_at_once_keep_the_bound(redis_url, contexts, fits):
    """Two stores on one Redis (two connection pools, as two servers have) put at once; a
    third reads usage() all along: never over the bound, never fewer contexts than fit once
    that many were put (a put never loses its own), and usage() agrees with the keys."""
    size = len(contexts[0].to_bytes())
    bound = fits * size + size // 2
    stores = [RedisStore(redis_url, bound) for _ in range(2)]
    watcher = RedisStore(redis_url, bound)
    put, errors, samples, done = [0], [], [], threading.Event()

    def write(store, k):
        try:
            for i in range(40):
                store.put(store.new_id(), contexts[(k + i) % 3])
                put[0] += 1
        except Exception as exc:                             # noqa: BLE001 - reported below
            errors.append(exc)

    def watch():
        while not done.is_set():
            at_least = min(put[0], fits)                     # read before usage()
            samples.append((at_least, watcher.usage()))

    threads = [threading.Thread(target=write, args=(s, k)) for k, s in enumerate(stores)]
    watching = threading.Thread(target=watch)
    watching.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    watching.join(10)
    assert errors == [] and len(samples) > 10
    for at_least, (count, total) in samples:
        assert at_least <= count <= fits and total == count * size <= bound
    assert consistent(watcher) == (fits, fits * size)


def test_one_lru_order_across_clients(redis_url, contexts):
    size = len(contexts[0].to_bytes())
    first, second = (RedisStore(redis_url, 2 * size + size // 2) for _ in range(2))
    a, b, c = (first.new_id() for _ in range(3))
    first.put(a, contexts[0])
    second.put(b, contexts[1])
    first.get(a)                                  # a used after b, by another client
    second.put(c, contexts[2])                    # b goes
    assert set(first.ids()) == {a, c} == set(second.ids())
    second.info(a)                                # not a use
    first.get(c)
    second.put(b, contexts[1])                    # a goes
    assert set(first.ids()) == {b, c}


def test_namespaces_keep_apart(redis_url, contexts):
    store = RedisStore(redis_url)
    prefixes = store.namespaced(PREFIXES, 1 << 20)
    assert prefixes.client is store.client
    a, b = store.new_id(), store.new_id()
    store.put(a, contexts[0])
    prefixes.put(b, contexts[1])
    assert store.ids() == [a] and prefixes.ids() == [b]
    with pytest.raises(UnknownContext):
        store.get(b)
    assert not prefixes.delete(a) and store.get(a).tokens == 40
    keys = [k.decode() for k in store.client.keys("*")]
    assert {k for k in keys if not k.startswith((CONTEXTS, PREFIXES))} == set()
    assert store.key(a) == CONTEXTS + a in keys and prefixes.key(b) == PREFIXES + b in keys
    assert str(store).startswith(redis_url) and CONTEXTS in str(store)


def test_bytes_lost_under_the_metadata_are_forgotten(redis_url, contexts):
    """Redis evicting keys itself (maxmemory with an allkeys policy) may drop a context's
    bytes: it is then unknown, and no longer counted."""
    store = RedisStore(redis_url)
    a, b = store.new_id(), store.new_id()
    size = store.put(a, contexts[0])
    store.put(b, contexts[1])
    store.client.delete(store.key(a))
    with pytest.raises(UnknownContext):
        store.get(a)
    assert consistent(store) == (1, size)
    store.client.delete(store.key(b))
    assert store.delete(b) is False and consistent(store) == (0, 0)


# URLs and missing pieces: one line ----------------------------------------------------------
@pytest.mark.parametrize("url, says", [
    ("redis://127.0.0.1:abc/0", "is not a Redis URL"),
    ("redis://127.0.0.1:99999/0", "is not a Redis URL"),
    ("redis://127.0.0.1:6379/zero", "is not a Redis URL"),
    ("redis:///0", "is not a Redis URL"),
    ("redis://user:hunter2@127.0.0.1:{closed}/0", "Connection refused"),
    ("redis://127.0.0.1:{closed}/0", "Connection refused"),
], ids=["port-not-a-number", "port-out-of-range", "db-not-a-number", "no-host", "password",
        "refused"])
def test_a_bad_or_unreachable_url_is_one_line(url, says):
    pytest.importorskip("redis", reason="redis-py is not installed")
    url = url.format(closed=free_port())
    with pytest.raises(InfiniTrtError, match=says) as info:
        RedisStore(url)
    assert "\n" not in str(info.value) and "hunter2" not in str(info.value)


def test_a_db_the_server_lacks_is_one_line(redis_server):
    with pytest.raises(InfiniTrtError, match="cannot use the context store .*/99: .*DB index"):
        RedisStore(redis_server.url[:-1] + "99")


def test_without_redis_py_it_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)          # import redis fails
    with pytest.raises(MissingDependencyError, match=r'pip install "infini-trt\[redis\]"'):
        RedisStore("redis://127.0.0.1:6379/0")


def test_what_is_a_redis_url():
    assert is_redis_url("redis://h:1/0") and is_redis_url("rediss://h/0")
    assert not any(map(is_redis_url, ["redis", "./redis://", "/tmp/contexts", None]))


@pytest.mark.parametrize("case", ["refused", "bad-url", "no-redis-py"])
def test_serve_says_it_in_one_line_before_the_model_loads(monkeypatch, case):
    pytest.importorskip("redis", reason="redis-py is not installed")
    import infini_trt.runtime.runners as runners

    called = []

    def prepare(*a, **kw):
        called.append(a)
        raise InfiniTrtError("the model was prepared")

    monkeypatch.setattr(runners, "prepare", prepare)
    url = {"refused": f"redis://127.0.0.1:{free_port()}/0", "bad-url": "redis://host:port/0",
           "no-redis-py": "redis://127.0.0.1:6379/0"}[case]
    if case == "no-redis-py":
        monkeypatch.setitem(sys.modules, "redis", None)
    result = CliRunner().invoke(main, ["serve", "--port", "0", "--context-store", url])
    assert result.exit_code == 1 and called == [], result.output
    assert result.output.count("\n") == 1, result.output
    assert {"refused": "Connection refused", "bad-url": "is not a Redis URL",
            "no-redis-py": '"infini-trt[redis]"'}[case] in result.output


# servers on one Redis -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared(tmp_path_factory, shared_cache, server):          # `server`: the export is made
    """A Redis of its own and two servers on it (the second by URL, the first by object)."""
    redis_server = RedisServer(tmp_path_factory.mktemp("redis-shared"))
    servers = []
    try:
        servers.append(RunningServer(shared_cache, max_batch=2, max_prompt_tokens=2000,
                                     context_store=RedisStore(redis_server.url)))
        servers.append(RunningServer(shared_cache, max_batch=2, max_prompt_tokens=2000,
                                     context_store=redis_server.url))
        yield redis_server, servers
    finally:
        for running in servers:
            running.close()
        redis_server.stop()


def test_a_second_server_continues_the_first_ones_context(shared, run_cli, tokenizer):
    _, (first, second) = shared
    prompt = passkey_prompt("31415", 4, 2)
    document, question = prompt.rsplit("What", 1)
    question = "What" + question
    assert tokenizer.encode(document) + tokenizer.encode(question) == tokenizer.encode(prompt)
    expected = run_cli(prompt, 12)["text"]
    assert "3 1 4 1 5" in expected
    with first.http() as http:
        made = http.post("/v1/contexts", json={"model": "passkey", "prompt": document}).json()
    assert made["tokens"] == len(tokenizer.encode(document))
    got = second.client().completions.create(model="passkey", prompt=question, max_tokens=12,
                                             temperature=0, extra_body={"context": made["id"]})
    assert got.choices[0].text == expected
    assert got.usage.context_tokens == made["tokens"]
    with second.http() as http:
        assert http.get(f"/v1/contexts/{made['id']}").json() == made
    assert second.metric("infini_trt_contexts_stored") >= 1
    assert isinstance(second.service.prefixes.store, RedisStore)
    assert second.service.prefixes.store.namespace == PREFIXES


def test_the_servers_share_the_prefix_cache(shared, run_cli):
    _, (first, second) = shared
    prompt = passkey_prompt("27182", 5, 1)
    one = first.client().completions.create(model="passkey", prompt=prompt, max_tokens=8,
                                            temperature=0)
    first.service.prefixes.flush()
    two = second.client().completions.create(model="passkey", prompt=prompt, max_tokens=8,
                                             temperature=0)
    assert two.usage.prompt_tokens_details.cached_tokens >= 2 * 64
    assert one.choices[0].text == two.choices[0].text == run_cli(prompt, 8)["text"]


def test_a_redis_gone_mid_run_fails_requests_not_the_server(shared):
    """Each request on a connection of its own: the app's catch-all for an error it does not
    map (a context read from a store that is gone) closes its connection after the 500."""
    redis_server, (first, _) = shared

    def post(path, **body):
        with first.http() as http:
            return http.post(path, json={"model": "passkey", **body})

    made = post("/v1/contexts", prompt="The sky is blue.")
    assert made.status_code == 200
    redis_server.stop()
    try:
        t0 = time.monotonic()
        response = post("/v1/contexts", prompt="The sun is yellow.")
        assert time.monotonic() - t0 < 10
        assert response.status_code == 507, response.text
        error = response.json()["error"]
        assert error["code"] == "context_store_error" and "cannot keep" in error["message"]
        continued = post("/v1/completions", prompt="The grass is", max_tokens=2,
                         context=made.json()["id"])
        assert continued.status_code == 503, continued.text          # retryable
        assert "cannot read the context" in continued.json()["error"]["message"]
        short = post("/v1/completions", prompt="The grass is", max_tokens=2)
        assert short.status_code == 200                  # no store needed: it is served
        long = post("/v1/completions", prompt="The grass is green. " * 20, max_tokens=2)
        assert long.status_code == 200, long.text        # the prefix cache only misses
        with first.http() as http:
            assert http.get("/metrics").status_code == 200
        with first.http() as http:
            assert http.get("/health").status_code == 200
    finally:
        redis_server.start()                             # empty: nothing was saved
    again = post("/v1/contexts", prompt="The sky is")
    assert again.status_code == 200, again.text          # the client reconnects
    assert first.engine.rows_busy == 0
