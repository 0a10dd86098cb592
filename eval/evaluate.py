"""``mimflow eval``: kNN, linear probe and fine-tune of an encoder, beside a random-init baseline.

``run_eval(cfg)`` resolves the train/test split (``eval.splits``), loads the encoder (and, with
``baseline: random``, the same architecture randomly initialised), computes or reuses cached
features, runs the asked methods, writes ``<out>/eval.json`` and ``<out>/config.yaml`` and returns
the same document. ``format_table`` renders it for a terminal.

Importing this module loads neither torch nor Ray; the work happens in ``eval.features``/``knn``/
``linear_probe``/``finetune``, imported when used.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Any

from eval.eval_config import METHODS, EvalConfig, EvalError
from eval.splits import class_mapping, resolve_split
from pipeline import storage
from pipeline.config import dump_config, to_dict

RESULT_VERSION = 1


# ------------------------------------------------------------------------------------------- run


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"eval: {msg}", file=sys.stderr, flush=True)


def _delta(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    a, b = results.get("pretrained", {}), results.get("random", {})
    out: dict[str, dict[str, float]] = {}
    for method in METHODS:
        if method in a and method in b:
            out[method] = {
                m: a[method][m] - b[method][m]
                for m in ("top1", "top5")
                if m in a[method] and m in b[method]
            }
    return out


def inputs_fingerprint(cfg: EvalConfig, encoder_id: str) -> str:
    """Changes when anything the figures depend on changes: the config (bar output paths and how the
    work is spread), the encoder's weights and config, or the data sources' listings."""
    from pipeline.sources import open_source

    h = hashlib.sha256(f"eval:v{RESULT_VERSION}:{encoder_id}".encode())
    conf = to_dict(cfg)
    for k in ("out", "feature_cache", "encoder", "feature_workers", "progress_every"):
        conf.pop(k, None)
    h.update(json.dumps(conf, sort_keys=True).encode())
    for spec in (cfg.train_source, cfg.test_source):
        if spec:
            h.update(f"{spec}\n{open_source(spec).fingerprint()}".encode())
    return h.hexdigest()[:16]


def run_eval(cfg: EvalConfig, address: str | None = None, *, num_cpus: int | None = None, verbose: bool = True) -> dict:
    """Evaluate ``cfg.encoder`` (and the random baseline); write and return the ``eval.json`` document."""
    from eval.feature_job import LazyRay, extract_features
    from eval.features import load_encoder, random_encoder

    t_start = time.perf_counter()
    if not cfg.encoder:
        raise EvalError("no encoder given: set encoder=DIR in the recipe or pass --encoder DIR")
    if not cfg.train_source:
        raise EvalError("no labelled data given: set train_source=SPEC in the recipe or pass --train SPEC")
    out = storage.absolute(cfg.out)
    cache = storage.absolute(cfg.feature_cache) if cfg.feature_cache else storage.join(out, "feature-cache")
    pretrained = load_encoder(cfg.encoder)
    encoders = [pretrained]
    if cfg.baseline == "random":
        encoders.append(random_encoder(pretrained, cfg.seed))
    _log(f"encoder {cfg.encoder} (id {pretrained.encoder_id}, {pretrained.img_size}px, depth {pretrained.depth})", verbose)
    plan = resolve_split(cfg.train_source, cfg.test_source, cfg.test_fraction)
    _log(f"train {plan.train!r}, test {plan.test!r} (split: {plan.mode})", verbose)

    def split_pair(get_train, get_test, subset):
        """(train, test) from the plan: two sources, or one source cut by key hash."""
        if plan.mode == "hash":
            whole = get_train()
            train_mask, test_mask = plan.masks(whole.keys)
            return subset(whole, train_mask), subset(whole, test_mask)
        return get_train(), get_test()

    results: dict[str, dict[str, Any]] = {enc.name: {} for enc in encoders}
    data_info: dict[str, Any] = {}
    feature_info: dict[str, Any] = {}
    feature_methods = [m for m in cfg.methods if m in ("knn", "linear")]
    with LazyRay(address, num_cpus) as ray_ctx:
        # Every encoder's features of a source in one pass over its partitions (Ray actors), cached.
        features: dict[str, dict] = {}

        def feats(spec: str) -> dict:
            if spec not in features:
                features[spec] = extract_features(
                    encoders, spec, cache_dir=cache, pooling=cfg.pooling, layer=cfg.layer,
                    batch_size=cfg.batch_size, workers=cfg.feature_workers, ray=ray_ctx,
                    progress_every=cfg.progress_every, log=lambda msg: _log(msg, verbose),
                )
                for name, fs in features[spec].items():
                    _log(f"{name} features of {spec!r}: {fs.features.shape} "
                         + ("from cache" if fs.cached else f"computed in {fs.seconds:.1f}s"), verbose)
            return features[spec]

        for enc in encoders if feature_methods else []:
            train_fs, test_fs = split_pair(
                lambda: feats(plan.train)[enc.name], lambda: feats(plan.test)[enc.name],
                lambda fs, mask: fs.subset(mask),
            )
            feature_info[enc.name] = {
                part: {"cached": fs.cached, "path": fs.path, "seconds": round(fs.seconds, 3)}
                for part, fs in (("train", train_fs), ("test", test_fs))
            }
            n_available = len(train_fs.keys)
            if "finetune" in cfg.methods and cfg.finetune.label_fraction < 1:
                # like for like with the low-label fine-tune: kNN and the probe see the same labelled subset
                import numpy as np

                from eval.finetune_data import class_balanced_subset

                chosen = class_balanced_subset(train_fs.labels, train_fs.keys, cfg.finetune.label_fraction, cfg.seed)
                mask = np.zeros(n_available, dtype=bool)
                mask[chosen] = True
                train_fs = train_fs.subset(mask)
            mapping = class_mapping(train_fs.classes, test_fs.classes, plan.test)
            test_labels = mapping[test_fs.labels] if mapping is not None else test_fs.labels
            num_classes = len(train_fs.classes)
            data_info = {
                "n_train": len(train_fs.keys),
                "n_train_available": n_available,
                "n_test": len(test_fs.keys),
                "num_classes": num_classes,
                "classes": list(train_fs.classes),
                "skipped": {"train": train_fs.skipped, "test": test_fs.skipped if plan.mode != "hash" else 0},
            }
            if "knn" in cfg.methods:
                t0 = time.perf_counter()
                r = knn_eval_fs(train_fs, test_fs, test_labels, num_classes, cfg)
                r["seconds"] = time.perf_counter() - t0
                results[enc.name]["knn"] = r
                _log(f"{enc.name} kNN top-1 {r['top1']:.1%} top-5 {r['top5']:.1%} ({r['index']} index)", verbose)
            if "linear" in cfg.methods:
                from eval.linear_probe import linear_probe

                t0 = time.perf_counter()
                r = linear_probe(
                    train_fs.features, train_fs.labels, test_fs.features, test_labels, num_classes=num_classes,
                    optimizer=cfg.probe.optimizer, epochs=cfg.probe.epochs, lr=cfg.probe.lr,
                    weight_decays=cfg.probe.weight_decays, val_fraction=cfg.probe.val_fraction,
                    batch_size=cfg.probe.batch_size, seed=cfg.seed,
                )
                r["seconds"] = time.perf_counter() - t0
                results[enc.name]["linear"] = r
                _log(f"{enc.name} linear probe top-1 {r['top1']:.1%} (weight decay {r['weight_decay']:g})", verbose)

    if "finetune" in cfg.methods:
        from eval.finetune import finetune, plan_steps
        from eval.finetune_data import plan_finetune
        from pipeline.ray_context import ray_session

        ft = cfg.finetune
        with ray_session(address, num_cpus):
            # keys and labels only: the workers stream the images from the source's partitions
            data = plan_finetune(plan, ft, cfg.seed)
            data_info = data_info or {
                "n_train": data.n_available, "n_test": len(data.test_keys), "num_classes": len(data.classes),
                "classes": list(data.classes), "skipped": data.skipped,
            }
            steps = plan_steps(len(data.train_keys), max(1, ft.workers), ft)
            _log(f"fine-tune: {steps.total} steps ({steps.steps_per_epoch}/epoch) on {len(data.train_keys)} of "
                 f"{data.n_available} labelled images (label fraction {ft.label_fraction:g}), "
                 + (f"selected on a validation split of {len(data.val_keys)}" if data.val_keys
                    else "no validation split: the last step is reported")
                 + f", {ft.workers} worker(s)", verbose)
            for enc in encoders:
                r = finetune(enc, data, ft, seed=cfg.seed, storage_path=storage.join(out, "ray-train"),
                             name=f"finetune-{enc.name}")
                results[enc.name]["finetune"] = r
                sel = r["selected"]
                _log(f"{enc.name} fine-tune test top-1 {r['top1']:.1%} at step {sel['step']}/{r['steps']}, "
                     + (f"selected on validation ({r['n_val']} images, val top-1 {sel['val_top1']:.1%})"
                        if r["selected_on"] == "validation" else "the last step (no validation split)"), verbose)

    enc_cfg = pretrained.config
    doc: dict[str, Any] = {
        "version": RESULT_VERSION,
        "encoder": {
            "path": storage.absolute(cfg.encoder),
            "encoder_id": pretrained.encoder_id,
            "img_size": pretrained.img_size,
            "depth": pretrained.depth,
            "embed_dim": int(enc_cfg["timm_kwargs"].get("embed_dim", 0)),
            "source_checkpoint": enc_cfg.get("source_checkpoint"),
        },
        "baseline": (
            {"kind": "random", "encoder_id": encoders[1].encoder_id, "seed": cfg.seed}
            if cfg.baseline == "random" else None
        ),
        "data": {"train": plan.train, "test": plan.test, "split": plan.mode, **data_info},
        "features": {"pooling": cfg.pooling, "layer": cfg.layer, "cache": cache, "entries": feature_info},
        "results": results,
        "selection": selection_notes(cfg, results),
        "delta": _delta(results),
        "inputs": inputs_fingerprint(cfg, pretrained.encoder_id),
        "seconds": time.perf_counter() - t_start,
        "eval_json": storage.join(out, "eval.json"),
        "config": to_dict(cfg),
    }
    storage.write_bytes_atomic(storage.join(out, "config.yaml"), dump_config(cfg).encode())
    storage.write_bytes_atomic(storage.join(out, "eval.json"), json.dumps(doc, indent=1).encode())
    return doc


def knn_eval_fs(train_fs, test_fs, test_labels, num_classes: int, cfg: EvalConfig) -> dict:
    from eval.knn import knn_eval

    return knn_eval(
        train_fs.features, train_fs.labels, test_fs.features, test_labels,
        num_classes=num_classes, k=cfg.k, temperature=cfg.temperature,
        index=cfg.knn_index, memory_mb=cfg.knn_memory_mb, nlist=cfg.knn_nlist, nprobe=cfg.knn_nprobe,
    )


def selection_notes(cfg: EvalConfig, results: dict[str, dict]) -> dict[str, str]:
    """What each method's tuned choice was selected on: never the test set."""
    notes: dict[str, str] = {}
    some = next(iter(results.values()), {})
    if "knn" in some:
        notes["knn"] = f"k={cfg.k} and temperature={cfg.temperature:g} fixed by the config, not tuned"
    if "linear" in some:
        lin = some["linear"]
        notes["linear"] = (f"weight decay chosen among {cfg.probe.weight_decays} on a held-out "
                           f"{cfg.probe.val_fraction:g} of the training features ({lin['n_val']} items), refit on all"
                           if lin.get("selected_on") == "validation" else
                           f"weight decay fixed at {lin['weight_decay']:g}, not tuned")
    if "finetune" in some:
        ft = some["finetune"]
        notes["finetune"] = (f"checkpoint chosen by top-1 on a validation split of {ft['n_val']} items carved by key"
                             f" hash from the {ft['n_labelled']} labelled training items; the test set scored once"
                             if ft["selected_on"] == "validation" else
                             "the last step's weights (val_fraction 0); the test set scored once")
    return notes


