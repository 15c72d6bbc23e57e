"""What long loops share: a progress bar in tokens, and a timer."""
from __future__ import annotations

import time


def progress_bar(total: int, desc: str, enabled: bool | None = None):
    """A tqdm bar in tokens (tokens/s and ETA); shown on terminals unless enabled=False."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True,
                disable=(None if enabled is None else not enabled), leave=False)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
