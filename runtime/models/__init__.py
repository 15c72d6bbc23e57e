"""Models that ship inside the package.

`passkey/`: a 167,692-parameter Infini-attention LM trained from scratch on the paper's passkey
task (examples/passkey/ has the training script and the exact command); the default model of
`infini-trt passkey`.
"""
from __future__ import annotations

from pathlib import Path

from infini_trt.export.errors import InfiniTrtError

PASSKEY = "passkey"


def bundled_model(name: str = PASSKEY) -> Path:
    """The directory of a bundled native checkpoint (config.json, model.safetensors,
    tokenizer.json)."""
    path = Path(__file__).resolve().parent / name
    if not (path / "model.safetensors").is_file():
        raise InfiniTrtError(f"the bundled model '{name}' is missing from {path.parent}; "
                             f"reinstall infini-trt (its package data was not installed)")
    return path
