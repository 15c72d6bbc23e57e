"""The failures a user can cause, one class at a time: each ends in one clear line and a
non-zero exit, with no traceback and nothing half-written or lost."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import random_model
from infini_trt.export import preset, save_checkpoint
from infini_trt.export.errors import InfiniTrtError
from infini_trt.export.files import atomic_dir, atomic_file, check_output, inside
from infini_trt.export.manifest import read_manifest
from infini_trt.runtime import export_cache as cache
from infini_trt.runtime.cli import main
from infini_trt.runtime.runners import open_runner

TINY = preset("tiny")
CLI = [sys.executable, "-m", "infini_trt.runtime.cli"]


def invoke(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def one_line_error(result, *fragments, code=1):
    """The exit code, one line of output (stderr and stdout mixed), each fragment in it."""
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


@pytest.fixture
def checkpoint(tmp_path):
    save_checkpoint(random_model(TINY, dtype=torch.float32), tmp_path / "ck")
    return tmp_path / "ck"


def export_copy(exported, tmp_path, name="copy", **kwargs):
    _, out = exported(TINY, **kwargs)
    shutil.copytree(out, tmp_path / name)
    return tmp_path / name


# ------------------------------------------------------------------------ data loss
def test_an_output_that_is_the_current_directory_or_above_it_is_refused(tmp_path, monkeypatch):
    work = tmp_path / "d"
    work.mkdir()
    (work / "keep").write_text("mine")
    monkeypatch.chdir(work)
    one_line_error(invoke("init", "--preset", "tiny", "-o", ".", "--force"),
                   "is the current directory")
    one_line_error(invoke("init", "--preset", "tiny", "-o", "..", "--force"),
                   "contains the current directory")
    assert (work / "keep").read_text() == "mine" and sorted(os.listdir(work)) == ["keep"]


@pytest.mark.parametrize("where", ["same", "parent"])
def test_an_output_that_is_or_contains_the_input_is_refused(checkpoint, where):
    before = snapshot(checkpoint)
    output = checkpoint if where == "same" else checkpoint.parent
    line = one_line_error(invoke("export", checkpoint, "-o", output, "--force"),
                          "the input")
    assert ("is the input" if where == "same" else "contains the input") in line
    line = one_line_error(invoke("convert", "--from", "hf", checkpoint, "-o", output,
                                 "--force"), "the input")
    assert snapshot(checkpoint) == before


def test_a_symlink_output_is_refused_and_its_target_kept(checkpoint, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(checkpoint)
    before = snapshot(checkpoint)
    one_line_error(invoke("init", "--preset", "tiny", "-o", link, "--force"), "symbolic link")
    one_line_error(invoke("validate", checkpoint, "--onnx", tmp_path, "--report", link),
                   "symbolic link")
    assert snapshot(checkpoint) == before


def test_a_replaced_directory_is_whole_before_and_after(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, force=True) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("boom")
    assert snapshot(target) == {"a": b"1"}
    with atomic_dir(target, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert snapshot(target) == {"b": b"2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]       # nothing left beside


def test_a_file_that_cannot_be_put_in_place_leaves_nothing(tmp_path):
    """The block fails, or the rename does (the target became a directory meanwhile): the
    error goes on, the temporary file is removed, and the target is as it was."""
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    with pytest.raises(IsADirectoryError):
        with atomic_file(target) as tmp:
            tmp.write_text("{}")
            target.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"] and target.is_dir()


# --------------------------------------------------------------- work lost at the end
@pytest.mark.parametrize("args", [
    ["validate", "{ck}", "--onnx", "{ck}", "--report", "/proc/x/r.json"],
    ["passkey", "--json", "/proc/x/p.json"],
    ["init", "--preset", "tiny", "-o", "/proc/foo"],
    ["init", "--preset", "tiny", "-o", "{file}/sub"],
    ["score", "{ck}", "--tokens", "{file}", "--logits-out", "{file}/sub/l.npy"],
    ["build", "{ck}", "--engine", "{file}/x.engine"],
    ["bench", "{ck}", "--json", "/proc/x/b.json"],
    ["bench", "{ck}", "--plot", "{file}/b.png"],
], ids=["validate-report", "passkey-json", "init-proc", "init-under-a-file", "score-logits",
        "build-engine", "bench-json", "bench-plot"])
def test_every_output_location_is_checked_before_the_work(args, checkpoint, tmp_path,
                                                          monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("INFINI_TRT_CACHE", str(tmp_path / "cache"))
    result = invoke(*[a.format(ck=checkpoint, file=afile) for a in args])
    one_line_error(result, "cannot write")
    assert not (tmp_path / "cache").exists()                # no export was started


def test_a_cache_that_is_a_file_is_refused(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("INFINI_TRT_CACHE", str(tmp_path / "afile"))
    (tmp_path / "afile").write_text("x")
    tokens = tmp_path / "t.txt"
    tokens.write_text("some text")
    one_line_error(invoke("score", checkpoint, "--tokens", tokens), "INFINI_TRT_CACHE",
                   "not a directory")


def test_logits_that_do_not_fit_on_the_disk_are_refused_first(exported, tmp_path,
                                                              monkeypatch):
    _, out = exported(TINY)
    np.save(tmp_path / "t.npy", np.zeros((2, 500), np.int64))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 1000))
    line = one_line_error(invoke("score", out, "--tokens", tmp_path / "t.npy", "--logits-out",
                                 tmp_path / "l.npy"), "the logits need 1,000.0 KiB")
    assert "1,000 B free" in line and not (tmp_path / "l.npy").exists()


# ----------------------------------------------------- artifacts not what they claim
def test_graphs_swapped_for_another_models_are_refused(exported, tmp_path):
    mine = export_copy(exported, tmp_path)
    _, other = exported(TINY, seed=7, graphs=("segment",))      # same shape, other weights
    shutil.copy(other / "model.onnx", mine / "model.onnx")
    np.save(tmp_path / "t.npy", np.arange(100) % 256)
    one_line_error(invoke("score", mine, "--tokens", tmp_path / "t.npy"), "sha256 differs",
                   "export again")
    one_line_error(invoke("inspect", mine), "sha256 differs")


@pytest.mark.parametrize("field", ["segment_len", "vocab_size"])
def test_an_edited_manifest_is_refused(exported, tmp_path, field):
    mine = export_copy(exported, tmp_path)
    data = json.loads((mine / "manifest.json").read_text())
    data["config"][field] //= 2
    (mine / "manifest.json").write_text(json.dumps(data))
    np.save(tmp_path / "t.npy", np.arange(100) % 128)
    one_line_error(invoke("score", mine, "--tokens", tmp_path / "t.npy"),
                   "was changed after the export")


def test_the_torch_backend_refuses_a_changed_source_checkpoint(exported, tmp_path):
    from infini_trt.export.files import sha256_file

    ckpt = tmp_path / "ck"
    save_checkpoint(random_model(TINY, seed=0, dtype=torch.float32), ckpt)
    mine = export_copy(exported, tmp_path)
    manifest = read_manifest(mine)
    manifest.source = {"checkpoint": str(ckpt),
                       "weights_sha256": sha256_file(ckpt / "model.safetensors")}
    manifest.write()
    open_runner(mine, "torch").close()
    save_checkpoint(random_model(TINY, seed=5, dtype=torch.float32), ckpt, force=True)
    with pytest.raises(InfiniTrtError, match="has changed since .* was exported"):
        open_runner(mine, "torch")


def _fake_export(source: Path, calls: list, delay: float = 0.0):
    def make(target: Path) -> None:
        calls.append(target)
        time.sleep(delay)
        with atomic_dir(target, force=True) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
    return make


def test_a_damaged_cache_entry_is_made_again(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("INFINI_TRT_CACHE", str(tmp_path / "cache"))
    _, out = exported(TINY)
    calls, said = [], []
    make = _fake_export(out, calls)
    first = cache.cached("exports", "k", make, "exporting", said.append)
    assert cache.cached("exports", "k", make, "exporting", said.append) == first
    assert len(calls) == 1
    graph = first / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])          # an interrupted copy, say
    assert cache.cached("exports", "k", make, "exporting", said.append) == first
    assert len(calls) == 2 and any("damaged" in s for s in said)
    open_runner(first, "onnxruntime").close()            # whole again


def test_concurrent_users_of_one_cache_entry_make_it_once(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("INFINI_TRT_CACHE", str(tmp_path / "cache"))
    _, out = exported(TINY)
    calls, said, got = [], [], []
    make = _fake_export(out, calls, delay=1.0)
    threads = [threading.Thread(target=lambda: got.append(
        cache.cached("exports", "k", make, "exporting", said.append))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(calls) == 1 and len(got) == 3 and len(set(got)) == 1
    assert sum("waiting for another" in s for s in said) == 2
    open_runner(got[0], "onnxruntime").close()


def test_file_names_inside_artifacts_stay_inside(exported, tmp_path):
    mine = export_copy(exported, tmp_path)
    manifest = read_manifest(mine)
    manifest.graphs["segment"]["file"] = "../outside.onnx"
    manifest.write()
    with pytest.raises(InfiniTrtError, match="leads outside the directory"):
        read_manifest(mine)
    with pytest.raises(InfiniTrtError, match="not a relative path"):
        inside(mine, "/etc/passwd")
    from infini_trt.export.convert.hf import weight_files

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "../../evil.safetensors"}}))
    with pytest.raises(InfiniTrtError, match="leads outside the directory"):
        weight_files(tmp_path / "hf")


# ---------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("field,value", [("memory_eps", float("nan")),
                                         ("gate_init", float("nan")),
                                         ("rope_theta", float("inf")),
                                         ("norm_eps", float("-inf"))])
def test_non_finite_config_values_are_refused(checkpoint, field, value):
    config = checkpoint / "config.json"
    data = json.loads(config.read_text())
    data["model"][field] = value
    config.write_text(json.dumps(data))                   # json writes NaN / Infinity
    one_line_error(invoke("inspect", checkpoint), field, "finite")


def test_non_finite_weights_are_refused(tmp_path):
    model = random_model(TINY, dtype=torch.float32)
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight[3, 4] = float("nan")
    save_checkpoint(model, tmp_path / "ck")
    one_line_error(invoke("inspect", tmp_path / "ck"), "layers.1.mlp.down_proj.weight",
                   "1 NaN or infinite")


def test_non_finite_logits_fail_score_and_generate():
    from infini_trt.runtime.generation import generate
    from infini_trt.runtime.runners.torch_runner import TorchRunner
    from infini_trt.runtime.sampling import SamplingConfig
    from infini_trt.runtime.scoring import score

    model = random_model(TINY, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[7, 0] = float("inf")         # past the checkpoint checks
    runner = TorchRunner(model)
    tokens = np.random.default_rng(0).integers(0, 256, (1, 3 * TINY.segment_len))
    with pytest.raises(InfiniTrtError, match="NaN or infinite logits in the segment at token 0"):
        score(runner, tokens, progress=False)
    with pytest.raises(InfiniTrtError, match="NaN or infinite logits after the prompt"):
        generate(runner, [tokens[0]], SamplingConfig(max_new_tokens=2), progress=False)


# --------------------------------------------------------------------------- leftovers
def _wait_for(proc, stream_name: str, text: str, timeout: float = 120) -> str:
    """Read a subprocess's stream until `text` appears (or fail)."""
    stream = getattr(proc, stream_name)
    seen, end = "", time.monotonic() + timeout
    while time.monotonic() < end:
        line = stream.readline()
        if not line:
            break
        seen += line
        if text in line:
            return seen
    proc.kill()
    pytest.fail(f"never printed {text!r}: {seen}")


