"""A context as a file: the whole past of one sequence, whatever its length, in a fixed size.

An Infini-attention sequence's past is its compressive memory and norm per layer, plus the
K/V rows of its current segment: `RowState`. With the tokens seen and the logits after the
last one (what the next token is chosen from), that is all it takes to continue it, on any
backend of the same model.

    context.safetensors = tensors  memory (L, Hkv, dk, dv), norm (L, Hkv, dk),
                                   k (L, Hkv, hd, P), v (L, Hkv, P, hd), last_logits (V,)
                          metadata {"format": "infini-trt-context", "format_version": "1",
                                    "header": JSON {tokens, position, fingerprint (config and
                                    weights hashes), made_by, config, text_tail,
                                    tensors_sha256}}

Loading refuses another model's context, a corrupt or truncated file (the tensors' hash is in
the header) and a format version newer than this one reads, each with one line.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infini_trt.export.config import InfiniConfig
from infini_trt.export.errors import InfiniTrtError, InputError

from .runners.base import RowState

FORMAT, FORMAT_VERSION = "infini-trt-context", 1
TENSORS = ("memory", "norm", "k", "v")


@dataclass
class Context:
    state: RowState
    tokens: int                              # tokens of the sequence so far
    last_logits: np.ndarray | None           # (V,) after the last token; None before any
    fingerprint: dict                        # session.model_fingerprint of the model
    made_by: str = ""                        # the runner that made it ("onnxruntime-cpu ...")
    text_tail: list[int] = field(default_factory=list)   # generated ids not yet shown as text
    config: dict | None = None               # the model's config, for people reading it

    @property
    def position(self) -> int:
        return self.state.position

    def check_model(self, fingerprint: dict, cfg: InfiniConfig) -> None:
        """Refuse to continue this context on a model other than the one that made it."""
        if self.fingerprint.get("config_sha256") != fingerprint.get("config_sha256"):
            raise InfiniTrtError("this context was made by a model with another configuration "
                                 "(its config hash differs); use the model that made it")
        if self.fingerprint.get("weights_sha256") != fingerprint.get("weights_sha256"):
            raise InfiniTrtError("this context was made by a model with other weights (its "
                                 "weights hash differs); use the model that made it")
        if self.position >= cfg.segment_len:         # pragma: no cover - guarded at load
            raise InfiniTrtError("this context's segment position is past the segment")

    # the file ------------------------------------------------------------------------------
    def tensors(self) -> dict[str, np.ndarray]:
        out = {name: np.ascontiguousarray(getattr(self.state, name)) for name in TENSORS}
        if self.last_logits is not None:
            out["last_logits"] = np.ascontiguousarray(self.last_logits, dtype=np.float32)
        return out

    def to_bytes(self) -> bytes:
        """The context file's bytes."""
        from safetensors.numpy import save

        tensors = self.tensors()
        header = {"tokens": self.tokens, "position": self.position,
                  "fingerprint": self.fingerprint, "made_by": self.made_by,
                  "config": self.config, "text_tail": [int(t) for t in self.text_tail],
                  "tensors_sha256": _digest(tensors)}
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                    "header": json.dumps(header)}
        return save(tensors, metadata=metadata)

    def save(self, path: str | Path) -> int:
        """Write the context file (atomically) -> its size in bytes."""
        from infini_trt.export.files import atomic_file

        data = self.to_bytes()
        with atomic_file(path) as tmp:
            tmp.write_bytes(data)
        return len(data)

    @classmethod
    def load(cls, path: str | Path) -> "Context":
        """Read a context file, with one clear message for each way it can be wrong."""
        path = Path(path)
        if path.is_dir():
            raise InputError(f"{path} is a directory, not a context file")
        if not path.is_file():
            raise InputError(f"no such context file: {path}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"{path} is not a readable context file ({exc.strerror})"
                             ) from None
        return cls.from_bytes(data, str(path))

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "the context") -> "Context":
        """The bytes of a context file -> Context, refused as `load` refuses a file (the
        messages name `name`)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        try:
            tensors = load(data)
            size = int.from_bytes(data[:8], "little")
            metadata = json.loads(data[8:8 + size]).get("__metadata__") or {}
        except (SafetensorError, ValueError, AttributeError) as exc:
            raise InputError(f"{name} is not a readable context file (corrupt or truncated: "
                             f"{str(exc).splitlines()[0] if str(exc) else exc})") from None
        if metadata.get("format") != FORMAT:
            raise InputError(f"{name} is not an infini-trt context file")
        try:
            version = int(metadata.get("format_version", ""))
            header = json.loads(metadata["header"])
        except (ValueError, KeyError):
            raise InputError(f"{name} is a damaged context file (its header is unreadable)"
                             ) from None
        if version > FORMAT_VERSION:
            raise InputError(f"{name} was written by a newer infini-trt (context format "
                             f"{version}; this one reads {FORMAT_VERSION}); upgrade infini-trt")
        if version < 1 or not all(n in tensors for n in TENSORS):
            raise InputError(f"{name} is a damaged context file (tensors missing)")
        if header.get("tensors_sha256") != _digest(tensors):
            raise InputError(f"{name} is a damaged context file (its tensors do not match the "
                             f"hash in its header)")
        state = RowState(*(tensors[n] for n in TENSORS))
        if header.get("position") != state.position or not _consistent(state):
            raise InputError(f"{name} is a damaged context file (its tensors' shapes disagree)")
        return cls(state=state, tokens=int(header["tokens"]),
                   last_logits=tensors.get("last_logits"), fingerprint=header["fingerprint"],
                   made_by=header.get("made_by", ""), text_tail=header.get("text_tail", []),
                   config=header.get("config"))


def _digest(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _consistent(state: RowState) -> bool:
    """The four tensors describe one model: same layers and KV heads, k and v alike."""
    m, n, k, v = state.memory, state.norm, state.k, state.v
    return (m.ndim == 4 and n.ndim == 3 and k.ndim == 4 and v.ndim == 4
            and m.shape[:3] == n.shape and k.shape[:2] == m.shape[:2]
            and v.shape[:2] == m.shape[:2] and k.shape[2] == v.shape[3]
            and k.shape[3] == v.shape[2])
