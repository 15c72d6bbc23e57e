"""The figures `bench` derives from its measurements, its table, and its plot.

Derived per point (subject x length):
    prefill_efficiency   model FLOPs of the prefill per second / measured fp32 matmul rate
                         (roofline.prefill_flops: useful, causal FLOPs; int8 and bf16 are also
                         set against the fp32 rate, so they can pass 100%)
    decode_bytes_per_token, decode_bandwidth_use
                         roofline.decode_bytes_per_token (weights / B + K/V cache + state)
                         x decode tokens/s / measured memory read bandwidth
    vs_torch             prefill and decode tokens/s over PyTorch eager's at the same length
    vs_genai             {peer: ratios} for this model's subjects against each onnxruntime-genai
                         peer at the same length: prefill and decode tokens/s ours/theirs,
                         TTFT and peak RSS theirs/ours (> 1: ours better in every column)
    interleaved[].vs_first, .vs_torch, .prefill_efficiency
                         prefill and decode tokens/s measured in alternation
                         (bench_measure.interleaved) over the same subject's at the first
                         length (0, the empty context, where the rounds have it) and over
                         PyTorch eager's at the same length; a segment's
                         model FLOPs per second over the matmul rate measured in the rounds;
                         .vs_genai: prefill and decode ours/onnxruntime-genai's in the rounds
"""
from __future__ import annotations

from pathlib import Path

from infini_trt.export.config import InfiniConfig
from infini_trt.export.quantize import METHODS as QUANTIZE_METHODS

from . import roofline
from .lengths import length_label

# bytes a decoded token reads per weight, by precision: the 8-bit methods 1 (their scales, at
# most 4 bytes per 128 weights, left out); int4 (ours and onnxruntime-genai's) 4 bits and a
# float32 scale per block of 32 (our 4-bit zero points, 1/64 byte a weight, left out)
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2,
         **{m: 1 for m in QUANTIZE_METHODS if m != "int4"}, "int4": 0.5 + 4 / 32}
GENAI_KIND = "genai"                  # the onnxruntime-genai peers (runtime/peer_genai.py)
OURS = ("torch", "onnxruntime", "tensorrt")          # the kinds of this model's subjects


def gflops(rate: float) -> str:
    """A FLOP/s figure in GFLOP/s: whole numbers, three digits below 10 (an emulated CPU)."""
    return f"{rate / 1e9:,.0f}" if rate >= 1e10 else f"{rate / 1e9:.3g}"


def _subject_config(cfg: InfiniConfig, subject: dict) -> InfiniConfig:
    """The shape whose FLOPs a subject computes (lucidrains has one K/V head per head)."""
    return cfg.replace(n_kv_heads=cfg.n_heads) if subject["kind"] == "lucidrains" else cfg


