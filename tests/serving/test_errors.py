"""Bad requests get OpenAI-style errors with the right status, never a crash or a leaked row:
malformed JSON, an unknown model, max_tokens out of range, ids outside the vocabulary, a
prompt too long, a full queue (429, Retry-After), a client that goes away mid-stream."""
import json
import threading
import time

import pytest

from live_server import RunningServer, passkey_prompt

GOOD = {"prompt": "The sky is", "max_tokens": 4, "temperature": 0}
LONG = " ".join(["The grass is green."] * 401)             # 2,005 tokens: over the 2,000 limit


def post(path, body=None, content=None):
    return path, body, content


BAD = [
    pytest.param(post("/v1/completions", content=b'{"prompt": "The sky is", '), 400,
                 "json_invalid", None, id="malformed-json"),
    pytest.param(post("/v1/completions", content=b"[1, 2]"), 400, "invalid_value", None,
                 id="not-an-object"),
    pytest.param(post("/v1/completions", {**GOOD, "model": "gpt-4"}), 404, "model_not_found",
                 "model", id="unknown-model"),
    pytest.param(post("/v1/chat/completions", {"model": "llama", "messages": [
        {"role": "user", "content": "hi"}]}), 404, "model_not_found", "model",
        id="unknown-model-chat"),
    pytest.param(post("/v1/completions", {**GOOD, "max_tokens": 0}), 400, "invalid_value",
                 "max_tokens", id="max-tokens-0"),
    pytest.param(post("/v1/completions", {**GOOD, "max_tokens": 5000}), 400, "invalid_value",
                 "max_tokens", id="max-tokens-over-the-limit"),
    pytest.param(post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": -3}),
                 400, "invalid_value", "max_tokens", id="max-tokens-negative-chat"),
    pytest.param(post("/v1/completions", {**GOOD, "prompt": [1, 2, 54]}), 400, None, "prompt",
                 id="id-past-the-vocabulary"),
    pytest.param(post("/v1/completions", {**GOOD, "prompt": [[3, -1]]}), 400, None, "prompt",
                 id="negative-id"),
    pytest.param(post("/v1/completions", {**GOOD, "prompt": [1.5, 2]}), 400, "invalid_value",
                 "prompt", id="ids-not-integers"),
    pytest.param(post("/v1/completions", {**GOOD, "prompt": ""}), 400, None, "prompt",
                 id="empty-prompt"),
    pytest.param(post("/v1/completions", {**GOOD, "prompt": LONG}), 400,
                 "context_length_exceeded", "prompt", id="prompt-too-long"),
    pytest.param(post("/v1/completions", {**GOOD, "temperature": 3}), 400, "invalid_value",
                 "temperature", id="temperature-out-of-range"),
    pytest.param(post("/v1/completions", {**GOOD, "stop": ["is", ""]}), 400, None, "stop",
                 id="empty-stop-string"),
    pytest.param(post("/v1/completions", {**GOOD, "n": 2}), 400, "unsupported_parameter", "n",
                 id="n-2"),
    pytest.param(post("/v1/completions", {**GOOD, "frobnicate": True}), 400,
                 "unknown_parameter", "frobnicate", id="unknown-field"),
    pytest.param(post("/v1/completions", {"max_tokens": 3}), 400, "invalid_value", "prompt",
                 id="no-prompt"),
    pytest.param(post("/v1/chat/completions", {"messages": [{"role": "wizard",
                                                             "content": "hi"}]}),
                 400, "invalid_value", "messages.0.role", id="unknown-role"),
    pytest.param(post("/v1/chat/completions", {"messages": []}), 400, "invalid_value",
                 "messages", id="no-messages"),
    pytest.param(post("/v1/nothing", {}), 404, None, None, id="unknown-route"),
]


@pytest.mark.parametrize("request_, status, code, param", BAD)
def test_a_bad_request_gets_its_error_and_the_server_goes_on(server, request_, status, code,
                                                              param):
    path, body, content = request_
    with server.http() as http:
        response = (http.post(path, content=content, headers={"content-type": "application/json"})
                    if content is not None else http.post(path, json=body))
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["type"] == ("not_found_error" if path == "/v1/nothing" else
                                 "invalid_request_error")
        assert (error["code"], error["param"]) == (code, param)
        after = http.post("/v1/completions", json=GOOD)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 4
    assert server.engine.rows_busy == 0 and server.engine.queue_length == 0


def test_the_openai_client_sees_the_errors(server):
    import openai

    client = server.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="The sky is", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model="passkey", prompt=[5, 99], max_tokens=2)


def data_lines(response):
    """The JSON of each server-sent event of a streamed response."""
    for line in response.iter_lines():
        if line:
            assert line.startswith("data: ") and line != "data: [DONE]", line
            yield json.loads(line[len("data: "):])


def wait_for(condition, timeout=10.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_full_queue_is_429_with_retry_after(shared_cache):
    """One row, a queue of one: a third request is refused at once, and the server goes on
    once the first client leaves."""
    import httpx
    import openai

    small = RunningServer(shared_cache, max_batch=1, max_queue=1)
    try:
        http = small.http()
        second = []
        waiter = threading.Thread(target=lambda: second.append(
            httpx.post(f"{small.url}/v1/completions", json=GOOD, timeout=60)))
        with http.stream("POST", "/v1/completions", json={
                "prompt": "The sky is", "max_tokens": 4000, "temperature": 0,
                "stream": True}) as first:
            events = data_lines(first)              # kept: closing it would disconnect
            assert next(events)["choices"][0]["text"]             # it holds the row
            waiter.start()
            wait_for(lambda: small.engine.queue_length == 1, what="a waiting request")
            refused = http.post("/v1/completions", json=GOOD)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                small.client().completions.create(model="passkey", prompt="The sky is",
                                                  max_tokens=2)
        waiter.join(30)                                       # the first client has left
        assert second[0].status_code == 200
        assert second[0].json()["usage"]["completion_tokens"] == 4
        small.wait_idle()
        assert small.metric("infini_trt_generations_finished_total",
                            'reason="cancelled"') == 1
        assert small.metric("infini_trt_requests_total",
                            'endpoint="/v1/completions",status="429"') == 2
        http.close()
    finally:
        small.close()


@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "no-stream"])
def test_a_client_gone_mid_request_frees_its_row(server, streamed):
    import httpx

    server.wait_idle()
    before = server.metric("infini_trt_generations_finished_total", 'reason="cancelled"')
    body = {"prompt": passkey_prompt("11111", 1, 1), "max_tokens": 4000, "temperature": 0,
            "stream": streamed}
    if streamed:
        with server.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
            lines = data_lines(r)
            for _ in range(3):
                assert next(lines)["choices"][0]["finish_reason"] is None
            assert server.engine.rows_busy == 1
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.5)
    wait_for(lambda: server.metric("infini_trt_batch_rows_busy") == 0, what="the row freed")
    assert server.metric("infini_trt_generations_finished_total",
                         'reason="cancelled"') == before + 1
    assert server.client().completions.create(model="passkey", prompt="The sky is",
                                              max_tokens=2, temperature=0).choices[0].text
