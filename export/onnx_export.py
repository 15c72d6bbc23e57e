"""Export a checkpoint to ONNX: the segment step graph, its memory-update nodes and manifest.

    export_checkpoint("ckpt/", "out/")   ->  out/model.onnx, out/manifest.json (+ tokenizer)

With memory_op="plugin" every layer's memory update is one custom node
(`infini::LinearMemoryUpdate` or `infini::DeltaMemoryUpdate`, with `plugin_namespace` and
`plugin_version` attributes) and the model carries the op's reference decomposition as a
model-local ONNX function of the same name; "portable" traces the update into plain ops.

Each graph is assembled from pieces traced once, its layer repeated per layer
(export/stamp.py); `export_model(..., method="trace")` traces every graph whole instead, the
reference that the stamped graphs are tested against.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import logging
import math
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from infini_trt.plugins.memory_update import contract
from infini_trt.plugins.memory_update.onnx_function import memory_update_function

from . import cached_attention, empty_memory, memory_op, rotary, split_attention
from .checkpoint import (copy_tokenizer, dtype_from_name, dtype_name, load_checkpoint,
                         read_checkpoint)
from .errors import InfiniTrtError
from .files import atomic_dir, check_output, sha256_file
from .io_spec import (DECODE_ATTENTIONS, EXTEND, FOLD, PREFILL, SEGMENT, GraphSpec,
                      extend_graph, fold_graph, prefill_graph, segment_graph)
from .manifest import Manifest, package_version
from .model import InfiniLM
from .quantize import check_method as check_quantize, quantization_record, quantize_graphs
from .weights_file import INLINE_BYTES, WeightsFile

MEMORY_OPS = ("plugin", "portable")
EXPORT_METHODS = ("stamp", "trace")        # export_model(method=...); see export/stamp.py
OPSETS = range(18, 24)
EXTERNAL_DATA_BYTES = 1 << 30        # above this, weights go to <file>.data beside the graph


class SegmentStep(torch.nn.Module):
    """forward = InfiniLM.step, logits in float32 whatever the compute dtype."""

    last_only = False

    def __init__(self, model: InfiniLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, memory, norm):
        logits, memory_out, norm_out = self.model.step(input_ids, memory, norm,
                                                       last_only=self.last_only)
        return logits.float(), memory_out, norm_out


class PrefillStep(SegmentStep):
    """forward = InfiniLM.step with the last token's logits only (reading a prompt)."""

    last_only = True


class ExtendStep(SegmentStep):
    """forward = InfiniLM.extend (decoding), one cache input per layer, logits in float32."""

    fixed_args = 5            # input_ids, start, logit_rows, memory, norm; then *caches

    def forward(self, input_ids, start, logit_rows, memory, norm, *caches):
        layers = self.model.cfg.n_layers
        logits, k_new, v_new = self.model.extend(input_ids, start, memory, norm,
                                                 caches[:layers], caches[layers:], logit_rows)
        return logits.float(), k_new, v_new


class FoldStep(SegmentStep):
    """forward = InfiniLM.fold_cache (decoding: a completed segment into memory)."""

    def forward(self, k_cache, v_cache, memory, norm, fold):
        return self.model.fold_cache(k_cache, v_cache, memory, norm, fold)


class ExtendInPlaceStep(SegmentStep):
    """forward = InfiniLM.extend_in_place (the "gqa" decode attention), one cache input and
    one cache output per layer."""

    fixed_args = 4            # input_ids, start, length, logit_rows; then memory_i, norm_i,
    #                           k_cache_i, v_cache_i of every layer

    def forward(self, input_ids, start, length, logit_rows, *per_layer):
        layers = self.model.cfg.n_layers
        memory, norm, k_caches, v_caches = (per_layer[i * layers:(i + 1) * layers]
                                            for i in range(4))
        logits, k_out, v_out = self.model.extend_in_place(
            input_ids, start, length, torch.stack(memory), torch.stack(norm), k_caches,
            v_caches, logit_rows)
        return (logits.float(), *k_out, *v_out)