def derive(report: dict) -> dict:
    """Add efficiencies, bytes per token and ratios to PyTorch eager to every point."""
    cfg = InfiniConfig.from_dict(report["config"])
    limits = report["limits"]
    torch_points = {p["length"]: p for s in report["subjects"] if s["name"] == "torch"
                    for p in s["points"] if "skipped" not in p}
    for subject in report["subjects"]:
        shape = _subject_config(cfg, subject)
        full = not subject["infini"]
        weight_bytes = BYTES.get(subject["precision"], 4)
        cache_value_bytes = weight_bytes if weight_bytes in (2, 4) else 4   # quantized: fp32
        for p in subject["points"]:
            if "skipped" in p:
                continue
            flops = p["batch"] * roofline.prefill_flops(shape, p["length"], full_attention=full)
            p["prefill_flops"] = flops
            p["prefill_efficiency"] = flops / p["prefill_s"] / limits["matmul_fp32_flops_per_s"]
            cache_len = _decode_cache_slots(cfg, subject["kind"], p)
            moved = roofline.decode_bytes_per_token(shape, p["batch"], weight_bytes, cache_len,
                                                    cache_value_bytes, memory=not full)
            p["decode_bytes_per_token"] = moved
            if p["decode_tokens_per_s"]:
                p["decode_bandwidth_use"] = (moved["total"] * p["decode_tokens_per_s"]
                                             / limits["memory_read_bytes_per_s"])
                p["decode_weight_bandwidth_use"] = (moved["weights"] * p["decode_tokens_per_s"]
                                                    / limits["memory_read_bytes_per_s"])
            base = torch_points.get(p["length"])
            if base is not None:
                p["vs_torch"] = _ratios(p, base)
    genai = [s for s in report["subjects"] if s["kind"] == GENAI_KIND]
    for subject in report["subjects"]:
        if subject["kind"] not in OURS:
            continue
        for p in subject["points"]:
            theirs = {g["name"]: q for g in genai for q in g["points"]
                      if q["length"] == p["length"] and "skipped" not in q}
            if "skipped" not in p and theirs:
                p["vs_genai"] = {name: _ratios(p, q, inverse=("ttft_s", "peak_rss_mb"))
                                 for name, q in theirs.items()}
    alternation = report.get("alternation") or {}
    rate = alternation.get("matmul_fp32_flops_per_s")
    segment = roofline.prefill_flops(cfg, cfg.segment_len)   # last token's logits only
    torch_rounds = {p["length"]: p for s in report["subjects"] if s["name"] == "torch"
                    for p in s.get("interleaved") or []}
    genai_rounds = {s["name"]: {p["length"]: p for p in s.get("interleaved") or []}
                    for s in genai}
    for subject in report["subjects"]:
        points = subject.get("interleaved") or []
        for p in points:
            p["vs_first"] = _ratios(p, points[0])
            if p["length"] in torch_rounds:
                p["vs_torch"] = _ratios(p, torch_rounds[p["length"]])
            theirs = {name: rounds[p["length"]] for name, rounds in genai_rounds.items()
                      if p["length"] in rounds}
            if subject["kind"] in OURS and theirs:
                p["vs_genai"] = {name: _ratios(p, q) for name, q in theirs.items()}
            if rate:
                p["prefill_efficiency"] = (p["prefill_tokens_per_s"] / cfg.segment_len
                                           * segment / rate)
    return report


def _decode_cache_slots(cfg: InfiniConfig, kind: str, p: dict) -> float:
    """K/V slots a decoded token of point p reads, on average: the growing context for the
    full-attention baseline and onnxruntime-genai; the cache window of its segment
    position for our runners (`cache_window`: the tokens decode from where the prompt
    ended); the whole segment for the lucidrains peer."""
    from .kv_cache import cache_window

    tokens = p["decode_tokens"] // p["batch"]
    if kind in ("full-attention", GENAI_KIND):
        return p["length"] + tokens / 2
    n = cfg.segment_len
    if kind == "lucidrains" or not tokens:
        return n
    return sum(cache_window((p["length"] + i) % n + 1, n) for i in range(tokens)) / tokens


def _ratios(p: dict, base: dict, inverse: tuple[str, ...] = ()) -> dict:
    """{"prefill", "decode"}: p's tokens/s over base's, and for each key in `inverse` (a time
    or a size, less is better: "ttft_s" -> "ttft") base's over p's; None where either has
    none."""
    ratios = {}
    for key in ("prefill", "decode"):
        mine, theirs = p[f"{key}_tokens_per_s"], base[f"{key}_tokens_per_s"]
        ratios[key] = mine / theirs if mine and theirs else None
    for key in inverse:
        mine, theirs = p.get(key), base.get(key)
        ratios[key.split("_")[0]] = theirs / mine if mine and theirs else None
    return ratios


def _ratio(p: dict, key: str) -> str:
    r = (p.get("vs_torch") or {}).get(key)
    return f"{r:5.2f}x" if r is not None else "     -"


def _prompt_graphs(report: dict) -> str:
    """What each onnxruntime subject read whole prompt segments with (--prompt-graph)."""
    chosen = [f"{s['name']} {s['prompt_graph']}" for s in report["subjects"]
              if s.get("prompt_graph")]
    setting = report["settings"].get("prompt_graph", "prefill")
    return (f"; onnxruntime reads whole prompt segments through its graph ({', '.join(chosen)}; "
            f"--prompt-graph {setting})" if chosen else "")


