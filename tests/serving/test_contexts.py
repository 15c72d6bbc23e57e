"""Stored contexts: a document read once (POST /v1/contexts) and continued by id from
completions and chat, as `infini-trt run --greedy` answers the whole prompt, also after a
restart on the same store; GET/DELETE; unknown, malformed and other models' ids; the
directory store itself (bit-for-bit round trip, LRU eviction that survives a reopen, atomic
writes); and the CLI's --context-store options."""
import errno
import os
import time
import urllib.parse

import numpy as np
import pytest
from click.testing import CliRunner

from live_server import RunningServer, passkey_prompt
from infini_trt.export.errors import InfiniTrtError
from infini_trt.runtime import Session
from infini_trt.runtime.cli import main
from infini_trt.runtime.context import Context
from infini_trt.runtime.serving.store import (ContextStore, ContextStoreError, DirectoryStore,
                                              UnknownContext)


def split(prompt: str) -> tuple[str, str]:
    """A passkey prompt -> (the document, the question after it)."""
    document, question = prompt.rsplit("What", 1)
    return document, "What" + question


def tiny_context(tokens: int) -> Context:
    """A context of `tokens` tokens from a model other than the server's: the `tiny` preset
    with random weights, on torch."""
    from infini_trt.export import InfiniLM, init_weights, preset
    from infini_trt.runtime.runners.torch_runner import TorchRunner

    session = Session(TorchRunner(init_weights(InfiniLM(preset("tiny")), 0)))
    session.feed([np.arange(tokens) % 200])
    return session.save(0)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("contexts") / "store"          # made by the server


@pytest.fixture(scope="module")
def ctx_server(shared_cache, store_dir, server):           # `server`: the export is made
    running = RunningServer(shared_cache, max_batch=4, max_queue=16, max_prompt_tokens=2000,
                            context_store=store_dir)
    yield running
    running.close()


def make_context(running, prompt) -> dict:
    with running.http() as http:
        response = http.post("/v1/contexts", json={"model": "passkey", "prompt": prompt})
    assert response.status_code == 200, response.text
    return response.json()


def ask(running, ctx_id, question, max_tokens, **kw):
    return running.client().completions.create(
        model="passkey", prompt=question, max_tokens=max_tokens, temperature=0,
        extra_body={"context": ctx_id}, **kw)


