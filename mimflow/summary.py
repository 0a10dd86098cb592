"""The closing summary of ``mimflow run`` / ``mimflow demo``: what a person wants to see first."""

from __future__ import annotations

from typing import Any


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = ["", "== mimflow summary =="]
    if results.get("skipped"):
        lines.append(f"skipped (already current): {', '.join(results['skipped'])}")
    if "tokenizer" in results:
        lines.append(f"tokenizer:        {results['tokenizer']['tokenizer']}")
    if "tokens" in results:
        lines.append(f"token cache:      {results['tokens']['cache']}")
    usage = results.get("codebook", {}).get("usage")
    if usage:
        lines.append(
            f"codebook usage:   {usage['codes_used']}/{usage['vocab_size']} codes used ({_pct(usage['used_fraction'])}), "
            f"perplexity {usage['perplexity']:.1f} ({_pct(usage['perplexity_over_k'])} of K), "
            f"{usage['dead_codes']} dead"
        )
        lines.append(f"codebook report:  {results['codebook']['html']}")
    metrics = results.get("pretrain", {}).get("metrics") or {}
    if metrics:
        acc = metrics.get("acc")
        lines.append(
            f"pretraining:      {metrics.get('step', '?')} steps, final loss {metrics.get('loss', float('nan')):.3f}"
            + (f", masked-token accuracy {_pct(acc)}" if acc is not None else "")
        )
        lines.append(f"encoder (timm):   {results['pretrain']['encoder']}")
    doc = results.get("eval", {}).get("results")
    if doc:
        res = doc["results"]
        lines.append(f"evaluation:       {doc['data']['n_train']} train / {doc['data']['n_test']} test images, "
                     f"{doc['data']['num_classes']} classes")
        lines.append(f"  {'method':<14}{'pretrained':>12}{'random init':>13}{'difference':>12}")
        for method, label in (("knn", "kNN top-1"), ("linear", "linear probe"), ("finetune", "fine-tune")):
            if method not in res.get("pretrained", {}):
                continue
            a = res["pretrained"][method].get("top1")  # fine-tune: selected on validation, not on test
            b = res.get("random", {}).get(method, {}).get("top1")
            diff = f"{100 * (a - b):+.1f} pts" if b is not None else ""
            lines.append(f"  {label:<14}{_pct(a):>12}{_pct(b):>13}{diff:>12}")
        lines.append(f"eval results:     {results['eval']['eval']}")
    return lines


def print_summary(results: dict[str, Any]) -> None:
    print("\n".join(summary_lines(results)), flush=True)
