"""``logging.param_grad_norms_at``: per-parameter gradient norms whose total is the logged norm."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tests.joyai_helpers import read_metrics, run_joyai, write_mock_recipe


def test_per_parameter_norms_add_up_to_the_logged_grad_norm(tmp_path: Path) -> None:
    recipe = write_mock_recipe(tmp_path, logging={"param_grad_norms_at": [2]}, checkpoint={"save_at_end": False})
    assert run_joyai("pretrain", recipe).returncode == 0
    written = sorted((tmp_path / "logs" / "param_grad_norms").iterdir())
    assert [p.name for p in written] == ["step_2.rank0.json"]
    norms = json.loads(written[0].read_text())
    # Every trainable tensor is there: attention, routed experts, router, MTP block, embedding.
    for part in ("linear_kv_down_proj", "experts", "router", "mtp", "embedding"):
        assert any(part in name for name in norms), part
    logged = read_metrics(tmp_path / "logs")[1]["grad_norm"]
    total = math.sqrt(sum(n * n for n in norms.values()))
    assert math.isclose(total, logged, rel_tol=1e-4), (total, logged)
