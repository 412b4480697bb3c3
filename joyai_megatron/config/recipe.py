"""Loading recipes: YAML that extends a base, ``key=value`` overrides, and strict key checking."""

from __future__ import annotations

import difflib
import os
import tempfile
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from joyai_megatron.config.schema import Recipe
from joyai_megatron.errors import UserError


class RecipeError(UserError, ValueError):
    """A recipe that cannot be used; the message names the file and key."""


def _known_keys(node: Any) -> set[str]:
    return {f.name for f in fields(node)} if is_dataclass(node) else set()


def _check_keys(data: Any, schema: Any, where: str, path: str = "") -> None:
    """Raise on keys the schema lacks, suggesting the closest valid one."""
    if not isinstance(data, dict) or not is_dataclass(schema):
        return
    known = _known_keys(schema)
    for key, value in data.items():
        dotted = f"{path}{key}"
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean '{path}{close[0]}'?" if close else f"; valid keys: {sorted(known)}"
            raise RecipeError(f"{where}: unknown recipe key '{dotted}'{hint}")
        child = getattr(schema, key)
        if is_dataclass(child):
            if value is not None and not isinstance(value, dict):
                raise RecipeError(f"{where}: '{dotted}' must be a mapping, got {value!r}")
            _check_keys(value, child, where, dotted + ".")


def _load_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"{path}: recipe base chain loops: {' -> '.join(map(str, seen + (path,)))}")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except Exception as err:  # YAML syntax, duplicate keys
        raise RecipeError(f"{path}: cannot parse recipe: {err}") from err
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping")
    _check_keys(raw, Recipe(), str(path))
    base = raw.pop("base", None)
    node = OmegaConf.create(raw)
    if base:
        parent = _load_yaml_chain((path.parent / base), seen + (path,))
        node = OmegaConf.merge(parent, node)
    return node


def parse_overrides(overrides: list[str]) -> DictConfig:
    """``a.b=1`` strings -> a config; the values are parsed as YAML (numbers, lists, null)."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise RecipeError(f"overrides must look like key=value, got {bad}")
    dotlist = OmegaConf.from_dotlist(overrides)
    _check_keys(OmegaConf.to_container(dotlist), Recipe(), "command line")
    return dotlist


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Resolve a recipe file, its bases and the overrides into a typed ``Recipe``."""
    chain, dotlist = _load_yaml_chain(Path(path)), parse_overrides(overrides or [])
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Recipe), chain)
    except Exception as err:  # omegaconf type errors name the key and value
        raise RecipeError(f"{path}: {err}") from err
    try:  # merged separately so a bad override is blamed on the command line, not the file
        merged = OmegaConf.merge(merged, dotlist)
    except Exception as err:
        where, why = _override_for(err, overrides or []), str(err).splitlines()[0]
        raise RecipeError("bad command-line override", where, why, "fix the value after '='") from err
    merged.base = None
    recipe = OmegaConf.to_object(merged)
    assert isinstance(recipe, Recipe)
    _check_values(recipe, str(path))
    return recipe


def _override_for(err: Exception, overrides: list[str]) -> str:
    """The ``key=value`` an omegaconf merge error is about (its ``full_key``), else all of them."""
    key = str(getattr(err, "full_key", "") or "")
    named = [o for o in overrides if o.split("=", 1)[0] == key]
    return named[0] if named else " ".join(overrides)


def _check_values(recipe: Recipe, where: str) -> None:
    """Values that type-check but cannot mean anything (a run of -5 steps wrote iter_0000000).  A
    length of 0 is meaningful: build, save the initial weights as ``iter_0000000`` and exit."""
    t = recipe.train
    for key, value in (("train.train_iters", t.train_iters), ("train.train_tokens", t.train_tokens)):
        if value is not None and value < 0:
            why = f"{value} is a negative length"
            fix = "give a number of steps (or tokens); 0 only saves the initial weights"
            raise RecipeError(f"invalid value in {where} or its overrides", key, why, fix)


def recipe_to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def save_resolved_recipe(recipe: Recipe, directory: str | os.PathLike) -> Path:
    """Write ``recipe.yaml`` atomically, so a checkpoint always carries how it was made."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "recipe.yaml"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".recipe.", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(recipe_to_yaml(recipe))
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; a recipe is meant to be read by others
    os.replace(tmp, target)
    return target
