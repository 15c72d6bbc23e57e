"""Export by stamping: each distinct piece of the graphs is traced once and repeated per layer.

    templates = trace_templates(model, ("segment", "extend"), sizes, opset=20, plugin=True)
    weights = weight_tensors(model, WeightsFile(directory))     # export/weights_file.py
    proto = assemble(segment_graph(cfg), templates, weights, cfg)    # then `finalize`

The layers of an `InfiniLM` are identical in structure, and tracing a whole graph with
torch.onnx costs time in proportion to its layers. Here each piece (`TEMPLATES`: the embedding,
the LM head, one layer of the segment step, of decoding, of the fold) is traced once, with the
piece's weights as graph inputs, so that the ONNX optimizer cannot fold one layer's weights
into the template as constants. The pieces that an export needs are traced together, in one
call of `trace_to_onnx` (each call pays a fixed cost of its own), each on dynamic axes of its
own, so that no piece computes a shape from another's input; the traced graph is then cut
into one template per piece.

Each final graph is assembled in ONNX: the frame (the per-layer slices of the stacked state
inputs, the stacked outputs), one copy ("stamp") of the layer template per layer, wired to
that layer's weights (initializers) and to the previous layer's output, and the head and tail,
pruned to the outputs that the graph needs; then the computations that layers repeat on shared
values (the shape and mask arithmetic on the rotary tables) are merged.

The copies keep the exporter's metadata with the layer's index put in (its name scopes, the
memory-update node's `LAYER_METADATA`), so that `finalize` names their nodes as it names a
whole trace's (`/layers.3/attn/qkv_proj/MatMul`, `/layers.3/memory_update`) and computes the
nodes that read weights only (`fold_weight_parts`) into initializers. The weights are pending
references into the export's one weights file, written once for all the graphs.
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import onnx
import torch

from . import memory_op, template_cache
from .checkpoint import dtype_name
from .config import InfiniConfig
from .forked import forked
from .io_spec import EXTEND, FOLD, GraphSpec, TensorSpec, extend_graph, segment_graph
from .model import InfiniLM
from .onnx_export import NAME_SCOPES as SCOPES, example_inputs, trace_to_onnx
from .weights_file import INLINE_BYTES, WeightsFile

HEAD, TAIL = "head", "tail"
LAYER_STEP, LAYER_EXTEND, LAYER_FOLD = "layer_step", "layer_extend", "layer_fold"
LAYER_EXTEND_GQA, LAYER_FOLD_GQA = "layer_extend_gqa", "layer_fold_gqa"
TEMPLATE_LAYER = 0                # the layer whose module each layer template is traced from
SEPARATOR = "__"                  # <template>__<name>: a template's I/O and axes in the trace
ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
              "bfloat16": onnx.TensorProto.BFLOAT16, "int64": onnx.TensorProto.INT64,
              "bool": onnx.TensorProto.BOOL}


# ------------------------------------------------------------------------------ the pieces
def _head(model: InfiniLM, input_ids):
    """The embedding and the rotary tables of the segment: input_ids -> (x, cos, sin)."""
    x, (cos, sin) = model.embed_segment(input_ids)
    return x, cos, sin


def _tail(model: InfiniLM, x, logit_rows):
    """The LM head: the last layer's x -> (logits, last_logits, the logits of logit_rows), in
    float32."""
    return (model.head_logits(x).float(), model.head_logits(x, last_only=True).float(),
            model.head_logits(x, rows=logit_rows).float())


def _layer_step(model: InfiniLM, x, memory, norm, cos, sin):
    return model.layer_step(TEMPLATE_LAYER, x, memory, norm, (cos, sin))


def _layer_extend(model: InfiniLM, x, start, memory, norm, k_cache, v_cache):
    rope = model.rope(model.cfg.segment_len, x.dtype, x.device)        # constants
    return model.layer_extend(TEMPLATE_LAYER, x, memory, norm, rope, k_cache, v_cache, start)


def _layer_fold(model: InfiniLM, k_cache, v_cache, memory, norm, fold):
    rope = model.rope(model.cfg.segment_len, k_cache.dtype, k_cache.device)
    return model.layer_fold(TEMPLATE_LAYER, k_cache, v_cache, memory, norm, fold, rope)


def _layer_extend_gqa(model: InfiniLM, x, start, length, memory, norm, k_cache, v_cache):
    rope = model.rope(model.cfg.segment_len, x.dtype, x.device)        # constants, unscaled
    return model.layer_extend_in_place(TEMPLATE_LAYER, x, memory, norm, rope, k_cache,
                                       v_cache, start, length)


def _layer_fold_gqa(model: InfiniLM, k_cache, v_cache, memory, norm, fold):
    """The fold of caches whose keys are in the values' layout (one row per slot)."""
    return _layer_fold(model, k_cache.transpose(-1, -2), v_cache, memory, norm, fold)


