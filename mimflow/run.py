"""``mimflow run``: tokenizer → token cache → codebook report → pretraining → evaluation.

Each stage is called through its own Python entry point, in order, inside one Ray session. A stage
whose inputs (its resolved config and the identities of what it reads) match the stamp left by its
last successful run is skipped, and the run says so. Stamps live in ``<out>/stamps/<stage>.json``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from pipeline import storage
from pipeline.config import load_config, save_config, to_dict


@dataclass
class StageRecipe:
    recipe: str = "demo"  # the stage's packaged recipe name, or a YAML path
    set: list[str] = field(default_factory=list)  # overrides, as with --set


@dataclass
class PipelineConfig:
    """``mimflow run``: which stages, on what data, with which recipe of each."""

    RECIPES: ClassVar[Path] = Path(__file__).parent / "recipes"

    out: str = "runs/demo"
    source: str = "shapes?n=2000&size=64&split=train"
    test_source: str | None = "shapes?n=500&size=64&split=test"
    views: int = 1
    cache_batch_size: int = 128
    cache_actors: int = 2
    seed: int = 0
    tokenizer: StageRecipe = field(default_factory=StageRecipe)
    pretrain: StageRecipe = field(default_factory=StageRecipe)
    eval: StageRecipe = field(default_factory=StageRecipe)
    codebook_sample: int = 256  # images re-encoded for the FAISS agreement check
    stages: list[str] = field(default_factory=lambda: ["tokenizer", "tokens", "codebook", "pretrain", "eval"])


STAGES = ("tokenizer", "tokens", "codebook", "pretrain", "eval")


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode() + b"\0")
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()[:16]


class Stamps:
    def __init__(self, out: Path):
        self.dir = out / "stamps"

    def current(self, stage: str, key: str) -> dict[str, Any] | None:
        path = self.dir / f"{stage}.json"
        if not path.is_file():
            return None
        stamp = json.loads(path.read_text())
        if stamp.get("key") != key:
            return None
        if not all(Path(p).exists() for p in stamp.get("outputs", {}).values() if isinstance(p, str)):
            return None
        return stamp

    def write(self, stage: str, key: str, outputs: dict[str, Any], seconds: float) -> None:
        doc = {"stage": stage, "key": key, "outputs": outputs, "seconds": round(seconds, 1),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        storage.write_bytes_atomic(self.dir / f"{stage}.json", json.dumps(doc, indent=2).encode())


def _stage(stamps: Stamps, name: str, key: str, work: Callable[[], dict[str, Any]], log: Callable[[str], None]):
    stamp = stamps.current(name, key)
    if stamp is not None:
        log(f"[{name}] current (inputs {key} unchanged since {stamp['finished']}), skipped")
        return stamp["outputs"], True
    log(f"[{name}] running")
    start = time.perf_counter()
    outputs = work()
    seconds = time.perf_counter() - start
    stamps.write(name, key, outputs, seconds)
    log(f"[{name}] done in {seconds:.0f} s")
    return outputs, False


def run_pipeline(cfg: PipelineConfig, address: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or skip) every stage; returns the outputs of each and a summary."""
    from eval.codebook.report import codebook_report
    from eval.evaluate import EvalConfig, run_eval
    from pipeline.ray_context import ray_session
    from pipeline.sources import open_source
    from pretrain.config import PretrainConfig
    from pretrain.train import run_pretrain
    from tokenizer.base import tokenizer_id
    from tokenizer.precompute import build_cache
    from tokenizer.train import train_tokenizer
    from tokenizer.train_config import TokenizerTrainConfig

    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, "run.yaml")
    stamps = Stamps(out)
    results: dict[str, Any] = {"skipped": []}
    fingerprint = open_source(cfg.source).fingerprint()

    tok_cfg = load_config(
        TokenizerTrainConfig, cfg.tokenizer.recipe,
        [*cfg.tokenizer.set, f"source={cfg.source}", f"out={out / 'tokenizer'}", f"storage_path={out / 'ray'}"],
    )
    pre_cfg = None
    with ray_session(address):
        if "tokenizer" in cfg.stages:
            outputs, skipped = _stage(
                stamps, "tokenizer", _digest(to_dict(tok_cfg), fingerprint),
                lambda: {"tokenizer": str(train_tokenizer(tok_cfg))}, log,
            )
            results["tokenizer"] = outputs
            results["skipped"] += ["tokenizer"] if skipped else []
        tok_dir = out / "tokenizer"
        tok_id = tokenizer_id(tok_dir)

        if "tokens" in cfg.stages:
            key = _digest(tok_id, fingerprint, cfg.views, cfg.seed)
            outputs, skipped = _stage(
                stamps, "tokens", key,
                lambda: {"cache": build_cache(
                    tok_dir, cfg.source, out / "tokens", cfg.views,
                    batch_size=cfg.cache_batch_size, num_actors=cfg.cache_actors, seed=cfg.seed,
                ).cache_dir}, log,
            )
            results["tokens"] = outputs
            results["skipped"] += ["tokens"] if skipped else []
        cache_dir = out / "tokens" / tok_id
        manifest_id = file_digest(cache_dir / "manifest.parquet")

        if "codebook" in cfg.stages:
            def codebook() -> dict[str, Any]:
                report = codebook_report(cache_dir, out / "codebook", tokenizer_dir=tok_dir, source=cfg.source,
                                         sample=cfg.codebook_sample)
                return {"report": str(out / "codebook" / "report.json"), "html": str(out / "codebook" / "report.html"),
                        "usage": report.get("usage", {})}

            outputs, skipped = _stage(stamps, "codebook", _digest(manifest_id, tok_id, cfg.codebook_sample), codebook, log)
            results["codebook"] = outputs
            results["skipped"] += ["codebook"] if skipped else []

        pre_cfg = load_config(
            PretrainConfig, cfg.pretrain.recipe,
            [*cfg.pretrain.set, f"data.tokens={cache_dir}", f"data.tokenizer={tok_dir}", f"out={out / 'pretrain'}"],
        )
        if "pretrain" in cfg.stages:
            def pretrain() -> dict[str, Any]:
                result = run_pretrain(pre_cfg)
                return {"checkpoint": str(result.checkpoint_dir), "encoder": str(result.encoder_dir),
                        "metrics": result.metrics}

            outputs, skipped = _stage(stamps, "pretrain", _digest(to_dict(pre_cfg), manifest_id), pretrain, log)
            results["pretrain"] = outputs
            results["skipped"] += ["pretrain"] if skipped else []

        if "eval" in cfg.stages:
            # the encoder this run's pretraining exports (also when pretraining is not among the stages)
            encoder = Path(results.get("pretrain", {}).get("encoder") or out / "pretrain" / pre_cfg.run_name / "encoder")
            ev_cfg = load_config(
                EvalConfig, cfg.eval.recipe,
                [*cfg.eval.set, f"encoder={encoder}", f"train_source={cfg.source}",
                 f"test_source={cfg.test_source}", f"out={out / 'eval'}"],
            )
            outputs, skipped = _stage(
                stamps, "eval", _digest(to_dict(ev_cfg), file_digest(encoder / "model.safetensors")),
                lambda: {"eval": str(out / "eval" / "eval.json"), "results": run_eval(ev_cfg)}, log,
            )
            results["eval"] = outputs
            results["skipped"] += ["eval"] if skipped else []
    return results
