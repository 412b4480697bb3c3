"""Every part of benchmarks/backend_equivalence.py builds a config Megatron-Core accepts on GPU.

The FP8 delayed-scaling part first died at config build on the H200 (delayed scaling refuses the
recipe's moe_act/layernorm recompute): this runs the same check on CPU, before a GPU is spent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from joyai_megatron.config.recipe import load_recipe
from joyai_megatron.model.config import check_gpu_config
from joyai_megatron.model.presets import recipe_arch
from tests.joyai_helpers import load_benchmark

bench = load_benchmark("backend_equivalence")


@pytest.mark.parametrize("part", sorted(bench.PARTS))
def test_part_builds_its_gpu_config(part: str, tmp_path: Path) -> None:
    args = bench.parse_args(["--data", str(tmp_path), "--out-dir", str(tmp_path / "out"), "--layers", "2"])
    recipe = load_recipe(bench.BASE, [*bench.common_overrides(args), *bench.PARTS[part]])
    check_gpu_config(recipe_arch(recipe), recipe.model, recipe.parallel, recipe.precision)


def test_the_check_catches_the_recipe_recompute_with_delayed_scaling(tmp_path: Path) -> None:
    args = bench.parse_args(["--data", str(tmp_path), "--out-dir", str(tmp_path / "out"), "--layers", "2"])
    overrides = [o for o in bench.PARTS["te-fp8-delayed"] if not o.startswith("model.recompute_modules")]
    recipe = load_recipe(bench.BASE, [*bench.common_overrides(args), *overrides])
    with pytest.raises(ValueError, match="Delayed scaling does not support"):
        check_gpu_config(recipe_arch(recipe), recipe.model, recipe.parallel, recipe.precision)


def test_grad_norm_groups_compare_backends_whose_parameter_names_differ(tmp_path: Path) -> None:
    args = bench.parse_args(["--data", str(tmp_path), "--out-dir", str(tmp_path), "--grad-norms"])
    assert "logging.param_grad_norms_at=[1]" in bench.common_overrides(args)
    files = {
        "local-bf16": {"decoder.layers.0.self_attention.q_layernorm.weight": 3.0,
                       "decoder.layers.0.self_attention.linear_q_up_proj.weight": 4.0,
                       "decoder.layers.1.mlp.experts.weight1": 2.0},
        "te-bf16": {"decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight": 3.0,
                    "decoder.layers.0.self_attention.linear_q_up_proj.weight": 4.0,
                    "decoder.layers.1.mlp.experts.linear_fc1.weight0": 1.0},
    }  # fmt: skip
    for part, norms in files.items():
        out = tmp_path / part / "logs" / "param_grad_norms"
        out.mkdir(parents=True)
        (out / "step_1.rank0.json").write_text(json.dumps(norms))
    lines = bench.compare_grad_norms(args, list(files))
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in lines[1:3]}
    assert rows == {"experts": [2.0, 1.0], "self_attention": [5.0, 5.0]}
    assert lines[3] == "tensors named alike: 1, 0 differ by more than 1%"  # the shared linear agrees


def test_per_tensor_differences_list_the_tensors_that_disagree() -> None:
    a = {"x.linear_proj.weight": 2.0, "x.linear_q_up_proj.weight": 4.0, "local.only": 1.0}
    b = {"x.linear_proj.weight": 2.01, "x.linear_q_up_proj.weight": 3.6, "te.only": 1.0}
    lines = bench.per_tensor_differences(a, b)
    assert lines[0] == "tensors named alike: 2, 1 differ by more than 1%"
    assert lines[1].split() == ["x.linear_q_up_proj.weight", "4.00000", "3.60000", "10.0%"]


def test_parts_spread_over_the_visible_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four parts at a time on two GPUs run two on each, with CUDA_VISIBLE_DEVICES set per part."""
    started: dict[str, str | None] = {}

    class Done:
        returncode = 0

        def poll(self) -> int:
            return 0

    def fake_launch(args, name, extra, gpu=None):  # noqa: ANN001, ANN202 (stands in for launch)
        started[name] = gpu
        return Done()

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    monkeypatch.setattr(bench, "launch", fake_launch)
    monkeypatch.setattr(bench.time, "sleep", lambda _s: None)
    args = bench.parse_args(["--data", str(tmp_path), "--out-dir", str(tmp_path), "--concurrent", "4"])
    parts = ["te-bf16", "te-fp8-blockwise", "te-fp8-tensorwise", "te-fp8-delayed"]
    assert bench.run_parts(args, parts, tmp_path) == dict.fromkeys(parts, 0)
    assert started == dict(zip(parts, ["2", "5", "2", "5"], strict=True))
