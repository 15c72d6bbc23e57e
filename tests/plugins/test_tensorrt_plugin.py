"""The TensorRT Python plugin (QDP) of the memory update, as far as CPU-only packages allow.

TensorRT-RTX 1.7 ships `tensorrt_rtx.plugin` but not the module it re-exports
(`tensorrt_rtx_bindings.plugin`), and the full TensorRT cannot be installed from PyPI; so the
registration runs here against `FakeQDP`, which applies the schema rules that `tensorrt.plugin`
documents for register / impl / aot_impl, and the ONNX parser's attribute handling is replayed
on a real exported node. The real registration runs where a `<trt>.plugin` imports.
"""
import inspect
import json
import os
import subprocess
import sys
import textwrap
import typing

import numpy as np
import onnx
import pytest
import torch

from helpers import assert_close
from infini_trt.export import preset, reference
from infini_trt.plugins.memory_update import contract, tensorrt_plugin, triton_kernel

TINY = preset("tiny")


class FakeQDP:
    """`tensorrt.plugin` as documented: decorators that check signatures and record."""

    class TensorDesc:
        def __init__(self, shape_expr=(), dtype="FLOAT"):
            self.shape_expr, self.dtype, self.aliased_to = tuple(shape_expr), dtype, None

        def like(self):
            return FakeQDP.TensorDesc(self.shape_expr, self.dtype)

        def aliased(self):
            out = self.like()
            out.aliased_to = self
            return out

    class Tensor:
        pass

    class KernelLaunchParams:
        grid_x = grid_y = grid_z = block_x = block_y = block_z = 1
        shared_mem = 0

    class SymExprs(tuple):
        pass

    class SymIntExprs(SymExprs):
        @classmethod
        def from_tuple(cls, values):
            return cls(values)

    @staticmethod
    def SymInt32(value):
        return int(value)

    def __init__(self):
        self.plugins = {}

    def register(self, plugin_id):
        def decorate(fn):
            assert plugin_id not in self.plugins, f"{plugin_id} registered twice"
            sig = inspect.signature(fn)
            tensors, attrs = [], {}
            for name, p in sig.parameters.items():
                assert p.annotation is not inspect.Parameter.empty and \
                    p.default is inspect.Parameter.empty
                if p.annotation is FakeQDP.TensorDesc:
                    assert not attrs, "tensors must come before attributes"
                    tensors.append(name)
                else:
                    assert p.annotation in (int, float, str, bool, bytes), name
                    assert name not in ("outputs", "stream", "tactic")
                    attrs[name] = p.annotation
            ret = sig.return_annotation
            assert typing.get_origin(ret) is tuple
            assert all(a is FakeQDP.TensorDesc for a in typing.get_args(ret))
            self.plugins[plugin_id] = {"describe": fn, "tensors": tensors, "attrs": attrs,
                                       "outputs": len(typing.get_args(ret))}
            return fn
        return decorate

    def _check(self, plugin_id, fn, tail):
        plugin = self.plugins[plugin_id]
        names = list(inspect.signature(fn).parameters)
        attrs = [n for n in names if n in plugin["attrs"]]
        assert names == plugin["tensors"] + attrs + tail, names
        return plugin

    def impl(self, plugin_id):
        def decorate(fn):
            self._check(plugin_id, fn, ["outputs", "stream"])["impl"] = fn
            return fn
        return decorate

    def aot_impl(self, plugin_id):
        def decorate(fn):
            plugin = self._check(plugin_id, fn, ["outputs", "tactic"])
            ret = typing.get_args(inspect.signature(fn).return_annotation)
            assert len(ret) == 4 and ret[2] is FakeQDP.KernelLaunchParams
            assert issubclass(ret[3], FakeQDP.SymExprs)
            plugin["aot_impl"] = fn
            return fn
        return decorate


class FakeTrt:
    __name__ = "fake_tensorrt"
    __version__ = "10.13"
    QuickPluginCreationRequest = object       # AOT plugins supported


@pytest.fixture
def qdp():
    fake = FakeQDP()
    assert tensorrt_plugin.register(FakeTrt(), trtp=fake) == {
        "infini::LinearMemoryUpdate": True, "infini::DeltaMemoryUpdate": True}
    return fake


def node_of(path, rule):
    return next(n for n in onnx.load(str(path)).graph.node
                if n.domain == contract.NAMESPACE and n.op_type == contract.op_type(rule))


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_plugin_matches_the_exported_node(qdp, exported, rule):
    """Name = op type, namespace = plugin_namespace, version = plugin_version of the node; the
    parser copies to the plugin the node attributes its creator declares: eps, nothing else."""
    _, out = exported(TINY.replace(update_rule=rule), graphs=("segment", "fold"))
    node = node_of(out / "model.onnx", rule)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    plugin_id = f"{attrs['plugin_namespace'].decode()}::{node.op_type}"
    assert plugin_id == tensorrt_plugin.plugin_id(rule) and attrs["plugin_version"] == b"1"
    plugin = qdp.plugins[plugin_id]
    assert plugin["tensors"] == list(contract.INPUTS) == ["memory", "norm", "key", "value"]
    assert plugin["outputs"] == len(contract.OUTPUTS)
    assert set(plugin["attrs"]) == ({"eps"} if rule == "delta" else set())
    # the parser: creator fields that the node has, FLOAT -> one fp32 value; QDP: annot(data)
    fields = {name: np.array([attrs[name]], dtype=np.float32) for name in plugin["attrs"]}
    values = {name: plugin["attrs"][name](data[0]) for name, data in fields.items()}
    if rule == "delta":
        assert values["eps"] == pytest.approx(TINY.memory_eps, rel=1e-7)


