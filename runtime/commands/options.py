"""Option types shared by several commands."""
import click

from ..backends import BACKENDS

DTYPE_CHOICE = click.Choice(["fp32", "fp16", "bf16"])
BACKEND_CHOICE = click.Choice(BACKENDS)
DEVICE_CHOICE = click.Choice(["cpu", "cuda"])


class OutputPath(click.ParamType):
    """A file or directory the command will write, checked when the command line is read
    (`files.check_output`), so that a long run never ends on an output it cannot write.
    Whether a non-empty directory may be replaced (--force) is the command's to check."""

    name = "path"

    def __init__(self, kind: str):
        self.kind = kind

    def convert(self, value, param, ctx):
        from infini_trt.export.errors import InfiniTrtError
        from infini_trt.export.files import check_output

        try:
            check_output(value, self.kind)
        except InfiniTrtError as exc:
            raise click.ClickException(f"{param.opts[-1] if param else 'output'}: {exc}"
                                       ) from None
        return str(value)


OUTPUT_FILE = OutputPath("file")
OUTPUT_DIR = OutputPath("dir")


def state_option(command):
    """--state CTX: continue from a context file (`infini-trt prefill`)."""
    return click.option("--state", type=click.Path(dir_okay=False), default=None,
                        help="Continue from this context file (`infini-trt prefill`, "
                             "`run --save-state`) instead of an empty memory.")(command)


def engine_options(command):
    """--engine and --cuda-graphs, for commands that can run the tensorrt backend."""
    command = click.option("--cuda-graphs", is_flag=True,
                           help="tensorrt: replay each step through a CUDA graph.")(command)
    return click.option("--engine", type=click.Path(dir_okay=False), default=None,
                        help="tensorrt: which engine `infini-trt build` recorded in the export "
                             "[default: the newest; built for this GPU if there is none]."
                        )(command)


PROMPT_GRAPH_HELP = ("onnxruntime: how whole prompt segments are read. prefill: the "
                     "prompt-reading graph (its session holds a second copy of the "
                     "pre-packed weights); extend: the decoding graph, in chunks of 256 "
                     "tokens, then a fold (one session holds the weights: the least memory); "
                     "auto: extend for an unquantized export with --decode-attention gqa (about "
                     "as fast), prefill otherwise (a quantized export's prefill graph reads "
                     "prompts faster; docs/benchmarks.md).  [default: auto]")


def prompt_graph_option(command):
    """--prompt-graph, for commands that read prompts with the onnxruntime backend."""
    return click.option("--prompt-graph", type=click.Choice(["auto", "prefill", "extend"]),
                        default=None, help=PROMPT_GRAPH_HELP)(command)


def runner_options(backend: str, engine: str | None, cuda_graphs: bool,
                   prompt_graph: str | None = None) -> dict:
    """The open_runner keyword arguments of the engine options (tensorrt only) and of
    --prompt-graph (onnxruntime only)."""
    if prompt_graph and backend != "onnxruntime":
        raise click.UsageError("--prompt-graph goes with --backend onnxruntime")
    if backend != "tensorrt":
        if engine or cuda_graphs:
            raise click.UsageError("--engine and --cuda-graphs go with --backend tensorrt")
        return {"prompt_graph": prompt_graph} if prompt_graph else {}
    return {"engine": engine, "cuda_graphs": cuda_graphs}


def stop_strings(ctx, param, values):
    """--stop: non-empty strings (an empty one would stop before the first token)."""
    if any(v == "" for v in values):
        raise click.BadParameter("a stop string must not be empty", ctx, param)
    return values
