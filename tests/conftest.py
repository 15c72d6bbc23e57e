import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))      # tests/naive.py, tests/helpers.py

from infini_trt.export import InfiniLM, init_weights, preset  # noqa: E402


def random_model(cfg, seed=0, dtype=torch.float64, gate_spread=2.0):
    """A model with random weights and random (not initial) gates, so memory and local
    attention both carry weight in the output."""
    model = init_weights(InfiniLM(cfg), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.beta.copy_(torch.randn(cfg.n_heads, generator=gen) * gate_spread)
            # larger than init: the memory branch must matter at test sizes
            layer.attn.qkv_proj.weight.mul_(4.0)
    return model.to(dtype).eval()


@pytest.fixture
def tiny_cfg():
    return preset("tiny")


@pytest.fixture
def tiny_model(tiny_cfg):
    return random_model(tiny_cfg)
