"""The fixtures of the tests of `infini-trt serve`: a real server on 127.0.0.1 on the bundled
passkey model, ONNX Runtime (live_server.py), and the references they compare it with."""
import json

import pytest
from click.testing import CliRunner

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("openai", reason="the test extra (openai) is not installed")

from live_server import RunningServer  # noqa: E402  (after the skips above)


@pytest.fixture(scope="session")
def server(shared_cache):
    """The server most tests share: 8 rows, a queue of 64, prompts up to 2,000 tokens."""
    running = RunningServer(shared_cache, max_batch=8, max_queue=64, max_prompt_tokens=2000,
                            max_new_tokens=4096)
    yield running
    running.close()


@pytest.fixture(scope="session")
def reference(server, shared_cache):
    """reference(prompt ids, max_new_tokens, **sampling) -> the Sequence that
    `generation.generate` gives the prompt alone (batch 1), on its own runner."""
    from infini_trt.runtime import SamplingConfig, bundled_model, generate, load, tokenizer_of

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INFINI_TRT_CACHE", str(shared_cache))
        runner = load(bundled_model(), "onnxruntime", log=lambda s: None)
    tok = tokenizer_of(bundled_model())

    def generate_alone(ids, max_new_tokens, **sampling):
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, eos_id=tok.eos_id, **sampling)
        return generate(runner, [ids], cfg, tok).sequences[0]

    yield generate_alone
    runner.close()


@pytest.fixture
def run_cli(server, shared_cache, monkeypatch):
    """run_cli(prompt, max_new_tokens, *more args) -> `infini-trt run BUNDLED --greedy
    --json`'s first sequence."""
    from infini_trt.runtime import bundled_model
    from infini_trt.runtime.cli import main

    monkeypatch.setenv("INFINI_TRT_CACHE", str(shared_cache))

    def run(prompt, max_new_tokens, *args):
        result = CliRunner().invoke(main, ["run", str(bundled_model()), "--prompt", prompt,
                                           "--greedy", "--max-new-tokens", str(max_new_tokens),
                                           "--json", "--no-progress", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["sequences"][0]

    return run


@pytest.fixture(scope="session")
def tokenizer():
    from infini_trt.runtime import bundled_model, tokenizer_of

    return tokenizer_of(bundled_model())