# template name -> (the function it traces, whether its weights are one layer's)
TEMPLATES: dict[str, tuple[Callable, bool]] = {
    HEAD: (_head, False), TAIL: (_tail, False), LAYER_STEP: (_layer_step, True),
    LAYER_EXTEND: (_layer_extend, True), LAYER_FOLD: (_layer_fold, True),
    LAYER_EXTEND_GQA: (_layer_extend_gqa, True), LAYER_FOLD_GQA: (_layer_fold_gqa, True)}
# graph -> the layer template it repeats (the segment-like ones have HEAD and TAIL around it)
LAYER_TEMPLATE = {"segment": LAYER_STEP, "prefill": LAYER_STEP, EXTEND: LAYER_EXTEND,
                  FOLD: LAYER_FOLD}
# the decoding graphs' layer templates with the "gqa" decode attention (cached_attention.py)
LAYER_TEMPLATE_GQA = {**LAYER_TEMPLATE, EXTEND: LAYER_EXTEND_GQA, FOLD: LAYER_FOLD_GQA}


def layer_template_name(graph: str, attention: str = "portable") -> str:
    """The layer template that `graph` repeats, for the decode attention `attention`."""
    return (LAYER_TEMPLATE_GQA if attention == "gqa" else LAYER_TEMPLATE)[graph]


def _activations(name: str, cfg: InfiniConfig, dtype: str):
    """The template's activation inputs and its outputs (TensorSpecs)."""
    h, dk, dv, hd, d, n = (cfg.n_kv_heads, cfg.dk, cfg.dv, cfg.head_dim, cfg.d_model,
                           cfg.segment_len)
    x = TensorSpec("x", dtype, ("batch", "seq", d))
    x_out = TensorSpec("x_out", dtype, ("batch", "seq", d))
    memory = TensorSpec("memory", "float32", ("batch", h, dk, dv))
    norm = TensorSpec("norm", "float32", ("batch", h, dk))
    memory_out = TensorSpec("memory_out", "float32", memory.dims)
    norm_out = TensorSpec("norm_out", "float32", norm.dims)
    rope = (TensorSpec("cos", dtype, ("seq", hd)), TensorSpec("sin", dtype, ("seq", hd)))
    rows = TensorSpec("k_new", dtype, ("batch", h, "seq", hd))
    if name == HEAD:
        return (TensorSpec("input_ids", "int64", ("batch", "seq")),), (x, *rope)
    if name == TAIL:
        return ((x, TensorSpec("logit_rows", "int64", ("batch", "rows"))),
                (TensorSpec("logits", "float32", ("batch", "seq", cfg.vocab_size)),
                 TensorSpec("last_logits", "float32", ("batch", cfg.vocab_size)),
                 TensorSpec("row_logits", "float32", ("batch", "rows", cfg.vocab_size))))
    if name == LAYER_STEP:
        return (x, memory, norm, *rope), (x_out, memory_out, norm_out)
    if name == LAYER_EXTEND:
        return ((x, TensorSpec("start", "int64", ("batch",)), memory, norm,
                 TensorSpec("k_cache", dtype, ("batch", h, hd, "window")),
                 TensorSpec("v_cache", dtype, ("batch", h, "window", hd))),
                (x_out, rows, TensorSpec("v_new", dtype, rows.dims)))
    if name in (LAYER_EXTEND_GQA, LAYER_FOLD_GQA):      # both caches (batch, h, n, hd)
        k_cache, v_cache = (TensorSpec(f"{c}_cache", dtype, ("batch", h, n, hd)) for c in "kv")
        if name == LAYER_FOLD_GQA:
            return ((k_cache, v_cache, memory, norm, TensorSpec("fold", "bool", ("batch",))),
                    (memory_out, norm_out))
        return ((x, TensorSpec("start", "int64", ("batch",)),
                 TensorSpec("length", "int64", ("batch",)), memory, norm, k_cache, v_cache),
                (x_out, TensorSpec("k_cache_out", dtype, k_cache.dims),
                 TensorSpec("v_cache_out", dtype, v_cache.dims)))
    return ((TensorSpec("k_cache", dtype, ("batch", h, hd, n)),
             TensorSpec("v_cache", dtype, ("batch", h, n, hd)), memory, norm,
             TensorSpec("fold", "bool", ("batch",))), (memory_out, norm_out))


