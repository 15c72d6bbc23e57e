"""Passkey prompts as token ids (.npy [count, length]): in-task input for `validate --tokens`.

    python examples/passkey/prompts.py pk_prompts.npy --length 512 --count 16
    infini-trt validate runtime/models/passkey --onnx OUT --tokens pk_prompts.npy

Random keys at random depths, from the generator the `passkey` evaluation uses, encoded by
the model's tokenizer (the bundled model's by default).
"""
from __future__ import annotations

import argparse

import numpy as np

from infini_trt.runtime.passkey import open_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the .npy file to write")
    parser.add_argument("--model", default=None,
                        help="checkpoint or export directory [default: the bundled model]")
    parser.add_argument("--length", default="512", help="tokens per prompt (K = 1024)")
    parser.add_argument("--count", type=int, default=16, help="prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the keys and depths")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from infini_trt.runtime.models import bundled_model

        model = str(bundled_model())
    gen, lengths, _ = open_task(model, args.length, "middle")
    prompts = gen.batch(np.random.default_rng(args.seed), args.count, lengths[0])
    ids = np.stack([p.ids for p in prompts])
    np.save(args.out, ids)
    print(f"wrote {args.out}: {ids.shape[0]} prompts of {ids.shape[1]} tokens")


if __name__ == "__main__":
    main()
