"""Memory: peak use of this process, as reported by the kernel, and sizes for people."""
from __future__ import annotations

import resource
import sys


def format_bytes(n: float) -> str:
    """'512.0 KiB', '3.2 MiB', '20.1 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"            # pragma: no cover


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cuda_torch():
    """The torch module when this process uses CUDA through it, else None (torch is not
    imported to find out: a process that uses CUDA through torch has imported it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch


def peak_gpu_bytes() -> int | None:
    """torch's peak CUDA allocation, when CUDA is in use."""
    torch = cuda_torch()
    return None if torch is None else int(torch.cuda.max_memory_allocated())
