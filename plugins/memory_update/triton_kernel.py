"""The memory update (eq 8 linear, eq 9 delta) as one fused Triton kernel, beside its reference
(`reference.py`), and a torch-facing launcher.

    memory_update(memory, norm, key, value, rule, eps) -> (memory_out, norm_out)

    memory  float32 (B, H, dk, dv)      M_{s-1}
    norm    float32 (B, H, dk)          z_{s-1}
    key     float32|float16|bfloat16 (B, H, S, dk)   raw keys: sigma = ELU + 1 is applied here
    value   same dtype as key (B, H, S, dv)
    ->      memory_out float32 (B, H, dk, dv), norm_out float32 (B, H, dk): new buffers

One program per (b*h, dk tile, dv tile) writes one tile of M_s; it streams the segment in
chunks of BLOCK_S tokens, so any S works, and masks every edge, so dk, dv and S need not be
powers of two. All arithmetic is float32 (fp16/bf16 keys and values are widened on load), the
matmuls in IEEE fp32 (no TF32). The delta rule's old values sigma(K) M / (sigma(K) z) are read
from M_{s-1} (the input), never from the tile being written.

CUDA tensors run the compiled kernel; with TRITON_INTERPRET=1 (set before Triton is imported)
Triton's interpreter runs it on CPU tensors instead (slow: for tests). `compile_ptx` compiles
it ahead of time for a GPU architecture (the TensorRT plugin's aot_impl), needing no GPU.

The kernel's arguments follow TensorRT's AOT plugin convention: input pointers, then int32
scalars, then output pointers (then compile-time constants).
"""
from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass

import torch

from infini_trt.export.errors import InputError, MissingDependencyError

RULES = ("linear", "delta")
KEY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_S = 32          # tokens per chunk of the segment loop (any S works)
MAX_BLOCK = 64        # largest dk / dv tile
NUM_STAGES = 2        # software pipelining depth: keeps shared memory <= 48 KiB (see compile_ptx)
STATIC_SHARED_LIMIT = 48 * 1024   # a launch above this needs an opt-in that TensorRT may not do


def import_triton():
    try:
        import triton
        import triton.language  # noqa: F401
    except ImportError:
        raise MissingDependencyError("triton", "the fused memory-update kernel",
                                     "pip install triton (CPU tests: TRITON_INTERPRET=1)") from None
    return triton


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def tile_size(dim: int) -> int:
    """Tile along dk or dv: the next power of two, between 16 (tl.dot's minimum) and 64."""
    return min(max(16, _next_pow2(dim)), MAX_BLOCK)


