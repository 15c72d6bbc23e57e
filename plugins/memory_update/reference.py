"""The op's CPU reference: the project's pure math, re-exported under the op's contract."""
from infini_trt.export.reference import memory_update

__all__ = ["memory_update"]
