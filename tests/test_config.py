from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import yaml

from pipeline.config import ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10


@dataclass
class Stage:
    name: str = "x"
    target: Literal["tokens", "pixels"] = "tokens"
    workers: int = 1
    use_gpu: bool = False
    tokenizer: str | None = None
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)


def test_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("workers: 2\noptim:\n  lr: 2.0e-3\n")
    cfg = load_config(Stage, recipe, ["optim.warmup_steps=5", "target=pixels", "tags=[a, b]", "optim.lr=1e-4"])
    assert cfg.workers == 2
    assert cfg.optim.lr == pytest.approx(1e-4)  # the override wins over the recipe; YAML's "1e-4" string parses
    assert cfg.optim.warmup_steps == 5
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.target == "pixels"
    assert cfg.tags == ["a", "b"]


def test_unknown_key_names_it_and_suggests(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Stage, recipe)
    msg = str(e.value)
    assert "optim.lrr" in msg and "optim.lr" in msg and str(recipe) in msg


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="unknown key 'worker'.*'workers'"):
        load_config(Stage, None, ["worker=3"])


@pytest.mark.parametrize(
    "override, field_name, expected",
    [
        ("workers=two", "workers", "int"),
        ("use_gpu=3", "use_gpu", "bool"),
        ("optim.lr=fast", "optim.lr", "float"),
        ("target=labels", "target", "one of"),
        ("optim.betas=[0.9]", "optim.betas", "2 items"),
    ],
)
def test_bad_value_names_field_and_type(override, field_name, expected):
    with pytest.raises(ConfigError) as e:
        load_config(Stage, None, [override])
    assert field_name in str(e.value) and expected in str(e.value)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["workers"])


def test_missing_recipe_lists_packaged_ones(tmp_path):
    recipes = tmp_path / "pretrain" / "recipes"
    recipes.mkdir(parents=True)
    (recipes / "demo.yaml").write_text("workers: 2\n")

    @dataclasses.dataclass
    class Owned(Stage):
        RECIPES: ClassVar[Path] = recipes

    assert load_config(Owned, "demo").workers == 2
    with pytest.raises(ConfigError, match="no pretrain recipe named 'demu'; packaged recipes: demo \\(did you mean demo"):
        load_config(Owned, "demu")


def test_save_round_trip(tmp_path):
    cfg = from_dict(Stage, {"workers": 3, "optim": {"lr": 0.5}, "tokenizer": "/t"})
    path = save_config(cfg, tmp_path / "out")
    again = from_dict(Stage, yaml.safe_load(Path(path).read_text()))
    assert again == cfg
    assert to_dict(again)["optim"]["betas"] == [0.9, 0.999]
