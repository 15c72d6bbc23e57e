"""The arrays a runner holds: numpy on the host, torch tensors on a GPU.

An exported model runs on the CPU with ONNX Runtime and numpy alone (an install without torch):
the ONNX Runtime runner keeps its buffers as numpy arrays there. On a GPU the buffers are torch
tensors (ONNX Runtime's CUDA provider, TensorRT), and the PyTorch runner's are torch anyway.
What the runners return through the contract is always a host numpy array (`to_host`).

The code that works on either kind (the decoding caches, a row's read and write) takes an
`ArraySpace` for allocation and strided views, and otherwise uses what numpy arrays and torch
tensors share: slicing, `reshape`, `swapaxes`, item assignment.
"""
from __future__ import annotations

import numpy as np


def is_torch(array) -> bool:
    """Whether `array` is a torch tensor (torch is not imported to find out)."""
    return type(array).__module__.startswith("torch")


def to_host(array) -> np.ndarray:
    """A numpy array of `array` (itself when it is one; a torch tensor's data, copied off a
    device; bfloat16, which numpy lacks, as float32)."""
    if isinstance(array, np.ndarray):
        return array
    if is_torch(array):
        import torch

        tensor = array.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.cpu().numpy()
    return np.asarray(array)


def host_logits(logits) -> np.ndarray:
    """Logits as the runner contract returns them: a float32 numpy array on the host."""
    array = to_host(logits)
    return array if array.dtype == np.float32 else array.astype(np.float32)


def copy_into(dst, src) -> None:
    """dst[...] = src, casting to dst's dtype; dst a numpy array or a torch tensor (on any
    device), src either, or anything numpy takes."""
    if isinstance(dst, np.ndarray):
        np.copyto(dst, to_host(src), casting="unsafe")
        return
    import torch

    source = src if isinstance(src, torch.Tensor) else torch.as_tensor(np.asarray(src))
    dst.copy_(source.to(dst.dtype))


class Staging:
    """A flat buffer (numpy or torch) that a graph's small inputs are copied into: token ids,
    positions, row indices. `load(array)` -> the view of the array's shape at the buffer's
    start, the same view object each time for the same shape, so that an IO binding that
    holds it knows it bound without working out its address (ort_runner.Binding: that took
    about 10 us an input of a decoded token, after a run had left the caches cold)."""

    def __init__(self, flat):
        self.flat, self._views = flat, {}

    def load(self, array):
        shape = tuple(array.shape)
        view = self._views.get(shape)
        if view is None:
            view = self._views[shape] = self.flat[:int(np.prod(shape))].reshape(shape)
        copy_into(view, array)
        return view


class ArraySpace:
    """Allocation and strided views for one kind of array: numpy (`device` "cpu") or torch on
    `device`. Dtypes are named as numpy names them ("float32", "float16", "int64", "bool")."""

    def __init__(self, device: str = "cpu", use_torch: bool | None = None):
        self.device = str(device)
        self._torch = None                       # the torch module, for torch arrays
        if self.device != "cpu" if use_torch is None else use_torch:
            import torch

            self._torch = torch

    def zeros(self, shape, dtype: str = "float32"):
        t = self._torch
        if t is None:
            return np.zeros(shape, dtype=dtype)
        return t.zeros(shape, dtype=getattr(t, dtype), device=self.device)

    def empty(self, shape, dtype: str = "float32"):
        t = self._torch
        if t is None:
            return np.empty(shape, dtype=dtype)
        return t.empty(shape, dtype=getattr(t, dtype), device=self.device)

    def mask(self, mask: np.ndarray):
        """A boolean numpy mask as this space indexes its arrays with."""
        if self._torch is None:
            return mask
        return self._torch.from_numpy(mask).to(self.device)

    @staticmethod
    def strided(flat, shape: tuple, strides: tuple):
        """A view of the flat array `flat` with `shape` and `strides` counted in elements."""
        if isinstance(flat, np.ndarray):
            return np.lib.stride_tricks.as_strided(flat, shape,
                                                   tuple(s * flat.itemsize for s in strides))
        return flat.as_strided(shape, strides)


def address(array) -> int:
    """The address of an array's first element (what an IO binding is given)."""
    return int(array.ctypes.data) if isinstance(array, np.ndarray) else int(array.data_ptr())


def dtype_name(array) -> str:
    """'float32', 'float16', 'bfloat16', 'int64', 'bool', ... for a numpy array or a tensor."""
    if isinstance(array, np.ndarray):
        return array.dtype.name
    return str(array.dtype).removeprefix("torch.")
