"""`infini-trt convert`: each kind of source through the command line, then export and
validate like a native checkpoint; misuse ends in one line and exit code 1."""
import json

import pytest
import torch
from click.testing import CliRunner

from infini_trt.export import load_checkpoint
from infini_trt.export.files import sha256_file
from infini_trt.runtime.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, message):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, \
        result.output


def export_segment_graph(ckpt, out):
    """One export (the segment graph only), as `infini-trt export` would write it."""
    from infini_trt.export.onnx_export import export_model

    export_model(load_checkpoint(ckpt), out, graphs=("segment",),
                 source={"checkpoint": str(ckpt),
                         "weights_sha256": sha256_file(ckpt / "model.safetensors")})


@pytest.fixture
def hf_source(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "hf", max_shard_size="30KB")
    return tmp_path / "hf"


@pytest.fixture
def lucidrains_source(tmp_path):
    lucidrains = pytest.importorskip("infini_transformer_pytorch")
    args = dict(num_tokens=256, dim=32, depth=2, dim_head=8, heads=2, use_mem_delta_rule=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = lucidrains.InfiniTransformer(**args)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "args.json").write_text(json.dumps(args))
    return tmp_path / "model.pt", tmp_path / "args.json"


def test_hf_convert_export_validate(hf_source, tmp_path):
    result = invoke("convert", "--from", "hf", hf_source, "-o", tmp_path / "ckpt",
                    "--segment-len", 16, "--gate-init", -1.0, "--update", "delta")
    assert result.exit_code == 0, result.output
    assert "segment 16, delta memory" in result.output
    export_segment_graph(tmp_path / "ckpt", tmp_path / "onnx")
    result = invoke("validate", tmp_path / "ckpt", "--onnx", tmp_path / "onnx",
                    "--segments", 4, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output and "decoding: not checked" in result.output


def test_lucidrains_convert(lucidrains_source, tmp_path):
    model_pt, args = lucidrains_source
    result = invoke("convert", "--from", "lucidrains", model_pt, "--model-args", args,
                    "-o", tmp_path / "ckpt", "--segment-len", 16)
    assert result.exit_code == 0, result.output
    cfg = load_checkpoint(tmp_path / "ckpt").cfg
    assert (cfg.segment_len, cfg.update_rule, cfg.empty_memory) == (16, "delta", "bypass")


@pytest.mark.slow
def test_lucidrains_convert_export_validate(lucidrains_source, tmp_path):
    model_pt, args = lucidrains_source
    assert invoke("convert", "--from", "lucidrains", model_pt, "--model-args", args,
                  "-o", tmp_path / "ckpt", "--segment-len", 16).exit_code == 0
    result = invoke("export", tmp_path / "ckpt", "-o", tmp_path / "onnx")
    assert result.exit_code == 0, result.output
    result = invoke("validate", tmp_path / "ckpt", "--onnx", tmp_path / "onnx",
                    "--segments", 4, "--no-progress")
    assert result.exit_code == 0 and "PASSED" in result.output, result.output


def test_gate_init_accepts_negative_exponent(hf_source, tmp_path):
    result = invoke("convert", "--from", "hf", hf_source, "-o", tmp_path / "ckpt",
                    "--segment-len", 16, "--gate-init", "-1e4")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "ckpt").cfg.gate_init == -1e4


@pytest.mark.parametrize("args, message", [
    pytest.param(["--from", "lucidrains", "{pt}"], "needs --model-args", id="no-model-args"),
    pytest.param(["--from", "lucidrains", "{pt}", "--model-args", "{args}", "--gate-init", "1"],
                 "--gate-init is for --from hf", id="gate-for-lucidrains"),
    pytest.param(["--from", "hf", "{hf}", "--model-args", "{args}"],
                 "--model-args is for --from lucidrains", id="model-args-for-hf"),
    pytest.param(["--from", "hf", "{pt}"], "is not a directory", id="hf-not-a-dir"),
    pytest.param(["--from", "hf", "{hf}", "--gate-init", "nan"], "finite", id="nan-gate"),
    pytest.param(["--from", "hf", "{hf}", "--segment-len", "4096"], "max_position_embeddings",
                 id="segment-too-long"),
    pytest.param(["--from", "lucidrains", "{args}", "--model-args", "{args}"],
                 "cannot read", id="not-a-state-dict"),
])
def test_misuse_is_one_line(hf_source, lucidrains_source, tmp_path, args, message):
    model_pt, model_args = lucidrains_source
    paths = {"pt": model_pt, "args": model_args, "hf": hf_source}
    result = invoke("convert", *[a.format(**paths) for a in args], "-o", tmp_path / "out")
    one_line_error(result, message)
    assert not (tmp_path / "out").exists()
