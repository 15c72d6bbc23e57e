"""Error metrics between a reference tensor and a candidate, as used by tests and `validate`.

relative RMS = RMS(candidate - reference) / RMS(reference)  (the fla convention); max abs;
cosine similarity; non-finite values always fail.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Errors:
    max_abs: float
    rel_rms: float
    cosine: float
    finite: bool         # candidate has no NaN/Inf where the reference is finite

    def within(self, rel_rms: float, max_abs: float | None = None) -> bool:
        ok = self.finite and self.rel_rms <= rel_rms
        return ok and (max_abs is None or self.max_abs <= max_abs)

    def to_dict(self) -> dict:
        return asdict(self)


def _as_f64(x) -> np.ndarray:
    if hasattr(x, "detach"):          # torch tensor, any dtype (bf16 included)
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def errors(reference, candidate) -> Errors:
    """Compare two arrays/tensors of the same shape, in float64."""
    ref, out = _as_f64(reference), _as_f64(candidate)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs candidate {out.shape}")
    finite = bool(np.isfinite(out).all() or not np.isfinite(ref).all())
    if not finite or out.size == 0:
        return Errors(float("inf") if not finite else 0.0, float("inf") if not finite else 0.0,
                      float("nan") if not finite else 1.0, finite)
    diff = out - ref
    max_abs = float(np.abs(diff).max())
    ref_rms = float(np.sqrt(np.mean(ref * ref)))
    diff_rms = float(np.sqrt(np.mean(diff * diff)))
    rel_rms = diff_rms / ref_rms if ref_rms > 0 else (0.0 if diff_rms == 0 else float("inf"))
    norms = float(np.linalg.norm(ref) * np.linalg.norm(out))
    cosine = float(np.dot(ref.ravel(), out.ravel()) / norms) if norms > 0 else float(diff_rms == 0)
    return Errors(max_abs, rel_rms, cosine, finite)