@dataclass(frozen=True)
class LaunchConfig:
    """Compile-time constants and grid of one launch."""

    block_s: int
    block_k: int
    block_v: int
    delta: bool
    eps: float

    def grid(self, bh: int, dk: int, dv: int) -> tuple[int, int, int]:
        return (bh, -(-dk // self.block_k), -(-dv // self.block_v))

    def constexprs(self) -> dict:
        return {"EPS": self.eps, "DELTA": self.delta, "BLOCK_S": self.block_s,
                "BLOCK_K": self.block_k, "BLOCK_V": self.block_v}


def launch_config(rule: str, eps: float, dk: int, dv: int) -> LaunchConfig:
    if rule not in RULES:
        raise InputError(f"unknown update rule {rule!r}; choose one of {', '.join(RULES)}")
    delta = rule == "delta"
    # the linear rule ignores eps: one constant, so that one compiled kernel serves every eps
    return LaunchConfig(BLOCK_S, tile_size(dk), tile_size(dv), delta, float(eps) if delta else 1.0)


def _kernel_source():
    """The kernel as a plain Python function, wrapped by `_jit`."""
    import triton.language as tl

    def memory_update_kernel(memory_ptr, norm_ptr, key_ptr, value_ptr, S, DK, DV,
                             memory_out_ptr, norm_out_ptr, EPS: tl.constexpr,
                             DELTA: tl.constexpr, BLOCK_S: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)                         # one (batch, head)
        rows = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # dk indices of the tile
        cols = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)  # dv indices of the tile
        row_ok = rows < DK
        col_ok = cols < DV
        tile_ok = row_ok[:, None] & col_ok[None, :]
        m_in = memory_ptr + bh * DK * DV
        k_in = key_ptr + bh * S * DK
        v_in = value_ptr + bh * S * DV
        z_in = norm_ptr + bh * DK

        acc = tl.load(m_in + rows[:, None] * DV + cols[None, :], mask=tile_ok, other=0.0)
        key_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            t = s0 + tl.arange(0, BLOCK_S)
            t_ok = t < S
            k_ok = t_ok[:, None] & row_ok[None, :]
            k = tl.load(k_in + t[:, None] * DK + rows[None, :], mask=k_ok, other=0.0)
            k = k.to(tl.float32)
            sigma_k = tl.where(k_ok, tl.where(k > 0, k + 1.0, tl.exp(k)), 0.0)  # ELU + 1
            v = tl.load(v_in + t[:, None] * DV + cols[None, :],
                        mask=t_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            if DELTA:
                # eq 9: v - sigma(K) M_{s-1} / max(sigma(K) z_{s-1}, eps), over all of dk
                numerator = tl.zeros([BLOCK_S, BLOCK_V], dtype=tl.float32)
                denominator = tl.zeros([BLOCK_S], dtype=tl.float32)
                for i0 in range(0, DK, BLOCK_K):
                    i = i0 + tl.arange(0, BLOCK_K)
                    i_ok = i < DK
                    ki_ok = t_ok[:, None] & i_ok[None, :]
                    ki = tl.load(k_in + t[:, None] * DK + i[None, :], mask=ki_ok,
                                 other=0.0).to(tl.float32)
                    sigma_ki = tl.where(ki_ok, tl.where(ki > 0, ki + 1.0, tl.exp(ki)), 0.0)
                    mi = tl.load(m_in + i[:, None] * DV + cols[None, :],
                                 mask=i_ok[:, None] & col_ok[None, :], other=0.0)
                    zi = tl.load(z_in + i, mask=i_ok, other=0.0)
                    numerator += tl.dot(sigma_ki, mi, input_precision="ieee")
                    denominator += tl.sum(sigma_ki * zi[None, :], axis=1)
                v = v - numerator / tl.maximum(denominator, EPS)[:, None]
            acc += tl.dot(tl.trans(sigma_k), v, input_precision="ieee")    # eq 8 / eq 9
            key_sum += tl.sum(sigma_k, axis=0)                             # z += sum_t sigma(K_t)
        tl.store(memory_out_ptr + bh * DK * DV + rows[:, None] * DV + cols[None, :], acc,
                 mask=tile_ok)
        if tl.program_id(2) == 0:                      # the first dv tile of a dk tile writes z
            z = tl.load(z_in + rows, mask=row_ok, other=0.0)
            tl.store(norm_out_ptr + bh * DK + rows, z + key_sum, mask=row_ok)

    return memory_update_kernel


@functools.cache
def _jit():
    """The kernel as `triton.jit` makes it: compiled for CUDA, or interpreted on the CPU when
    TRITON_INTERPRET=1 was set before Triton was first imported (Triton fixes the mode of its
    own library functions at import)."""
    triton = import_triton()
    return triton.jit(_kernel_source())


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_jit(), InterpretedFunction)


def check_inputs(memory: torch.Tensor, norm: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> tuple[int, int, int, int, int]:
    """-> (B, H, S, dk, dv), or InputError naming what disagrees with the op's contract."""
    if memory.dim() != 4 or norm.dim() != 3 or key.dim() != 4 or value.dim() != 4:
        raise InputError("memory_update takes memory (B,H,dk,dv), norm (B,H,dk), key (B,H,S,dk), "
                         f"value (B,H,S,dv); got {tuple(memory.shape)}, {tuple(norm.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    b, h, dk, dv = memory.shape
    s = key.shape[2]
    want = {"norm": (b, h, dk), "key": (b, h, s, dk), "value": (b, h, s, dv)}
    for name, t in (("norm", norm), ("key", key), ("value", value)):
        if tuple(t.shape) != want[name]:
            raise InputError(f"memory_update: {name} has shape {tuple(t.shape)}, expected "
                             f"{want[name]} for memory {tuple(memory.shape)}")
    if memory.dtype != torch.float32 or norm.dtype != torch.float32:
        raise InputError(f"memory_update: memory and norm must be float32, got {memory.dtype}, "
                         f"{norm.dtype}")
    if key.dtype not in KEY_DTYPES or value.dtype != key.dtype:
        raise InputError(f"memory_update: key and value must share one of float32, float16, "
                         f"bfloat16; got {key.dtype}, {value.dtype}")
    devices = {t.device for t in (memory, norm, key, value)}
    if len(devices) != 1:
        raise InputError(f"memory_update: inputs on several devices {sorted(map(str, devices))}")
    return b, h, s, dk, dv


def memory_update(memory: torch.Tensor, norm: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, rule: str, eps: float,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_{s-1}, z_{s-1}, raw K, V) -> (M_s, z_s) with the fused kernel; see the module doc.

    `out` = (memory_out, norm_out): contiguous float32 buffers to write instead of new ones
    (they must not alias the inputs). Launches on the current CUDA stream.
    """
    b, h, s, dk, dv = check_inputs(memory, norm, key, value)
    cfg = launch_config(rule, eps, dk, dv)
    memory, norm = memory.contiguous(), norm.contiguous()
    key, value = key.contiguous(), value.contiguous()
    if out is None:
        out = (torch.empty_like(memory), torch.empty_like(norm))
    memory_out, norm_out = out
    for name, t, like in (("memory_out", memory_out, memory), ("norm_out", norm_out, norm)):
        if t.shape != like.shape or t.dtype != torch.float32 or not t.is_contiguous():
            raise InputError(f"memory_update: {name} must be a contiguous float32 tensor of "
                             f"shape {tuple(like.shape)}")
    if b * h == 0 or dk == 0 or dv == 0:
        return memory_out, norm_out
    if memory.device.type != "cuda" and not interpreting():
        raise InputError(f"memory_update runs on CUDA tensors, or on {memory.device.type} "
                         f"tensors under Triton's interpreter (TRITON_INTERPRET=1 set before "
                         f"Triton is imported)")
    _jit()[cfg.grid(b * h, dk, dv)](memory, norm, key, value, s, dk, dv, memory_out, norm_out,
                                     num_stages=NUM_STAGES, **cfg.constexprs())
    return memory_out, norm_out


# ---- ahead-of-time compilation (the TensorRT plugin's aot_impl) -----------------------------
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class CompiledKernel:
    name: str                 # the PTX entry point
    ptx: str
    num_warps: int
    shared_mem: int           # bytes of dynamic shared memory per program
    config: LaunchConfig


def compile_ptx(key_dtype: torch.dtype, rule: str, eps: float, dk: int, dv: int,
                arch: int) -> CompiledKernel:
    """Compile the kernel for sm_<arch> (e.g. 89) to PTX, for keys/values of `key_dtype`.

    Needs Triton with its CUDA backend (bundled LLVM and ptxas), not a GPU.
    """
    triton = import_triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = launch_config(rule, eps, dk, dv)
    kv = TRITON_DTYPES[key_dtype]
    if interpreting():
        raise InputError("the memory-update kernel cannot be compiled ahead of time while "
                         "TRITON_INTERPRET=1; unset it")
    fn = _jit()
    signature = {"memory_ptr": "*fp32", "norm_ptr": "*fp32", "key_ptr": f"*{kv}",
                 "value_ptr": f"*{kv}", "S": "i32", "DK": "i32", "DV": "i32",
                 "memory_out_ptr": "*fp32", "norm_out_ptr": "*fp32"}
    constexprs = cfg.constexprs()
    signature.update({name: "constexpr" for name in constexprs})
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    else:                                               # Triton < 3.3
        source = ASTSource(fn=fn, signature=signature, constants=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", int(arch), 32),
                              options={"num_stages": NUM_STAGES})
    meta = compiled.metadata
    if meta.shared > STATIC_SHARED_LIMIT:
        raise RuntimeError(f"memory-update kernel needs {meta.shared} bytes of shared memory")
    ptx = strip_scratch_params(compiled.asm["ptx"], meta.name, len(signature) - len(constexprs),
                               meta)
    return CompiledKernel(meta.name, ptx, meta.num_warps, meta.shared, cfg)


def strip_scratch_params(ptx: str, name: str, n_args: int, meta) -> str:
    """Drop the scratch-pointer parameters that Triton >= 3.3 appends after the kernel's own.

    TensorRT's AOT launch passes exactly: input pointers, int32 scalars, output pointers. The
    extra parameters are unused when the kernel asks for no scratch memory (checked here), so
    their declarations can go; a kernel that did need scratch could not run under TensorRT.
    """
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, field, 0):
            raise RuntimeError(f"memory-update kernel needs {field}={getattr(meta, field)}; "
                               f"TensorRT's AOT launch cannot provide it")
    pattern = re.compile(rf"\s*\.param [^\n]*?\b{re.escape(name)}_param_(\d+),?")
    head_end = ptx.index(")", ptx.index(f".entry {name}("))
    head, body = ptx[:head_end], ptx[head_end:]
    extra = [m for m in pattern.finditer(head) if int(m.group(1)) >= n_args]
    for m in extra:
        if re.search(rf"\b{re.escape(name)}_param_{m.group(1)}\b", body):
            raise RuntimeError(f"PTX parameter {m.group(1)} of {name} is used; cannot drop it")
    for m in reversed(extra):
        head = head[:m.start()] + head[m.end():]
    head = head.rstrip().rstrip(",") + "\n"
    return head + body
