"""Tokenizers: a Hugging Face `tokenizer.json` when the model has one, bytes otherwise."""
from __future__ import annotations

import warnings
from pathlib import Path

from infini_trt.export.errors import InfiniTrtError, InfiniTrtWarning


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (the bundled small models)."""

    name = "byte-level"
    eos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    @staticmethod
    def whole(token: int) -> bool:
        """Whether `token` decodes to a finished character whatever follows (an id that is no
        byte: its U+FFFD is final, not the start of a UTF-8 character)."""
        return not 0 <= int(token) < 256

    def decode(self, ids) -> str:
        """Bytes back to text; an id that is no byte (a model whose vocabulary is larger than
        256, as the random `small` preset) shows as U+FFFD rather than vanishing."""
        text, run = [], bytearray()
        for i in map(int, ids):
            if 0 <= i < 256:
                run.append(i)
                continue
            text.append(run.decode("utf-8", errors="replace") + "\ufffd")
            run.clear()
        return "".join(text) + run.decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer.json."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:  # pragma: no cover - a base dependency
            raise InfiniTrtError("reading tokenizer.json needs the 'tokenizers' package") from None
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise InfiniTrtError(f"cannot read tokenizer {path}: {exc}") from None
        self.name = str(path)
        unk = getattr(self.tok.model, "unk_token", None)
        self.unk = (unk, self.tok.token_to_id(unk)) if unk else None
        self.eos_id = None
        for candidate in ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<eos>"):
            token_id = self.tok.token_to_id(candidate)
            if token_id is not None:
                self.eos_id = token_id
                break

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; words outside the vocabulary (which become the unknown token)
        are named in an InfiniTrtWarning, since the model cannot read them."""
        encoding = self.tok.encode(text, add_special_tokens=False)
        if self.unk is not None:
            unk, unk_id = self.unk
            words = [text[a:b] for i, (a, b) in zip(encoding.ids, encoding.offsets)
                     if i == unk_id and text[a:b] != unk]
            if words:
                shown = ", ".join(repr(w) for w in dict.fromkeys(words[:5]))
                warnings.warn(InfiniTrtWarning(
                    f"{len(words)} word(s) of the text are not in the tokenizer's vocabulary "
                    f"and became {unk}: {shown}{' ...' if len(words) > 5 else ''}"))
        return encoding.ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: Path | None, vocab_size: int):
    """The model's tokenizer.json, else bytes (which needs a vocabulary of at least 256)."""
    if path is not None:
        return HFTokenizer(path)
    if vocab_size < 256:
        raise InfiniTrtError(f"this model has no tokenizer.json and its vocabulary ({vocab_size}) "
                             f"is too small for bytes; give token ids as a .npy file")
    return ByteTokenizer()


class LazyTokenizer:
    """A tokenizer made on first use: for readers of token files (`score.read_tokens`) that
    need one only when the file is text, so that .npy ids work for models without one."""

    def __init__(self, make):
        self.make = make

    def encode(self, text: str) -> list[int]:
        return self.make().encode(text)


def tokenizer_file(model: str | Path) -> Path | None:
    """The tokenizer.json of a checkpoint or export directory, if it has one."""
    from infini_trt.export.manifest import is_export_dir, read_manifest

    if is_export_dir(model):
        return read_manifest(model).tokenizer_path
    candidate = Path(model) / "tokenizer.json"
    return candidate if candidate.is_file() else None


def tokenizer_of(model: str | Path):
    """The tokenizer of a checkpoint or export directory (its tokenizer.json, else bytes)."""
    from infini_trt.export.manifest import model_config

    return model_tokenizer(model, model_config(model).vocab_size)


def model_tokenizer(model: str | Path, vocab_size: int):
    """The tokenizer of a checkpoint or export directory (bytes when it has none)."""
    return load_tokenizer(tokenizer_file(model), vocab_size)
