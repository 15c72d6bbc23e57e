"""The backends a model runs on, named once. The runners (`runners.opening`), every command's
--backend choice and the subjects of `bench` (`bench_subjects`) are made from these names.

Kept free of heavy imports: the command line builds its options from it at start-up.
"""
from __future__ import annotations

BACKENDS = ("torch", "onnxruntime", "tensorrt")

# the reduced precisions of a backend that `bench` measures as "backend:variant" (the ONNX
# Runtime variants are the quantization methods: export/quantize.py METHODS)
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def bench_backends(quantize_methods: tuple[str, ...]) -> tuple[str, ...]:
    """Every backend name `bench --backends` takes: the plain backends, torch in its reduced
    dtypes, ONNX Runtime on each quantized export."""
    return ("torch", *(f"torch:{v}" for v in TORCH_DTYPES), "onnxruntime",
            *(f"onnxruntime:{method}" for method in quantize_methods), "tensorrt")