def test_outputs_are_new_buffers_like_the_state(qdp):
    m = FakeQDP.TensorDesc((2, 3, 16, 8), "FLOAT")
    z = FakeQDP.TensorDesc((2, 3, 16), "FLOAT")
    k = FakeQDP.TensorDesc((2, 3, 5, 16), "HALF")
    for rule, extra in (("linear", ()), ("delta", (1e-6,))):
        out_m, out_z = qdp.plugins[tensorrt_plugin.plugin_id(rule)]["describe"](m, z, k, k,
                                                                               *extra)
        assert (out_m.shape_expr, out_m.dtype, out_m.aliased_to) == (m.shape_expr, "FLOAT", None)
        assert (out_z.shape_expr, out_z.dtype, out_z.aliased_to) == (z.shape_expr, "FLOAT", None)


def test_register_is_idempotent(qdp):
    tensorrt_plugin.register(FakeTrt(), trtp=qdp)             # FakeQDP refuses a second one
    assert len(qdp.plugins) == 2


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_jit_impl_writes_the_outputs(qdp, rule):
    """The enqueue callback: TensorRT's buffers (NaN-poisoned) get the reference's values."""
    if not triton_kernel.interpreting() and not torch.cuda.is_available():
        pytest.skip("needs Triton's interpreter or a GPU")
    device = "cpu" if triton_kernel.interpreting() else "cuda"
    gen = torch.Generator().manual_seed(5)
    memory, norm = torch.randn(2, 2, 16, 16, generator=gen), torch.rand(2, 2, 16, generator=gen)
    key = torch.randn(2, 2, 7, 16, generator=gen).half()
    value = torch.randn(2, 2, 7, 16, generator=gen).half()
    ins = [t.to(device) for t in (memory, norm, key, value)]
    outs = (torch.full_like(ins[0], float("nan")), torch.full_like(ins[1], float("nan")))
    attrs = (1e-3,) if rule == "delta" else ()
    qdp.plugins[tensorrt_plugin.plugin_id(rule)]["impl"](*ins, *attrs, outs, 0)
    want = reference.memory_update(*(t.double() for t in (memory, norm, key, value)), rule,
                                   1e-3)
    assert_close(want[0], outs[0].cpu(), rel_rms=1e-6, what="memory_out")
    assert_close(want[1], outs[1].cpu(), rel_rms=1e-6, what="norm_out")


def test_dtype_names():
    class DataType:
        def __init__(self, name):
            self.name = name

    assert tensorrt_plugin.torch_dtype(DataType("BF16")) is torch.bfloat16
    assert tensorrt_plugin.torch_dtype(DataType("HALF")) is torch.float16
    with pytest.raises(Exception, match="fp32/fp16/bf16"):
        tensorrt_plugin.torch_dtype(DataType("INT8"))


def test_tensorrt_rtx_plugin_module():
    """TensorRT-RTX: our registration where its QDP module imports; else one clear error."""
    trt = pytest.importorskip("tensorrt_rtx")
    try:
        import tensorrt_rtx.plugin  # noqa: F401
    except ImportError:
        with pytest.raises(tensorrt_plugin.PluginUnavailableError, match="no Python plugin API"):
            tensorrt_plugin.register(trt)
        return
    tensorrt_plugin.register(trt)
    registry = trt.get_plugin_registry()
    for rule in ("linear", "delta"):
        creator = registry.get_creator(contract.op_type(rule), contract.VERSION,
                                       contract.NAMESPACE)
        assert creator is not None
        assert {f.name for f in creator.field_names} == ({"eps"} if rule == "delta" else set())


AOT_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    sys.path.insert(0, {here!r})
    from test_tensorrt_plugin import FakeQDP, FakeTrt
    from infini_trt.plugins.memory_update import tensorrt_plugin
    fake = FakeQDP()
    tensorrt_plugin.register(FakeTrt(), trtp=fake)
    tensorrt_plugin.set_target_arch(89)
    B, H, S, dk, dv = 3, 2, 11, 24, 40
    m, z = FakeQDP.TensorDesc((B, H, dk, dv)), FakeQDP.TensorDesc((B, H, dk))
    k, v = FakeQDP.TensorDesc((B, H, S, dk), "BF16"), FakeQDP.TensorDesc((B, H, S, dv), "BF16")
    aot = fake.plugins["infini::DeltaMemoryUpdate"]["aot_impl"]
    name, ptx, p, scalars = aot(m, z, k, v, 1e-6, (m.like(), z.like()), 0)
    print(json.dumps({{"name": name.decode(), "sm89": b".target sm_89" in ptx,
                       "entry": (b".entry " + name) in ptx, "scalars": list(scalars),
                       "grid": [p.grid_x, p.grid_y, p.grid_z], "block": p.block_x,
                       "shared": p.shared_mem}}))
""")


def test_aot_impl_returns_ptx_and_launch(tmp_path):
    """aot_impl: PTX for the build target, a grid of (B*H, dk tiles, dv tiles), and the int32
    scalars (S, dk, dv) in the kernel's order. Compiles without a GPU (no interpreter)."""
    here = os.path.dirname(__file__)
    script = AOT_SCRIPT.format(tests=os.path.dirname(here), here=here)
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["sm89"] and result["entry"]
    assert result["scalars"] == [11, 24, 40]
    assert result["grid"] == [6, 1, 1] and result["block"] == 128
    assert 0 < result["shared"] <= 48 * 1024
