"""examples/passkey: the parallel training form against `InfiniLM.forward` (float64), the
write-weight augmentation, the training batches, and a two-step training run."""
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_close, random_model, random_tokens
from infini_trt.export import load_checkpoint
from infini_trt.runtime.passkey_data import ANSWER_TOKEN, KEY_TOKEN

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "passkey"


@pytest.fixture(scope="module")
def example():
    """The example's modules (data, parallel, train), imported from its folder."""
    sys.path.insert(0, str(EXAMPLE))
    saved = {name: sys.modules.pop(name) for name in ("data", "parallel", "train")
             if name in sys.modules}
    try:
        yield {name: importlib.import_module(name) for name in ("data", "parallel", "train")}
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in ("data", "parallel", "train"):
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def passkey_cfg(example):
    return example["train"].passkey_config()


@pytest.mark.parametrize("shape", [
    pytest.param({}, id="passkey-shape"),
    pytest.param({"n_kv_heads": 2, "attn_bias": False}, id="gqa"),
])
def test_parallel_forward_equals_model_forward(example, passkey_cfg, shape):
    cfg = passkey_cfg.replace(segment_len=8, **shape)
    model = random_model(cfg, seed=11)                      # float64
    tokens = random_tokens(cfg.vocab_size, 2, 5 * 8, seed=12)
    want, want_m, want_z = model(tokens)
    got, got_m, got_z = example["parallel"].parallel_forward(model, tokens)
    assert_close(want, got, 1e-10, what="logits")
    assert_close(want_m, got_m, 1e-10, what="memory")
    assert_close(want_z, got_z, 1e-10, what="norm")
    ones = torch.ones(2, 5 * 8, dtype=torch.float64)
    again, _, _ = example["parallel"].parallel_forward(model, tokens, ones)
    assert_close(want, again, 1e-12, what="logits with unit write weights")


def test_write_weight_counts_a_segment_that_many_times(example, passkey_cfg):
    """Weight 3 on the tokens of segment 1 == the sequence with segment 1 written three times,
    for the first layer's memory (whose writes depend only on the tokens)."""
    cfg = passkey_cfg.replace(segment_len=8)
    model = random_model(cfg, seed=13)
    tokens = random_tokens(cfg.vocab_size, 1, 4 * 8, seed=14)
    weights = torch.ones(1, 4 * 8, dtype=torch.float64)
    weights[:, 8:16] = 3.0
    _, got_m, got_z = example["parallel"].parallel_forward(model, tokens, weights)
    repeated = torch.cat([tokens[:, :8]] + [tokens[:, 8:16]] * 3 + [tokens[:, 16:]], dim=1)
    _, want_m, want_z = model(repeated)
    assert_close(want_m[0], got_m[0], 1e-12, what="layer-0 memory")
    assert_close(want_z[0], got_z[0], 1e-12, what="layer-0 norm")
    _, plain_m, _ = model(tokens)
    assert (plain_m[0] - got_m[0]).abs().max() > 1e-3          # the weight did something


def test_training_batch(example):
    data = example["data"]
    gen = data.generator(64)
    batch = data.make_batch(gen, np.random.default_rng(0), 6, 8 * 64, weights=(0.5, 100.0))
    assert batch.ids.shape == batch.targets.shape == (6, 512)
    assert (batch.answer.sum(dim=1) == 5).all()
    assert (batch.targets[batch.answer].view(6, 5) == batch.ids[:, -5:]).all()
    assert not (batch.lm_mask & batch.answer).any()
    assert ((batch.lm_mask.sum(dim=1)) == 511 - 5 - 5).all()          # minus key digits
    kinds = batch_kinds(gen, np.random.default_rng(0), 6, 512)
    key = torch.from_numpy(kinds == KEY_TOKEN)
    weights = batch.write_weights
    assert (weights[key] == 1).all()                      # the key is written once
    others = weights.masked_fill(key, float("nan"))
    assert (others.nan_to_num(0).amax(1) == others.nan_to_num(1e9).amin(1)).all()   # one/row
    assert (weights >= 0.5).all() and (weights <= 100).all() and weights.std() > 0
    assert ((kinds == KEY_TOKEN).sum(1) == gen.key_len).all()
    assert ((kinds == ANSWER_TOKEN).sum(1) == 5).all()


def batch_kinds(gen, rng, count, length):
    return np.stack([p.kinds for p in gen.batch(rng, count, length)])


def test_two_training_steps_write_a_loadable_checkpoint(example, tmp_path):
    out = tmp_path / "passkey"
    example["train"].main(["--out", str(out), "--steps", "2", "--tokens-per-step", "256",
                           "--eval-every", "1000", "--threads", "1"])
    model = load_checkpoint(out)
    assert (out / "tokenizer.json").is_file()
    assert model.cfg == example["train"].passkey_config()


def test_prompts_script_writes_the_generators_prompts(tmp_path):
    """examples/passkey/prompts.py: input for `validate --tokens`, the evaluation's prompts."""
    import subprocess

    from infini_trt.runtime.models import bundled_model
    from infini_trt.runtime.passkey import open_task

    out = tmp_path / "p.npy"
    done = subprocess.run([sys.executable, str(EXAMPLE / "prompts.py"), str(out), "--length",
                           "256", "--count", "3", "--seed", "4"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ids = np.load(out)
    gen, _, _ = open_task(bundled_model(), "256", "middle")
    want = gen.batch(np.random.default_rng(4), 3, 256)
    assert ids.shape == (3, 256) and ids.dtype == np.int64
    assert np.array_equal(ids, np.stack([p.ids for p in want]))


def test_contexts_script_answers_from_a_context_as_from_the_whole_prompt(tmp_path,
                                                                         shared_cache):
    """examples/passkey/contexts.py: the document read once, then the question alone, gives the
    answer the whole prompt gives, and the context has the same size after 1K and after all."""
    import os
    import subprocess

    done = subprocess.run([sys.executable, str(EXAMPLE / "contexts.py"), str(tmp_path),
                           "--length", "4K"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "INFINI_TRT_CACHE": str(shared_cache)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sum("answer right" in line for line in lines) == 2, done.stdout
    sizes = [line for line in lines if line.startswith("context file:")][0]
    first, last = (int(part.split(" bytes")[0].replace(",", "")) for part in
                   sizes.removeprefix("context file: ").split(", "))
    assert first == last, sizes
