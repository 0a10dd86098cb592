"""The pretraining job end to end: real Ray Train (2 workers, gloo), real shards, resume, cache checks."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import load_config
from pipeline.token_cache import CacheError
from pretrain.checkpoint import read_metrics, read_state
from pretrain.optim import WarmupCosine
from cache_fixture import PatchColorTokenizer, write_cache
from pretrain.config import PretrainConfig
from pretrain.train import plan_run, run_pretrain

TOK = PatchColorTokenizer((4, 4), 32)


def _cfg(cache_dir, out, *extra):
    return load_config(PretrainConfig, None, [
        f"data.tokens={cache_dir}", "data.img_size=32", "data.batch_size=8", "data.loader_workers=1",
        "data.shuffle_buffer=16", "model.dim=32", "model.depth=2", "model.heads=2", "model.patch=8",
        "model.drop_path=0.0", "mask.num_masked=6", "mask.min_block=2", "optim.lr=2e-3", "optim.warmup_steps=2",
        "steps=10", "checkpoint_every=3", "workers=2", f"out={out}", "run_name=uneven", "log_every=1", *extra,
    ])


@pytest.fixture(scope="module")
def uneven_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_run")
    cache = root / "tokens" / TOK.tokenizer_id
    write_cache(str(cache), TOK, "shapes?n=32&size=32&seed=11", [28, 3, 1], views=2)  # deliberately uneven
    return root, str(cache)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_workers_on_uneven_shards_then_stop_and_resume(ray_local, uneven_cache):
    root, cache = uneven_cache
    out = root / "runs"
    # 1) stop after step 6 of 10: both ranks take exactly 6 steps (a plain split of 28/3/1 would hang DDP)
    first = run_pretrain(_cfg(cache, out, "stop_at=6"))
    assert first.metrics["start_step"] == 0 and first.metrics["step"] == 6
    assert first.metrics["rank_steps"] == [6, 6]
    ckpt6 = out / "uneven" / "checkpoint_00000006"
    assert first.checkpoint_dir == str(ckpt6)
    state6 = read_state(ckpt6)
    assert state6["step"] == 6 and state6["total_steps"] == 10 and state6["tokenizer_id"] == TOK.tokenizer_id
    assert (out / "uneven" / "encoder" / "model.safetensors").is_file()

    # 2) the same command again (no stop): resumes at step 6 with the saved optimizer state, ends at 10;
    # this time with torch.compile'd blocks (same parameter names, so the checkpoint loads into them)
    second = run_pretrain(_cfg(cache, out, "data.loader_workers=0", "compile=true"))
    assert second.metrics["start_step"] == 6 and second.metrics["step"] == 10
    assert second.metrics["rank_steps"] == [4, 4]
    assert second.metrics["resumed_optimizer_digest"] == state6["optimizer_digest"]
    ckpt10 = out / "uneven" / "checkpoint_00000010"
    opt10 = torch.load(ckpt10 / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in opt10["state"].values()} == {10}  # Adam's count went on from 6
    assert not (out / "uneven" / "checkpoint_00000003").exists()  # keep_checkpoints=2

    records = read_metrics(str(out / "uneven"))
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == list(range(1, 11))  # one record per step, no step twice across the two runs
    assert any(r["kind"] == "resume" and r["step"] == 6 for r in records)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]  # 32 samples / batch 8 = 4 steps per epoch
    sched = WarmupCosine(10, 2, 2e-3, 1e-5)
    by_step = {r["step"]: r for r in records if r["kind"] == "step"}
    for s in (1, 2, 7, 10):  # the lr used at step s is the schedule's value at s - 1
        assert by_step[s]["lr"] == pytest.approx(2e-3 * sched(s - 1))
    flops = plan_run(_cfg(cache, out)).train_flops_per_image
    for r in by_step.values():
        assert r["loss"] > 0 and 0 <= r["acc"] <= 1 and r["images_per_s"] > 0 and r["images"] == 8
        assert r["model_tflops"] == pytest.approx(r["images_per_s"] * flops / 1e12)
        assert "mfu" not in r  # CPU: no peak to divide by
    enc = json.loads((out / "uneven" / "encoder" / "config.json").read_text())
    assert enc["step"] == 10 and enc["timm_kwargs"]["use_shared_rel_pos_bias"] is True

    # 3) once more: nothing left to train; it returns at once with the newest checkpoint exported
    third = run_pretrain(_cfg(cache, out, "workers=1", "data.loader_workers=0"))
    assert third.metrics["start_step"] == 10 and third.metrics["step"] == 10
    assert third.checkpoint_dir == str(ckpt10)


def test_stale_and_incomplete_caches_are_errors_naming_ids_and_the_fix(tmp_path, monkeypatch, capsys):
    import pretrain.plan as plan
    from mimflow.cli import main

    stale = tmp_path / "tokens" / "old"
    write_cache(str(stale), PatchColorTokenizer((4, 4), 32, levels=3), "shapes?n=8&size=32", [8])
    monkeypatch.setattr(plan, "load_tokenizer", lambda path: TOK)
    cfg = _cfg(stale, tmp_path / "runs", f"data.tokenizer={tmp_path}/tok")
    with pytest.raises(CacheError) as e:
        plan_run(cfg)
    msg = str(e.value)
    assert "patchcolor3-4x4-32" in msg and TOK.tokenizer_id in msg and "mimflow tokens refresh" in msg

    incomplete = tmp_path / "tokens" / TOK.tokenizer_id
    write_cache(str(incomplete), TOK, "shapes?n=8&size=32", [8], manifest=False)
    with pytest.raises(CacheError, match="incomplete"):
        plan_run(_cfg(incomplete, tmp_path / "runs", f"data.tokenizer={tmp_path}/tok"))

    # through the CLI: one line, exit code 2, before any Ray work
    code = main(["pretrain", "--set", f"data.tokens={stale}", "--set", f"data.tokenizer={tmp_path}/tok",
                 "--set", "data.img_size=32", "--set", "model.patch=8"])
    err = capsys.readouterr().err
    assert code == 2 and TOK.tokenizer_id in err and "refresh" in err


def test_plan_checks_grid_batch_and_target(tmp_path):
    from pipeline.config import ConfigError

    cache = tmp_path / "tokens" / TOK.tokenizer_id
    write_cache(str(cache), TOK, "shapes?n=16&size=32", [10, 6])
    plan = plan_run(_cfg(cache, tmp_path / "runs", "steps=null", "epochs=2.5"))
    assert plan.samples == 16 and plan.steps_per_epoch == 2 and plan.total_steps == 5
    assert plan.per_worker_batch == 4 and plan.num_masked == 6 and plan.vocab_size == TOK.vocab_size
    with pytest.raises(ConfigError, match="grid"):
        plan_run(_cfg(cache, tmp_path / "runs", "model.patch=16"))
    with pytest.raises(ConfigError, match="split evenly"):
        plan_run(_cfg(cache, tmp_path / "runs", "workers=3"))
    with pytest.raises(ConfigError, match="larger than the cache"):
        plan_run(_cfg(cache, tmp_path / "runs", "data.batch_size=32"))
    with pytest.raises(ConfigError, match="tokenizer"):
        plan_run(_cfg(cache, tmp_path / "runs", "target=tokens-online"))
    with pytest.raises(ConfigError, match="random_resized_crop"):
        plan_run(_cfg(cache, tmp_path / "runs", "data.augment=random_resized_crop"))


def test_recipes_load_and_match_the_published_hyperparameters():
    v1 = load_config(PretrainConfig, "beit_base_patch16_224")
    assert (v1.model.dim, v1.model.depth, v1.model.heads, v1.model.patch, v1.data.img_size) == (768, 12, 12, 16, 224)
    assert (v1.optim.lr, v1.data.batch_size, v1.epochs, v1.optim.weight_decay) == (1.5e-3, 2048, 800, 0.05)
    assert (v1.model.layer_scale, v1.model.drop_path, v1.mask.num_masked, v1.mask.min_block) == (0.1, 0.1, 75, 16)
    assert v1.model.head == "v1" and v1.optim.clip == 3.0 and v1.optim.warmup_epochs == 10
    v2 = load_config(PretrainConfig, "beitv2_base_patch16_224")
    assert v2.model.head == "v2" and v2.model.v2_layer == 9 and v2.model.v2_blocks == 2 and v2.epochs == 1600
    demo = load_config(PretrainConfig, "demo")
    assert demo.data.img_size // demo.model.patch == 8 and not demo.use_gpu


def test_tokens_online_with_the_real_tokenizer_matches_the_cache_and_trains(tmp_path):
    """A saved dVAE: the id check passes, and the tokens computed in the step equal the cached ones."""
    from pretrain.data import SampleTransform, make_dataset, make_loader
    from pretrain.loop import train_step
    from pretrain.masking import make_masker
    from pretrain.model import build_model
    from pretrain.optim import make_optimizer, make_scheduler
    from tokenizer.base import TokenizerConfig
    from tokenizer.checkpoint import build_tokenizer, load_tokenizer, save_tokenizer

    torch.manual_seed(0)
    tok_dir = tmp_path / "tok"
    save_tokenizer(build_tokenizer(TokenizerConfig(kind="dvae", vocab_size=64, grid=4, input_size=16, width=8,
                                                   depth=1, code_dim=8)), tok_dir)
    tok = load_tokenizer(tok_dir)
    cache = tmp_path / "tokens" / tok.tokenizer_id
    write_cache(str(cache), tok, "shapes?n=16&size=32&seed=2", [16])  # V=1: the centre view
    for target in ("tokens", "tokens-online"):
        cfg = _cfg(cache, tmp_path / "runs", f"data.tokenizer={tok_dir}", f"target={target}", "workers=1",
                   "data.shuffle_buffer=0")
        plan = plan_run(cfg)
        assert plan.tokenizer_id == tok.tokenizer_id and plan.vocab_size == 64
        masker = make_masker("block", (4, 4), plan.num_masked, min_block=2)
        t = SampleTransform(img_size=32, masker=masker, target=target,
                            tok_input_size=plan.tok_input_size)
        batch = next(iter(make_loader(make_dataset(plan.urls, t, 8, shuffle_buffer=0), 1)))
        if target == "tokens":
            cached = batch
            continue
        assert batch["tok_image"].shape == (8, 3, 16, 16)
        # webdataset streams shards in order with shuffling off: the same 8 samples as the cached batch
        assert torch.equal(batch["image"], cached["image"])
        assert batch["tok_image"].dtype == torch.uint8
        assert torch.equal(tok.encode(batch["tok_image"].float() / 255), cached["tokens"])
        model = build_model(cfg.model, 32, target, plan.vocab_size)
        opt = make_optimizer(model, cfg.optim)
        sched = make_scheduler(opt, cfg.optim, 10, 2)
        mean, std = torch.tensor(cfg.data.mean), torch.tensor(cfg.data.std)
        out, _, _ = train_step(model, opt, sched, batch, torch.device("cpu"), mean=mean, std=std, tokenizer=tok,
                               clip=3.0)
        assert torch.isfinite(out["loss"]) and int(out["count"]) == 8 * plan.num_masked


def test_python_m_pretrain_is_the_job_entry_point(capsys):
    import subprocess
    import sys

    from pretrain.__main__ import main

    ok = subprocess.run([sys.executable, "-m", "pretrain", "--config", "beitv2_base_patch16_224", "--print-config",
                         "--set", "data.tokens=/abs/tokens/abc", "--set", "optim.lr=1e-3"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "tokens: /abs/tokens/abc" in ok.stdout and "lr: 0.001" in ok.stdout
    assert main(["--config", "demo", "--set", "optim.lrr=1"]) == 2
    assert "optim.lr" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_use_gpu_on_a_local_ray_without_gpu_is_a_clear_error(uneven_cache):
    """On a Ray this process starts nothing will ever add a GPU: fail at once, not wait forever."""
    import subprocess
    import sys
    from pathlib import Path

    root, cache = uneven_cache
    def pretrain(*extra: str) -> subprocess.CompletedProcess:
        sets = [a for s in (f"data.tokens={cache}", f"out={root / 'gpu-runs'}", "data.img_size=32", "model.patch=8",
                            "data.batch_size=8", "model.dim=32", "model.depth=2", "model.heads=2", *extra)
                for a in ("--set", s)]
        return subprocess.run([sys.executable, "-m", "mimflow", "pretrain", *sets, "--num-cpus", "1"],
                              cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)

    r = pretrain("use_gpu=true", "mask.num_masked=6")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "use_gpu is true but this machine's Ray has no GPU" in r.stderr
    # (and a mask that does not fit the grid is a config error too, before Ray starts)
    r = pretrain("mask.num_masked=26")
    assert r.returncode == 2 and "mask.num_masked must be in (0, 16)" in r.stderr and "Traceback" not in r.stderr
    assert not (root / "gpu-runs").exists() or not any((root / "gpu-runs").rglob("checkpoint_*"))