def test_sigterm_during_export_leaves_nothing(checkpoint, tmp_path):
    proc = subprocess.Popen([*CLI, "export", str(checkpoint), "-o", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1",
                                 "INFINI_TRT_TEMPLATE_CACHE": "0"})   # so that it traces
    _wait_for(proc, "stdout", "tracing one of each piece")      # mid-export: tracing
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_sigterm_during_score_removes_the_logits_file(exported, tmp_path):
    _, out = exported(TINY)
    np.save(tmp_path / "t.npy", np.random.default_rng(0).integers(0, 256, 400_000))
    (tmp_path / "logits").mkdir()
    proc = subprocess.Popen([*CLI, "score", str(out), "--tokens", str(tmp_path / "t.npy"),
                             "--logits-out", str(tmp_path / "logits" / "l.npy"),
                             "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(proc, "stderr", "writing 400,000 x 256 float32 logits (390.6 MiB)")
    time.sleep(2.0)
    assert proc.poll() is None, "scoring ended before the signal"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert os.listdir(tmp_path / "logits") == []


# --------------------------------------------------------------------- silent choices
def test_run_takes_every_row_of_a_token_file(exported, tmp_path):
    _, out = exported(TINY)
    np.save(tmp_path / "rows.npy", np.array([[104, 105, 32], [111, 107, 33]]))
    result = invoke("run", out, "--prompt-file", tmp_path / "rows.npy", "--json",
                    "--max-new-tokens", 2)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [s["prompt"] for s in data["sequences"]] == [f"{tmp_path / 'rows.npy'}[{i}]"
                                                         for i in range(2)]
    assert [s["prompt_tokens"] for s in data["sequences"]] == [3, 3]


@pytest.mark.parametrize("tol", ["nan", "-1", "0", "inf", "logits=nan"])
def test_tolerances_must_be_finite_and_positive(exported, tol):
    ckpt, out = exported(TINY)
    one_line_error(invoke("validate", ckpt, "--onnx", out, "--tol", tol),
                   "must be a finite positive number")


def test_an_empty_stop_string_is_refused(exported):
    _, out = exported(TINY)
    result = invoke("run", out, "--prompt", "hi", "--stop", "")
    assert result.exit_code == 2 and "a stop string must not be empty" in result.output


def test_streamed_and_final_text_agree_at_a_stop_string(exported):
    """The stream never shows a stop string, nor text after it; it equals the JSON text."""
    _, out = exported(TINY)
    args = ("run", out, "--prompt", "The sky", "--max-new-tokens", 48, "--no-progress")
    free = json.loads(invoke(*args, "--json").stdout)["sequences"][0]["text"]
    printable = [i for i in range(8, len(free) - 3)
                 if free[i:i + 3].isascii() and free[i:i + 3].isprintable()]
    assert printable, f"no printable text to stop at in {free!r}"
    stop = free[printable[0]:printable[0] + 3]
    want = free[:free.index(stop)]
    streamed = invoke(*args, "--stop", stop)
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout == want + "\n"
    as_json = json.loads(invoke(*args, "--stop", stop, "--json").stdout)["sequences"][0]
    assert as_json["text"] == want and as_json["finish_reason"] == "stop"


# ---------------------------------------------------------------------------- messages
@pytest.mark.parametrize("make,message", [
    (lambda p: np.savez(p.with_suffix(".npz"), ids=np.arange(5)) or
     p.with_suffix(".npz").rename(p), ".npz archive, not a .npy array"),
    (lambda p: np.save(p, np.array([3, 2**63 + 5], np.uint64)),
     "token id 9223372036854775813 is outside the vocabulary [0, 256)"),
    (lambda p: p.mkdir(), "is a directory, not a token file"),
], ids=["npz", "uint64", "directory"])
def test_token_file_messages(exported, tmp_path, make, message):
    _, out = exported(TINY)
    make(tmp_path / "t.npy")
    one_line_error(invoke("score", out, "--tokens", tmp_path / "t.npy"), message)


def test_inspect_tells_an_export_from_a_checkpoint(exported):
    from infini_trt.export import read_checkpoint

    _, out = exported(TINY)
    result = invoke("inspect", out)
    assert result.exit_code == 0 and "export (float32" in result.output, result.output
    assert "every file matches its sha256" in result.output
    with pytest.raises(InfiniTrtError, match="is an export directory .* not a checkpoint"):
        read_checkpoint(out)


def test_inspect_refuses_a_broken_tokenizer(checkpoint):
    (checkpoint / "tokenizer.json").write_text('{"model": "half a tokenizer"')
    one_line_error(invoke("inspect", checkpoint), "cannot read tokenizer")


def test_words_outside_the_vocabulary_are_named(tmp_path):
    from infini_trt.runtime.models import bundled_model

    text = tmp_path / "prompt.txt"
    text.write_text("the grass is green qwerty the sky is blue zzz")
    result = CliRunner().invoke(main, ["score", str(bundled_model()), "--backend", "torch",
                                       "--tokens", str(text)])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "2 word(s)" in warning[0], result.output
    assert "'qwerty', 'zzz'" in warning[0] and "<unk>" in warning[0]


def test_check_output_allows_what_it_should(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output("new/dir/file.json") == tmp_path / "new/dir/file.json"
    assert not (tmp_path / "new").exists()                 # the probe leaves nothing
    check_output("sub", "dir")
    with atomic_file("out.json", inputs=["in.json"]) as tmp:
        tmp.write_text("{}")
    assert (tmp_path / "out.json").read_text() == "{}"


def test_an_onnxruntime_failure_is_one_line():
    from infini_trt.runtime.runners.ort_runner import Binding

    class Session:
        def io_binding(self):
            return self

        def bind_input(self, *args):
            pass

        bind_output = bind_input

        def run_with_iobinding(self, io, options=None):
            raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid "
                               "dimensions for input: memory\n more detail")

    with pytest.raises(InfiniTrtError, match=r"^onnxruntime failed running the extend graph: "
                                             r"\[ONNXRuntimeError\].*memory$"):
        Binding(Session(), "cpu", "extend").run((), ())


def test_sigterm_while_a_class_is_made_still_exits_143():
    """A signal that comes while a class body's descriptors are set up (`__set_name__`, as a
    module's dataclasses are on import) is wrapped by Python 3.11 in a RuntimeError; the CLI
    still ends it as SIGTERM: one line, exit code 143, no traceback."""
    import click
    from click.testing import CliRunner

    from infini_trt.runtime.cli import Group, Terminated

    class Field:
        def __set_name__(self, owner, name):
            raise Terminated()

    @click.group(cls=Group)
    def group():
        pass

    @group.command()
    def make():
        type("Made", (), {"field": Field()})

    result = CliRunner().invoke(group, ["make"])
    assert result.exit_code == 143, result.output
    assert "terminated (SIGTERM); no partial output was left" in result.output
    assert "Traceback" not in result.output
