"""`mimflow run` on a tiny recipe: every artefact, then a second run that skips every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import from_dict
from mimflow.run import STAGES, PipelineConfig, run_pipeline

TOKENIZER = ["model.vocab_size=32", "model.grid=4", "model.input_size=16", "model.width=16", "model.depth=1",
             "model.num_heads=2", "model.code_dim=8", "epochs=1", "batch_size=16", "heldout_size=16",
             "kmeans_iters=2", "num_workers=1", "cpus_per_worker=1"]
PRETRAIN = ["data.img_size=16", "data.batch_size=8", "data.loader_workers=0", "data.shuffle_buffer=16",
            "model.dim=32", "model.depth=1", "model.heads=2", "model.patch=4", "mask.num_masked=6",
            "mask.min_block=2", "optim.warmup_steps=1", "steps=4", "checkpoint_every=2", "workers=1",
            "cpus_per_worker=1", "log_every=2"]
EVAL = ["methods=[knn]", "baseline=random", "k=5"]


def _config(out, eval_set=EVAL) -> PipelineConfig:
    return from_dict(PipelineConfig, {
        "out": str(out),
        "source": "shapes?n=64&size=16&partition_size=32",
        "test_source": "shapes?n=32&size=16&split=test",
        "cache_batch_size": 32,
        "cache_actors": 1,
        "codebook_sample": 16,
        "tokenizer": {"recipe": "vqkd_demo", "set": TOKENIZER},
        "pretrain": {"recipe": "demo", "set": PRETRAIN},
        "eval": {"recipe": "demo", "set": list(eval_set)},
    })


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_run_produces_every_artefact_then_skips_every_stage(tmp_path, ray_local):
    out = tmp_path / "run"
    logs: list[str] = []
    first = run_pipeline(_config(out), log=logs.append)
    assert first["skipped"] == []
    tok_dir = out / "tokenizer"
    assert (tok_dir / "config.json").is_file() and (tok_dir / "model.safetensors").is_file()
    cache = Path(first["tokens"]["cache"])
    assert cache.parent == out / "tokens"
    assert (cache / "manifest.parquet").is_file() and len(list(cache.glob("errors-*.parquet"))) == 1
    assert (out / "codebook" / "report.html").is_file() and (out / "codebook" / "report.json").is_file()
    assert first["codebook"]["usage"]["vocab_size"] == 32
    encoder = out / "pretrain" / "demo" / "encoder"
    assert (encoder / "model.safetensors").is_file()
    assert first["pretrain"]["metrics"]["step"] == 4
    doc = json.loads((out / "eval" / "eval.json").read_text())
    assert 0.0 <= doc["results"]["pretrained"]["knn"]["top1"] <= 1.0
    assert "random" in doc["results"]
    assert {json.loads((out / "stamps" / f"{s}.json").read_text())["stage"] for s in STAGES} == set(STAGES)

    logs.clear()
    second = run_pipeline(_config(out), log=logs.append)
    assert second["skipped"] == list(STAGES)
    assert sum("skipped" in line for line in logs) == len(STAGES)
    assert second["eval"]["eval"] == first["eval"]["eval"]

    third = run_pipeline(_config(out, eval_set=[*EVAL[:-1], "k=3"]), log=logs.append)
    assert third["skipped"] == ["tokenizer", "tokens", "codebook", "pretrain"]  # only eval's inputs changed
    assert json.loads((out / "eval" / "eval.json").read_text())["results"]["pretrained"]["knn"]["k"] == 3


def test_unknown_stage_is_refused(tmp_path):
    cfg = _config(tmp_path)
    cfg.stages = ["tokenizer", "pretrian"]
    with pytest.raises(ValueError, match="pretrian"):
        run_pipeline(cfg)


@pytest.mark.timeout(300)
def test_run_builds_the_cache_with_its_view_style(tmp_path, ray_local):
    from pipeline.token_cache import CacheError, read_cache_info, read_manifest

    cfg = _config(tmp_path / "run")
    cfg.stages = ["tokenizer", "tokens"]
    cfg.views, cfg.crop_scale, cfg.jitter, cfg.tok_interp = 2, [0.08, 1.0], 0.4, "lanczos"
    out = run_pipeline(cfg, log=lambda _: None)
    info = read_cache_info(out["tokens"]["cache"])
    assert info.views == 2
    assert info.view_style == "scale=0.08:1,jitter=0.4,interp=bicubic,tok_interp=lanczos"
    assert sum(int(r["samples"]) for r in read_manifest(out["tokens"]["cache"])) == 64

    cfg.jitter = 0.2  # another style is another cache: refused by name, the first one kept
    with pytest.raises(CacheError, match="view style"):
        run_pipeline(cfg, log=lambda _: None)
    assert read_cache_info(out["tokens"]["cache"]).view_style == info.view_style
