"""Stages read and write a real S3-compatible server (moto, on loopback) exactly as they do a local disk."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import storage
from pipeline.token_cache import check_cache, shard_urls
from pretrain.data import SampleTransform, make_dataset, make_loader
from pretrain.masking import BlockMasking
from cache_fixture import PatchColorTokenizer, write_cache


def _copy_tree(src: str, dst: str) -> None:
    for path in storage.list_files(src):
        storage.write_bytes_atomic(dst + path[len(src):], storage.read_bytes(path))


def _batches(cache_dir: str, tok, n: int) -> list[dict[str, torch.Tensor]]:
    _, rows = check_cache(cache_dir, tok.tokenizer_id)
    transform = SampleTransform(img_size=32, masker=BlockMasking((4, 4), 6, min_block=2), target="tokens",
                                tok_input_size=tok.input_size, augment="views", seed=3)
    ds = make_dataset(shard_urls(cache_dir, rows), transform, batch_size=4, shuffle_buffer=1, seed=3)
    return list(make_loader(ds, n))


def test_pretraining_loader_streams_a_cache_from_a_bucket(tmp_path, s3_server):
    tok = PatchColorTokenizer((4, 4), 32)
    local = str(tmp_path / tok.tokenizer_id)
    # one shard: resampled mode draws shards with a time-based seed, the order inside a shard is fixed
    write_cache(local, tok, "shapes?n=12&size=48&seed=5", [12], views=2)
    remote = s3_server("mimflow-cache") + "/tokens/" + tok.tokenizer_id
    _copy_tree(local, remote)
    assert [u.startswith("s3://") for u in shard_urls(remote, check_cache(remote)[1])] == [True]

    from_bucket, from_disk = _batches(remote, tok, 3), _batches(local, tok, 3)
    assert len(from_bucket) == 3
    for a, b in zip(from_bucket, from_disk):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def _bucket_cfg(cache: str, out: str, *extra: str):
    from pipeline.config import load_config
    from pretrain.config import PretrainConfig

    return load_config(PretrainConfig, None, [
        f"data.tokens={cache}", "data.img_size=32", "data.batch_size=4", "data.loader_workers=0",
        "data.shuffle_buffer=4", "model.dim=16", "model.depth=1", "model.heads=2", "model.patch=8",
        "mask.num_masked=6", "mask.min_block=2", "optim.warmup_steps=1", "steps=3", "checkpoint_every=2",
        "workers=1", "cpus_per_worker=1", f"out={out}", "run_name=b", "log_every=1", *extra])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pretraining_into_a_bucket_writes_config_and_tensorboard_and_a_rerun_says_done(ray_local, tmp_path, s3_server,
                                                                                      capsys):
    """A run whose output is a bucket: config.yaml and TensorBoard events land there; the same command
    again finds the finished run's newest checkpoint in the bucket (no restart from 0, no crash), and
    ``mimflow export`` reads a checkpoint from the bucket."""
    from mimflow.cli import main
    from pretrain.checkpoint import read_metrics
    from pretrain.train import run_pretrain

    tok = PatchColorTokenizer((4, 4), 32)
    cache = str(tmp_path / tok.tokenizer_id)
    write_cache(cache, tok, "shapes?n=8&size=32&seed=5", [8], views=1)
    out = s3_server("mimflow-pretrain-out") + "/runs"
    run = out + "/b"

    first = run_pretrain(_bucket_cfg(cache, out))
    assert first.metrics["start_step"] == 0 and first.metrics["step"] == 3
    assert first.checkpoint_dir == run + "/checkpoint_00000003"
    assert "steps: 3" in storage.read_bytes(run + "/config.yaml").decode()
    events = [p for p in storage.list_files(run + "/tensorboard") if "tfevents" in p]
    assert events and all(storage.size(p) > 0 for p in events)
    enc1 = json.loads(storage.read_bytes(run + "/encoder/config.json"))
    assert enc1["step"] == 3 and enc1["source_checkpoint"] == run + "/checkpoint_00000003"

    # the same command again: done, said so, nothing trained (and no Ray Train run started)
    lines: list[str] = []
    second = run_pretrain(_bucket_cfg(cache, out), log=lines.append)
    assert second.metrics["start_step"] == 3 and second.metrics["step"] == 3 and second.metrics["already_done"]
    assert second.checkpoint_dir == run + "/checkpoint_00000003"
    assert any(f"{run} is done (step 3/3" in line for line in lines), lines
    steps = [r for r in read_metrics(run) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3] and second.metrics["loss"] == steps[-1]["loss"]
    assert json.loads(storage.read_bytes(run + "/encoder/config.json")) == enc1

    # export straight from the bucket: a run directory (its newest checkpoint) into another prefix
    assert main(["export", run, "--out", out + "/exported"]) == 0
    assert f"load_encoder('{out}/exported')" in capsys.readouterr().out
    exported = json.loads(storage.read_bytes(out + "/exported/config.json"))
    assert exported["step"] == 3 and exported["source_checkpoint"] == run + "/checkpoint_00000003"
    assert storage.read_bytes(out + "/exported/model.safetensors") == storage.read_bytes(run + "/encoder/model.safetensors")
    from pretrain.export import load_encoder  # what eval reads: an export or a checkpoint, both in the bucket

    (from_export, _), (from_run, cfg) = load_encoder(out + "/exported"), load_encoder(run)
    assert cfg["source_checkpoint"] == run + "/checkpoint_00000003"
    assert all(torch.equal(a, b) for a, b in zip(from_export.state_dict().values(), from_run.state_dict().values()))


def test_mimflow_run_outputs_under_a_bucket_prefix(s3_server, tmp_path, monkeypatch):
    """``mimflow run`` with ``out=s3://...``: every stage's output is under the bucket prefix (not a local
    directory named ``s3:``), and the stage stamps that let a rerun skip a stage live in the bucket."""
    from mimflow.run import PipelineConfig, Stamps, stage_configs
    from pipeline.config import load_config

    monkeypatch.chdir(tmp_path)
    out = s3_server("mimflow-run-out") + "/demo"
    tok, pre, ev = stage_configs(load_config(PipelineConfig, None, [f"out={out}"]))
    assert (tok.out, tok.storage_path) == (out + "/tokenizer", out + "/ray")
    assert (pre.data.tokens, pre.data.tokenizer, pre.out) == (out + "/tokens", out + "/tokenizer", out + "/pretrain")
    assert (ev.encoder, ev.out) == (f"{out}/pretrain/{pre.run_name}/encoder", out + "/eval")

    stamps = Stamps(out)
    storage.write_bytes_atomic(out + "/eval/eval.json", b"{}")
    stamps.write("eval", "k1", {"eval": out + "/eval/eval.json"}, 1.0)
    assert storage.exists(out + "/stamps/eval.json")
    assert stamps.current("eval", "k1")["outputs"] == {"eval": out + "/eval/eval.json"}
    assert stamps.current("eval", "k2") is None  # other inputs
    storage.remove(out + "/eval/eval.json")
    assert stamps.current("eval", "k1") is None  # its output is gone
    assert not (tmp_path / "s3:").exists()


def test_data_preview_writes_its_grid_and_summary_to_a_bucket(s3_server, tmp_path, monkeypatch):
    import io

    from PIL import Image

    from mimflow.cli import main

    monkeypatch.chdir(tmp_path)
    out = s3_server("mimflow-preview") + "/look"
    assert main(["data", "preview", "shapes?n=6&size=16", "--out", out + "/grid.png", "--n", "4", "--cell", "20",
                 "--json", out + "/summary.json"]) == 0
    assert Image.open(io.BytesIO(storage.read_bytes(out + "/grid.png"))).size == (8 * 20, 20 + 12)  # 8 columns, one row with its caption strip
    assert json.loads(storage.read_bytes(out + "/summary.json"))["items"] == 6
    assert not (tmp_path / "s3:").exists()
