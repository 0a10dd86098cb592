"""``mimflow run``: tokenizer → token cache → codebook report → pretraining → evaluation.

Each stage is called through its own Python entry point, in order, inside one Ray session. A stage
whose inputs (its resolved config and the identities of what it reads) match the stamp left by its
last successful run is skipped, and the run says so. Stamps live in ``<out>/stamps/<stage>.json``.
``out`` may be a local path or a URI (``s3://``...): every stage writes through ``pipeline.storage``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal

from pipeline import storage
from pipeline.config import PATH, ConfigError, RECIPE, SOURCE, Range, load_config, save_config, to_dict
from pipeline.views import ViewStyleFields


@dataclass
class StageRecipe:
    recipe: Annotated[str, RECIPE] = "demo"  # the stage's packaged recipe name, or a YAML path
    set: list[str] = field(default_factory=list)  # overrides, as with --set


@dataclass
class PipelineConfig(ViewStyleFields):
    """``mimflow run``: which stages, on what data, with which recipe of each. The cache's views are
    drawn with the inherited view-style keys (crop_scale, jitter, interp, tok_interp), as ``tokens build``."""

    RECIPES: ClassVar[Path] = Path(__file__).parent / "recipes"

    out: Annotated[str, PATH] = "runs/demo"
    source: Annotated[str, SOURCE] = "shapes?n=2000&size=64&split=train"
    test_source: Annotated[str | None, SOURCE] = "shapes?n=500&size=64&split=test"
    views: Annotated[int, Range(ge=1)] = 1
    cache_batch_size: Annotated[int, Range(ge=1)] = 128
    cache_actors: Annotated[int, Range(ge=1)] = 2
    seed: int = 0
    tokenizer: StageRecipe = field(default_factory=StageRecipe)
    pretrain: StageRecipe = field(default_factory=StageRecipe)
    eval: StageRecipe = field(default_factory=StageRecipe)
    codebook_sample: Annotated[int, Range(ge=0)] = 256  # images re-encoded for the FAISS agreement check
    stages: list[Literal["tokenizer", "tokens", "codebook", "pretrain", "eval"]] = field(default_factory=lambda: ["tokenizer", "tokens", "codebook", "pretrain", "eval"])


STAGES = ("tokenizer", "tokens", "codebook", "pretrain", "eval")


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode() + b"\0")
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()[:16]


class Stamps:
    def __init__(self, out: str):
        self.dir = storage.join(out, "stamps")

    def current(self, stage: str, key: str) -> dict[str, Any] | None:
        path = storage.join(self.dir, f"{stage}.json")
        if not storage.exists(path):
            return None
        stamp = json.loads(storage.read_bytes(path))
        if stamp.get("key") != key:
            return None
        if not all(storage.exists(p) for p in stamp.get("outputs", {}).values() if isinstance(p, str)):
            return None
        return stamp

    def write(self, stage: str, key: str, outputs: dict[str, Any], seconds: float) -> None:
        doc = {"stage": stage, "key": key, "outputs": outputs, "seconds": round(seconds, 1),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        storage.write_bytes_atomic(storage.join(self.dir, f"{stage}.json"), json.dumps(doc, indent=2).encode())


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


def _stage_config(name: str, cls: type, stage: StageRecipe, fixed: list[str]) -> Any:
    """A stage's config from its recipe, its ``set`` list and what the run fixes; errors name the stage."""
    try:
        return load_config(cls, stage.recipe, [*stage.set, *fixed])
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


