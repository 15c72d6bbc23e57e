"""Train the bundled passkey model: a small Infini-attention LM, on CPU, from scratch.

The exact command that made `runtime/models/passkey/` (2 CPU cores, seed 0):

    python examples/passkey/train.py --out runtime/models/passkey --seed 0

Measured wall time: 25.1 min, and 26.2 min for a bit-identical rerun, on the project's
2-core machine shared with other jobs (about 5 min when the cores are idle); the curve is in
examples/passkey/README.md. The recipe, in short:

- the paper's passkey format (runtime/passkey_data.py): intro, filler, a 5-digit key at a
  random depth, the question, the answer; the key always a whole segment before the
  question's segment, so that only the compressive memory can carry it;
- short real sequences: each step draws a number of segments of 64 tokens uniformly from 2 to
  a maximum that is 3 for the first 20% of the steps and rises to 8 (512 tokens, the training
  length) at 60%; 2,048 tokens per step (as many sequences as fit);
- loss = LM loss on every predictable token (not the key's random first digits) +
  `--answer-weight` x the cross-entropy of the 5 answer digits;
- the write-weight augmentation of parallel.py: every non-key token's write into M and z is
  counted w times, w log-uniform per sequence in [lo, hi]. First lo = hi = `--start-weight`
  (0.02: the key dominates the memory and retrieval is easy to find), then lo -> 1 and
  hi -> `--max-weight` (16,384: a 512-token sequence loads M and z like one of 8M tokens).
  This is what teaches the model to keep filler out of M and z (z dilution, design.md);
- AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.05 on matrices), gates beta at 10x the lr
  without decay, 100 warm-up steps then cosine decay to 10%, gradient clipping at 1.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data import generator, make_batch, save_tokenizer  # noqa: E402
from parallel import parallel_forward  # noqa: E402

from infini_trt.export import InfiniConfig, InfiniLM, init_weights, save_checkpoint  # noqa: E402
from infini_trt.runtime.passkey_data import vocabulary  # noqa: E402


def passkey_config() -> InfiniConfig:
    """The bundled model's shape: ~0.17M parameters, segments of 64 tokens."""
    return InfiniConfig(vocab_size=len(vocabulary()), d_model=64, n_layers=3, n_heads=4,
                        n_kv_heads=4, head_dim=16, ffn_dim=192, segment_len=64,
                        attn_bias=True)


def schedule(step: int, steps: int, args) -> tuple[int, tuple[float, float], float]:
    """(max segments, (lo, hi) of the write weights, learning-rate factor) at `step`.

    Write weights of the non-key tokens: `--start-weight` for the first 10% of the steps (the
    key stands out in M and z: retrieval is easy to find), then lo rises to 1 and hi to
    `--max-weight` (log-linearly) until 60%, and stay there."""
    p = step / steps
    max_segments = round(3 + (args.max_segments - 3) * min(1.0, max(0.0, p - 0.2) / 0.4))
    ramp = min(1.0, max(0.0, (p - 0.1) / 0.5))
    start = math.log(args.start_weight)
    weights = (math.exp(start * (1 - ramp)),
               math.exp(start + ramp * (math.log(args.max_weight) - start)))
    warm = min(1.0, (step + 1) / args.warmup)
    lr = warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
    return max_segments, weights, lr


def optimizer(model: InfiniLM, args) -> torch.optim.Optimizer:
    gates = [p for n, p in model.named_parameters() if n.endswith("beta")]
    matrices = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2 and not n.endswith("beta")]
    return torch.optim.AdamW([
        {"params": matrices, "lr": args.lr, "weight_decay": 0.05},
        {"params": rest, "lr": args.lr, "weight_decay": 0.0},
        {"params": gates, "lr": args.lr * 10, "weight_decay": 0.0},
    ], betas=(0.9, 0.95))


def losses(model: InfiniLM, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(LM loss, answer-digit loss, answer exact-match per sequence (B,))."""
    logits, _, _ = parallel_forward(model, batch.ids, batch.write_weights)
    ce = F.cross_entropy(logits.transpose(1, 2), batch.targets.clamp_min(0), reduction="none")
    lm = (ce * batch.lm_mask).sum() / batch.lm_mask.sum()
    answer = (ce * batch.answer).sum() / batch.answer.sum()
    right = (logits.argmax(-1) == batch.targets) | ~batch.answer
    return lm, answer, right.all(dim=1)


@torch.no_grad()
def evaluate(model: InfiniLM, gen, seed: int, length: int, weight: float, count: int) -> float:
    """Exact match of the answer (teacher-forced argmax) on fixed held-out prompts."""
    rng = np.random.default_rng(10_000 + seed)
    batch = make_batch(gen, rng, count, length, weight=weight)
    _, _, right = losses(model, batch)
    return float(right.float().mean())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--tokens-per-step", type=int, default=2048)
    ap.add_argument("--max-segments", type=int, default=8)
    ap.add_argument("--max-weight", type=float, default=16384.0)
    ap.add_argument("--start-weight", type=float, default=0.02)
    ap.add_argument("--answer-weight", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = passkey_config()
    model = init_weights(InfiniLM(cfg), args.seed).train()
    gen = generator(cfg.segment_len)
    opt = optimizer(model, args)
    base_lrs = [g["lr"] for g in opt.param_groups]
    n = cfg.segment_len
    print(f"{cfg.num_parameters():,} parameters; {args.steps} steps of "
          f"{args.tokens_per_step} tokens; seed {args.seed}", flush=True)
    start, seen, recent = time.perf_counter(), 0, []
    for step in range(args.steps):
        max_segments, weights, lr = schedule(step, args.steps, args)
        segments = int(rng.integers(2, max_segments + 1))
        count = max(1, args.tokens_per_step // (segments * n))
        batch = make_batch(gen, rng, count, segments * n, weights)
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * lr
        lm, answer, right = losses(model, batch)
        loss = lm + args.answer_weight * answer
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += batch.ids.numel()
        recent.append((answer.item(), right.float().mean().item()))
        if step % 50 == 49:
            a, e = np.mean(recent, axis=0)
            print(f"step {step:5d}  {(time.perf_counter() - start) / 60:5.1f} min  answer loss "
                  f"{a:.3f}  batch exact match {e:.2f} (mean of 50 steps)", flush=True)
            recent = []
        if step % args.eval_every == 0 or step == args.steps - 1:
            model.eval()
            short = evaluate(model, gen, args.seed, 16 * n, 1.0, 16)
            long = evaluate(model, gen, args.seed, 16 * n, 1024.0, 16)
            model.train()
            elapsed = time.perf_counter() - start
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  {seen / elapsed:6.0f} tok/s  "
                  f"lm {lm.item():.3f}  answer {answer.item():.3f}  batch-em "
                  f"{right.float().mean().item():.2f}  segs<={max_segments} "
                  f"w in [{weights[0]:.3g}, {weights[1]:.3g}]"
                  f"  em@1K {short:.2f}  em@1K(w=1024) {long:.2f}", flush=True)
    model.eval()
    out = Path(args.out)
    tmp_tok = Path(args.out + ".tokenizer.json")
    save_tokenizer(tmp_tok)
    save_checkpoint(model, out, tokenizer=tmp_tok, force=True)
    tmp_tok.unlink()
    elapsed = time.perf_counter() - start
    print(f"wrote {out} after {elapsed / 60:.1f} min ({seen:,} tokens)", flush=True)


if __name__ == "__main__":
    main()
