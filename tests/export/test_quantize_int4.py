"""int4 (export/quantize.py): 4-bit MatMulNBits in the decoding graph, int8-rows' row GEMMs in
the graphs that read whole segments. On tiny random weights and on the bundled passkey model:
only the projections are rewritten, every one of them; the export validates within int4's
tolerances; the decoding graphs (extend, fold) compute what a segment graph with the same 4-bit
weights computes. On a small graph: ONNX Runtime computes the 4-bit math that quantize.py
states, here and (under qemu-user) on the other kind of x86 CPU where qemu can emulate it.
(The refusals, the manifest record and bench's subjects are tested for every method in
test_quantize.py.)"""
import platform
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from helpers import ORT_ON_SAVED_INPUTS, assert_close, random_model
from infini_trt.export import preset, save_checkpoint
from infini_trt.export.io_spec import EXTEND, PREFILL, SEGMENT
from infini_trt.export.manifest import read_manifest
from infini_trt.export.quantize import BLOCKS, quantize_export, quantize_graph, row_gemms
from infini_trt.export.quantize_rows import weight_matmuls
from infini_trt.runtime.cli import main
from infini_trt.runtime.validate import DEFAULT_MIN_GREEDY, DEFAULT_TOLERANCES, validate_export

ort = pytest.importorskip("onnxruntime")

TINY = preset("tiny")
INT4 = BLOCKS["int4"]


def _int4_copy(fp32, tmp_path_factory, name):
    target = tmp_path_factory.mktemp(f"int4-{name}") / "onnx"
    quantize_export(fp32, target, "int4")
    return target


