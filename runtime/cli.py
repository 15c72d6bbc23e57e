"""The `infini-trt` command line: a thin click group, each command one library call.

The commands live in `runtime/commands/`, one module per job. Heavy and optional imports
(torch, onnxruntime, tensorrt, triton) happen inside the commands, so `infini-trt --help`
works on a machine with only the base install.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import warnings

import click

from infini_trt.export.errors import InfiniTrtError, InfiniTrtWarning, MissingDependencyError

# What the `export` extra installs: exporting, the torch backend, validate and bench need it;
# running and serving an export does not (ONNX Runtime and numpy).
EXPORT_PACKAGES = ("torch", "onnxscript")

COMMAND_MODULES = ["checkpoint", "convert", "export", "build", "prefill", "score", "run",
                   "validate", "passkey", "bench", "serve", "bench_serve"]


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that every `atomic_*` writer on the stack
    removes its temporary output (the default action would kill the process on the spot)."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)        # one is enough: let cleanup finish
    raise Terminated()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, InfiniTrtWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


_default_show_warning = warnings.showwarning


class Group(click.Group):
    """A click group that turns any InfiniTrtError, and a missing package of the export
    toolchain (torch), into one line on stderr and exit code 1,
    SIGTERM and Ctrl-C into one line and exit codes 143 and 130 (after the writers of
    outputs have removed what they had begun), and our warnings into one line each."""

    def invoke(self, ctx: click.Context):
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _terminate)
        else:                                              # pragma: no cover
            previous = None
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except InfiniTrtError as exc:
            raise click.ClickException(str(exc)) from None
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in EXPORT_PACKAGES:
                raise
            missing = MissingDependencyError(
                exc.name.split(".")[0], f"`infini-trt {ctx.invoked_subcommand}` here",
                "pip install 'infini-trt[export]' (the CPU build of torch first: pip install "
                "torch --index-url https://download.pytorch.org/whl/cpu); an export directory "
                "runs and serves without it on onnxruntime")
            raise click.ClickException(str(missing)) from None
        except (Terminated, KeyboardInterrupt) as exc:
            _stopped(ctx, exc)
        except Exception as exc:
            # Python 3.11 wraps what a descriptor's __set_name__ raises in a RuntimeError: a
            # signal that comes while a class is made (a dataclass of a module being
            # imported, as torch.onnx's are on the first export) arrives as its cause
            stop = _signal_cause(exc)
            if stop is None:
                raise
            _stopped(ctx, stop)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _signal_cause(exc: BaseException) -> BaseException | None:
    """The Terminated or KeyboardInterrupt that `exc` was raised from, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (Terminated, KeyboardInterrupt)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _stopped(ctx: click.Context, exc: BaseException) -> None:
    """One line and exit code 143 (SIGTERM) or 130 (Ctrl-C)."""
    if isinstance(exc, Terminated):
        click.echo("infini-trt: terminated (SIGTERM); no partial output was left", err=True)
        ctx.exit(143)
    click.echo("\ninfini-trt: interrupted; no partial output was left", err=True)
    ctx.exit(130)


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


_OWN_PROCESS: list = []     # set by `entry`: this process runs one command and then ends


def entry() -> None:
    """The `infini-trt` console script (and `python -m infini_trt.runtime.cli`): `main` in a
    process of its own, which a command may end early (`end_now`)."""
    from infini_trt.runtime import cli       # this module, also when run as __main__ (-m)

    cli._OWN_PROCESS.append(True)
    sys.exit(main())


def end_now() -> None:
    """End the process now, its output flushed, when it runs this one command (`entry`; not
    under click's CliRunner or as a library): for a command that has closed everything it
    wrote and leaves nothing to clean up (export), the interpreter's teardown of torch and
    the traced graphs would take another ~2 s (2.2 of `export small`'s 25.7 s on Zen 3)."""
    if not _OWN_PROCESS:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":  # pragma: no cover
    entry()
