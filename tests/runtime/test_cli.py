"""The command line: exit codes, messages, and that it starts without optional backends."""
import subprocess
import sys

from click.testing import CliRunner

from infini_trt.export import load_checkpoint
from infini_trt.runtime.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("init", "inspect"):
        assert command in result.output


def test_help_imports_no_heavy_backend():
    code = ("import sys, infini_trt.runtime.cli as c; "
            "heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'tensorrt_rtx', 'triton') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_init_writes_a_loadable_checkpoint(tmp_path):
    result = invoke("init", "--preset", "tiny", "-o", tmp_path / "m", "--seed", 3, "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    model = load_checkpoint(tmp_path / "m")
    assert str(model.embed.weight.dtype) == "torch.bfloat16"
    result = invoke("inspect", tmp_path / "m")
    assert result.exit_code == 0 and "parameters" in result.output


def test_init_refuses_to_overwrite(tmp_path):
    assert invoke("init", "--preset", "tiny", "-o", tmp_path / "m").exit_code == 0
    result = invoke("init", "--preset", "tiny", "-o", tmp_path / "m")
    assert result.exit_code == 1
    assert "not empty" in result.output and "Traceback" not in result.output


def test_truncated_weights_one_line_error(tmp_path):
    assert invoke("init", "--preset", "tiny", "-o", tmp_path / "m").exit_code == 0
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = invoke("inspect", tmp_path / "m")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "corrupt or truncated" in lines[0], result.output


def test_missing_checkpoint_exit_code(tmp_path):
    result = invoke("inspect", tmp_path / "absent")
    assert result.exit_code == 1 and "no such checkpoint" in result.output


def test_export_in_its_own_process_ends_early_with_everything_written(tmp_path):
    """`infini-trt export` (here `python -m infini_trt.runtime.cli`) ends its process as soon
    as the export is written (no interpreter teardown): exit code 0, its last line printed,
    an export that loads and verifies; under CliRunner (every other test) it returns."""
    from infini_trt.export.manifest import read_manifest
    from infini_trt.runtime.artifacts import verify_export

    assert invoke("init", "--preset", "tiny", "-o", tmp_path / "m").exit_code == 0
    done = subprocess.run([sys.executable, "-m", "infini_trt.runtime.cli", "export",
                           str(tmp_path / "m"), "-o", str(tmp_path / "onnx")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith(f"wrote {tmp_path / 'onnx'}: ")
    verify_export(read_manifest(tmp_path / "onnx"))
    result = invoke("export", tmp_path / "m", "-o", tmp_path / "again")
    assert result.exit_code == 0 and "wrote" in result.output          # this process goes on
