"""What every importer shares: reading the source's JSON, and turning a dict of tensors under
our names into a checked `InfiniLM` without copying the weights twice."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import check_state_dict
from ..config import InfiniConfig
from ..errors import CheckpointError, ConfigError
from ..model import InfiniLM


def read_json(path: Path, what: str) -> Any:
    """A JSON file of the source, or one clear CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} {path} is not valid JSON ({exc})") from None


def expect_shape(name: str, tensor: Any, shape: tuple[int, ...], where: str) -> None:
    """Refuse a source tensor (or safetensors slice) whose shape does not match the
    configuration."""
    actual = list(tensor.shape) if hasattr(tensor, "shape") else list(tensor.get_shape())
    if actual != list(shape):
        raise ConfigError(f"{where}: tensor {name} has shape {actual}, the configuration "
                          f"expects {list(shape)}")


def native_model(cfg: InfiniConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 where: str) -> InfiniLM:
    """An `InfiniLM` in eval mode whose parameters are `tensors` (our names) cast to `dtype`.

    The model is built on the meta device and the tensors are assigned, not copied. Missing,
    unexpected and misshapen tensors raise CheckpointError naming the first offenders.
    """
    tensors = {name: t.to(dtype).contiguous() for name, t in tensors.items()}
    with torch.device("meta"):
        model = InfiniLM(cfg)
    check_state_dict(model, tensors, dtype, where)
    model.load_state_dict(tensors, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()