def table(report: dict) -> str:
    """The figures against context length, one row per subject and length."""
    limits, machine = report["limits"], report["machine"]
    s = report["settings"]
    bf16 = limits.get("matmul_bf16_flops_per_s")
    bf16 = (f"{gflops(bf16)} GFLOP/s" if bf16 is not None
            else f"- ({limits.get('bf16_not_measured', 'not measured')})")
    lines = [f"model {report['model']}: {report['parameters']:,} parameters, segment "
             f"{report['config']['segment_len']}, batch {s['batch']}, "
             f"{s['decode_tokens']} decoded tokens per sequence{_prompt_graphs(report)}",
             f"CPU: {machine.get('cpu_summary', machine['cpu'])}",
             f"machine: {machine['cores']} cores, load average "
             f"{_load(machine.get('load_average'))} -> {_load(machine.get('load_average_end'))}; "
             f"fp32 matmul {gflops(limits['matmul_fp32_flops_per_s'])} GFLOP/s, bf16 "
             f"{bf16}, memory read {limits['memory_read_bytes_per_s'] / 1e9:,.1f} GB/s",
             f"{'length':>6s}  {'subject':28s} {'prefill tok/s':>13s} {'vs torch':>8s} "
             f"{'segment p50/p95/p99 ms':>24s} {'TTFT s':>8s} {'decode tok/s':>12s} "
             f"{'vs torch':>8s} {'peak RSS MiB':>12s} {'prefill eff':>11s} {'decode BW':>9s}"]
    lengths = sorted({p["length"] for sub in report["subjects"] for p in sub["points"]})
    for length in lengths:
        for sub in report["subjects"]:
            p = next((q for q in sub["points"] if q["length"] == length), None)
            if p is None:
                continue
            head = f"{length_label(length):>6s}  {sub['name']:28s}"
            if "skipped" in p:
                lines.append(f"{head} skipped: {p['skipped']}")
                continue
            lat = p["segment_latency_ms"]
            decode = p["decode_tokens_per_s"]
            lines.append(
                f"{head} {p['prefill_tokens_per_s']:>13,.0f} {_ratio(p, 'prefill'):>8s} "
                f"{lat['p50']:>8,.1f}/{lat['p95']:>7,.1f}/{lat['p99']:>7,.1f} "
                f"{p['ttft_s']:>8.2f} {decode or 0:>12,.1f} {_ratio(p, 'decode'):>8s} "
                f"{p['peak_rss_mb']:>12,.0f} {p['prefill_efficiency']:>10.0%} "
                f"{p.get('decode_bandwidth_use', 0):>9.0%}")
    lines += genai_table(report)
    lines += interleaved_table(report)
    for sub in report["subjects"]:
        if sub["status"] != "ok":
            lines.append(f"{sub['name']}: skipped: {sub['reason']}")
    return "\n".join(lines)


def _times(r: float | None) -> str:
    return f"{r:.2f}x" if r is not None else "-"


def genai_table(report: dict) -> list[str]:
    """This model's subjects against each onnxruntime-genai peer, per length: prefill and
    decode tokens/s ours/theirs, TTFT and peak RSS theirs/ours (> 1: ours better)."""
    rows = [(p["length"], sub["name"], peer, r) for sub in report["subjects"]
            for p in sub["points"] for peer, r in (p.get("vs_genai") or {}).items()]
    if not rows:
        return []
    lines = ["against onnxruntime-genai (> 1: ours better; prefill and decode tok/s "
             "ours/theirs, TTFT and peak RSS theirs/ours):",
             f"{'length':>6s}  {'subject':28s} {'peer':24s} {'prefill':>8s} {'decode':>8s} "
             f"{'TTFT':>8s} {'peak RSS':>8s}"]
    for length, name, peer, r in sorted(rows, key=lambda row: row[0]):
        lines.append(f"{length_label(length):>6s}  {name:28s} {peer:24s} "
                     f"{_times(r['prefill']):>8s} {_times(r['decode']):>8s} "
                     f"{_times(r['ttft']):>8s} {_times(r['peak']):>8s}")
    return lines


