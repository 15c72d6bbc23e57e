import os
import sys

import pytest
import torch

# Without a GPU, Triton runs kernels (on CPU tensors) only in its interpreter, a mode fixed when
# Triton is first imported (torch.export imports it): set it before any test, for tests/plugins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))      # tests/naive.py, tests/helpers.py

# What test modules import lives in helpers.py, not here: `from conftest import` names the
# conftest.py imported last (tests/serving's once that folder is collected).
from helpers import random_model  # noqa: E402
from infini_trt.export import preset  # noqa: E402


@pytest.fixture
def tiny_cfg():
    return preset("tiny")


@pytest.fixture
def tiny_model(tiny_cfg):
    return random_model(tiny_cfg)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(cfg, seed=0, dtype=torch.float32, memory_op="plugin", graphs=all, opset=20,
    decode_attention="portable") -> (checkpoint_dir, export_dir) of a random model, exported
    once per session."""
    from infini_trt.export import save_checkpoint
    from infini_trt.export.files import sha256_file
    from infini_trt.export.onnx_export import export_model

    made = {}

    def make(cfg, seed=0, dtype=torch.float32, memory_op="plugin",
             graphs=("segment", "prefill", "extend", "fold"), opset=20,
             decode_attention="portable"):
        key = (cfg, seed, dtype, memory_op, opset, decode_attention)
        if key not in made or not set(graphs) <= made[key][0]:   # reuse a superset export
            root = tmp_path_factory.mktemp("exported")
            model = random_model(cfg, seed=seed, dtype=dtype)
            save_checkpoint(model, root / "ckpt")
            weights = sha256_file(root / "ckpt" / "model.safetensors")
            export_model(model, root / "onnx", memory_op_mode=memory_op, graphs=tuple(graphs),
                         opset=opset, decode_attention=decode_attention,
                         source={"checkpoint": str(root / "ckpt"), "weights_sha256": weights})
            made[key] = (set(graphs), (root / "ckpt", root / "onnx"))
        return made[key][1]

    return make


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """An export cache for the tests that export the bundled model (made once per session):
    monkeypatch.setenv("INFINI_TRT_CACHE", str(shared_cache))."""
    return tmp_path_factory.mktemp("shared-cache")