def _weights_of(model: InfiniLM, per_layer: bool) -> list[str]:
    """The parameter names of layer TEMPLATE_LAYER, or of everything outside the layers
    (tied parameters once)."""
    return [name for name, _ in model.named_parameters()
            if (name.startswith(f"layers.{TEMPLATE_LAYER}.") if per_layer
                else not name.startswith("layers."))]


class Pieces(torch.nn.Module):
    """Pieces of the model traced together: forward(*each piece's activations, *weights) ->
    each piece's outputs, in order, computed with `weights` in the place of the model's
    parameters `names` (torch.func.functional_call), so that the trace reads them as inputs."""

    fixed_args = 0                 # for `trace_to_onnx`: every input is in one *varargs

    def __init__(self, model: InfiniLM, pieces: list[tuple[Callable, int]], names: list[str]):
        super().__init__()
        self.model, self.pieces, self.names = model, pieces, list(names)

    def forward(self, *inputs, _bound: bool = False):
        if not _bound:
            n = len(inputs) - len(self.names)
            params = {f"model.{name}": w for name, w in zip(self.names, inputs[n:])}
            return torch.func.functional_call(self, params, inputs[:n], {"_bound": True})
        outputs, start = [], 0
        for body, count in self.pieces:
            outputs.extend(body(self.model, *inputs[start:start + count]))
            start += count
        return tuple(outputs)


@dataclass(frozen=True)
class Template:
    """A traced piece, cut from the trace: its nodes (which name its inputs and outputs
    `<name>__<input>`), its constants, value infos and opsets, and the parameter names of its
    weight inputs (layer TEMPLATE_LAYER's for a layer template)."""

    name: str
    nodes: tuple[onnx.NodeProto, ...]
    constants: dict[str, onnx.TensorProto]
    value_info: dict[str, onnx.ValueInfoProto]
    opsets: dict[str, int]
    ir_version: int
    inputs: dict[str, tuple[int | str, ...]]          # activation name -> its dims
    outputs: tuple[str, ...]
    weights: tuple[str, ...]
    per_layer: bool

    def value(self, name: str) -> str:
        """The traced name of the template's input or output `name`."""
        return f"{self.name}{SEPARATOR}{name}"


def templates_for(graphs: Iterable[str], attention: str = "portable") -> list[str]:
    """The templates that the given graphs are made of, each once, in TEMPLATES' order."""
    wanted = set()
    for graph in graphs:
        wanted.add(layer_template_name(graph, attention))
        if graph != FOLD:
            wanted.update((HEAD, TAIL))
    return [t for t in TEMPLATES if t in wanted]


