"""What the CPU can do, from CPUID (numpy's probe) and /proc/cpuinfo where they agree."""
import shutil
import subprocess
import sys

import pytest

from infini_trt.runtime import cpu


def features(monkeypatch, numpy_names, model, flags):
    monkeypatch.setattr(cpu, "_numpy_features", lambda: {n: True for n in numpy_names})
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: (model, set(flags)))
    cpu.cpu_features.cache_clear()
    try:
        return cpu.cpu_features()
    finally:
        cpu.cpu_features.cache_clear()


def test_an_avx2_cpu_has_no_int8_dot_products_nor_bf16(monkeypatch):
    info = features(monkeypatch, ["AVX2", "FMA3"], "AMD EPYC 7B13", ["avx2", "fma", "sse2"])
    assert info["model"] == "AMD EPYC 7B13"
    assert (info["int8_dot"], info["bf16"], info["fp16"]) == (False, False, False)
    assert [n for n, present in info["features"].items() if present] == ["avx2", "fma"]


def test_avx_vnni_and_amx_come_from_cpuinfo_when_it_agrees(monkeypatch):
    info = features(monkeypatch, ["AVX2", "FMA3", "AVX512F", "AVX512VNNI", "AVX512BF16"],
                    "Xeon", ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                             "avx_vnni", "amx_bf16"])
    assert info["int8_dot"] and info["bf16"] and info["features"]["amx_bf16"]


def test_cpuinfo_of_another_cpu_is_not_used(monkeypatch):
    """An emulator shows the host's /proc/cpuinfo: its AVX-VNNI must not be believed."""
    info = features(monkeypatch, ["AVX2", "FMA3"], "Xeon", ["avx2", "fma", "avx512f",
                                                            "avx512_vnni", "avx_vnni"])
    assert not info["int8_dot"] and "emulated" in info["model"]


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                    reason="qemu-x86_64 (Debian's qemu-user) is not installed")
def test_an_emulated_zen3_is_seen_as_one():
    code = "from infini_trt.runtime.cpu import cpu_features as f; i = f(); " \
           "print(i['int8_dot'], i['bf16'], i['features']['avx2'], i['features']['avx512f'])"
    out = subprocess.run(["qemu-x86_64", "-cpu", "EPYC-Milan", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False", "True", "False"], out.stdout
