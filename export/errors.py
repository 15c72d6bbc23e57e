"""One exception family for everything a user can cause.

The CLI turns any `InfiniTrtError` into a one-line message and a non-zero exit code; anything
else is a bug in infini-trt and keeps its traceback.
"""


class InfiniTrtError(Exception):
    """Base class: a problem with the user's input, files or environment."""


class ConfigError(InfiniTrtError):
    """A model configuration that is malformed or inconsistent."""


class CheckpointError(InfiniTrtError):
    """A checkpoint directory that is missing, corrupt or does not match its config."""


class MissingDependencyError(InfiniTrtError):
    """An optional dependency (TensorRT, Triton, ...) is needed but not installed."""

    def __init__(self, package: str, purpose: str, install: str):
        super().__init__(f"{purpose} needs the '{package}' package, which is not installed; "
                         f"install it with: {install}")
        self.package = package


class InputError(InfiniTrtError):
    """Input tensors or token files with the wrong shape, dtype or content."""


class InfiniTrtWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as one
    line on stderr): e.g. prompt words outside the tokenizer's vocabulary."""
