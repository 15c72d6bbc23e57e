"""Prompts from the command line: text (encoded with the model's tokenizer) and token files
(.npy ids: [T] one prompt, [B, T] B prompts; any other file is text), read and checked
against the vocabulary before any work starts."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from infini_trt.export.errors import InputError


def read_prompts(model: str | Path, texts: tuple[str, ...] = (), files: tuple[str, ...] = (),
                 allow_empty: bool = False):
    """-> (tokenizer, [ids (T,)], [where each came from]). `allow_empty`: no prompt at all is
    allowed (a context goes on from its last logits)."""
    from infini_trt.export.manifest import model_config

    from .scoring import read_tokens
    from .tokenizer import model_tokenizer

    if not texts and not files and not allow_empty:
        raise InputError("give --prompt TEXT or --prompt-file FILE")
    vocab = model_config(model).vocab_size
    tokenizer = model_tokenizer(model, vocab)
    prompts = [np.asarray(tokenizer.encode(t), dtype=np.int64) for t in texts]
    sources = list(texts)
    for file in files:
        rows = read_tokens(file, tokenizer, vocab)[0]
        prompts += list(rows)
        sources += [file if len(rows) == 1 else f"{file}[{i}]" for i in range(len(rows))]
    if any(len(p) == 0 for p in prompts):
        raise InputError("a prompt is empty")
    return tokenizer, prompts, sources