def _own_axes(template: str, specs: Iterable[TensorSpec]) -> tuple[TensorSpec, ...]:
    """The specs named <template>__<name>, on the template's own dynamic axes."""
    def axis(d):
        return f"{template}{SEPARATOR}{d}" if isinstance(d, str) else d

    return tuple(TensorSpec(f"{template}{SEPARATOR}{t.name}", t.dtype,
                            tuple(axis(d) for d in t.dims)) for t in specs)


# traced in a forked child while this process traces the others (export/forked.py): the
# templates of the decoding step cost about as much to trace as all the others together
TRACED_APART = (LAYER_EXTEND, LAYER_EXTEND_GQA)


def trace_templates(model: InfiniLM, graphs: Iterable[str], sizes: dict[str, int],
                    opset: int, plugin: bool,
                    log: Callable[[str], None] = lambda s: None,
                    attention: str = "portable") -> dict[str, Template]:
    """Every template that `graphs` need, traced once: those of TRACED_APART by
    `trace_to_onnx` in a forked child process (on a second core), the others together in
    this one; or taken from the template cache, where an export of this shape traced them
    before (export/template_cache.py)."""
    names = templates_for(graphs, attention)
    entry = None
    if template_cache.enabled():
        entry = template_cache.key({
            "config": model.cfg.to_dict(), "dtype": dtype_name(model.embed.weight.dtype),
            "templates": names, "sizes": sizes, "opset": opset, "plugin": plugin})
        cached = template_cache.load(entry, names, Template)
        if cached is not None:
            log(f"the pieces ({', '.join(names)}) as traced before for this shape "
                f"(export/template_cache.py)")
            return cached
    log(f"tracing one of each piece ({', '.join(names)})")
    apart = [n for n in names if n in TRACED_APART]
    here = [n for n in names if n not in apart]
    if not here or not apart:
        templates = _trace(model, names, sizes, opset, plugin)
    else:
        def trace_apart() -> dict[str, Template]:
            torch.set_num_threads(1)                # nothing to compute in parallel: a trace
            return _trace(model, apart, sizes, opset, plugin)

        with forked(trace_apart) as child:
            templates = _trace(model, here, sizes, opset, plugin)
            templates.update(child.result())
    templates = {name: templates[name] for name in names}
    if entry is not None:
        template_cache.store(entry, templates)
    return templates


def _trace(model: InfiniLM, names: list[str], sizes: dict[str, int], opset: int,
           plugin: bool) -> dict[str, Template]:
    """The templates `names`, traced together in one call of `trace_to_onnx`."""
    cfg = model.cfg
    dtype = dtype_name(model.embed.weight.dtype)
    params = dict(model.named_parameters())
    per_layer = {TEMPLATES[n][1] for n in names}
    weights = [w for kind in (True, False) if kind in per_layer
               for w in _weights_of(model, kind)]
    inputs, outputs, axes, own_sizes, pieces = [], [], {}, {}, []
    ranges = {**segment_graph(cfg).axes, **extend_graph(cfg, dtype).axes}    # the I/O table's
    for name in names:
        activations, results = _activations(name, cfg, dtype)
        inputs += _own_axes(name, activations)
        outputs += _own_axes(name, results)
        pieces.append((TEMPLATES[name][0], len(activations)))
        for axis in sorted({d for t in activations for d in t.dims if isinstance(d, str)}):
            axes[f"{name}{SEPARATOR}{axis}"] = ranges[axis]
            own_sizes[f"{name}{SEPARATOR}{axis}"] = sizes[axis]
    spec = GraphSpec("templates", (*inputs, *(TensorSpec(w, dtype_name(params[w].dtype),
                                                         tuple(params[w].shape))
                                              for w in weights)), tuple(outputs), axes)
    proto = trace_to_onnx(Pieces(model.eval(), pieces, weights), spec,
                          example_inputs(spec, own_sizes), opset, plugin)
    return {name: _cut(proto, name, cfg, dtype, weights) for name in names}


