"""The memory update as a TensorRT Python plugin (QDP: `tensorrt.plugin`), one per update rule.

    from infini_trt.plugins.memory_update.tensorrt_plugin import register
    import tensorrt
    register(tensorrt)            # before parsing the ONNX graph or deserializing an engine

registers `infini::LinearMemoryUpdate` and `infini::DeltaMemoryUpdate`, version "1": the op
type, `plugin_namespace` and `plugin_version` that the exported ONNX node carries, so the ONNX
parser (TensorRT >= 10.7) puts the plugin where the node is instead of inlining its function.

Each op has
    register  the I/O description: memory_out like memory, norm_out like norm (new buffers, no
              aliasing); attribute `eps` (float) for the delta rule only, so that the parser
              copies exactly the node's `eps` and ignores plugin_namespace/plugin_version.
    impl      JIT: a Python callback at enqueue that launches the Triton kernel on TensorRT's
              stream (the engine then needs this module imported to run).
    aot_impl  AOT (TensorRT >= 10.9): the kernel compiled to PTX at build time, launched by
              TensorRT itself, so the engine runs without Python (e.g. under trtexec).

This file does not use `from __future__ import annotations`: QDP reads the annotations as
objects when the decorators run.
"""
import contextlib
import importlib
from typing import Tuple, Union

from infini_trt.export.errors import InfiniTrtError

from . import contract

TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}  # trt.DataType names
DEFAULT_ARCH = 80             # PTX target when no GPU and no build target says otherwise
# "trt module name:id(plugin module)" -> (that plugin module, {plugin id: aot}); the module is
# kept, so that its id is not reused by another object (a test's fake, once collected)
_registered: dict[str, tuple[object, dict[str, bool]]] = {}
_target_arch: list[int] = []


class PluginUnavailableError(InfiniTrtError):
    """This TensorRT has no usable Python plugin (QDP) API."""


def plugin_id(rule: str) -> str:
    """'infini::LinearMemoryUpdate' for 'linear'."""
    return f"{contract.NAMESPACE}::{contract.op_type(rule)}"


def qdp_module(trt):
    """`<trt>.plugin` (QDP), or PluginUnavailableError with the reason."""
    name = getattr(trt, "__name__", "tensorrt")
    try:
        return importlib.import_module(f"{name}.plugin")
    except ImportError as exc:
        raise PluginUnavailableError(
            f"{name} {getattr(trt, '__version__', '?')} has no Python plugin API "
            f"({name}.plugin: {exc}); TensorRT >= 10.6 has it") from None


def supports_aot(trt) -> bool:
    """AOT Python plugins (TensorRT >= 10.9) are available."""
    return hasattr(trt, "QuickPluginCreationRequest")


def set_target_arch(arch: int | None) -> None:
    """The sm_XY that aot_impl compiles for (default: the current GPU's, else sm_80)."""
    _target_arch[:] = [int(arch)] if arch else []


def target_arch() -> int:
    if _target_arch:
        return _target_arch[0]
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return 10 * major + minor
    except ImportError:
        pass
    return DEFAULT_ARCH


def register(trt, rules: tuple[str, ...] = ("linear", "delta"), aot: bool | None = None,
             trtp=None) -> dict[str, bool]:
    """Register the plugin of each rule with `trt` (the `tensorrt` or `tensorrt_rtx` module).

    aot: define aot_impl too (default: where the TensorRT supports it). `trtp` replaces
    `trt.plugin` (tests). Idempotent. Returns {plugin id: has aot_impl}.
    """
    if contract.VERSION != "1":
        raise InfiniTrtError(f"TensorRT Python plugins have version '1'; the op's contract says "
                             f"'{contract.VERSION}'")
    trtp = trtp if trtp is not None else qdp_module(trt)
    aot = supports_aot(trt) if aot is None else aot
    key = f"{getattr(trt, '__name__', '?')}:{id(trtp)}"
    if key not in _registered or _registered[key][0] is not trtp:
        _registered[key] = (trtp, {})
    done = _registered[key][1]
    for rule in rules:
        if plugin_id(rule) not in done:
            (_define_linear if rule == "linear" else _define_delta)(trtp, aot)
            done[plugin_id(rule)] = aot
    return {plugin_id(rule): done[plugin_id(rule)] for rule in rules}


# ---- shared pieces ----------------------------------------------------------------------------
def torch_dtype(trt_dtype):
    """trt.DataType -> torch dtype (float32, float16, bfloat16)."""
    import torch

    name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1]
    if name not in TRT_DTYPES:
        raise InfiniTrtError(f"the memory-update plugin takes fp32/fp16/bf16, got {name}")
    return getattr(torch, TRT_DTYPES[name])


class _DeviceArray:
    """`__cuda_array_interface__` over a device pointer, typed by an equal-width stand-in
    (int16 for bf16, which the interface cannot name)."""

    def __init__(self, ptr: int, shape: tuple, strides: tuple, itemsize: int, typestr: str):
        self.__cuda_array_interface__ = {
            "shape": tuple(shape), "typestr": typestr, "data": (int(ptr), False), "version": 3,
            "strides": tuple(s * itemsize for s in strides), "stream": None}