class FoldRowsStep(SegmentStep):
    """FoldStep of the "gqa" decode attention: each layer's caches (keys in the values'
    layout) and state are inputs and outputs of their own."""

    fixed_args = 0            # k_cache_i, v_cache_i, memory_i, norm_i of every layer; fold

    def forward(self, *per_layer_and_fold):
        """Each layer's fold on its own inputs (`InfiniLM.fold_cache` without the stacking,
        which would copy both caches in the graph)."""
        model, layers = self.model, self.model.cfg.n_layers
        *per_layer, fold = per_layer_and_fold
        k_caches, v_caches, memory, norm = (per_layer[i * layers:(i + 1) * layers]
                                            for i in range(4))
        rope = model.rope(model.cfg.segment_len, k_caches[0].dtype, k_caches[0].device)
        states = [model.layer_fold(i, k_caches[i].transpose(-1, -2), v_caches[i], memory[i],
                                   norm[i], fold, rope) for i in range(layers)]
        return (*(m for m, _ in states), *(z for _, z in states))


# the "gqa" decode attention's wrappers of the decoding graphs
IN_PLACE_WRAPPERS = {EXTEND: ExtendInPlaceStep, FOLD: FoldRowsStep}


# graph name -> (module wrapping the model, file name, description)
GRAPHS = {
    SEGMENT: (SegmentStep, "model.onnx",
              "segment step: (input_ids, memory, norm) -> (logits, memory_out, norm_out)"),
    PREFILL: (PrefillStep, "prefill.onnx",
              "prompt reading: (input_ids, memory, norm) -> (last_logits, memory_out, norm_out)"),
    EXTEND: (ExtendStep, "extend.onnx",
             "decoding: (input_ids, start, memory, norm, k_cache_i.., v_cache_i..) -> "
             "(logits, k_new, v_new)"),
    FOLD: (FoldStep, "fold.onnx",
           "decoding: (k_cache, v_cache, memory, norm, fold) -> (memory_out, norm_out)"),
}


def example_inputs(spec: GraphSpec, sizes: dict[str, int]) -> tuple[torch.Tensor, ...]:
    """Zero inputs of the spec's shapes (sizes >= 2, so that torch.export keeps axes dynamic)."""
    return tuple(torch.zeros(t.shape(sizes), dtype=getattr(torch, t.dtype)) for t in spec.inputs)


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx speaks a lot (warnings, logs, prints); keep it for errors only."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo",
                                              "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def trace_to_onnx(module: torch.nn.Module, spec: GraphSpec, example: tuple,
                  opset: int, plugin: bool) -> onnx.ModelProto:
    """torch.onnx (dynamo) export of `module` under the I/O names and dynamic axes of `spec`."""
    context = memory_op.plugin_nodes() if plugin else contextlib.nullcontext()
    with _quiet_exporter(), context, rotary.rotation_nodes(opset), torch.no_grad():
        program = torch.onnx.export(
            module, example, dynamo=True, opset_version=opset, optimize=True,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=_grouped(spec.torch_dynamic_shapes(), module), verbose=False,
            custom_translation_table={**split_attention.translation(),
                                      **rotary.translation(),
                                      **cached_attention.translation()})
    return program.model_proto


def _grouped(shapes: tuple, module: torch.nn.Module) -> tuple:
    """torch.export wants the dynamic shapes of a *varargs parameter as one tuple."""
    fixed = getattr(module, "fixed_args", None)
    return shapes if fixed is None else (*shapes[:fixed], tuple(shapes[fixed:]))


# the exporter's records of where a node was traced from, but its name scopes (the node's
# module path, kept): the source file's path and lines, the FX node and the class hierarchy
# and namespace (they print Python functions with their addresses). An export keeps none of
# them, so that its bytes do not depend on where, or in which process, it was made.
NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def _path_name(node: onnx.NodeProto) -> str:
    """'/layers.3/attn/qkv_proj/MatMul' from the exporter's name scopes."""
    props = {p.key: p.value for p in node.metadata_props}
    if memory_op.LAYER_METADATA in props:
        return f"/layers.{props[memory_op.LAYER_METADATA]}/memory_update"
    try:
        scopes = ast.literal_eval(props.get(NAME_SCOPES, "[]"))
    except (ValueError, SyntaxError):
        scopes = []
    modules = [s for s in scopes[:-1] if s and not s.startswith("_")]
    path = modules[-1].removeprefix("model.").replace(".", "/") if modules else ""
    path = path.replace("layers/", "layers.")
    return f"/{path}/{node.op_type}" if path else f"/{node.op_type}"


