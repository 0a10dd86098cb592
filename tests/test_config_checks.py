"""Every stage's config is checked before Ray starts: one stderr line naming the field, exit code 2.

Also: paths resolved to absolute ones in the driver, and ``--print-config`` on every command that takes
``--config``. The commands run in-process (no Ray may start: checked); one runs as a real subprocess
from another directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dataclasses import dataclass, field
from typing import Annotated

from pipeline.config import ConfigError, Range, from_dict, load_config, to_dict

REPO = Path(__file__).resolve().parent.parent


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _run(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run an entry point in-process; assert it started no Ray (a wall-clock bound would measure the
    machine's load and the first import of torch, not the order of the checks)."""
    assert not _ray_started(), "a Ray from another test is still up: cannot tell who started it"
    rc = main(argv)
    out, err = capsys.readouterr()
    assert not _ray_started(), f"{argv}: Ray was started"
    return rc, out, err


def _mimflow(argv, capsys):
    from mimflow.cli import main

    return _run(main, argv, capsys)


BAD = [
    # (command, override, what the one line must name)
    (["pretrain"], "optim.lr=-1", ["optim.lr", "-1", "> 0"]),
    (["pretrain"], "model.dim=0", ["model.dim", "0", ">= 1"]),
    (["pretrain"], "model.depth=-1", ["model.depth", "-1", ">= 1"]),
    (["pretrain"], "model.patch=0", ["model.patch", "0", ">= 1"]),
    (["pretrain"], "checkpoint_every=0", ["checkpoint_every", "0", ">= 1"]),
    (["pretrain"], "data.loader_workers=-1", ["data.loader_workers", "-1", ">= 0"]),
    (["pretrain"], "cpus_per_worker=0", ["cpus_per_worker", "0", ">= 1"]),
    (["pretrain"], "epochs=-1", ["epochs", "-1", "> 0"]),
    (["pretrain"], "steps=-5", ["steps", "-5", ">= 1"]),
    (["pretrain"], "data.batch_size=-1", ["data.batch_size", "-1", ">= 1"]),
    (["pretrain"], "mask.ratio=1.5", ["mask.ratio", "1.5", "< 1"]),
    (["pretrain"], "model.heads=5", ["dim", "heads", "divisible"]),
    (["pretrain"], "data.img_size=30", ["data.img_size", "30", "multiple of model.patch"]),
    (["tokenizer", "train"], "loader_workers=-1", ["loader_workers", "-1", ">= 0"]),
    (["tokenizer", "train"], "cpus_per_worker=0", ["cpus_per_worker", "0", "> 0"]),
    (["tokenizer", "train"], "checkpoint_every=0", ["checkpoint_every", "0", ">= 1"]),
    (["tokenizer", "train"], "model.num_heads=0", ["model.num_heads", "0", ">= 1"]),
    (["eval"], "k=0", ["k", "0", ">= 1"]),
    (["eval"], "finetune.epochs=0", ["finetune.epochs", "0", ">= 1"]),
    (["eval"], "probe.val_fraction=1.5", ["probe.val_fraction", "1.5", "< 1"]),
    (["run"], "views=0", ["views", "0", ">= 1"]),
    (["run"], "pretrain.set=[model.dim=0]", ["pretrain", "model.dim", "0"]),
    (["run"], "eval.set=[k=-3]", ["eval", "k", "-3"]),
]


@pytest.mark.parametrize("command, override, names", BAD, ids=[f"{' '.join(c)}:{o}" for c, o, _ in BAD])
def test_bad_value_is_one_line_before_ray(command, override, names, capsys):
    rc, out, err = _mimflow([*command, "--set", override], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], (name, lines[0])


