"""The segment streaming loop: any-length token sequences through any runner, one segment
at a time, at constant memory."""
from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import torch

from .runners.base import Runner


def progress_bar(total: int, desc: str, enabled: bool | None = None):
    """A tqdm bar in tokens (tokens/s and ETA); shown on terminals unless enabled=False."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True,
                disable=(None if enabled is None else not enabled), leave=False)


def stream(runner: Runner, tokens: np.ndarray, reset: bool = True,
           progress: bool | None = None, desc: str = "prefill"
           ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, logits (B, S, V)) for each segment of tokens (B, T), in order.

    The state is carried by the runner; with reset=False the stream continues from it.
    """
    tokens = np.asarray(tokens)
    batch, total = tokens.shape
    if reset:
        runner.reset(batch)
    n = runner.config.segment_len
    with progress_bar(batch * total, desc, progress) as bar:
        for start in range(0, total, n):
            logits = runner.step(tokens[:, start:start + n])
            bar.update(batch * logits.shape[1])
            yield start, logits


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