# ------------------------------------------------------------------------------------------ table


def _rows(doc: dict) -> list[tuple[str, str, str, str]]:
    """(method, metric key, label, metric label) for every figure present."""
    rows = []
    cfg = doc.get("config", {})
    any_res = {m for r in doc["results"].values() for m in r}
    if "knn" in any_res:
        label = f"kNN (k={cfg.get('k', 20)}, T={cfg.get('temperature', 0.07):g})"
        rows += [("knn", "top1", label, "top-1"), ("knn", "top5", label, "top-5")]
    if "linear" in any_res:
        rows.append(("linear", "top1", "linear probe (wd on held-out train)", "top-1"))
    if "finetune" in any_res:
        ft = next(r["finetune"] for r in doc["results"].values() if "finetune" in r)
        frac = ft.get("label_fraction", 1.0)
        on = f"val n={ft['n_val']}" if ft.get("selected_on") == "validation" else "last step"
        label = f"fine-tune ({ft.get('steps', '?')} steps" + (f", {frac:.0%} labels" if frac < 1 else "") + f"; {on})"
        rows.append(("finetune", "top1", label, "top-1"))
    return rows


def format_table(doc: dict) -> str:
    """The results as a fixed-width table: pretrained, random init and the difference, in points."""
    cols = [name for name in ("pretrained", "random") if name in doc["results"]]
    header = ["method", "metric", *cols] + (["Δ (points)"] if len(cols) == 2 else [])
    lines = [header]
    for method, key, label, metric in _rows(doc):
        row = [label, metric]
        vals = []
        for c in cols:
            v = doc["results"][c].get(method, {}).get(key)
            vals.append(v)
            row.append("-" if v is None else f"{100 * v:.1f}%")
        if len(cols) == 2:
            row.append("-" if None in vals else f"{100 * (vals[0] - vals[1]):+.1f}")
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    fmt = lambda r: "  ".join(s.ljust(w) if i < 2 else s.rjust(w) for i, (s, w) in enumerate(zip(r, widths)))  # noqa: E731
    d = doc["data"]
    head = (
        f"encoder {doc['encoder']['path']} (id {doc['encoder']['encoder_id']})\n"
        f"train {d['train']} ({d.get('n_train', '?')}) · test {d['test']} ({d.get('n_test', '?')})"
        f" · split: {d['split']} · {d.get('num_classes', '?')} classes"
        f" · features: {doc['features']['pooling']}"
        + (f" of block {doc['features']['layer']}" if doc["features"]["layer"] is not None else "")
    )
    body = [fmt(lines[0]), "  ".join("-" * w for w in widths), *(fmt(r) for r in lines[1:])]
    chosen = [f"selection, {m}: {note}" for m, note in doc.get("selection", {}).items()]
    return "\n".join([head, *body, *chosen, f"written: {doc['eval_json']} ({doc['seconds']:.1f}s)"])