def as_torch(tensor):
    """A zero-copy torch view of a QDP `trtp.Tensor` (any of fp32/fp16/bf16), or the tensor
    itself if it already is a torch tensor."""
    import torch

    if isinstance(tensor, torch.Tensor):
        return tensor
    dtype = torch_dtype(tensor.dtype)
    stand_in = {torch.float32: (torch.float32, "<f4"), torch.float16: (torch.float16, "<f2"),
                torch.bfloat16: (torch.int16, "<i2")}[dtype]
    shape = tuple(int(d) for d in tensor.shape)
    strides = tuple(int(s) for s in tensor.strides)
    item = torch.tensor([], dtype=dtype).element_size()
    view = torch.as_tensor(_DeviceArray(tensor.data_ptr, shape, strides, item, stand_in[1]),
                           device="cuda")
    return view.view(dtype)


def run_update(memory, norm, key, value, outputs, stream, rule: str, eps: float) -> None:
    """The JIT impl: the Triton kernel writes TensorRT's output buffers on TensorRT's stream."""
    import torch

    from .triton_kernel import memory_update

    m, z, k, v = (as_torch(t) for t in (memory, norm, key, value))
    out = (as_torch(outputs[0]), as_torch(outputs[1]))
    on_stream = (torch.cuda.stream(torch.cuda.ExternalStream(int(stream))) if m.is_cuda
                 else contextlib.nullcontext())
    with on_stream:
        memory_update(m, z, k, v, rule, eps, out=out)


def _static(expr, what: str) -> int:
    """The value of a build-time-constant shape expression (dk and dv are fixed)."""
    if isinstance(expr, int):
        return expr
    if getattr(expr, "is_fake", False) or not expr.is_constant:
        raise InfiniTrtError(f"the memory-update plugin needs a static {what}")
    return int(expr.constant_value())


def compile_update(trtp, memory, key, rule: str, eps: float):
    """The aot_impl: (kernel name, PTX, launch parameters, int32 scalar arguments)."""
    from .triton_kernel import compile_ptx

    b, h, dk, dv = (memory.shape_expr[i] for i in range(4))
    s = key.shape_expr[2]
    dk_, dv_ = _static(dk, "dk"), _static(dv, "dv")
    kernel = compile_ptx(torch_dtype(key.dtype), rule, eps, dk_, dv_, target_arch())
    cfg = kernel.config
    params = trtp.KernelLaunchParams()
    params.grid_x = b * h                                   # one program per (batch, head) ...
    params.grid_y = -(-dk_ // cfg.block_k)                  # ... dk tile
    params.grid_z = -(-dv_ // cfg.block_v)                  # ... and dv tile
    params.block_x = kernel.num_warps * 32
    params.shared_mem = kernel.shared_mem
    scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (s, dk, dv)])  # S, DK, DV
    return kernel.name.encode(), kernel.ptx.encode(), params, scalars


# ---- one definition per op (QDP matches the signatures exactly) ---------------------------------
def _define_linear(trtp, aot: bool) -> None:
    pid = plugin_id("linear")

    @trtp.register(pid)
    def describe(memory: trtp.TensorDesc, norm: trtp.TensorDesc, key: trtp.TensorDesc,
                 value: trtp.TensorDesc) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return memory.like(), norm.like()           # eq 8: M_s, z_s; fp32, same shapes

    @trtp.impl(pid)
    def impl(memory: trtp.Tensor, norm: trtp.Tensor, key: trtp.Tensor, value: trtp.Tensor,
             outputs: Tuple[trtp.Tensor, trtp.Tensor], stream: int) -> None:
        run_update(memory, norm, key, value, outputs, stream, "linear", 1.0)

    if aot:
        @trtp.aot_impl(pid)
        def aot_impl(memory: trtp.TensorDesc, norm: trtp.TensorDesc, key: trtp.TensorDesc,
                     value: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc],
                     tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes],
                                           trtp.KernelLaunchParams, trtp.SymIntExprs]:
            return compile_update(trtp, memory, key, "linear", 1.0)


def _define_delta(trtp, aot: bool) -> None:
    pid = plugin_id("delta")

    @trtp.register(pid)
    def describe(memory: trtp.TensorDesc, norm: trtp.TensorDesc, key: trtp.TensorDesc,
                 value: trtp.TensorDesc, eps: float) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return memory.like(), norm.like()           # eq 9: M_s, z_s; fp32, same shapes

    @trtp.impl(pid)
    def impl(memory: trtp.Tensor, norm: trtp.Tensor, key: trtp.Tensor, value: trtp.Tensor,
             eps: float, outputs: Tuple[trtp.Tensor, trtp.Tensor], stream: int) -> None:
        run_update(memory, norm, key, value, outputs, stream, "delta", eps)

    if aot:
        @trtp.aot_impl(pid)
        def aot_impl(memory: trtp.TensorDesc, norm: trtp.TensorDesc, key: trtp.TensorDesc,
                     value: trtp.TensorDesc, eps: float,
                     outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc],
                     tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes],
                                           trtp.KernelLaunchParams, trtp.SymIntExprs]:
            return compile_update(trtp, memory, key, "delta", eps)