@pytest.fixture(scope="module")
def tiny_int4(exported, tmp_path_factory):
    """(checkpoint, fp32 export, its int4 copy) of tiny random weights."""
    ckpt, fp32 = exported(TINY)
    return ckpt, fp32, _int4_copy(fp32, tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def passkey_int4(shared_cache, tmp_path_factory):
    """The same for the bundled passkey model (its fp32 export made once per session, in the
    shared cache)."""
    from infini_trt.runtime.export_cache import cached_export
    from infini_trt.runtime.models import bundled_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INFINI_TRT_CACHE", str(shared_cache))
        fp32 = cached_export(bundled_model(), log=lambda s: None)
    return bundled_model(), fp32, _int4_copy(fp32, tmp_path_factory, "passkey")


@pytest.fixture(params=["tiny_int4", "passkey_int4"])
def int4_export(request):
    return request.getfixturevalue(request.param)


def _signature(node):
    return (node.op_type, node.domain, tuple(node.input), tuple(node.output),
            tuple(a.SerializeToString() for a in node.attribute))


def _attributes(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_every_projection_is_quantized_and_nothing_else_changes(int4_export):
    """Each graph against its fp32 original: every node but the projections is there as it
    was (embedding, norms, attention, memory update and its function, the state path), and the
    new nodes replace exactly the projections: 4-bit MatMulNBits in extend, row GEMMs in the
    segment and prefill graphs."""
    _, fp32, int4 = int4_export
    manifest = read_manifest(int4)
    cfg = manifest.config
    assert manifest.precision == "int4" and manifest.dtype == "float32"
    for graph in (SEGMENT, PREFILL, EXTEND):
        before = onnx.load(str(read_manifest(fp32).graph_file(graph)))
        after = onnx.load(str(manifest.graph_file(graph)))
        projections = weight_matmuls(before.graph)
        # q, k, v, o, gate, up, down per layer and the LM head (of the last row only, in the
        # prefill graph)
        assert len(projections) == 7 * cfg.n_layers + 1, graph
        kept = [n for n in before.graph.node if n not in projections]
        kept_signatures = {_signature(n) for n in kept}
        assert kept_signatures <= {_signature(n) for n in after.graph.node}, graph
        new = [n for n in after.graph.node if _signature(n) not in kept_signatures]
        read_by_kept = {i for n in kept for i in n.input} | {o.name for o in after.graph.output}
        assert {o for n in new for o in n.output} & read_by_kept == \
            {n.output[0] for n in projections}, graph
        assert weight_matmuls(after.graph) == [], graph
        op = "MatMulIntegerToFloat" if row_gemms("int4", graph) else "MatMulNBits"
        products = [n for n in new if n.op_type == op]
        assert len(products) == len(projections), graph
        assert manifest.quantization["graphs"][graph]["op"] == op
        if op == "MatMulNBits":
            by_output = {n.output[0]: n for n in projections}
            weights = {t.name: t for t in before.graph.initializer}
            for node in products:
                original = by_output[node.output[0]]
                assert node.input[0] == original.input[0]
                k, n = weights[original.input[1]].dims
                assert _attributes(node) == {"K": k, "N": n, "bits": 4,
                                             "block_size": INT4.block_size,
                                             "accuracy_level": INT4.accuracy_level}
                assert len(node.input) == (3 if INT4.symmetric else 4)    # zero points
        assert [f.SerializeToString() for f in after.functions] == \
            [f.SerializeToString() for f in before.functions], graph
        assert [i.SerializeToString() for i in after.graph.input] == \
            [i.SerializeToString() for i in before.graph.input], graph
        assert [o.SerializeToString() for o in after.graph.output] == \
            [o.SerializeToString() for o in before.graph.output], graph
    assert manifest.graphs["fold"]["files"] == read_manifest(fp32).graphs["fold"]["files"]


def test_the_passkey_model_validates_within_int4_tolerances(passkey_int4):
    """The trained model, random tokens: segments and the decoding phase against float64
    (tiny random weights: test_quantize.py, as every method)."""
    ckpt, _, int4 = passkey_int4
    report = validate_export(ckpt, int4, segments=8, batch=2, include_torch=False)
    ort_report = report.backends[0]
    assert report.dtype == "int4" and ort_report.min_greedy == DEFAULT_MIN_GREEDY["int4"]
    assert {k: o.tolerance for k, o in ort_report.outputs.items()} == DEFAULT_TOLERANCES["int4"]
    assert report.decoding is not None
    assert report.passed, report.table()
    # 4 bits where tokens are decoded: several times int8's error there
    decoded = report.decoding.backends[0].outputs["logits"]
    assert decoded.rel_rms > DEFAULT_TOLERANCES["int8"]["logits"], report.table()


def test_the_passkey_model_still_retrieves_the_key(passkey_int4):
    """Keys 1 to 7 segments back, read by the row GEMMs, the answer decoded in 4 bits."""
    from infini_trt.runtime.passkey import parse_depths, run_passkey
    from infini_trt.runtime.passkey_data import PasskeyGenerator, vocabulary
    from infini_trt.runtime.runners.ort_runner import OrtRunner
    from infini_trt.runtime.tokenizer import model_tokenizer

    ckpt, _, int4 = passkey_int4
    tokenizer = model_tokenizer(ckpt, len(vocabulary()))
    gen = PasskeyGenerator(tokenizer.encode, read_manifest(int4).config.segment_len,
                           tokenizer.decode)
    with OrtRunner(int4) as runner:
        result = run_passkey(runner, gen, [256, 512], parse_depths("start,end"), trials=4,
                             seed=1, progress=False)
    assert all(c.accuracy == 1.0 for c in result.cells), result.table()


def _segment_logits(session, cfg, tokens):
    """The segment graph `session` over `tokens` (B, T), segment by segment from an empty
    state -> (logits (B, T, V), memory, norm after the last full segment)."""
    batch, n = tokens.shape[0], cfg.segment_len
    memory = np.zeros(cfg.memory_shape(batch), np.float32)
    norm = np.zeros(cfg.norm_shape(batch), np.float32)
    logits, full = [], (memory, norm)
    for start in range(0, tokens.shape[1], n):
        out, memory, norm = session.run(None, {"input_ids": tokens[:, start:start + n],
                                               "memory": memory, "norm": norm})
        logits.append(out)
        if start + n <= tokens.shape[1]:
            full = (memory, norm)
    return np.concatenate(logits, axis=1), *full


def test_decoding_computes_the_segment_graph_with_the_same_weights(int4_export, tmp_path):
    """A prompt inside the first segment (the extend graph), then tokens decoded one at a time
    across two folds, batched: the logits and the state of the segment graph quantized as the
    decoding graph is (the same 4-bit weights). Mostly to float32 rounding; where a float32
    difference moves an activation across the rounding boundary of its int8 level, a little
    more (over 30 draws: logits up to 3e-3, memory 1.6e-4, norm 4e-5, against 0.15-0.2 / 0.06 /
    0.01 between int4 and float32)."""
    from infini_trt.runtime.runners.ort_runner import OrtRunner
    from infini_trt.runtime.session import Session

    _, fp32, int4 = int4_export
    cfg = read_manifest(int4).config
    n = cfg.segment_len
    segment = tmp_path / "model.onnx"
    for file in read_manifest(fp32).graphs[SEGMENT]["files"]:     # with the weights file
        shutil.copyfile(fp32 / file, tmp_path / file)
    quantize_graph(segment, "int4", EXTEND)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(segment), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng()
    tokens = rng.integers(0, cfg.vocab_size, (2, 2 * n + 5))
    prompt = int(rng.integers(1, n))
    want, memory, norm = _segment_logits(session, cfg, tokens)
    with OrtRunner(int4) as runner:
        decoding = Session(runner, 2)
        got = [decoding.feed(list(tokens[:, :prompt]), progress=False)]
        for t in range(prompt, tokens.shape[1]):
            got.append(decoding.decode(tokens[:, t]))
        state = runner.state()
    got = np.stack(got, axis=1)                              # logits after tokens prompt-1 ..
    assert_close(torch.from_numpy(want[:, prompt - 1:]), got, 2e-2, what="decoded logits")
    assert_close(torch.from_numpy(memory), state[0], 2e-3, what="memory after two folds")
    assert_close(torch.from_numpy(norm), state[1], 1e-3, what="norm after two folds")


def test_export_cli_refuses_int4_of_a_bf16_checkpoint(tmp_path):
    save_checkpoint(random_model(TINY, dtype=torch.bfloat16), tmp_path / "ckpt")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "ckpt"), "-o",
                                       str(tmp_path / "x"), "--quantize", "int4"])
    assert result.exit_code == 1
    assert "--dtype fp32" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- the 4-bit math, on a small graph
