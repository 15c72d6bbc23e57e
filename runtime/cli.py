"""The `infini-trt` command line: a thin click group, each command one library call.

The commands live in `runtime/commands/`, one module per job. Heavy and optional imports
(torch, onnxruntime, tensorrt, triton) happen inside the commands, so `infini-trt --help`
works on a machine with only the base install.
"""
from __future__ import annotations

import importlib
import sys

import click

from infini_trt.export.errors import InfiniTrtError

COMMAND_MODULES = ["checkpoint", "convert", "export", "build", "score", "run", "validate",
                   "passkey", "bench"]


class Group(click.Group):
    """A click group that turns any InfiniTrtError into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InfiniTrtError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"],
                                          "show_default": True})
@click.version_option(package_name="infini-trt")
def main() -> None:
    """infini-trt: Infini-attention models from a PyTorch checkpoint to fast, validated
    ONNX Runtime and TensorRT deployments that stream inputs of any length at constant
    memory."""


for _name in COMMAND_MODULES:
    for _command in importlib.import_module(f"infini_trt.runtime.commands.{_name}").COMMANDS:
        main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