def _cut(proto: onnx.ModelProto, name: str, cfg: InfiniConfig, dtype: str,
         traced_weights: list[str]) -> Template:
    """The template `name` from the trace of all pieces: the nodes that compute its outputs,
    checked to read nothing but its own inputs, its weights and constants."""
    activations, results = _activations(name, cfg, dtype)
    weights = [w for w in traced_weights
               if w.startswith("layers.") == TEMPLATES[name][1]]
    graph = proto.graph
    nodes, wanted = _needed(graph.node, [f"{name}{SEPARATOR}{t.name}" for t in results])
    for node in nodes:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            raise RuntimeError(f"template {name} has a subgraph ({node.op_type}); "
                               f"stamping copies flat graphs only")              # a bug
    produced = {o for node in nodes for o in node.output}
    constants = {t.name: t for t in graph.initializer if t.name in wanted}
    own = {f"{name}{SEPARATOR}{t.name}" for t in activations} | set(weights)
    foreign = wanted - produced - set(constants) - own
    if foreign:                                                            # a bug
        raise RuntimeError(f"template {name} reads {sorted(foreign)}, not its own inputs")
    axis = re.compile(rf"\b{re.escape(name + SEPARATOR)}(\w+)")
    value_info = {}
    for info in graph.value_info:
        if info.name in produced:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(info)
            for dim in copy.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = axis.sub(r"\1", dim.dim_param)
            value_info[info.name] = copy
    return Template(name, tuple(nodes), constants, value_info,
                    {o.domain: o.version for o in proto.opset_import}, proto.ir_version,
                    {t.name: t.dims for t in activations}, tuple(t.name for t in results),
                    tuple(weights), TEMPLATES[name][1])


def weight_tensors(model: InfiniLM, weights: WeightsFile) -> dict[str, onnx.TensorProto]:
    """Every parameter as an initializer named `model.<parameter>` (tied ones once), shared
    by every graph: a pending reference into the export's weights file (the parameter's
    memory itself, not a copy) for those above INLINE_BYTES, inline for the others."""
    from onnx import helper

    out = {}
    for name, p in model.named_parameters():
        t = p.detach().cpu().contiguous()
        data_type = ONNX_TYPES[dtype_name(t.dtype)]
        array = t.reshape(-1).view(torch.uint8).numpy().view(
            helper.tensor_dtype_to_np_dtype(data_type)).reshape(tuple(t.shape))
        if array.nbytes > INLINE_BYTES:
            out[name] = weights.tensor(f"model.{name}", f"model.{name}", array, data_type)
        else:
            out[name] = onnx.TensorProto(name=f"model.{name}", dims=list(t.shape),
                                         data_type=data_type, raw_data=array.tobytes())
    return out


# ------------------------------------------------------------------------------ stamping
_TEMPLATE_PATH = re.compile(rf"(?<![\w.])model\.layers\.{TEMPLATE_LAYER}(?!\d)")


