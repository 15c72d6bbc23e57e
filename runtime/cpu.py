"""What this CPU can do: the instruction sets that decide which kernels torch and ONNX Runtime
run (and so their speed and, for 8-bit integer GEMMs, their rounding), for every report that
publishes a figure.

The features come from numpy's own CPUID probe (what the running process can execute, also
under an emulator), and the few numpy does not name (AVX-VNNI, AMX) from /proc/cpuinfo when
that file describes the same CPU (an emulator such as qemu-user shows the host's file: where its
flags disagree with the CPUID probe, the file is not used).
"""
from __future__ import annotations

import functools
import platform

# the features that change a kernel choice, as reported: name -> what it is for
NOTABLE = {
    "avx2": "256-bit SIMD",
    "fma": "fused multiply-add",
    "avx512f": "512-bit SIMD",
    "avx512_vnni": "int8 dot products (AVX-512 VNNI)",
    "avx_vnni": "int8 dot products (AVX-VNNI)",
    "avx512_bf16": "bfloat16 dot products",
    "avx512_fp16": "float16 arithmetic",
    "amx_bf16": "AMX bfloat16 tiles",
    "amx_int8": "AMX int8 tiles",
}
_NUMPY_NAMES = {"avx2": "AVX2", "fma": "FMA3", "avx512f": "AVX512F",
                "avx512_vnni": "AVX512VNNI", "avx512_bf16": "AVX512BF16",
                "avx512_fp16": "AVX512FP16"}


def _numpy_features() -> dict[str, bool]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:                                   # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return dict(__cpu_features__)


def _cpuinfo() -> tuple[str | None, set[str]]:
    """(model name, flags) from /proc/cpuinfo ((None, empty) where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None, set()
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


@functools.lru_cache(maxsize=1)
def cpu_features() -> dict:
    """{"model": str, "machine": str, "features": {name: bool for NOTABLE}, "int8_dot": bool,
    "bf16": bool, "fp16": bool}: int8_dot, bf16 and fp16 say whether the CPU has instructions
    for that arithmetic (without them torch emulates bf16/fp16 GEMMs, tens of times slower
    than fp32, and ONNX Runtime's u8 x s8 GEMM sums pairs of products in 16 bits)."""
    model, flags = _cpuinfo()
    numpy_features = _numpy_features()
    if flags and any((name in flags) != bool(numpy_features.get(numpy_name, False))
                     for name, numpy_name in _NUMPY_NAMES.items()):
        model, flags = "an emulated or virtual CPU (/proc/cpuinfo describes another)", set()
    features = {}
    for name in NOTABLE:
        if name in _NUMPY_NAMES:
            features[name] = bool(numpy_features.get(_NUMPY_NAMES[name], False))
        else:
            features[name] = name in flags
    return {"model": model or platform.processor() or platform.machine(),
            "machine": platform.machine(),
            "features": features,
            "int8_dot": features["avx512_vnni"] or features["avx_vnni"],
            "bf16": features["avx512_bf16"] or features["amx_bf16"],
            "fp16": features["avx512_fp16"]}


def cpu_summary() -> str:
    """One line for a report: 'Intel(R) Xeon(R) Processor: avx2 fma avx512f avx512_vnni ...
    (int8 dot products: yes, bf16: yes)'."""
    info = cpu_features()
    have = " ".join(name for name, present in info["features"].items() if present) or "none"
    yes = {True: "yes", False: "no"}
    return (f"{info['model']}: {have} (int8 dot products: {yes[info['int8_dot']]}, "
            f"bf16: {yes[info['bf16']]}, fp16: {yes[info['fp16']]})")
