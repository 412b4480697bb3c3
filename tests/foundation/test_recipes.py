"""Recipes: strict keys with suggestions, ``base:`` inheritance, override precedence, and every
recipe in the repository loading (other stages' recipes included)."""

from __future__ import annotations

from pathlib import Path

import pytest

from joyai_megatron.cli import STAGES
from joyai_megatron.config.recipe import RecipeError, load_recipe
from joyai_megatron.config.schema import Recipe
from tests.joyai_helpers import REPO, TINY_BASE, run_cli

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def typo_recipe(tmp_path: Path) -> Path:
    return _write(tmp_path / "typo.yaml", f"base: {TINY_BASE}\noptim:\n  optimzer: muon\n")


def test_typo_suggests_the_key(typo_recipe: Path) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(typo_recipe)
    message = str(err.value)
    assert "unknown recipe key 'optim.optimzer'" in message
    assert "did you mean 'optim.optimizer'?" in message
    assert str(typo_recipe) in message


def test_typo_fails_on_the_command_line(typo_recipe: Path) -> None:
    proc = run_cli("pretrain", str(typo_recipe), "train.train_iters=1")
    assert proc.returncode != 0
    assert "did you mean 'optim.optimizer'?" in proc.stderr
    assert "step 1/" not in proc.stdout, "training started despite the typo"


def test_unknown_override_fails() -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY_BASE, ["train.seq_lenght=64"])
    assert "command line" in str(err.value) and "did you mean 'train.seq_length'?" in str(err.value)
    with pytest.raises(RecipeError, match="unknown recipe key 'nonsense'"):
        load_recipe(TINY_BASE, ["nonsense=1"])
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(TINY_BASE, ["train.seq_length"])


def test_unknown_nested_section_key_fails(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.yaml", "parallel:\n  tensor_parallel: 2\n")
    with pytest.raises(RecipeError, match="unknown recipe key 'parallel.tensor_parallel'"):
        load_recipe(bad)


def test_base_inheritance_and_override_precedence(tmp_path: Path) -> None:
    """schema default < grandparent < parent < child < command line; lists are replaced."""
    (tmp_path / "sub").mkdir()
    _write(
        tmp_path / "grand.yaml",
        "name: grand\ntrain:\n  seq_length: 256\n  global_batch_size: 16\noptim:\n  lr: 1.0e-3\n"
        "model:\n  recompute_modules: [core_attn, moe_act]\n",
    )
    _write(tmp_path / "sub" / "parent.yaml", "base: ../grand.yaml\nname: parent\noptim:\n  lr: 2.0e-3\n")
    child = _write(
        tmp_path / "sub" / "child.yaml",
        "base: parent.yaml\nname: child\noptim:\n  min_lr: 1.0e-5\nmodel:\n  recompute_modules: [layernorm]\n",
    )
    r = load_recipe(child)
    defaults = Recipe()
    assert r.name == "child"
    assert r.train.seq_length == 256 and r.train.global_batch_size == 16  # from the grandparent
    assert r.optim.lr == 2.0e-3  # parent beats grandparent
    assert r.optim.min_lr == 1.0e-5  # child
    assert r.model.recompute_modules == ["layernorm"]  # replaced, not appended
    assert r.optim.weight_decay == defaults.optim.weight_decay  # untouched default
    assert r.base is None
    r = load_recipe(child, ["optim.lr=3e-3", "train.seq_length=64", "model.recompute_modules=[mlp]"])
    assert (r.optim.lr, r.train.seq_length, r.model.recompute_modules) == (3e-3, 64, ["mlp"])
    assert r.train.global_batch_size == 16


def test_base_loop_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="loops"):
        load_recipe(tmp_path / "a.yaml")


def test_there_are_recipes() -> None:
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert "pretrain/joyai_48b_a3b/stage1.yaml" in names and "pretrain/tiny_cpu/stage4.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=[p.relative_to(REPO / "recipes").as_posix() for p in RECIPES])
def test_every_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.stage in STAGES, f"{path}: stage {recipe.stage!r} is not one of {sorted(STAGES)}"