K, N = 96, 40          # three blocks of 32; the product below reads N = 40: a partial block


def _graph():
    """y1 = x @ w1, y2 = x @ w2 (sharing x), y3 = y1 @ w3, weights of different spreads."""
    rng = np.random.default_rng()
    w1 = rng.standard_normal((K, N)).astype(np.float32)
    w2 = (rng.uniform(-1, 1, (K, N)) * rng.uniform(0, 3, (K, 1)) ** 3).astype(np.float32)
    w3 = (rng.standard_normal((N, N)) ** 3).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", K])
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["b", "t", N])
               for i in (1, 2, 3)]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="p1"),
             helper.make_node("MatMul", ["x", "w2"], ["y2"], name="p2"),
             helper.make_node("MatMul", ["y1", "w3"], ["y3"], name="p3")]
    weights = [numpy_helper.from_array(w, f"w{i}") for i, w in ((1, w1), (2, w2), (3, w3))]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outputs, weights),
                              opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model, (w1, w2, w3)


def _levels(model, node):
    """A MatMulNBits node's weights as stored -> (q - zero_point (N, blocks, B) int, scales
    (N, blocks), B), read as the operator's contract lays them out (two levels a byte, the low
    nibble first; zero points likewise; 2^(bits-1) when there are none)."""
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    attrs = _attributes(node)
    n, size, blocks = attrs["N"], attrs["block_size"], -(-attrs["K"] // attrs["block_size"])
    packed = constants[node.input[1]].reshape(n, blocks, size // 2)
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, blocks, size).astype(np.int64)
    if len(node.input) > 3:
        zp = constants[node.input[3]].reshape(n, -1)
        zp = np.stack([zp & 15, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.int64)
    else:
        zp = np.full((n, blocks), 8)
    scales = constants[node.input[2]].reshape(n, blocks).astype(np.float64)
    return q - zp[:, :, None], scales, size


def _stated_math(x, centered, scales, size):
    """quantize.py's 4-bit product, in float64 but for s_x (float32, as the kernel has it)."""
    blocks = centered.shape[1]
    padded = np.zeros(x.shape[:-1] + (blocks * size,), np.float32)
    padded[..., :x.shape[-1]] = x
    xb = padded.reshape(x.shape[:-1] + (blocks, size))
    s_x = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)            # (..., blocks)
    safe = np.where(s_x > 0, s_x, 1)
    xq = np.where(s_x[..., None] > 0, np.rint(xb / safe[..., None]), 0).astype(np.int64)
    dots = np.einsum("...kb,nkb->...nk", xq, centered).astype(np.float64)      # (..., N, blocks)
    return (dots * s_x[..., None, :] * scales).sum(-1)


def _rel_rms(want, got):
    return float(np.sqrt(((want - got) ** 2).mean() / (want ** 2).mean()))


def _rows(rng, shape):
    """Rows far apart in scale, a row with one outlier (its block's others near zero) and a
    zero row."""
    x = rng.standard_normal(shape).astype(np.float32)
    x *= (10.0 ** rng.integers(-3, 4, shape[:-1]))[..., None]
    flat = x.reshape(-1, shape[-1])
    if len(flat) > 2:
        flat[1] *= 1e-3
        flat[1, 40] = 30.0
        flat[2] = 0.0
    return x


@pytest.fixture(scope="module")
def int4_graph(tmp_path_factory):
    """The small graph quantized as the int4 decoding graph is, saved."""
    model, weights = _graph()
    path = tmp_path_factory.mktemp("int4-graph") / "g.onnx"
    onnx.save(model, str(path))
    quantize_graph(path, "int4", EXTEND)
    return path, weights


def _check_outputs(model, weights, inputs, outputs, rel):
    nodes = {n.output[0]: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    for name, x in inputs.items():
        y1, y2, y3 = (outputs[f"{name}/{i}"] for i in range(3))
        assert all(np.isfinite(y).all() for y in (y1, y2, y3)), name
        for y, source, out in ((y1, x, "y1"), (y2, x, "y2"), (y3, y1, "y3")):
            want = _stated_math(source, *_levels(model, nodes[out]))
            assert _rel_rms(want, y) < rel, (name, out)
            assert (y[np.all(source == 0, axis=-1)] == 0).all()             # a zero row: 0


def test_weights_are_4_bit_blocks_within_a_step_of_the_float_weights(int4_graph):
    path, weights = int4_graph
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"] * 3
    for node, w in zip(nodes, weights):
        centered, scales, size = _levels(model, node)
        k = w.shape[0]
        assert size == INT4.block_size and _attributes(node)["bits"] == 4
        assert np.isfinite(scales).all() and (scales > 0).all()
        dequantized = (centered * scales[:, :, None]).reshape(w.shape[1], -1)[:, :k].T
        step = np.repeat(scales, size, axis=1)[:, :k].T
        # round to nearest, except where a block's zero point rounds its range past a level
        assert (np.abs(dequantized - w) <= step * (1 + 1e-6)).all()
        assert np.abs(dequantized - w).mean() <= 0.3 * step.mean()
        assert _rel_rms(w.astype(np.float64), dequantized) < 0.15       # 4 bits: ~8% here


def test_ort_computes_the_stated_4_bit_math(int4_graph):
    path, weights = int4_graph
    rng = np.random.default_rng()
    inputs = {"rows": _rows(rng, (2, 6, K)), "one": _rows(rng, (1, 1, K))}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = {f"{name}/{i}": y for name, x in inputs.items()
               for i, y in enumerate(session.run(None, {"x": x}))}
    _check_outputs(onnx.load(str(path)), weights, inputs, outputs, 1e-5)


# Under qemu-user as the other kind of x86 CPU than this one: ONNX Runtime's CPUID dispatch picks
# other MatMulNBits kernels. qemu 7.2's TCG emulates AVX2 but neither AVX-512 nor AVX-VNNI (it
# drops those features, and their instructions raise SIGILL): on a host without VNNI the check
# skips, saying so.
OTHER_CPU = {True: ("EPYC-Milan", ["1", "0", "0"]),         # host with VNNI: AVX2 only
             False: ("Icelake-Server", ["1", "1", "1"])}    # host without: AVX-512 VNNI
_CHILD = ORT_ON_SAVED_INPUTS


@pytest.mark.skipif(platform.machine() != "x86_64", reason="qemu-x86_64 runs x86-64 Python only")
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                    reason="qemu-x86_64 is not on PATH (Debian: apt-get install qemu-user)")
def test_the_other_kind_of_cpu_computes_the_stated_4_bit_math(int4_graph, tmp_path):
    from infini_trt.runtime.cpu import cpu_features

    path, weights = int4_graph
    cpu, features = OTHER_CPU[cpu_features()["int8_dot"]]
    rng = np.random.default_rng()
    inputs = {"rows": _rows(rng, (2, 6, K)), "one": _rows(rng, (1, 1, K))}
    np.savez(tmp_path / "x.npz", **inputs)
    child = subprocess.run(["qemu-x86_64", "-cpu", cpu, sys.executable, "-c", _CHILD, str(path),
                            str(tmp_path / "x.npz"), str(tmp_path / "y.npz")],
                           capture_output=True, text=True, timeout=120)
    said = [line for line in child.stderr.splitlines() if "TCG doesn't support" not in line]
    if not child.stdout.startswith("cpu "):
        pytest.skip(f"qemu-x86_64 -cpu {cpu} did not start Python: {said[-3:]}")
    got = child.stdout.split()[1:4]
    if got != features:
        dropped = sorted({line.split(".")[-1].split()[0] for line in child.stderr.splitlines()
                          if "TCG doesn't support" in line and "avx512" in line})
        pytest.skip(f"qemu-x86_64 cannot emulate {cpu}'s kind here (avx2, avx512f, int8 dot "
                    f"products: {got}, wanted {features}; TCG drops {', '.join(dropped)})")
    assert child.returncode == 0, said[-10:]
    _check_outputs(onnx.load(str(path)), weights, inputs, dict(np.load(tmp_path / "y.npz")),
                   1e-5)
