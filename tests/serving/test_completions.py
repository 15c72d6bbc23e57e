"""The OpenAI API of `infini-trt serve`, driven by the official client: greedy answers equal
`infini-trt run --greedy`, alone and 16 at once; streams add up to the whole text; chat."""
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from live_server import passkey_prompt

WORDS = "The grass is green. The sky is blue. The sun is yellow. Here we go.".split()
SHORT = [" ".join(WORDS[:n]) for n in range(1, len(WORDS) + 1)]       # 1 to 15 tokens
PROMPTS = [
    pytest.param("The grass is green. The sky is", 12, id="short"),
    pytest.param(passkey_prompt("71432", 2, 1), 10, id="three-segments"),
    pytest.param(passkey_prompt("50925", 9, 4), 70, id="six-segments-answer-past-a-fold"),
]


@pytest.mark.parametrize("prompt, max_tokens", PROMPTS)
def test_greedy_completion_equals_run(server, run_cli, tokenizer, prompt, max_tokens):
    expected = run_cli(prompt, max_tokens)
    client = server.client()
    got = client.completions.create(model="passkey", prompt=prompt, max_tokens=max_tokens,
                                    temperature=0)
    assert got.choices[0].text == expected["text"]
    assert got.choices[0].finish_reason == "length" == expected["finish_reason"]
    n_prompt = len(tokenizer.encode(prompt))
    assert (got.usage.prompt_tokens, got.usage.completion_tokens,
            got.usage.total_tokens) == (n_prompt, max_tokens, n_prompt + max_tokens)
    by_ids = client.completions.create(model="passkey", prompt=tokenizer.encode(prompt),
                                       max_tokens=max_tokens, temperature=0)
    assert by_ids.choices[0].text == expected["text"]


def test_a_stop_string_ends_the_text_as_run_does(server, run_cli):
    prompt = passkey_prompt("71432", 2, 1)
    words = run_cli(prompt, 40)["text"].split()
    stop = words[len(words) // 2]                   # a word in the middle of the answer
    expected = run_cli(prompt, 40, "--stop", stop)
    assert expected["finish_reason"] == "stop"
    got = server.client().completions.create(model="passkey", prompt=prompt, max_tokens=40,
                                             temperature=0, stop=[stop, "never"])
    assert got.choices[0].text == expected["text"] and stop not in expected["text"]
    assert got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == len(expected["token_ids"])


def test_sixteen_requests_at_once_answer_as_each_alone(server, reference, tokenizer):
    """16 prompts of 3 to 450 tokens and 5 to 40 new tokens, in flight together (half of
    them streamed): each answer equals generate() on that prompt alone."""
    cases = [(passkey_prompt(f"{k * 6733 % 100000:05d}", 2 * (k % 7), (3 * k) % 5) if k % 4 else
              SHORT[k - 1 if k else 2], 5 + (7 * k) % 36) for k in range(16)]
    expected = [reference(tokenizer.encode(p), n).text for p, n in cases]
    lengths = {len(tokenizer.encode(p)) for p, _ in cases}
    assert len(lengths) > 10 and max(lengths) > 5 * 64
    client = server.client()
    peak, going = [0], threading.Event()

    def watch():
        while not going.is_set():
            peak[0] = max(peak[0], server.engine.rows_busy)

    def ask(k):
        prompt, n = cases[k]
        if k % 2:
            chunks = client.completions.create(model="passkey", prompt=prompt, max_tokens=n,
                                               temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model="passkey", prompt=prompt, max_tokens=n,
                                         temperature=0).choices[0].text

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(ask, range(16)))
    finally:
        going.set()
        watcher.join()
    assert got == expected
    assert peak[0] >= 4, f"at most {peak[0]} rows were busy at once: nothing was batched"
    server.wait_idle()


def test_streamed_deltas_add_up_to_the_text(server):
    client = server.client()
    prompt = passkey_prompt("31337", 3, 2)
    whole = client.completions.create(model="passkey", prompt=prompt, max_tokens=30,
                                      temperature=0)
    chunks = list(client.completions.create(model="passkey", prompt=prompt, max_tokens=30,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 30
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 5     # really streamed
    with server.http() as http, http.stream("POST", "/v1/completions", json={
            "prompt": prompt, "max_tokens": 3, "temperature": 0, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_a_seeded_sample_does_not_depend_on_the_batch(server, reference, tokenizer):
    prompt = passkey_prompt("24680", 2, 2)
    expected = reference(tokenizer.encode(prompt), 20, greedy=False, temperature=1.0,
                         top_p=0.9, seed=7).text
    client = server.client()

    def sample(seed):
        return client.completions.create(model="passkey", prompt=prompt, max_tokens=20,
                                         temperature=1.0, top_p=0.9, seed=seed).choices[0].text

    with ThreadPoolExecutor(6) as pool:             # with other requests in the batch
        got = list(pool.map(sample, [7, 1, 7, 2, 7, 3]))
    assert got[0] == got[2] == got[4] == expected
    assert len(set(got)) > 1                        # other seeds, other samples


def test_several_prompts_give_one_choice_each(server, run_cli):
    prompts = ["The sky is", "The sun is yellow. The grass is"]
    got = server.client().completions.create(model="passkey", prompt=prompts, max_tokens=6,
                                             temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == [run_cli(p, 6)["text"] for p in prompts]


@pytest.mark.filterwarnings("ignore:.*not in the tokenizer's vocabulary")   # the server's
def test_chat_uses_the_plain_template(server, reference, tokenizer):
    messages = [{"role": "system", "content": "The sky is blue."},
                {"role": "user", "content": "What is the pass key?"}]
    text = "system: The sky is blue.\nuser: What is the pass key?\nassistant:"
    with pytest.warns(UserWarning, match="not in the tokenizer's vocabulary"):
        ids = tokenizer.encode(text)
    expected = reference(ids, 15).text
    client = server.client()
    got = client.chat.completions.create(model="passkey", messages=messages, max_tokens=15,
                                         temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == expected
    assert got.usage.prompt_tokens == len(ids) and got.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="passkey", messages=messages,
                                                 max_tokens=15, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_health_docs(server):
    assert [m.id for m in server.client().models.list()] == ["passkey"]
    with server.http() as http:
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["rows"] == 8
        assert http.get("/docs").status_code == 200
        paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(paths)
    assert server.metric("infini_trt_batch_rows") == 8
    assert server.metric("infini_trt_context_hits_total") == 0
    assert server.metric("infini_trt_generation_tokens_total") > 0
    assert server.metric("infini_trt_time_to_first_token_seconds_count") > 0


def test_only_the_reader_holds_a_prefill_session(server):
    """Whole prompt segments go to the reader; the decoding runner reads the rest through
    the extend graph, so its process does not hold a second pre-packed copy of the weights
    for a prefill session it would never use (small: 766 -> 600 MiB at start, Xeon). The
    reader reads through what "auto" picks for the export (the extend graph too for an
    unquantized gqa export), and holds a prefill session only when that is the prefill graph."""
    from infini_trt.runtime.runners.ort_runner import choose_prompt_graph

    runner, reader = server.engine.runner, server.engine.reader.runner
    assert runner.prompt_graph == "extend" and "prefill" not in runner.sessions
    assert reader.prompt_graph == choose_prompt_graph(reader.manifest)
    assert ("prefill" in reader.sessions) == (reader.prompt_graph == "prefill")
