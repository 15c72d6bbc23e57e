"""The ONNX Runtime runner's IO: bindings kept between calls, inputs copied into buffers made
once per reset, and logits that belong to the caller."""
import numpy as np
import torch

from infini_trt.export import preset
from infini_trt.runtime.runners.ort_runner import OrtRunner

TINY = preset("tiny")


def test_decoding_reuses_buffers_and_bindings(exported):
    _, out = exported(TINY)
    runner = OrtRunner(out, threads=1)
    runner.reset(2)
    runner.step(np.zeros((2, TINY.segment_len), np.int64))
    position, ones = np.zeros(2, np.int64), np.ones(2, np.int64)
    tokens = np.array([[1], [2]])
    first = runner.extend(tokens, position, ones)
    kept = first.clone()
    bound = dict(runner.bindings["extend"].bound)
    for i in range(1, 6):
        logits = runner.extend(tokens + i, position + i, ones)
        now = runner.bindings["extend"].bound
        for name in ("input_ids", "start", "memory", "norm", "k_cache_0", "v_cache_1", "k_new"):
            assert now[name] == bound[name], name          # same buffer: not re-bound
        assert now["input_ids"][0] == runner.ids.data_ptr()
        assert logits.data_ptr() != first.data_ptr()
    assert torch.equal(first, kept)                        # the caller's logits stay intact
    binding = runner.bindings["extend"]
    runner.fold(np.array([True, False]))
    runner.extend(tokens, np.zeros(2, np.int64), ones)
    assert runner.bindings["extend"] is binding            # one IOBinding per graph