def _drop_trace_records(node: onnx.NodeProto) -> None:
    for index in reversed(range(len(node.metadata_props))):
        key = node.metadata_props[index].key
        if key == "namespace" or (key.startswith("pkg.torch.onnx.") and key != NAME_SCOPES):
            del node.metadata_props[index]


def fold_weight_parts(graph: onnx.GraphProto, opset: int,
                      weights: WeightsFile | None = None) -> None:
    """Compute, in place, the nodes that read initializers only into initializers: the Split
    and Transpose nodes of a `PartedLinear` weight (its parts, transposed for MatMul), which
    torch.onnx's constant folding leaves alone at this size, and in a stamped graph
    (export/stamp.py) what a template computes from its weights alone (the gate's
    sigmoid(beta)). ONNX Runtime's int8 quantizer and TensorRT's weight handling want a
    MatMul's weight to be an initializer, and nothing is computed on weights at run time.
    With `weights` (the export's weights file), a node that reads pending references
    (export/weights_file.py) reads their arrays and its results are kept there, keyed by
    what computed them: a node that an earlier graph folded is not computed again."""
    from onnx import numpy_helper

    values = {t.name: t for t in graph.initializer}
    folded = []
    for index, node in enumerate(graph.node):
        if not node.input or node.domain not in ("", "ai.onnx") or \
                not all(i in values for i in node.input if i):
            continue
        if weights is None or not any(weights.key(values[i]) for i in node.input if i):
            inputs = [numpy_helper.to_array(values[i]) if i else None for i in node.input]
            for name, part in zip(node.output, _evaluate(node, inputs, opset)):
                tensor = values[name] = graph.initializer.add()      # one copy of the data
                tensor.name = name
                tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(part.dtype)
                tensor.dims.extend(part.shape)
                tensor.raw_data = part.tobytes()
        else:
            computed = [f"{_fold_key(node, values, weights)}/{i}"
                        for i in range(len(node.output))]
            if not all(c in weights.derived for c in computed):
                inputs = [None if not i else weights.array(values[i])
                          if weights.key(values[i]) else numpy_helper.to_array(values[i])
                          for i in node.input]
                for c, part in zip(computed, _evaluate(node, inputs, opset)):
                    data_type = onnx.helper.np_dtype_to_tensor_dtype(part.dtype)
                    weights.derived[c] = (weights.keep(part, data_type), part.shape)
            for name, c in zip(node.output, computed):
                key, shape = weights.derived[c]
                part = weights.arrays[key].reshape(shape)
                tensor = weights.tensor(name, key, part, weights.types[key]) \
                    if part.nbytes > INLINE_BYTES else numpy_helper.from_array(part, name)
                values[name] = tensor
                graph.initializer.append(tensor)
        folded.append(index)
    for index in reversed(folded):
        del graph.node[index]
    drop_unused_initializers(graph)


def _fold_key(node: onnx.NodeProto, values: dict[str, onnx.TensorProto],
              weights: WeightsFile) -> str:
    """What a node on constants computes, as a digest: its op and attributes, and for each
    input the key of its pending reference (or the content of an inline tensor)."""
    digest = hashlib.sha256(f"{node.domain}/{node.op_type}/{len(node.output)}".encode())
    for attribute in node.attribute:
        digest.update(attribute.SerializeToString())
    for name in node.input:
        key = weights.key(values[name]) if name else None
        if key is not None:
            digest.update(b"ref:" + key.encode())
        elif not name:
            digest.update(b"none")
        else:
            unnamed = onnx.TensorProto()
            unnamed.CopyFrom(values[name])
            unnamed.name = ""
            digest.update(hashlib.sha256(unnamed.SerializeToString()).digest())
    return digest.hexdigest()


