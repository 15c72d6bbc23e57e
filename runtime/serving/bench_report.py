"""`infini-trt bench-serve`'s report as text: what was measured where, then Markdown tables
(ready for a README) of the concurrency levels and of the document phase."""
from __future__ import annotations


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 1:
        return f"{value:,.2f} s"
    return f"{value * 1000:,.1f} ms" if value >= 0.01 else f"{value * 1000:,.2f} ms"


def describe(report: dict) -> list[str]:
    m, s = report["machine"], report["settings"]
    cpu = m["cpu"]
    if m.get("family") and cpu.startswith(m["name"]):
        cpu = f"{m['name']} (family {m['family']}, model {m['model']}){cpu[len(m['name']):]}"
    load, after = m.get("load_average"), m.get("load_average_after")
    rows = (f"server --max-batch {report['max_batch']}" if report["max_batch"] else
            "a server per level, --max-batch its streams (the document phase: 1)")
    lines = [f"'{report['model_name']}' on {report['backend']}, {rows}",
             f"CPU: {cpu}, {m['cores']} cores"
             + (f"; load average {load[0]:.2f} before, {after[0]:.2f} after" if load and after
                else ""),
             f"each request: {s['prompt_tokens']} random token ids, {s['max_tokens']} tokens "
             f"generated (greedy, ignore_eos, streamed); {s['requests_per_stream']} request(s) "
             f"per stream, one after the other"]
    return lines


def levels_table(report: dict) -> list[str]:
    levels = report.get("levels") or []
    if not levels:
        return []
    base, per_level = levels[0], not report["max_batch"]
    lines = [f"| streams |{' rows |' * per_level} requests | tokens | wall | tokens/s | vs "
             f"{base['concurrency']} stream{'s' if base['concurrency'] > 1 else ''} | TTFT p50 "
             f"| TTFT p99 | ITL p50 |",
             "|" + " ---: |" * (9 + per_level)]
    marked = False
    for level in levels:
        ttft, itl = level["ttft_s"], level["itl_s"]
        bound, approx = ("", "") if ttft["source"] == "client" else ("≤ ", "~ ")
        rows = f" {level['max_batch']} |" if per_level else ""
        marked = marked or bool(bound)
        lines.append(
            f"| {level['concurrency']} |{rows} {level['requests']} "
            f"| {level['completion_tokens']:,} "
            f"| {_seconds(level['wall_s'])} | {level['tokens_per_s']:,.1f} "
            f"| {level['tokens_per_s'] / base['tokens_per_s']:.2f}x "
            f"| {bound}{_seconds(ttft['p50'])} | {bound}{_seconds(ttft['p99'])} "
            f"| {approx}{_seconds(itl['p50'])} |")
    lines.append("")
    lines.append("tokens/s: completion tokens of all streams / wall time of the level; TTFT: "
                 "from sending a request to the first streamed chunk carrying a token; ITL: "
                 "between a stream's chunks.")
    if marked:
        lines.append("≤, ~: the stream sent fewer chunks than tokens (text held back), so "
                     "the first chunk may be a few tokens late (≤: an upper bound) and ITL is "
                     "the server's histogram (~: GET /metrics, interpolated within buckets).")
    return lines


def document_table(report: dict) -> list[str]:
    doc = report.get("document")
    if not doc:
        return []
    runs = doc["runs"]
    lines = [f"| a {doc['tokens']:,}-token document, then a {doc['question_tokens']}-token "
             f"question | time to first token p50 | min | max | runs |",
             "| --- | ---: | ---: | ---: | ---: |"]
    names = [("miss", "miss: document + question in the prompt (a new document each time)"),
             ("hit", f"hit: the question after the document's context (POST /v1/contexts "
                     f"once: {_seconds(doc['context_create_s'])})"),
             ("prefix_cache", "document sent again, another question (prefix cache)")]
    for key, name in names:
        row = doc.get(key)
        if row:
            lines.append(f"| {name} | {_seconds(row['p50_s'])} | {_seconds(row['min_s'])} | "
                         f"{_seconds(row['max_s'])} | {runs} |")
    lines.append("")
    lines.append(f"hit against miss: {doc['miss_over_hit']:,.0f}x less time to first token"
                 + (f"; sent again (prefix cache) against miss: "
                    f"{doc['miss_over_prefix_cache']:,.0f}x less" if "miss_over_prefix_cache"
                    in doc else ""))
    lines.append("time to first token here: from sending a max_tokens=1 request to its first "
                 "streamed chunk.")
    return lines


def table(report: dict) -> str:
    """The whole report as text."""
    parts = describe(report) + [""] + levels_table(report)
    document = document_table(report)
    if document:
        parts += [""] + document
    return "\n".join(parts)