def stage_configs(cfg: PipelineConfig) -> tuple[Any, Any, Any]:
    """The tokenizer, pretraining and eval configs of a run, loaded (so validated) before Ray starts: a
    mistake in the last stage's settings must not cost the first stages' run time. The cache directory
    is named by the tokenizer's id, known once the tokenizer exists: ``run_pipeline`` fills it in."""
    from eval.eval_config import EvalConfig
    from pretrain.config import PretrainConfig
    from tokenizer.train_config import TokenizerTrainConfig

    out = storage.absolute(cfg.out)
    tok_dir = storage.join(out, "tokenizer")
    tok_cfg = _stage_config(
        "tokenizer", TokenizerTrainConfig, cfg.tokenizer,
        [f"source={cfg.source}", f"out={tok_dir}", f"storage_path={storage.join(out, 'ray')}"],
    )
    pre_cfg = _stage_config(
        "pretrain", PretrainConfig, cfg.pretrain,
        [f"data.tokens={storage.join(out, 'tokens')}", f"data.tokenizer={tok_dir}", f"out={storage.join(out, 'pretrain')}"],
    )
    ev_cfg = _stage_config(
        "eval", EvalConfig, cfg.eval,
        [f"encoder={storage.join(out, 'pretrain', pre_cfg.run_name, 'encoder')}", f"train_source={cfg.source}",
         f"test_source={cfg.test_source if cfg.test_source is not None else 'null'}", f"out={storage.join(out, 'eval')}"],
    )
    return tok_cfg, pre_cfg, ev_cfg


def run_pipeline(cfg: PipelineConfig, address: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or skip) every stage; returns the outputs of each and a summary."""
    from eval.codebook.report import codebook_report
    from eval.evaluate import run_eval
    from pipeline.ray_context import ray_session
    from pipeline.sources import open_source
    from pretrain.train import run_pretrain
    from tokenizer.checkpoint import tokenizer_id
    from tokenizer.precompute import build_cache
    from tokenizer.train import train_tokenizer

    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    out = storage.absolute(cfg.out)

    tok_cfg, pre_cfg, ev_cfg = stage_configs(cfg)
    tok_dir = storage.join(out, "tokenizer")
    save_config(cfg, out, "run.yaml")
    stamps = Stamps(out)
    results: dict[str, Any] = {"skipped": []}
    fingerprint = open_source(cfg.source).fingerprint()

    with ray_session(address):
        if "tokenizer" in cfg.stages:
            outputs, skipped = _stage(
                stamps, "tokenizer", _digest(to_dict(tok_cfg), fingerprint),
                lambda: {"tokenizer": str(train_tokenizer(tok_cfg))}, log,
            )
            results["tokenizer"] = outputs
            results["skipped"] += ["tokenizer"] if skipped else []
        tok_id = tokenizer_id(tok_dir)

        if "tokens" in cfg.stages:
            key = _digest(tok_id, fingerprint, cfg.views, cfg.seed, cfg.style().key())
            outputs, skipped = _stage(
                stamps, "tokens", key,
                lambda: {"cache": build_cache(
                    tok_dir, cfg.source, storage.join(out, "tokens"), cfg.views,
                    batch_size=cfg.cache_batch_size, num_actors=cfg.cache_actors, seed=cfg.seed, style=cfg.style(),
                ).cache_dir}, log,
            )
            results["tokens"] = outputs
            results["skipped"] += ["tokens"] if skipped else []
        cache_dir = storage.join(out, "tokens", tok_id)
        manifest_id = file_digest(storage.join(cache_dir, "manifest.parquet"))

        if "codebook" in cfg.stages:
            def codebook() -> dict[str, Any]:
                report_dir = storage.join(out, "codebook")
                report = codebook_report(cache_dir, report_dir, tokenizer_dir=tok_dir, source=cfg.source,
                                         sample=cfg.codebook_sample)
                return {"report": storage.join(report_dir, "report.json"), "html": storage.join(report_dir, "report.html"),
                        "usage": report.get("usage", {})}

            outputs, skipped = _stage(stamps, "codebook", _digest(manifest_id, tok_id, cfg.codebook_sample), codebook, log)
            results["codebook"] = outputs
            results["skipped"] += ["codebook"] if skipped else []

        pre_cfg = dataclasses.replace(pre_cfg, data=dataclasses.replace(pre_cfg.data, tokens=cache_dir))
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
            encoder = ev_cfg.encoder
            outputs, skipped = _stage(
                stamps, "eval", _digest(to_dict(ev_cfg), file_digest(storage.join(encoder, "model.safetensors"))),
                lambda: {"eval": storage.join(out, "eval", "eval.json"), "results": run_eval(ev_cfg)}, log,
            )
            results["eval"] = outputs
            results["skipped"] += ["eval"] if skipped else []
    return results
