"""Typed stage configs: dataclasses loaded from YAML recipes, overridden with ``--set a.b=value``.

Every stage declares one dataclass. ``load_config`` reads a recipe (a packaged name such as ``demo``
or a path), applies overrides and builds the dataclass strictly: an unknown key is an error that
names it and suggests the closest valid keys, and a value of the wrong type names the field and the
type it expects.

Fields declare what else holds for them next to their type, with ``typing.Annotated``::

    epochs: Annotated[int, Range(ge=1)] = 10          # bounds, checked for every value given
    out: Annotated[str, PATH] = "runs/x"              # a local path (made absolute) or a URI
    source: Annotated[str, SOURCE] = "shapes?n=100"   # a source spec: its location part is a path

``from_dict`` (so every loader) checks the bounds, runs a ``validate()`` method a class may define
for checks across fields, and resolves every local path against the current directory, once, in the
driver: Ray workers run elsewhere, so a relative path would name another file there.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, TypeVar, Union

import yaml

from pipeline import storage
from pipeline.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field (of each item, for a list): ``Range(ge=1)``, ``Range(gt=0, le=1)``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        parts = [f"{op} {v:g}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if v is not None]
        return " and ".join(parts)

    def check(self, value: Any, name: str) -> None:
        if value is None:
            return
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                self.check(v, f"{name}[{i}]")
            return
        ok = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
              and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        if not ok:
            raise ConfigError(f"{name}: must be {self.describe()}, got {value!r}")


@dataclass(frozen=True)
class PathKind:
    """Marks a field that names files: resolved to an absolute path in the driver (URIs untouched)."""

    kind: Literal["path", "source", "recipe"]


PATH = PathKind("path")  # a local path or a URI
SOURCE = PathKind("source")  # a source spec (pipeline.sources): only its location is a path
RECIPE = PathKind("recipe")  # a packaged recipe name (left as is) or a YAML path


def read_yaml(path: Path) -> Any:
    """``yaml.safe_load`` of a file; malformed YAML or a tag such as ``!!python/object`` is a ConfigError
    naming the file and line."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(problem).split())}") from None


def list_recipes(recipes: Path) -> list[str]:
    return sorted(p.stem for p in recipes.glob("*.yaml"))


def resolve_recipe(recipe: str | Path, recipes: Path) -> Path:
    """A packaged recipe name (``demo``, looked up in the stage's ``recipes`` folder) or a YAML path."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path
    candidate = recipes / f"{recipe}.yaml"
    if candidate.is_file():
        return candidate
    known = list_recipes(recipes)
    hint = difflib.get_close_matches(str(recipe), known, n=3)
    stage = recipes.parent.name
    raise ConfigError(
        f"no {stage} recipe named {recipe!r}; packaged recipes: {', '.join(known) or 'none'}"
        + (f" (did you mean {', '.join(hint)}?)" if hint else "")
    )


def load_config(
    cls: type[T],
    recipe: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Build ``cls`` from a recipe plus ``key.sub=value`` overrides.

    A recipe is a YAML path or the name of one in the folder the config class names as ``RECIPES``
    (a ``ClassVar``): each stage owns its recipes, the core knows none of them.
    """
    data: dict[str, Any] = {}
    where = "defaults"
    if recipe is not None:
        path = resolve_recipe(recipe, getattr(cls, "RECIPES", None) or Path("recipes"))
        where = str(path)
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping, got {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``a.b=3`` sets ``data['a']['b'] = 3``; values are parsed as YAML scalars/lists."""
    out = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = {}
                node[k] = child
            node = child
        try:
            node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"override {item!r}: not a valid YAML value ({' '.join(str(problem).split())})") from None
    return out


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build ``cls`` strictly: types, bounds, ``validate()``; at the top level also resolve paths."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""
        raise ConfigError(
            f"unknown key {prefix + str(key)!r}{hint} (valid keys: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(data[name], hints[name], prefix + name) for name in fields if name in data}
    try:
        cfg = cls(**kwargs)
        if hasattr(cfg, "validate"):
            cfg.validate()  # checks across fields; raises ValueError naming them
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None
    if not prefix:
        resolve_paths(cfg)
    return cfg


def resolve_paths(cfg: Any, base: str | Path | None = None) -> Any:
    """Make every field marked ``PATH``/``SOURCE``/``RECIPE`` absolute against ``base`` (default: the
    current directory), in place, recursing into nested configs. URIs, empty strings and None stay."""
    base = Path(base) if base is not None else Path.cwd()
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            resolve_paths(value, base)
            continue
        kind = next((m for m in _markers(hints.get(f.name)) if isinstance(m, PathKind)), None)
        if kind is not None and value is not None:
            if isinstance(value, list):
                setattr(cfg, f.name, [_absolute(v, kind.kind, base) for v in value])
            else:
                setattr(cfg, f.name, _absolute(value, kind.kind, base))
    return cfg


def _absolute(value: Any, kind: str, base: Path) -> Any:
    text = str(value)
    if not text or "://" in text:
        return value
    if kind == "source":
        from pipeline.sources import absolute_spec

        out: str | Path = absolute_spec(text, base)
    elif kind == "recipe" and not (Path(text).suffix in (".yaml", ".yml") or os.sep in text):
        return value  # a packaged recipe name
    else:
        out = os.path.normpath(os.path.join(base, os.path.expanduser(text)))
    return Path(out) if isinstance(value, Path) else out


def _markers(tp: Any) -> tuple[Any, ...]:
    return tuple(typing.get_args(tp)[1:]) if typing.get_origin(tp) is Annotated else ()


def to_dict(cfg: Any) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, directory: str | Path, name: str = "config.yaml") -> str:
    """Write the resolved config beside a stage's outputs (atomically; ``directory`` may be a URI)."""
    path = storage.join(directory, name)
    storage.write_bytes_atomic(path, dump_config(cfg).encode())
    return path


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        value = _coerce(value, args[0], name)
        for marker in args[1:]:
            if isinstance(marker, Range):
                marker.check(value, name)
        return value
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arm, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{name}: expected one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=name + ".")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{name}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        val_tp = args[1] if args else Any
        return {k: _coerce(v, val_tp, f"{name}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected str, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{name}: expected a path, got {value!r}")
    raise ConfigError(f"{name}: unsupported config type {_type_name(tp)}")


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
