"""Token counts as users write them and read them: 4096, 4K, 1M (K = 1024 tokens, M = 1024 K)."""
from __future__ import annotations

import re

from infini_trt.export.errors import InputError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20}


def parse_length(text: str) -> int:
    """'4K' -> 4096, '1M' -> 1048576, '1000' -> 1000; InputError for anything else or 0."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not match or int(match.group(1)) == 0:
        raise InputError(f"bad length {text.strip()!r} in --lengths; write e.g. 4096, 4K, 16K, "
                         f"1M")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_lengths(text: str) -> list[int]:
    """'1K,4K,16K,1M' -> [1024, 4096, 16384, 1048576]."""
    return [parse_length(item) for item in text.split(",")]


def length_label(length: int) -> str:
    """4096 -> '4K', 1048576 -> '1M', 1000 -> '1000'."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if length % size == 0:
            return f"{length // size}{unit}"
    return str(length)