class Assembly:
    """An ONNX graph being put together from copies of templates ("stamps")."""

    def __init__(self, spec: GraphSpec, weights: dict[str, onnx.TensorProto]):
        self.spec, self.weights = spec, weights
        self.axes: dict[str, tuple[str, int]] = {}     # axis -> (graph input, its position)
        for t in spec.inputs:
            for position, dim in enumerate(t.dims):
                if isinstance(dim, str):
                    self.axes.setdefault(dim, (t.name, position))
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.value_info: list[onnx.ValueInfoProto] = []
        self.opsets: dict[str, int] = {}

    def stamp(self, template: Template, inputs: dict[str, str], outputs: dict[str, str | None],
              prefix: str, layer: int | None = None) -> dict[str, str]:
        """Copy the template's nodes that compute `outputs` (template name -> graph name, or
        None: a name of the stamp's own), their activation inputs wired to the graph values
        `inputs` (template name -> graph name) and their weights to layer `layer`'s (or the
        model's, for a template not per layer). -> {template output: graph value}."""
        self.opsets.update(template.opsets)
        nodes, _ = _needed(template.nodes, [template.value(o) for o in outputs])
        used = {i for node in nodes for i in node.input if i}
        rename = {template.value(k): v for k, v in inputs.items()}
        for name in template.weights:
            key = name if layer is None else \
                f"layers.{layer}.{name.removeprefix(f'layers.{TEMPLATE_LAYER}.')}"
            rename[name] = self.weights[key].name
            if name in used:
                self.initializers.setdefault(rename[name], self.weights[key])
        named = {template.value(o): g for o, g in outputs.items() if g is not None}
        produced = {o for node in nodes for o in node.output}
        for name in sorted(used | {template.value(o) for o in outputs}):   # a fixed order
            if name in rename:
                continue
            if name in template.constants:         # shared by every stamp of the template
                rename[name] = f"{template.name}/{name}"
                if rename[name] not in self.initializers:
                    copy = onnx.TensorProto()
                    copy.CopyFrom(template.constants[name])
                    copy.name = rename[name]
                    self.initializers[rename[name]] = copy
            elif name not in produced:
                raise KeyError(f"template {template.name}: input {name} is not wired")
            else:
                rename[name] = named.get(name, f"{prefix}{name}")
        template_inputs = {template.value(name): dims for name, dims in template.inputs.items()}
        for node in nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.input[:] = [rename[i] if i else "" for i in node.input]
            copy.output[:] = [rename.setdefault(o, f"{prefix}{o}") if o else ""
                              for o in node.output]
            if layer is not None:
                _to_layer(copy, layer)
            self._read_axis_from_graph_input(copy, node, template_inputs)
            self.nodes.append(copy)
        for name in sorted(produced):
            if name in template.value_info:
                copy = onnx.ValueInfoProto()
                copy.CopyFrom(template.value_info[name])
                copy.name = rename[name]
                self.value_info.append(copy)
        result = {}
        for out, target in outputs.items():     # an output that is an input or a constant
            value = rename[template.value(out)]
            if target is not None and value != target:
                self.nodes.append(onnx.helper.make_node("Identity", [value], [target]))
                value = target
            result[out] = value
        return result

    def _read_axis_from_graph_input(self, copy: onnx.NodeProto, node: onnx.NodeProto,
                                    inputs: dict[str, tuple]) -> None:
        """A Shape node that reads one dynamic axis of a template input (`inputs`: traced
        name -> dims) reads it from the graph input that has that axis instead: every stamp
        then computes its shapes and masks from the same values, and `_without_repeats`
        merges them."""
        if node.op_type != "Shape" or node.input[0] not in inputs:
            return
        dims = inputs[node.input[0]]
        attrs = {a.name: a.i for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", len(dims))
        start, end = (i + len(dims) if i < 0 else min(i, len(dims)) for i in (start, end))
        if end - start != 1 or dims[start] not in self.axes:
            return
        source, position = self.axes[dims[start]]
        copy.input[0] = source
        del copy.attribute[:]
        copy.attribute.extend([onnx.helper.make_attribute("start", position),
                               onnx.helper.make_attribute("end", position + 1)])

    def layer_slice(self, stacked: str, layer: int) -> str:
        """`stacked`[layer] (Gather on axis 0) -> the name of the slice."""
        index = f"frame/layer_{layer}"
        if index not in self.initializers:
            self.initializers[index] = onnx.helper.make_tensor(index, onnx.TensorProto.INT64,
                                                               [], [layer])
        out = f"frame/{stacked}_{layer}"
        self.nodes.append(onnx.helper.make_node("Gather", [stacked, index], [out], axis=0))
        return out

    def stack(self, values: list[str], output: str) -> None:
        """output = the values stacked on a new axis 0 (Unsqueeze, Concat)."""
        axis = "frame/axis_0"
        if axis not in self.initializers:
            self.initializers[axis] = onnx.helper.make_tensor(axis, onnx.TensorProto.INT64,
                                                              [1], [0])
        parts = []
        for value in values:
            parts.append(f"frame/{value}_unsqueezed")
            self.nodes.append(onnx.helper.make_node("Unsqueeze", [value, axis], [parts[-1]]))
        self.nodes.append(onnx.helper.make_node("Concat", parts, [output], axis=0))

    def model(self, spec: GraphSpec, ir_version: int) -> onnx.ModelProto:
        """The assembled graph with the I/O of `spec`, repeated computations merged."""
        def value(t: TensorSpec):
            return onnx.helper.make_tensor_value_info(t.name, ONNX_TYPES[t.dtype], list(t.dims))

        nodes, alias = _without_repeats(self.nodes, self.initializers, set(spec.output_names))
        model = onnx.ModelProto(ir_version=ir_version, opset_import=[
            onnx.helper.make_opsetid(d, v) for d, v in self.opsets.items()])
        graph = model.graph                    # filled in place: the weights are copied once
        graph.name = spec.name
        graph.input.extend(value(t) for t in spec.inputs)
        graph.output.extend(value(t) for t in spec.outputs)
        graph.node.extend(nodes)
        graph.initializer.extend(t for name, t in self.initializers.items() if name not in alias)
        graph.value_info.extend(v for v in self.value_info if v.name not in alias)
        return model


def _needed(nodes, outputs) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes (in graph order) that compute `outputs`, in their order -> (those nodes, the
    names they and the outputs need: the outputs, and every input of those nodes)."""
    wanted, keep = set(outputs), []
    for node in reversed(nodes):
        if wanted.intersection(node.output):
            keep.append(node)
            wanted.update(i for i in node.input if i)
    return keep[::-1], wanted


SMALL_CONSTANT_ELEMENTS = 256     # constants up to this size are merged by content
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
              "Multinomial", "Bernoulli", "Dropout"}      # equal inputs, different outputs


def _without_repeats(nodes: list[onnx.NodeProto], initializers: dict[str, onnx.TensorProto],
                     keep: set[str]) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    """Common subexpressions merged: small constants of equal content, then the standard
    nodes that compute what an earlier one computes (the same op, attributes and inputs),
    such as each layer's copy of the shape and mask arithmetic on the shared rotary tables.
    Nodes that write a name in `keep` (the graph outputs) stay. -> (nodes, {dropped name:
    the name that replaces it}); the nodes' inputs are rewritten in place."""
    alias: dict[str, str] = {}
    by_content: dict[bytes, str] = {}
    for name, tensor in initializers.items():
        if math.prod(tensor.dims) <= SMALL_CONSTANT_ELEMENTS:
            unnamed = onnx.TensorProto()
            unnamed.CopyFrom(tensor)
            unnamed.name = ""
            first = by_content.setdefault(unnamed.SerializeToString(), name)
            if first != name:
                alias[name] = first
    seen: dict[tuple, onnx.NodeProto] = {}
    kept = []
    for node in nodes:
        node.input[:] = [alias.get(i, i) for i in node.input]
        key = (node.domain, node.op_type, tuple(node.input), len(node.output),
               tuple(a.SerializeToString() for a in node.attribute))
        if node.domain not in ("", "ai.onnx") or not node.input or node.op_type in RANDOM_OPS \
                or keep.intersection(node.output):
            kept.append(node)
        elif key in seen:
            alias.update(zip(node.output, seen[key].output))
        else:
            seen[key] = node
            kept.append(node)
    return kept, alias


def _to_layer(node: onnx.NodeProto, layer: int) -> None:
    """A layer template's node as layer `layer`'s: its name scopes and its memory-update layer
    index (the exporter's other records are dropped by `finalize`)."""
    for prop in node.metadata_props:
        if prop.key == memory_op.LAYER_METADATA:
            prop.value = str(layer)
        elif prop.key == SCOPES:
            scopes = ast.literal_eval(prop.value)
            prop.value = repr([_TEMPLATE_PATH.sub(f"model.layers.{layer}", s) for s in scopes])


# ------------------------------------------------------------------------------ the graphs
def assemble(spec: GraphSpec, templates: dict[str, Template],
             weights: dict[str, onnx.TensorProto], cfg: InfiniConfig,
             log: Callable[[str], None] = lambda s: None,
             attention: str = "portable") -> onnx.ModelProto:
    """The graph `spec` (segment, prefill, extend, fold) from its templates: the head, one
    stamp of the layer template per layer, the tail, and the frame around them."""
    graph = Assembly(spec, weights)
    layers = cfg.n_layers
    layer_template = templates[layer_template_name(spec.name, attention)]
    # the decoding graphs of the "gqa" decode attention: each layer's state and caches are
    # graph I/O of their own
    in_place = spec.name in (EXTEND, FOLD) and attention == "gqa"
    if spec.name == FOLD:
        memories, norms = [], []
        names = ("k_cache", "v_cache", "memory", "norm")
        for i in range(layers):
            wired = ({name: f"{name}_{i}" for name in names} if in_place else
                     {name: graph.layer_slice(name, i) for name in names})
            out = graph.stamp(layer_template, {**wired, "fold": "fold"},
                              {"memory_out": f"memory_out_{i}" if in_place else None,
                               "norm_out": f"norm_out_{i}" if in_place else None},
                              f"layers.{i}/", i)
            memories.append(out["memory_out"])
            norms.append(out["norm_out"])
            log(f"  {spec.name}: layer {i + 1}/{layers} stamped")
        if not in_place:
            graph.stack(memories, "memory_out")
            graph.stack(norms, "norm_out")
        return graph.model(spec, layer_template.ir_version)

    head_outputs = ("x", "cos", "sin") if spec.name != EXTEND else ("x",)
    head = graph.stamp(templates[HEAD], {"input_ids": "input_ids"},
                       dict.fromkeys(head_outputs), "head/")
    x = head["x"]
    states: tuple[list[str], list[str]] = ([], [])
    for i in range(layers):
        if in_place:
            wired = {"x": x, "memory": f"memory_{i}", "norm": f"norm_{i}", "length": "length"}
            outputs = {f"{c}_cache_out": f"{c}_cache_out_{i}" for c in "kv"}
        else:
            wired = {"x": x, "memory": graph.layer_slice("memory", i),
                     "norm": graph.layer_slice("norm", i)}
            outputs = {}
        if spec.name == EXTEND:
            wired.update(start="start", k_cache=f"k_cache_{i}", v_cache=f"v_cache_{i}")
            carried = () if in_place else ("k_new", "v_new")
        else:
            wired.update(cos=head["cos"], sin=head["sin"])
            carried = ("memory_out", "norm_out")
        out = graph.stamp(layer_template, wired, {"x_out": None, **dict.fromkeys(carried),
                                                  **outputs}, f"layers.{i}/", i)
        x = out["x_out"]
        for values, name in zip(states, carried):
            values.append(out[name])
        log(f"  {spec.name}: layer {i + 1}/{layers} stamped")
    if spec.name == EXTEND:                         # the logits of the tokens asked for
        graph.stamp(templates[TAIL], {"x": x, "logit_rows": "logit_rows"},
                    {"row_logits": "logits"}, "tail/")
    else:                                           # logits, or last_logits for prefill
        logits = spec.outputs[0].name
        graph.stamp(templates[TAIL], {"x": x}, {logits: logits}, "tail/")
    for values, output in zip(states, spec.output_names[1:]):
        if values:                                  # (in place: the layers' own outputs)
            graph.stack(values, output)
    return graph.model(spec, layer_template.ir_version)
