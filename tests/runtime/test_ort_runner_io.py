"""The ONNX Runtime runner's IO: bindings kept between calls, inputs copied into buffers made
once per reset, and logits that belong to the caller."""
import numpy as np

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
    kept = first.copy()
    bound = dict(runner.bindings["extend"].bound)
    for i in range(1, 6):
        logits = runner.extend(tokens + i, position + i, ones)
        now = runner.bindings["extend"].bound
        for name in ("input_ids", "start", "memory", "norm", "k_cache_0", "v_cache_1", "k_new"):
            assert now[name] == bound[name], name          # same buffer: not re-bound
        assert runner.caches.window == TINY.segment_len    # 32 slots: one window (64 slots)
        assert now["input_ids"][0] == runner.ids.flat.ctypes.data
        assert not np.shares_memory(logits, first)
        # the same view object for the same shape: taken as bound without a look
        assert runner.bindings["extend"].arrays["input_ids"] is runner.ids.load(tokens + i)
        # decoding's logits: one output array kept bound, each caller given a copy of it
        output = runner._kept_logits[(2, 1, TINY.vocab_size)]
        assert now["logits"][0] == output.ctypes.data and not np.shares_memory(logits, output)
    assert np.array_equal(first, kept)                        # the caller's logits stay intact
    binding = runner.bindings["extend"]
    runner.fold(np.array([True, False]))
    runner.extend(tokens, np.zeros(2, np.int64), ones)
    assert runner.bindings["extend"] is binding            # one IOBinding per graph


def test_decode_graph_reads_the_caches_with_plain_matmuls(exported, tmp_path, monkeypatch):
    """No scale between the queries and the matmul over the cached keys (it is in the rotation
    tables): with one, ONNX Runtime fused it into a FusedMatMul that read the caches at half
    the speed (see InfiniLM.extend). Read back the graph as ONNX Runtime optimized it. One KV
    head per head (as `small`): under GQA a reshape in between kept the fusion off anyway."""
    import onnx

    from infini_trt.runtime.runners import ort_runner

    cfg = TINY.replace(n_kv_heads=TINY.n_heads)
    _, out = exported(cfg, graphs=("extend",))
    made = ort_runner.session_options

    def keep_optimized(ort, *args):
        so = made(ort, *args)
        so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        return so

    monkeypatch.setattr(ort_runner, "session_options", keep_optimized)
    OrtRunner(out, threads=1).session("extend")
    # its weights are references into the export's weights file, which is not beside it
    extend = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    reads_cache = [n.op_type for n in extend.graph.node if n.op_type != "Shape"   # the window
                   and any(i.startswith("k_cache_") for i in n.input)]
    assert reads_cache == ["MatMul"] * cfg.n_layers
