"""Option types shared by several commands."""
import click

DTYPE_CHOICE = click.Choice(["fp32", "fp16", "bf16"])
BACKEND_CHOICE = click.Choice(["torch", "onnxruntime", "tensorrt"])
DEVICE_CHOICE = click.Choice(["cpu", "cuda"])


def engine_options(command):
    """--engine and --cuda-graphs, for commands that can run the tensorrt backend."""
    command = click.option("--cuda-graphs", is_flag=True,
                           help="tensorrt: replay each step through a CUDA graph.")(command)
    return click.option("--engine", type=click.Path(dir_okay=False), default=None,
                        help="tensorrt: which engine `infini-trt build` recorded in the export "
                             "[default: the newest; built for this GPU if there is none]."
                        )(command)


def runner_options(backend: str, engine: str | None, cuda_graphs: bool) -> dict:
    """The open_runner keyword arguments of the engine options (tensorrt only)."""
    if backend != "tensorrt":
        if engine or cuda_graphs:
            raise click.UsageError("--engine and --cuda-graphs go with --backend tensorrt")
        return {}
    return {"engine": engine, "cuda_graphs": cuda_graphs}
