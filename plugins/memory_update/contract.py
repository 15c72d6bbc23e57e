"""The memory-update op's contract, shared by the exporter, the ONNX function, the kernel and
the TensorRT plugin. Change it only together with VERSION.

    inputs   memory  float32            (B, H, dk, dv)   M_{s-1}
             norm    float32            (B, H, dk)       z_{s-1}
             key     float32|16|bf16    (B, H, S, dk)    raw keys (sigma is applied inside)
             value   same dtype as key  (B, H, S, dv)
    outputs  memory_out float32 (B, H, dk, dv), norm_out float32 (B, H, dk); new buffers,
             never aliasing the inputs.
    attributes
             plugin_namespace (string) = NAMESPACE, plugin_version (string) = VERSION: how the
             TensorRT ONNX parser finds the plugin; ignored by the math.
             eps (float, delta rule only): clamp of the denominator sigma(K) z.

One op type per update rule, so that each op has one meaning and its ONNX function matches it
by construction: LinearMemoryUpdate (eq 8) and DeltaMemoryUpdate (eq 9).
"""
from __future__ import annotations

NAMESPACE = "infini"          # ONNX domain and TensorRT plugin namespace
VERSION = "1"                 # TensorRT plugin version; the ONNX domain version is int(VERSION)
OP_TYPES = {"linear": "LinearMemoryUpdate", "delta": "DeltaMemoryUpdate"}
INPUTS = ("memory", "norm", "key", "value")
OUTPUTS = ("memory_out", "norm_out")


def op_type(rule: str) -> str:
    """The ONNX op type (= TensorRT plugin name) of an update rule."""
    return OP_TYPES[rule]


def attributes(rule: str, eps: float) -> dict:
    """The attributes that the exporter writes on each memory-update node."""
    attrs = {"plugin_namespace": NAMESPACE, "plugin_version": VERSION}
    if rule == "delta":
        attrs["eps"] = float(eps)
    return attrs