def interleaved_table(report: dict) -> list[str]:
    """The rounds in alternation: per subject and length, a segment's and a decoded token's
    median time, the tokens/s they make, their ratios to torch and to the first length, and
    prefill efficiency against the matmul rate of the rounds."""
    measured = [s for s in report["subjects"] if s.get("interleaved")]
    r = report.get("alternation")
    if not measured or not r:
        return []
    rate, n = r.get("matmul_fp32_flops_per_s"), r.get("matmul_n")
    lines = [f"in alternation ({r['rounds']} rounds; per subject, length and round "
             f"{r['segments']} segments and {r['decode_tokens']} decoded tokens from the "
             f"state the prompt left (length 0: each segment read from an empty context, a "
             f"one-segment prompt, and tokens decoded inside it), and an fp32 matmul"
             f"{f' (n={n})' if n else ''}: {gflops(rate or 0)} GFLOP/s; medians):",
             f"{'length':>6s}  {'subject':28s} {'segment ms':>10s} {'prefill tok/s':>13s} "
             f"{'vs torch':>8s} {'vs first':>8s} {'eff':>5s} {'token ms':>9s} "
             f"{'decode tok/s':>12s} {'vs torch':>8s} {'vs first':>8s}"]
    lengths = sorted({p["length"] for s in measured for p in s["interleaved"]})
    for length in lengths:
        for sub in measured:
            p = next((q for q in sub["interleaved"] if q["length"] == length), None)
            if p is None:
                continue
            eff = p.get("prefill_efficiency")
            lines.append(
                f"{_round_length(length):>6s}  {sub['name']:28s} "
                f"{p['segment_ms']['p50']:>10,.2f} {p['prefill_tokens_per_s']:>13,.0f} "
                f"{_ratio(p, 'prefill'):>8s} {p['vs_first']['prefill']:>7.2f}x "
                f"{f'{eff:.0%}' if eff else '-':>5s} "
                f"{p['decode_token_ms']['p50']:>9,.3f} {p['decode_tokens_per_s']:>12,.1f} "
                f"{_ratio(p, 'decode'):>8s} {p['vs_first']['decode']:>7.2f}x")
    against = [(p["length"], sub["name"], peer, ratio) for sub in measured
               for p in sub["interleaved"] for peer, ratio in (p.get("vs_genai") or {}).items()]
    if against:
        lines.append("in alternation against onnxruntime-genai (tok/s ours/theirs, > 1: ours "
                     "faster):")
        for length, name, peer, ratio in sorted(against, key=lambda row: row[0]):
            lines.append(f"{_round_length(length):>6s}  {name:28s} {peer:24s} prefill "
                         f"{_times(ratio['prefill']):>7s} decode {_times(ratio['decode']):>7s}")
    lines += [f"left out of the rounds: {why}" for why in r.get("left_out", [])]
    return lines


def _round_length(length: int) -> str:
    """A length of the rounds: 0 is the empty context (bench_measure.empty_context)."""
    return length_label(length) if length else "0"


def _load(load) -> str:
    return "/".join(f"{x:.1f}" for x in load) if load else "?"


def plot(report: dict, path: str | Path) -> None:
    """Prefill and decode tokens/s and peak RSS against context length (log x), one line per
    subject, written as a PNG."""
    try:
        import matplotlib
    except ImportError:
        from infini_trt.export.errors import MissingDependencyError

        raise MissingDependencyError("matplotlib", "bench --plot",
                                     "pip install 'infini-trt[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = (("prefill_tokens_per_s", "prefill tokens/s"),
              ("decode_tokens_per_s", "decode tokens/s"), ("peak_rss_mb", "peak RSS (MiB)"))
    for ax, (key, title) in zip(axes, panels):
        for sub in report["subjects"]:
            points = [p for p in sub["points"] if "skipped" not in p and p.get(key)]
            if points:
                ax.plot([p["length"] for p in points], [p[key] for p in points], marker="o",
                        label=sub["label"] or sub["name"])
        ax.set_xscale("log", base=2)
        if key == "peak_rss_mb":
            ax.set_ylim(bottom=0)
        else:
            ax.set_yscale("log")
        lengths = sorted({p["length"] for sub in report["subjects"] for p in sub["points"]})
        ax.set_xticks(lengths, [length_label(n) for n in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize=8)
    cfg = report["config"]
    fig.suptitle(f"infini-trt bench: {report['parameters'] / 1e6:,.1f}M parameters, "
                 f"d={cfg['d_model']}, L={cfg['n_layers']}, N={cfg['segment_len']}, "
                 f"batch {report['settings']['batch']} ({report['machine']['cpu']})")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
