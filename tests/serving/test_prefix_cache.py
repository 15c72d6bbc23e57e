"""The automatic exact-prefix cache (runtime/serving/prefix_cache.py): its keys, which
boundaries a prompt keeps, the longest stored prefix found, a damaged entry a miss, writes off
the loop; and over HTTP, a document sent again starts where the first one left a boundary,
with the same answer as `infini-trt run --greedy` and usage.prompt_tokens_details."""
import threading

import numpy as np
import pytest

from live_server import FILLER, passkey_prompt
from infini_trt.runtime.context import Context
from infini_trt.runtime.runners.base import RowState
from infini_trt.runtime.serving.prefix_cache import WRITE_QUEUE, PrefixCache
from infini_trt.runtime.serving.store import DirectoryStore, is_context_id

N = 8                                     # segment length of the unit tests


def fake_context(tokens: int, seed: int = 0) -> Context:
    """A context of a 1-layer, 1-head, 2x2 state at a boundary (no K/V rows)."""
    rng = np.random.default_rng(seed)
    state = RowState(rng.standard_normal((1, 1, 2, 2)).astype(np.float32),
                     rng.standard_normal((1, 1, 2)).astype(np.float32),
                     np.zeros((1, 1, 2, 0), np.float32), np.zeros((1, 1, 0, 2), np.float32))
    return Context(state=state, tokens=tokens, last_logits=rng.standard_normal(5).astype(
        np.float32), fingerprint={"config_sha256": "c", "weights_sha256": "w"}, made_by="test",
        text_tail=[], config={})


@pytest.fixture
def cache(tmp_path):
    cache = PrefixCache(DirectoryStore(tmp_path / "p"), {"model": "m", "runner": "r"}, N)
    yield cache
    cache.close()


def test_a_key_names_exactly_its_prefix_and_what_made_it(cache, tmp_path):
    rng = np.random.default_rng()
    prompt = rng.integers(0, 1000, 5 * N + 3)
    keys = cache.keys(prompt)
    assert len(keys) == 5 and all(is_context_id(k) for k in keys) and len(set(keys)) == 5
    assert cache.keys(prompt[:3 * N + 1]) == keys[:3]          # the tail after does not count
    changed = prompt.copy()
    changed[2 * N] += 1                                         # the third segment's first id
    assert cache.keys(changed)[:2] == keys[:2] and not set(cache.keys(changed)[2:]) & set(keys)
    other = PrefixCache(DirectoryStore(tmp_path / "q"), {"model": "m", "runner": "r int8"}, N)
    try:
        assert not set(other.keys(prompt)) & set(keys)          # another runner, other keys
    finally:
        other.close()
    assert cache.keys(prompt[:N - 1]) == []


@pytest.mark.parametrize("tokens, kept", [(N - 1, set()), (N, {N}), (2 * N + 5, {N, 2 * N}),
                                          (7 * N, {6 * N, 7 * N}), (9 * N + 1, {8 * N, 9 * N})])
def test_a_prompt_keeps_its_last_two_boundaries(cache, tokens, kept):
    assert cache.boundaries(tokens) == kept


def test_the_longest_stored_prefix_is_found_and_a_damaged_one_is_a_miss(cache):
    prompt = np.random.default_rng().integers(0, 1000, 6 * N)
    keys = cache.keys(prompt)
    assert cache.lookup(keys) is None
    for k in (2, 4):
        assert cache.offer(keys[k - 1], fake_context(k * N, seed=k))
    cache.flush()
    tokens, context = cache.lookup(keys)
    assert tokens == 4 * N and context.tokens == 4 * N
    assert np.array_equal(context.state.memory, fake_context(4 * N, seed=4).state.memory)
    assert cache.lookup(keys[:3])[0] == 2 * N                   # a shorter prompt: its own
    path = cache.store.file(keys[3])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF                                            # a tensor byte: sha256 fails
    path.write_bytes(bytes(data))
    assert cache.lookup(keys)[0] == 2 * N and not path.exists()


class SlowStore(DirectoryStore):
    """Writes wait until `go` is set."""

    def __init__(self, path):
        super().__init__(path)
        self.go, self.entered = threading.Event(), threading.Event()

    def _write(self, ctx_id, data):
        self.entered.set()
        assert self.go.wait(30)
        super()._write(ctx_id, data)


def test_writes_happen_off_the_loop_and_a_writer_behind_drops_offers(tmp_path):
    store = SlowStore(tmp_path / "slow")
    cache = PrefixCache(store, {"model": "m"}, N)
    try:
        keys = cache.keys(np.arange(N * (WRITE_QUEUE + 3)) % 97)
        assert cache.offer(keys[0], fake_context(N))
        assert store.entered.wait(30)                # the writer holds it, blocked
        taken = [True] + [cache.offer(key, fake_context(N * (i + 2)))
                          for i, key in enumerate(keys[1:])]
        # the queue holds WRITE_QUEUE more, the rest are dropped
        assert taken == [True] * (WRITE_QUEUE + 1) + [False] * 2
        assert cache.dropped == taken.count(False)
        store.go.set()
        cache.flush()
        assert store.usage()[0] == taken.count(True)
    finally:
        store.go.set()
        cache.close()


def test_a_store_error_is_said_once_and_the_cache_goes_on(tmp_path, capsys):
    cache = PrefixCache(DirectoryStore(tmp_path / "full", max_bytes=10), {"model": "m"}, N)
    try:
        keys = cache.keys(np.arange(3 * N))
        for i, key in enumerate(keys):
            cache.offer(key, fake_context(N * (i + 1)))
        cache.flush()
        assert cache.lookup(keys) is None
    finally:
        cache.close()
    err = capsys.readouterr().err
    assert err.count("the prefix cache cannot keep") == 1 and "more than the store" in err


# over HTTP, on the tests' shared server (its prefix cache is on by default) ------------------
def test_a_document_sent_again_is_not_read_again(server, run_cli, tokenizer):
    key = str(np.random.default_rng().integers(10_000, 99_999))
    document = passkey_prompt(key, 4, 3).rsplit("What", 1)[0]
    first = document + "What is the pass key? The pass key is"
    second = document + FILLER + "What is the pass key? The pass key is"
    n = 64
    common = next(i for i, (a, b) in enumerate(zip(tokenizer.encode(first),
                                                   tokenizer.encode(second))) if a != b)
    kept = PrefixCache.boundaries(server.service.prefixes, len(tokenizer.encode(first)))
    expected = max(b for b in kept if b <= common)
    assert expected >= 2 * n                                     # the test means something
    client = server.client()
    got = client.completions.create(model=server.service.model_name, prompt=first,
                                    max_tokens=8, temperature=0)
    # other tests' prompts may share the words before the key, not the key's segment
    key_at = len(tokenizer.encode(document.split(key)[0].rstrip()))
    assert got.usage.prompt_tokens_details.cached_tokens <= key_at < expected
    server.service.prefixes.flush()
    hits = server.metric("infini_trt_prefix_cache_hits_total")
    saved = server.metric("infini_trt_prefix_cache_tokens_total")
    again = client.completions.create(model=server.service.model_name, prompt=second,
                                      max_tokens=8, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == expected
    assert again.usage.prompt_tokens == len(tokenizer.encode(second))
    assert server.metric("infini_trt_prefix_cache_hits_total") == hits + 1
    assert server.metric("infini_trt_prefix_cache_tokens_total") == saved + expected
    assert got.choices[0].text == run_cli(first, 8)["text"]
    assert again.choices[0].text == run_cli(second, 8)["text"]
