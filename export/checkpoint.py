"""The native checkpoint: a directory with `config.json`, `model.safetensors` and, optionally,
`tokenizer.json` (with the Hugging Face files beside it that hold its chat template).

    config.json = {"format": "infini-trt", "format_version": 1, "dtype": "float32",
                   "model": {...InfiniConfig fields...}}

Loading checks everything it can and says what is wrong in one sentence: a path that is not a
checkpoint, bad JSON, unknown or missing config fields, a corrupt or truncated weights file,
missing or unexpected tensors, a shape or dtype that does not match the config.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import InfiniConfig
from .errors import CheckpointError, ConfigError
from .files import atomic_dir
from .model import InfiniLM

FORMAT, FORMAT_VERSION = "infini-trt", 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
# Read beside a tokenizer.json (the chat template and its special tokens: runtime/serving/
# schemas.py ChatTemplate), so they travel with it wherever it is copied.
TOKENIZER_COMPANIONS = ("tokenizer_config.json", "chat_template.jinja")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}


def dtype_from_name(name: str) -> torch.dtype:
    """'fp32' | 'float32' | ... -> torch dtype."""
    full = DTYPE_ALIASES.get(name, name)
    if full not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of fp32, fp16, bf16")
    return DTYPES[full]


def dtype_name(dtype: torch.dtype) -> str:
    return next(n for n, d in DTYPES.items() if d == dtype)


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint directory holds, before any weights are read."""

    path: Path
    config: InfiniConfig
    dtype: torch.dtype

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.path / TOKENIZER_FILE
        return p if p.is_file() else None


def copy_tokenizer(tokenizer: str | Path, directory: Path) -> str:
    """Copy `tokenizer` into `directory` as tokenizer.json -> that file name. When `tokenizer`
    is itself named tokenizer.json, the TOKENIZER_COMPANIONS beside it are copied with it
    (another name, such as a training script's temporary file, has no companions: the files
    beside it are not its)."""
    tokenizer = Path(tokenizer)
    shutil.copyfile(tokenizer, directory / TOKENIZER_FILE)
    if tokenizer.name == TOKENIZER_FILE:
        for name in TOKENIZER_COMPANIONS:
            if (tokenizer.parent / name).is_file():
                shutil.copyfile(tokenizer.parent / name, directory / name)
    return TOKENIZER_FILE


def save_checkpoint(model: InfiniLM, path: str | Path, tokenizer: str | Path | None = None,
                    force: bool = False, inputs: tuple = ()) -> Path:
    """Write `model` as a native checkpoint directory (atomically); `inputs` (what the model
    was read from) and the tokenizer are refused as the output."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight")           # shared with embed.weight
    dtype = model.embed.weight.dtype
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype_name(dtype),
            "model": model.cfg.to_dict()}
    sources = (*inputs, *([tokenizer] if tokenizer is not None else []))
    with atomic_dir(path, force=force, inputs=sources) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp)
    return Path(path)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check `config.json` of a checkpoint directory (no weights are loaded)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory (expected a directory "
                              f"with {CONFIG_FILE} and {WEIGHTS_FILE})")
    config_path = path / CONFIG_FILE
    if (path / "manifest.json").is_file() and not config_path.is_file():
        raise CheckpointError(f"{path} is an export directory (it has manifest.json), not a "
                              f"checkpoint; give the checkpoint it was exported from")
    if not config_path.is_file():
        raise CheckpointError(f"{path} is not an infini-trt checkpoint: it has no {CONFIG_FILE}")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not an infini-trt config (no \"format\": "
                              f"\"{FORMAT}\"); foreign checkpoints go through `infini-trt convert`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format_version {meta.get('format_version')!r} is "
                              f"not supported by this infini-trt (it reads {FORMAT_VERSION})")
    unknown = sorted(set(meta) - {"format", "format_version", "dtype", "model"})
    if unknown:
        raise CheckpointError(f"{config_path}: unknown field(s) {', '.join(unknown)}")
    for key in ("dtype", "model"):
        if key not in meta:
            raise CheckpointError(f"{config_path}: missing field '{key}'")
    try:
        config = InfiniConfig.from_dict(meta["model"])
        dtype = dtype_from_name(meta["dtype"]) if isinstance(meta["dtype"], str) else None
    except ConfigError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None
    if dtype is None:
        raise CheckpointError(f"{config_path}: 'dtype' must be a string like \"float32\"")
    return Checkpoint(path=path, config=config, dtype=dtype)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}")
    try:
        return load_file(str(weights))
    except SafetensorError as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated ({exc})") from None


def _listing(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_state_dict(model: InfiniLM, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                     where: str) -> None:
    """Raise CheckpointError unless `tensors` are exactly the model's, with its shapes and
    `dtype`, and every value finite."""
    expected = {k: v for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {_listing(missing)}")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor(s) {_listing(unexpected)}")
    for name, ref in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{where}: tensor {name} has shape {list(t.shape)}, the config "
                                  f"expects {list(ref.shape)}")
        if t.dtype != dtype:
            raise CheckpointError(f"{where}: tensor {name} is {dtype_name_or_str(t.dtype)}, "
                                  f"config.json says {dtype_name(dtype)}")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{where}: tensor {name} has {bad:,} NaN or infinite "
                                  f"value(s); the checkpoint is broken")


def dtype_name_or_str(dtype: torch.dtype) -> str:
    try:
        return dtype_name(dtype)
    except StopIteration:
        return str(dtype).replace("torch.", "")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> InfiniLM:
    """Load and validate a native checkpoint -> an `InfiniLM` in eval mode.

    `dtype` casts the weights after loading (e.g. float64 for the reference)."""
    ckpt = read_checkpoint(path)
    tensors = _load_tensors(ckpt.path)
    with torch.device("meta"):
        model = InfiniLM(ckpt.config)
    check_state_dict(model, tensors, ckpt.dtype, str(ckpt.path / WEIGHTS_FILE))
    model = model.to_empty(device=device).to(ckpt.dtype)
    if ckpt.config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.load_state_dict(tensors, strict=not ckpt.config.tie_embeddings)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
