"""``report.html``: one self-contained page. Figures are embedded as data URIs; the only links are to
files written beside it (``report.json``, ``codes.parquet``), and only when they exist."""

from __future__ import annotations

import base64
import html
from typing import Any, Sequence

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}.note{color:#666;font-size:13px}
img{max-width:100%;border:1px solid #eee;margin:6px 0}.bad{color:#b00}.good{color:#070}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def image(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render(report: dict[str, Any], figures: dict[str, bytes], links: Sequence[str]) -> str:
    """The page: summary table, figures, geometry, agreement, classes, shards, comparison."""
    u = report["usage"]
    cache = report["cache"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Codebook report: {_e(cache.get('tokenizer_id'))}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>Codebook report — tokenizer {_e(cache.get('tokenizer_id'))} ({_e(cache.get('kind') or 'unknown kind')})</h1>",
             f"<p class='note'>cache {_e(cache['path'])} · {fmt(cache['shards'])} shards · {fmt(cache['samples'])} images · "
             f"{fmt(cache['views'])} views · grid {_e(cache.get('grid'))} · generated {_e(report['created'])}</p>"]
    if links:
        parts.append("<p>Data: " + " · ".join(f'<a href="{_e(name)}">{_e(name)}</a>' for name in links) + "</p>")
    parts.append("<h2>Usage</h2>")
    rows = [
        ("codebook size K", u["vocab_size"]), ("tokens", u["tokens"]),
        ("codes used", f"{u['codes_used']:,} ({100 * u['used_fraction']:.1f}%)"),
        ("dead codes", f"{u['dead_codes']:,} ({100 * u['dead_fraction']:.1f}%)"),
        ("perplexity", u["perplexity"]), ("perplexity / K", u["perplexity_over_k"]),
        ("entropy (bits)", f"{u['entropy_bits']:.3f} of {u['max_entropy_bits']:.3f}"),
        (f"share of the top 1% ({u['top1pct_codes']} codes)", f"{100 * u['top1pct_share']:.2f}%"),
        ("most used code's share", f"{100 * u['max_code_share']:.2f}%"), ("Gini", u["gini"]),
    ]
    parts.append(table(["figure", "value"], rows))
    for name, alt in (("usage_sorted.png", "sorted usage"), ("usage_histogram.png", "usage histogram")):
        if name in figures:
            parts.append(image(figures[name], alt))
    g = report.get("geometry")
    if g:
        parts.append("<h2>Codebook geometry (FAISS)</h2>")
        parts.append(table(["figure", "value"], [
            ("nearest-neighbour cosine, median", g["nearest_cosine"]["median"]),
            ("nearest-neighbour cosine, max", g["nearest_cosine"]["max"]),
            ("nearest-neighbour L2, median", g["nearest_distance"]["median"]),
            (f"near-duplicate pairs (cosine > {g['duplicate_threshold']})", g["duplicate_pairs"]),
            ("codes in a near-duplicate pair", g["codes_in_duplicate_pairs"]),
            ("k-means groups", g["kmeans"]["clusters"]),
            ("groups holding only dead codes", g["kmeans"]["all_dead_clusters"]),
            ("dead codes: median nearest cosine", g.get("dead_nearest_cosine_median")),
            ("live codes: median nearest cosine", g.get("live_nearest_cosine_median")),
        ]))
        if g["top_duplicates"]:
            parts.append("<p>Closest pairs:</p>" + table(["code a", "code b", "cosine", "count a", "count b"],
                         [(p["a"], p["b"], p["cosine"], p["count_a"], p["count_b"]) for p in g["top_duplicates"][:20]]))
    elif report.get("geometry_skipped"):
        parts.append(f"<h2>Codebook geometry</h2><p class='note'>{_e(report['geometry_skipped'])}</p>")
    a = report.get("agreement")
    if a:
        cls = "good" if a["agreement"] >= 0.999 else "bad"
        parts.append("<h2>Agreement with the cached tokens</h2>")
        parts.append(f"<p class='{cls}'>{100 * a['agreement']:.2f}% of {fmt(a['tokens'])} re-assigned tokens equal the cached ones "
                     f"({fmt(a['images'])} images, method: {_e(a['method'])}).</p>")
        parts.append(table(["figure", "value"], [(k, v) for k, v in a.items() if k not in ("agreement", "method", "per_shard")]))
    if "mosaic.png" in figures:
        parts.append("<h2>Patches of the most and least used codes</h2>" + image(figures["mosaic.png"], "patch mosaic"))
    c = report.get("classes")
    if c:
        parts.append("<h2>Usage per class</h2>")
        parts.append(table(["figure", "value"], [
            ("classes", c["num_classes"]), ("mean codes used per class", c["mean_codes_used_per_class"]),
            ("codes used by one class only", c["codes_exclusive_to_one_class"]),
            ("codes used by every class", c["codes_used_by_every_class"]),
            ("I(code; class) bits", c["mutual_information_bits"]), ("I / H(class)", c["mi_over_class_entropy"]),
        ]))
        parts.append(table(["class", "tokens", "codes used", "used %", "perplexity", "exclusive codes"],
                           [(x["name"], x["tokens"], x["codes_used"], 100 * x["used_fraction"], x["perplexity"], x["exclusive_codes"]) for x in c["classes"][:200]]))
        if "class_overlap.png" in figures:
            parts.append(image(figures["class_overlap.png"], "class overlap"))
    s = report["shards"]
    parts.append("<h2>Drift per shard</h2>")
    parts.append(f"<p>Jensen-Shannon divergence (bits) of each shard's histogram from the whole: mean {s['drift_mean']:.4g}, "
                 f"max {s['drift_max']:.4g} ({_e(s['drift_max_shard'])}). A shard of the same size drawn from the whole "
                 f"would drift {s['drift_chance_mean']:.4g} by chance alone (black ticks); shards beyond twice that and twice the median shard's drift: "
                 f"{_e(', '.join(s['drifting_shards'][:50]) or 'none')}.</p>")
    if "drift.png" in figures:
        parts.append(image(figures["drift.png"], "drift per shard"))
    cmp_ = report.get("compare")
    if cmp_:
        parts.append(f"<h2>Compared with {_e(cmp_['other'])}</h2>")
        parts.append(table(["figure", "this", "other", "change"], [(r["figure"], r["this"], r["other"], r["change"]) for r in cmp_["rows"]]))
        if "histogram_js" in cmp_:
            parts.append(f"<p>Same tokenizer: JS divergence between the two histograms {cmp_['histogram_js']:.4g}; "
                         f"{cmp_['dead_here_only']} codes dead here only, {cmp_['dead_there_only']} dead there only.</p>")
        if "compare_usage.png" in figures:
            parts.append(image(figures["compare_usage.png"], "usage compared"))
    t = report.get("timing", {})
    if t:
        parts.append("<h2>Run</h2>" + table(["phase", "seconds"], [(k, v) for k, v in t.items()]))
    parts.append("</body></html>")
    return "\n".join(parts)
