"""bench_report.derive on a made-up report: what a decoded token reads per weight, by precision."""
from __future__ import annotations

import pytest

from infini_trt.export import preset
from infini_trt.runtime import roofline
from infini_trt.runtime.bench_report import BYTES, derive

TINY = preset("tiny")


def _report(precisions: list[str], batch: int = 2) -> dict:
    point = {"length": 2 * TINY.segment_len, "batch": batch, "prefill_s": 0.5,
             "prefill_tokens_per_s": 100.0, "decode_tokens": 4 * batch,
             "decode_tokens_per_s": 50.0}
    return {"config": TINY.to_dict(),
            "limits": {"matmul_fp32_flops_per_s": 1e10, "memory_read_bytes_per_s": 1e10},
            "subjects": [{"name": f"onnxruntime:{p}", "kind": "onnxruntime", "infini": True,
                          "precision": p, "points": [dict(point)]} for p in precisions]}


@pytest.mark.parametrize("precision, per_weight", [("float32", 4), ("float16", 2),
                                                   ("int8", 1), ("int8-rows", 1),
                                                   ("int4", 0.5 + 4 / 32)])
def test_decode_bytes_count_the_weights_at_their_width(precision, per_weight):
    """int4 reads half a byte a weight (and a float32 scale per block of 32), not one."""
    assert BYTES[precision] == per_weight
    point = derive(_report([precision]))["subjects"][0]["points"][0]
    moved = point["decode_bytes_per_token"]
    assert moved["weights"] == pytest.approx(roofline.matmul_params(TINY) * per_weight / 2)
    assert point["decode_weight_bandwidth_use"] == pytest.approx(moved["weights"] * 50.0 / 1e10)


def test_quantized_exports_keep_fp32_caches_and_state():
    """The caches and the state stay float32 whatever the weights' width."""
    subjects = derive(_report(["float32", "int8", "int4"]))["subjects"]
    fp32, int8, int4 = (s["points"][0]["decode_bytes_per_token"] for s in subjects)
    assert int4["weights"] < int8["weights"] < fp32["weights"]
    assert fp32["cache"] == int8["cache"] == int4["cache"]
    assert fp32["state"] == int8["state"] == int4["state"]