def _evaluate(node: onnx.NodeProto, inputs: list, opset: int) -> list[np.ndarray]:
    """The outputs of a standard ONNX node on constant inputs: Split and Transpose (the large
    ones) in numpy, anything else with ONNX's reference evaluator."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    data = inputs[0]
    if node.op_type == "Transpose":
        return [data.transpose(attrs.get("perm"))]
    if node.op_type == "Split" and (len(inputs) > 1 or "num_outputs" not in attrs):
        axis = attrs.get("axis", 0)
        sizes = inputs[1] if len(inputs) > 1 and inputs[1] is not None \
            else [data.shape[axis] // len(node.output)] * len(node.output)
        return np.split(data, np.cumsum(sizes)[:-1], axis=axis)
    from onnx.reference import ReferenceEvaluator

    feeds = {name: value for name, value in zip(node.input, inputs) if name}
    return ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove, in place, the initializers that no node reads and no output is."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for index in reversed(range(len(graph.initializer))):      # in place: no copy of weights
        if graph.initializer[index].name not in used:
            del graph.initializer[index]


def finalize(proto: onnx.ModelProto, spec: GraphSpec, rule: str | None, opset: int,
             doc: str, weights: WeightsFile | None = None) -> onnx.ModelProto:
    """Path-style node names, the weight parts as initializers (`fold_weight_parts`), the
    memory-update function, and checks of the I/O table."""
    fold_weight_parts(proto.graph, opset, weights)
    seen: dict[str, int] = {}
    for node in proto.graph.node:
        name = _path_name(node)
        seen[name] = seen.get(name, 0) + 1
        node.name = name if seen[name] == 1 else f"{name}_{seen[name] - 1}"
        _drop_trace_records(node)
    if rule is not None:
        del proto.functions[:]
        proto.functions.append(memory_update_function(rule, opset))
        n_custom = sum(n.domain == contract.NAMESPACE for n in proto.graph.node)
        if n_custom == 0:
            raise RuntimeError("export produced no memory-update node")  # a bug, not user error
    got = ([i.name for i in proto.graph.input], [o.name for o in proto.graph.output])
    if got != (spec.input_names, spec.output_names):
        raise RuntimeError(f"exported I/O {got} differs from the I/O table")
    proto.doc_string = doc
    proto.producer_name = "infini-trt"
    proto.producer_version = package_version("infini-trt") or "dev"
    return proto


def save_onnx(proto: onnx.ModelProto, path: Path, weights: WeightsFile | None = None,
              check: bool = True) -> dict[str, str | None]:
    """Save, check (`check_onnx`, unless not `check`), return {file: sha256}. With `weights`
    (the export's weights file) the pending references go there (`WeightsFile.place`), and
    the file is listed with None until `WeightsFile.finish` gives its sha256. Inline
    initializers stay in the graph file, or go to <file>.data beside it when they are too
    many for one protobuf."""
    files = {}
    if weights is not None and weights.place(proto.graph):
        files[weights.path.name] = None
    if sum(len(t.raw_data) for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(path), save_as_external_data=True,
                        location=path.name + ".data")
        if check:
            check_onnx(proto, path.parent)
        return {**{f.name: sha256_file(f) for f in (path, path.with_name(path.name + ".data"))},
                **files}
    data = proto.SerializeToString()            # once: written and hashed
    path.write_bytes(data)
    if check:
        check_onnx(proto, path.parent)
    return {path.name: hashlib.sha256(data).hexdigest(), **files}


def hash_weights_file(graphs: dict[str, dict], weights: WeightsFile) -> None:
    """Finish the weights file and record its sha256 in the graphs that list it."""
    digest = weights.finish()
    for graph in graphs.values():
        if weights.path.name in graph["files"]:
            graph["files"][weights.path.name] = digest


CHECKED_APART_BYTES = 1 << 16    # initializers this large are checked apart from the graph


def check_onnx(proto: onnx.ModelProto, directory: Path) -> None:
    """The full ONNX checker (schemas, types, strict shape inference) on the model with its
    large initializers given as graph inputs of their type and shape, and those checked
    here: their bytes (or their extent in the external data file, under `directory`) against
    their type and shape. The same checks as checking the saved file, without the checker
    parsing hundreds of megabytes of weights."""
    light = onnx.ModelProto(ir_version=proto.ir_version, opset_import=proto.opset_import,
                            functions=proto.functions, producer_name=proto.producer_name,
                            producer_version=proto.producer_version,
                            doc_string=proto.doc_string)
    graph = light.graph
    graph.name = proto.graph.name
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, field).extend(getattr(proto.graph, field))
    for tensor in proto.graph.initializer:
        external = tensor.data_location == onnx.TensorProto.EXTERNAL
        if not external and (not tensor.HasField("raw_data") or
                             len(tensor.raw_data) <= CHECKED_APART_BYTES):
            graph.initializer.append(tensor)
            continue
        width = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        want = math.prod(tensor.dims) * width
        if external:
            where = {e.key: e.value for e in tensor.external_data}
            file = directory / where["location"]
            got = int(where.get("length", want))
            fits = int(where.get("offset", 0)) + got <= file.stat().st_size
        else:
            got, fits = len(tensor.raw_data), True
        if got != want or not fits:                                   # a bug
            raise RuntimeError(f"initializer {tensor.name}: {got} bytes for {want}")
        graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                              list(tensor.dims)))
    onnx.checker.check_model(light.SerializeToString(), full_check=True)


def export_model(model: InfiniLM, output: str | Path, memory_op_mode: str = "plugin",
                 opset: int = 20, force: bool = False, source: dict | None = None,
                 tokenizer: Path | None = None,
                 log: Callable[[str], None] = lambda s: None,
                 graphs: tuple[str, ...] = (SEGMENT, PREFILL, EXTEND, FOLD),
                 quantize: str | None = None, inputs: tuple = (),
                 method: str = "stamp", decode_attention: str = "portable") -> Manifest:
    """Export `model` (already in its export dtype) into the directory `output`: the segment
    graph, the prompt-reading graph (prefill) and the decoding graphs (extend, fold), or those
    of them that `graphs` names.
    `quantize="int8"`: int8 weights for ONNX Runtime (export/quantize.py). `inputs` (and the
    tokenizer) are refused as the output.
    `method`: "stamp" traces each distinct piece once and repeats the layer per layer
    (export/stamp.py); "trace" traces every graph whole (the reference the stamped graphs are
    tested against).
    `decode_attention`: io_spec.DECODE_ATTENTIONS; "gqa" writes the decoding graphs for ONNX
    Runtime only (export/cached_attention.py)."""
    if decode_attention not in DECODE_ATTENTIONS:
        raise InfiniTrtError(f"--decode-attention must be one of {', '.join(DECODE_ATTENTIONS)}")
    if memory_op_mode not in MEMORY_OPS:
        raise InfiniTrtError(f"--memory-op must be one of {', '.join(MEMORY_OPS)}")
    if opset not in OPSETS:
        raise InfiniTrtError(f"--opset must be between {OPSETS.start} and {OPSETS.stop - 1}")
    if method not in EXPORT_METHODS:
        raise ValueError(f"export method must be one of {EXPORT_METHODS}, got {method!r}")
    cfg = model.cfg
    dtype = dtype_name(model.embed.weight.dtype)
    if dtype == "float64":
        raise InfiniTrtError("float64 is the reference dtype; export fp32, fp16 or bf16")
    if quantize is not None:
        check_quantize(quantize, dtype)
    plugin = memory_op_mode == "plugin"
    if cfg.segment_len < 2:
        raise InfiniTrtError("segment_len must be at least 2 to export")
    specs = [spec for spec in (segment_graph(cfg), prefill_graph(cfg),
                               extend_graph(cfg, dtype, decode_attention,
                                            skip_empty=method == "stamp"),
                               fold_graph(cfg, dtype, decode_attention)) if spec.name in graphs]
    sizes = {"batch": 2, "seq": min(3, cfg.segment_len), "rows": 2, "window": cfg.segment_len}
    graphs = {}
    sources = (*inputs, *([tokenizer] if tokenizer is not None else []))
    check_output(output, "dir", force, inputs=sources)
    with atomic_dir(output, force=force, inputs=sources) as tmp:
        model = model.eval()
        weights_file = WeightsFile(tmp)
        if method == "stamp":
            from . import stamp

            log(f"exporting {cfg.n_layers} layers, {dtype}, opset {opset}")
            templates = stamp.trace_templates(model, [s.name for s in specs], sizes, opset,
                                              plugin, log, decode_attention)
            weights = stamp.weight_tensors(model, weights_file)
        for spec in specs:
            wrapper, file, doc = GRAPHS[spec.name]
            if decode_attention == "gqa":
                wrapper = IN_PLACE_WRAPPERS.get(spec.name, wrapper)
            if method == "stamp":
                log(f"stamping the {spec.name} graph")
                proto = stamp.assemble(spec, templates, weights, cfg, log, decode_attention)
            else:
                log(f"tracing the {spec.name} graph ({cfg.n_layers} layers, {dtype}, "
                    f"opset {opset})")
                proto = trace_to_onnx(wrapper(model), spec, example_inputs(spec, sizes),
                                      opset, plugin)
            has_update = spec.name != EXTEND
            proto = finalize(proto, spec, cfg.update_rule if plugin and has_update else None,
                             opset, doc=f"infini-trt {doc}", weights=weights_file)
            if empty_memory.FLAG in spec.input_names:         # (stamped exports only)
                empty_memory.skip_retrieval_while_empty(proto.graph, cfg.n_layers)
            files = save_onnx(proto, tmp / file, weights_file)
            graphs[spec.name] = {"file": file, "files": files, "io": spec.to_dict()}
        hash_weights_file(graphs, weights_file)
        if quantize is not None:
            quantize_graphs(tmp, graphs, quantize, log)
        tokenizer_name = copy_tokenizer(tokenizer, tmp) if tokenizer is not None else None
        manifest = Manifest(
            path=Path(output), config=cfg, dtype=dtype, memory_op=memory_op_mode, opset=opset,
            graphs=graphs, tokenizer=tokenizer_name,
            plugin=({"op_type": contract.op_type(cfg.update_rule),
                     "namespace": contract.NAMESPACE, "version": contract.VERSION,
                     "attributes": contract.attributes(cfg.update_rule, cfg.memory_eps)}
                    if plugin else None),
            source=source or {},
            versions={name: package_version(name) for name in
                      ("infini-trt", "torch", "onnx", "onnxscript")},
            quantization=quantization_record(quantize) if quantize else None,
            decode_attention=decode_attention)
        manifest.write(tmp)
    return manifest


def export_checkpoint(checkpoint: str | Path, output: str | Path, dtype: str | None = None,
                      memory_op_mode: str = "plugin", opset: int = 20, force: bool = False,
                      log: Callable[[str], None] = lambda s: None,
                      quantize: str | None = None,
                      decode_attention: str = "portable") -> Manifest:
    """Load a native checkpoint, cast it to `dtype` (default: its own) and export it
    (`quantize="int8"`: with int8 weights, for ONNX Runtime; `decode_attention="gqa"`: the
    decoding graphs for ONNX Runtime only)."""
    check_output(output, "dir", force, inputs=(checkpoint,))       # before the long work
    ckpt = read_checkpoint(checkpoint)
    model = load_checkpoint(checkpoint)
    if dtype is not None:
        model = model.to(dtype_from_name(dtype))
    weights = ckpt.path / "model.safetensors"
    source = {"checkpoint": str(ckpt.path.resolve()), "weights_sha256": sha256_file(weights),
              "checkpoint_dtype": dtype_name(ckpt.dtype)}
    return export_model(model, output, memory_op_mode, opset, force, source,
                        ckpt.tokenizer_path, log, quantize=quantize, inputs=(ckpt.path,),
                        decode_attention=decode_attention)