def test_stage1_job_checks_its_tokens_section(capsys):
    from tokenizer.__main__ import main

    rc, _, err = _run(main, ["--set", "tokens.views=0"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "tokens.views: must be >= 1, got 0" in err


@pytest.mark.parametrize("text, problem", [
    ("model:\n  dim: [1, 2\n", "not valid YAML"),
    ("model: !!python/object/apply:os.system ['echo owned']\n", "python/object/apply"),
])
def test_bad_yaml_is_one_line_naming_file_and_line(tmp_path, text, problem, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("steps: 3\n" + text)
    rc, _, err = _mimflow(["pretrain", "--config", str(recipe)], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{recipe}:" in err and problem in err
    line = int(err.split(f"{recipe}:")[1].split(":")[0])
    assert line >= 2  # where the problem is, not the top of the file


def test_bad_override_yaml_is_one_line(capsys):
    rc, _, err = _mimflow(["pretrain", "--set", "optim.betas=[0.9,"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "optim.betas=[0.9," in err


def test_job_entry_point_fails_fast_without_a_traceback(tmp_path):
    """`python -m pretrain` as `ray job submit` runs it, from a directory that is not the repo."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--set", "model.patch=0"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "model.patch: must be >= 1, got 0" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


# --- paths ------------------------------------------------------------------------------------------
def test_every_stage_resolves_relative_paths_against_the_driver_cwd(tmp_path, monkeypatch):
    from eval.eval_config import EvalConfig
    from mimflow.run import PipelineConfig
    from pretrain.config import PretrainConfig
    from tokenizer.stage1 import load_stage1_config
    from tokenizer.train_config import TokenizerTrainConfig

    monkeypatch.chdir(tmp_path)
    here = str(tmp_path)

    pre = load_config(PretrainConfig, "demo", ["data.tokens=runs/tokens/abc", "data.tokenizer=runs/tok",
                                               "out=s3://bucket/runs"])
    assert pre.data.tokens == f"{here}/runs/tokens/abc" and pre.data.tokenizer == f"{here}/runs/tok"
    assert pre.out == "s3://bucket/runs"  # URIs untouched

    tok = load_config(TokenizerTrainConfig, "demo", ["source=imgs?split=train", "out=out/tok",
                                                     "heldout_source=idx:mnist?split=test",
                                                     "teacher_weights=~/w.safetensors"])
    assert tok.source == f"{here}/imgs?split=train"
    assert tok.heldout_source == f"idx:{here}/mnist?split=test"
    assert tok.out == f"{here}/out/tok" and tok.storage_path is None
    assert tok.teacher_weights == os.path.expanduser("~/w.safetensors")

    s1 = load_stage1_config("demo", ["tokens.out=tokens", "tokens.source=wds:shards/train-{000..009}.tar"])
    assert s1.tokens.out == f"{here}/tokens"
    assert s1.tokens.source == f"wds:{here}/shards/train-{{000..009}}.tar"
    assert s1.tokenizer.source.startswith("shapes?")  # the built-in source has no path

    ev = load_config(EvalConfig, "demo", ["encoder=../enc", "train_source=data/train", "test_source=null",
                                          "feature_cache=cache"])
    assert ev.encoder == str(tmp_path.parent / "enc") and ev.train_source == f"{here}/data/train"
    assert ev.test_source is None and ev.feature_cache == f"{here}/cache" and os.path.isabs(ev.out)

    run = load_config(PipelineConfig, "demo", ["out=r", "source=imgs", "pretrain.recipe=my/pre.yaml"])
    assert run.out == f"{here}/r" and run.source == f"{here}/imgs"
    assert run.pretrain.recipe == f"{here}/my/pre.yaml" and "/" not in run.tokenizer.recipe  # names stay names

    # resolving is done once: loading the saved config elsewhere changes nothing
    monkeypatch.chdir(tmp_path.parent)
    assert from_dict(PretrainConfig, to_dict(pre)) == pre


# --- --print-config ---------------------------------------------------------------------------------
def _printed(out: str) -> dict:
    doc = yaml.safe_load(out)
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize("argv, field", [
    (["tokenizer", "train", "--set", "out=rel/tok"], ("out",)),
    (["pretrain", "--set", "data.tokens=rel/tokens"], ("data", "tokens")),
    (["eval", "--set", "encoder=rel/enc"], ("encoder",)),
    (["eval", "--encoder", "rel/enc"], ("encoder",)),
    (["run", "--set", "out=rel/run"], ("out",)),
])
def test_print_config_on_every_mimflow_command(argv, field, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _mimflow([*argv, "--print-config"], capsys)
    assert rc == 0
    node = _printed(out)
    for key in field:
        node = node[key]
    assert node.startswith(str(tmp_path) + "/rel/")
    assert not list(tmp_path.iterdir())  # printing writes nothing


@pytest.mark.parametrize("module", ["tokenizer", "pretrain", "eval"])
def test_print_config_on_every_job_entry_point(module, tmp_path, monkeypatch, capsys):
    import importlib

    main = importlib.import_module(f"{module}.__main__").main
    monkeypatch.chdir(tmp_path)
    argv = ["--config", "demo", "--print-config"]
    rc, out, _ = _run(main, argv, capsys)
    assert rc == 0
    doc = _printed(out)
    outs = {"tokenizer": doc.get("tokens", {}).get("out"), "pretrain": doc.get("out"), "eval": doc.get("out")}
    assert os.path.isabs(outs[module])


def test_print_config_still_checks(capsys):
    rc, out, err = _mimflow(["eval", "--print-config", "--set", "k=0"], capsys)
    assert rc == 2 and out == "" and "k: must be >= 1, got 0" in err


@dataclass
class _Optim:
    betas: Annotated[list[float], Range(ge=0, lt=1)] = field(default_factory=lambda: [0.9, 0.99])
    clip: Annotated[float | None, Range(gt=0)] = None


def test_range_checks_list_items_and_skips_none():
    assert from_dict(_Optim, {"clip": None}).clip is None
    with pytest.raises(ConfigError, match=r"betas\[1\]: must be >= 0 and < 1, got 1.5"):
        from_dict(_Optim, {"betas": [0.9, 1.5]})
    with pytest.raises(ConfigError, match=r"clip: must be > 0, got 0.0"):
        from_dict(_Optim, {"clip": 0})
