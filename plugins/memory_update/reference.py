"""The op's CPU reference: the project's pure math, re-exported under the op's contract, and
the random inputs that the kernel's checks (tests, scripts/gpu_check.py) feed it."""
import torch

from infini_trt.export.reference import memory_update

__all__ = ["memory_update", "random_inputs"]


def random_inputs(b: int, h: int, s: int, dk: int, dv: int, dtype: torch.dtype,
                  device: str | torch.device = "cpu", seed: int = 0, empty: bool = False
                  ) -> list[torch.Tensor]:
    """[memory (b,h,dk,dv), norm (b,h,dk), key (b,h,s,dk), value (b,h,s,dv)]: a random state
    (z > 0, as after some segments; or M = z = 0 with `empty`) in fp32, raw keys/values in
    `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    memory = torch.zeros(b, h, dk, dv) if empty else torch.randn(b, h, dk, dv, generator=gen)
    norm = torch.zeros(b, h, dk) if empty else torch.rand(b, h, dk, generator=gen) * 8
    key = (torch.randn(b, h, s, dk, generator=gen) * 1.5).to(dtype)
    value = torch.randn(b, h, s, dv, generator=gen).to(dtype)
    return [t.to(device) for t in (memory, norm, key, value)]
