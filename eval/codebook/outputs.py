"""Writing the report: figures, codes.parquet, report.json, report.html, and the terminal summary."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa

from eval.codebook import html, plots, stats
from pipeline import storage
from pipeline.token_cache import write_parquet_atomic

CODES_SCHEMA = pa.schema(
    [
        ("code", pa.int64()),
        ("count", pa.int64()),
        ("frequency", pa.float64()),
        ("rank", pa.int64()),  # 1 = most used; ties broken by code id
        ("dead", pa.bool_()),
        ("shards_using", pa.int64()),
        ("classes_using", pa.int64()),
        ("nearest_code", pa.int64()),
        ("nearest_distance", pa.float64()),
        ("nearest_cosine", pa.float64()),
        ("cluster", pa.int64()),
        ("in_duplicate_pair", pa.bool_()),
    ]
)


def codes_table(sc, columns: dict[str, np.ndarray]) -> pa.Table:
    counts = sc.counts
    k = counts.size
    order = np.lexsort((np.arange(k), -counts))
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(1, k + 1)
    shards_using = np.zeros(k, dtype=np.int64)
    for c in sc.shard_counts:
        shards_using += c > 0
    data: dict[str, Any] = {
        "code": np.arange(k, dtype=np.int64),
        "count": counts,
        "frequency": stats.probabilities(counts),
        "rank": rank,
        "dead": counts == 0,
        "shards_using": shards_using,
        "classes_using": sum((row > 0).astype(np.int64) for row in sc.labels.values()) if sc.labels else None,
    }
    data.update(columns)
    arrays = [pa.array(data[f.name], type=f.type) if data.get(f.name) is not None else pa.nulls(k, f.type) for f in CODES_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=CODES_SCHEMA)


def make_figures(report: dict[str, Any], sc, patches: dict[int, list[np.ndarray]], other_counts) -> dict[str, bytes]:
    k = report["usage"]["vocab_size"]
    figs: dict[str, bytes] = {}
    tid = report["cache"].get("tokenizer_id") or "this"
    figs["usage_sorted.png"] = plots.png_bytes(plots.sorted_usage([(f"this: {tid}", sc.counts)], k))
    labels, values = stats.log_bins(sc.counts)
    figs["usage_histogram.png"] = plots.png_bytes(
        plots.bars("Codes by number of tokens (dead codes in red)", "tokens per code", "codes", labels, values, highlight=[0])
    )
    per = report["shards"]["per_shard"]
    drifting = set(report["shards"]["drifting_shards"])
    figs["drift.png"] = plots.png_bytes(
        plots.bars("Drift of each shard from the whole (JS divergence, bits)", "shard", "JS bits",
                   [p["shard"].replace("shard-", "").replace(".tar", "") for p in per], [p["drift_js_bits"] for p in per],
                   highlight=[i for i, p in enumerate(per) if p["shard"] in drifting],
                   marks=[p["drift_by_chance"] for p in per],
                   legend=[("drift", plots.COLOURS[0]), ("drifting (> 2x chance, 2x median)", plots.COLOURS[1]), ("expected by chance", (0, 0, 0))])
    )
    most, least = report["mosaic"]["most_used"], report["mosaic"]["least_used"]
    if patches and (most or least):
        total = max(1, int(sc.counts.sum()))
        rows: list[tuple[str, list]] = [("-- most used codes --", [])]
        rows += [(f"code {c}: {100 * sc.counts[c] / total:.2f}% ({sc.counts[c]:,})", patches.get(c, [])) for c in most]
        rows += [("-- least used codes still in use --", [])]
        rows += [(f"code {c}: {sc.counts[c]:,} token" + ("s" if sc.counts[c] != 1 else ""), patches.get(c, [])) for c in least]
        figs["mosaic.png"] = plots.png_bytes(plots.mosaic(rows, per_row=max(1, sc.m), title="Image patches per code"))
    cls = report.get("classes")
    if cls and "overlap" in cls:
        figs["class_overlap.png"] = plots.png_bytes(
            plots.heatmap("Class x class usage overlap (histogram intersection)", cls["overlap"]["labels"], np.array(cls["overlap"]["matrix"]))
        )
    cmp_ = report.get("compare")
    if cmp_:
        curves = [(f"this: {tid}", sc.counts)]
        if other_counts is not None:
            curves.append((cmp_["other_label"], other_counts))
        elif cmp_.get("other_curve"):
            # rebuild a histogram-shaped curve from the stored sorted-usage samples
            ranks = np.asarray(cmp_["other_curve"]["rank"], dtype=np.float64)
            freq = np.asarray(cmp_["other_curve"]["frequency"], dtype=np.float64)
            live = freq > 0  # dead codes are off a log axis; interpolate the live part in log-log
            if live.sum() >= 2:
                r = np.arange(1, int(ranks[live].max()) + 1)
                full = np.exp(np.interp(np.log(r), np.log(ranks[live]), np.log(freq[live])))
                curves.append((cmp_["other_label"], full))
        figs["compare_usage.png"] = plots.png_bytes(plots.sorted_usage(curves, k))
    return figs


def summary_lines(report: dict[str, Any]) -> list[str]:
    u, c = report["usage"], report["cache"]
    lines = [
        f"codebook report: tokenizer {c.get('tokenizer_id')} ({c.get('kind') or '?'}), K={u['vocab_size']:,}, "
        f"{u['tokens']:,} tokens from {c['samples']:,} images in {c['shards']} shards",
        f"  used {u['codes_used']:,}/{u['vocab_size']:,} ({100 * u['used_fraction']:.1f}%), dead {u['dead_codes']:,}, "
        f"perplexity {u['perplexity']:.1f} ({u['perplexity_over_k']:.3f} K), entropy {u['entropy_bits']:.2f}/{u['max_entropy_bits']:.2f} bits, "
        f"top 1% share {100 * u['top1pct_share']:.1f}%",
        f"  drift: mean JS {report['shards']['drift_mean']:.4f} (chance alone: {report['shards']['drift_chance_mean']:.4f}), "
        f"max {report['shards']['drift_max']:.4f} ({report['shards']['drift_max_shard']}); "
        f"{len(report['shards']['drifting_shards'])} shard(s) drifting beyond chance",
    ]
    if report.get("classes"):
        cl = report["classes"]
        lines.append(f"  classes: {cl['num_classes']}, mean codes used per class {cl['mean_codes_used_per_class']:.1f}, "
                     f"I(code; class) {cl['mutual_information_bits']:.3f} bits")
    g = report.get("geometry")
    if g:
        lines.append(f"  geometry: {g['duplicate_pairs']} near-duplicate pairs (cos > {g['duplicate_threshold']}), median nearest "
                     f"cosine {g['nearest_cosine']['median']:.3f}, {g['kmeans']['clusters']} k-means groups")
    a = report.get("agreement")
    if a:
        flag = "" if a["agreement"] >= 0.999 else "  <-- the cache does not match this tokenizer (stale or corrupt)"
        lines.append(f"  agreement with cache: {100 * a['agreement']:.2f}% of {a['tokens']:,} tokens ({a['images']} images, {a['method']}){flag}")
    t = report.get("tokenizer")
    if t and not t["matches_cache"]:
        lines.append(f"  note: tokenizer {t['tokenizer_id']} is not the one that built the cache ({c.get('tokenizer_id')})")
    s = report.get("source")
    if s and not s["matches_cache"]:
        lines.append(f"  note: source fingerprint {s['fingerprint']} differs from the cache's {', '.join(s['cache_fingerprints'])}")
    cmp_ = report.get("compare")
    if cmp_:
        from eval.codebook.compare import KEY_FIGURES

        lines.append(f"  compared with {cmp_['other']}:")
        lines.append(f"    {'figure':<28}{'this':>18}{'other':>18}  change")
        for row in cmp_["rows"]:
            if row["figure"] in KEY_FIGURES:
                this, other = html.fmt(row["this"]) or "n/a", html.fmt(row["other"]) or "n/a"
                lines.append(f"    {row['figure']:<28}{this:>18}{other:>18}  {row['change']}")
        if "histogram_js" in cmp_:
            lines.append(f"    same tokenizer: histogram JS {cmp_['histogram_js']:.4f}, dead here only {cmp_['dead_here_only']}, "
                         f"dead there only {cmp_['dead_there_only']}")
    return lines


def write_all(report: dict[str, Any], sc, columns, patches, out_dir: str, compare: str | None, timing: dict[str, float], t0: float, quiet: bool) -> dict[str, Any]:
    from eval.codebook.compare import compare as compare_reports

    other_counts = None
    if compare:
        report["compare"], other_counts = compare_reports(report, sc.counts, compare)
    storage.makedirs(out_dir)
    t = time.perf_counter()
    figs = make_figures(report, sc, patches, other_counts)
    for name, data in figs.items():
        storage.write_bytes_atomic(storage.join(out_dir, name), data)
    write_parquet_atomic(storage.join(out_dir, "codes.parquet"), codes_table(sc, columns))
    timing["outputs_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t0
    tokens = report["usage"]["tokens"]
    timing["seconds_per_million_tokens"] = timing["total_s"] / tokens * 1e6
    report["timing"] = {k: round(v, 4) for k, v in timing.items()}
    report["outputs"] = ["report.json", "codes.parquet", *sorted(figs), "report.html"]
    storage.write_bytes_atomic(storage.join(out_dir, "report.json"), json.dumps(report, indent=1, default=_json_default).encode())
    page = html.render(report, figs, links=["report.json", "codes.parquet"])
    storage.write_bytes_atomic(storage.join(out_dir, "report.html"), page.encode())
    lines = summary_lines(report)
    lines.append(f"  wrote {storage.join(out_dir, 'report.html')} (+ report.json, codes.parquet, {len(figs)} figures) in {timing['total_s']:.1f} s")
    if not quiet:
        print("\n".join(lines))
    report["summary"] = lines
    return report


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