# the HTTP API -------------------------------------------------------------------------------
def test_a_context_answers_as_the_whole_prompt(ctx_server, store_dir, run_cli, tokenizer):
    prompt = passkey_prompt("86420", 4, 2)
    document, question = split(prompt)
    doc_ids, question_ids = tokenizer.encode(document), tokenizer.encode(question)
    assert doc_ids + question_ids == tokenizer.encode(prompt)     # split at a token boundary
    assert len(doc_ids) > 2 * 64 and len(doc_ids) % 64          # full segments and a tail
    expected = run_cli(prompt, 12)
    assert "8 6 4 2 0" in expected["text"]                        # the key is in the document
    hits = ctx_server.metric("infini_trt_context_hits_total")

    made = make_context(ctx_server, document)
    path = store_dir / f"{made['id']}.ctx"
    assert made["object"] == "context" and made["id"].startswith("ctx-")
    assert made["tokens"] == len(doc_ids) and made["bytes"] == path.stat().st_size
    assert abs(made["created"] - time.time()) < 60
    assert Context.load(path).tokens == len(doc_ids)            # a context file, as it is

    got = ask(ctx_server, made["id"], question, 12)
    assert got.choices[0].text == expected["text"]
    assert (got.usage.prompt_tokens, got.usage.context_tokens,
            got.usage.completion_tokens) == (len(question_ids), len(doc_ids), 12)
    by_ids = make_context(ctx_server, doc_ids)                  # token ids: the same context
    assert by_ids["tokens"] == made["tokens"] and by_ids["bytes"] == made["bytes"]
    streamed = ask(ctx_server, by_ids["id"], question_ids, 12, stream=True,
                   stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["text"]
    assert chunks[-1].usage.context_tokens == len(doc_ids)
    with ctx_server.http() as http:
        info = http.get(f"/v1/contexts/{made['id']}").json()
    assert info == made                                         # reading info is no change
    assert ctx_server.metric("infini_trt_context_hits_total") == hits + 2


@pytest.mark.filterwarnings("ignore:.*not in the tokenizer's vocabulary")
def test_chat_and_an_empty_prompt_continue_a_context(ctx_server, reference, tokenizer):
    document, _ = split(passkey_prompt("13579", 3, 1))
    made = make_context(ctx_server, document)
    messages = [{"role": "user", "content": "What is the pass key?"}]
    text = "user: What is the pass key?\nassistant:"
    expected = reference(tokenizer.encode(document) + tokenizer.encode(text), 10).text
    got = ctx_server.client().chat.completions.create(
        model="passkey", messages=messages, max_tokens=10, temperature=0,
        extra_body={"context": made["id"]})
    assert got.choices[0].message.content == expected
    assert got.usage.prompt_tokens == len(tokenizer.encode(text))
    assert got.usage.context_tokens == made["tokens"]
    after = ask(ctx_server, made["id"], "", 6)               # no prompt: the document goes on
    assert after.choices[0].text == reference(tokenizer.encode(document), 6).text
    assert after.usage.prompt_tokens == 0


def test_a_context_survives_a_restart(shared_cache, server, tmp_path, tokenizer):
    """Made by one server, which stops; a new server on the same directory answers from it
    as the first did."""
    document, question = split(passkey_prompt("24601", 5, 1))
    store = tmp_path / "store"
    first = RunningServer(shared_cache, max_batch=2, context_store=store)
    try:
        made = make_context(first, document)
        answer = ask(first, made["id"], question, 10).choices[0].text
    finally:
        first.close()
    second = RunningServer(shared_cache, max_batch=2, context_store=store)
    try:
        assert second.service.store is not first.service.store
        assert ask(second, made["id"], question, 10).choices[0].text == answer
        assert "2 4 6 0 1" in answer
        with second.http() as http:
            assert http.get(f"/v1/contexts/{made['id']}").json() == made
        assert second.metric("infini_trt_contexts_stored") == 1
        assert second.metric("infini_trt_context_store_bytes") == made["bytes"]
    finally:
        second.close()


def test_a_deleted_context_is_404(ctx_server, store_dir):
    import openai

    made = make_context(ctx_server, "The sky is blue. The grass is green.")
    with ctx_server.http() as http:
        deleted = http.delete(f"/v1/contexts/{made['id']}")
        assert deleted.status_code == 200
        assert deleted.json() == {"id": made["id"], "object": "context", "deleted": True}
        assert not (store_dir / f"{made['id']}.ctx").exists()
        for response in (http.get(f"/v1/contexts/{made['id']}"),
                         http.delete(f"/v1/contexts/{made['id']}")):
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "context_not_found"
    with pytest.raises(openai.NotFoundError) as info:
        ask(ctx_server, made["id"], "The sky is", 2)
    assert info.value.body["code"] == "context_not_found"
    assert info.value.body["param"] == "context"
    assert ctx_server.engine.rows_busy == 0


@pytest.mark.parametrize("ctx_id", [
    ContextStore.new_id(), "../victim", "ctx-0123", "ctx-" + "0" * 23 + "/../../victim",
    "/etc/passwd", ""], ids=["unknown", "dot-dot", "short", "dot-dot-inside", "absolute",
                             "empty"])
def test_unknown_and_malformed_ids_are_404_and_touch_nothing(ctx_server, store_dir, ctx_id):
    """A file outside the store that a path built from the id would reach (a real context
    file, so that reading it would succeed) is neither read nor removed."""
    import openai

    victim = store_dir.parent / "victim.ctx"
    if not victim.exists():
        made = make_context(ctx_server, "The sun is yellow.")
        victim.write_bytes((store_dir / f"{made['id']}.ctx").read_bytes())
    before = victim.read_bytes(), sorted(os.listdir(store_dir))
    with pytest.raises(openai.NotFoundError) as info:
        ask(ctx_server, ctx_id, "The sky is", 2)
    assert info.value.body["code"] == "context_not_found"
    quoted = urllib.parse.quote(ctx_id, safe="")          # "/" as %2F: one path segment
    with ctx_server.http() as http:
        for response in (http.get(f"/v1/contexts/{quoted}"),
                         http.delete(f"/v1/contexts/{quoted}")) if ctx_id else ():
            assert response.status_code == 404, response.text
    assert (victim.read_bytes(), sorted(os.listdir(store_dir))) == before


@pytest.mark.filterwarnings("ignore:.*not in the tokenizer's vocabulary")
def test_another_models_context_is_400(ctx_server, store_dir):
    import openai

    ctx_id = ContextStore.new_id()
    DirectoryStore(store_dir).put(ctx_id, tiny_context(40))     # as another server would
    with ctx_server.http() as http:
        assert http.get(f"/v1/contexts/{ctx_id}").json()["tokens"] == 40
    with pytest.raises(openai.BadRequestError, match="another configuration") as info:
        ask(ctx_server, ctx_id, "The sky is", 2)
    assert info.value.body["code"] == "context_model_mismatch"
    with pytest.raises(openai.BadRequestError, match="another configuration"):
        ctx_server.client().chat.completions.create(
            model="passkey", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            extra_body={"context": ctx_id})
    assert ctx_server.engine.rows_busy == 0


@pytest.mark.parametrize("body, status, code", [
    ({"model": "gpt-4", "prompt": "The sky is"}, 404, "model_not_found"),
    ({"prompt": [1, 2, 54]}, 400, None),
    ({"prompt": ["The sky is", "The sun is"]}, 400, "invalid_value"),
    ({"prompt": ""}, 400, None),
    ({"prompt": " ".join(["The grass is green."] * 401)}, 400, "context_length_exceeded"),
    ({"prompt": "The sky is", "max_tokens": 3}, 400, "unknown_parameter"),
], ids=["unknown-model", "id-past-the-vocabulary", "two-prompts", "empty", "too-long",
        "unknown-field"])
def test_a_bad_context_request_gets_its_error(ctx_server, store_dir, body, status, code):
    before = sorted(os.listdir(store_dir))
    with ctx_server.http() as http:
        response = http.post("/v1/contexts", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert sorted(os.listdir(store_dir)) == before
    assert ctx_server.engine.rows_busy == 0 and ctx_server.engine.queue_length == 0


def test_the_store_gauges_and_the_default_directory(ctx_server, server, shared_cache):
    count, size = ctx_server.service.store.usage()
    assert count > 0
    assert ctx_server.metric("infini_trt_contexts_stored") == count
    assert ctx_server.metric("infini_trt_context_store_bytes") == size
    assert ctx_server.metric("infini_trt_requests_total",
                             'endpoint="/v1/contexts",status="200"') > 0
    assert server.service.store.path == shared_cache / "contexts"       # no --context-store


# the directory store ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def contexts():
    """Three contexts of the same size (tokens 40, 72, 104: segment position 8 in each)."""
    return [tiny_context(n) for n in (40, 72, 104)]


# The store's contract (bit for bit, ids it does not make, LRU order across a reopen, threads at
# once) runs on the DirectoryStore and the RedisStore alike in test_redis_store.py.


def test_a_failed_put_leaves_no_file_and_the_old_one_intact(tmp_path, contexts, monkeypatch):
    store = DirectoryStore(tmp_path / "s")
    a, b = store.new_id(), store.new_id()
    store.put(a, contexts[0])
    kept = (tmp_path / "s" / f"{a}.ctx").read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)         # the bytes are written, then fail
    for ctx_id in (a, b):
        with pytest.raises(ContextStoreError, match="No space left on device"):
            store.put(ctx_id, contexts[1])
    monkeypatch.undo()
    assert os.listdir(tmp_path / "s") == [f"{a}.ctx"]
    assert (tmp_path / "s" / f"{a}.ctx").read_bytes() == kept
    assert store.get(a).tokens == 40
    with pytest.raises(UnknownContext):
        store.get(b)


def test_a_crashs_temporary_files_are_removed_on_open(tmp_path):
    root = tmp_path / "s"
    DirectoryStore(root)
    stale, fresh = (root / f".{ContextStore.new_id()}.ctx.tmp-{k}" for k in (1, 2))
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    store = DirectoryStore(root)
    assert not stale.exists() and fresh.exists()          # another process may be writing it
    assert store.ids() == [] and store.usage() == (0, 0)


def test_serve_help_names_the_store_options():
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    for text in ("--context-store", "--context-store-bytes", "/v1/contexts",
                 "~/.cache/infini-trt/contexts", "[default: 1G]"):
        assert text in result.output, text


@pytest.mark.parametrize("text, size", [("1073741824", 1 << 30), ("512M", 512 << 20),
                                        ("2G", 2 << 30), ("64KiB", 64 << 10), ("1 gb", 1 << 30)],
                         ids=["bytes", "512M", "2G", "64KiB", "1-gb"])
def test_store_sizes_are_read_with_suffixes(text, size):
    from infini_trt.runtime.commands.serve import ByteSize

    assert ByteSize().convert(text, None, None) == size


def test_a_bad_store_size_is_a_usage_error():
    result = CliRunner().invoke(main, ["serve", "--context-store-bytes", "12X"])
    assert result.exit_code == 2 and "'12X' is not a size" in result.output


@pytest.mark.parametrize("where", ["a-file", "under-a-file", "read-only"])
def test_a_store_that_cannot_be_written_is_one_line_before_the_model_loads(
        tmp_path, monkeypatch, where):
    import infini_trt.runtime.runners as runners

    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    path = {"a-file": afile, "under-a-file": afile / "contexts",
            "read-only": tmp_path / "ro" / "contexts"}[where]
    if where == "read-only":
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("this user (root) may write in a read-only directory")
    called = []

    def prepare(*a, **kw):
        called.append(a)
        raise InfiniTrtError("the model was prepared")

    monkeypatch.setattr(runners, "prepare", prepare)
    result = CliRunner().invoke(main, ["serve", "--port", "0", "--context-store", str(path)])
    assert result.exit_code == 1 and called == []
    assert result.output.count("\n") == 1 and str(path) in result.output, result.output
    assert ("not a directory" if where == "a-file" else "cannot write") in result.output
    assert afile.read_text() == "not a directory"
