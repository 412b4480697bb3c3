"""``compat.install()`` is the one place Megatron-Core is patched: what it installs on this CPU
machine, that process-group start installs it, and that no module outside ``compat/`` patches
Megatron-Core itself (an AST scan for assignments into objects imported from ``megatron``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import joyai_megatron
from joyai_megatron.compat import PATCHES

PACKAGE = Path(joyai_megatron.__file__).parent

# A fresh interpreter (this one may already hold patches from other tests): start a one-rank group
# and report, for each row of the table, whether its upstream target is the replacement.
PROBE = """
import importlib, json
from joyai_megatron.training.distributed import init_distributed, shutdown
from joyai_megatron.compat import PATCHES
init_distributed()
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.optimizer import clip_grads, emerging_optimizers
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer import multi_latent_attention
from megatron.core.models.gpt import gpt_model
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.optimizer import layer_wise_optimizer
from joyai_megatron.compat import cpu, mla, mtp, multi_tensor, no_te, rope, router, threads, allocator
from joyai_megatron.optim.muon import BatchedMuon
state = {
    "cpu redirects": cpu._applied,
    "heap keeps freed memory": allocator._applied,
    "serial helper threads": threads._applied or __import__("torch").get_num_threads() == 1,
    "no-TE recompute": mcore_random.FP8GlobalStateManager is no_te._STAND_INS["FP8GlobalStateManager"],
    "MLA down projections": multi_latent_attention.Linear is mla.ReplicatedLinear,
    "multi-tensor ops": clip_grads.l2_norm_impl is multi_tensor.foreach_l2_norm,
    "ZeRO-1 gaps": any(getattr(getattr(o, a), "__joyai_zero1__", False) for o, a, *_ in
                       __import__("joyai_megatron.compat.zero1", fromlist=["_PATCHES"])._PATCHES),
    "batched Muon": emerging_optimizers._EMERGING_OPTIMIZERS["muon"].optimizer_cls is BatchedMuon,
    "sync-free THD RoPE": rope_utils._apply_rotary_pos_emb_thd is rope.apply_rotary_pos_emb_thd,
    "padding-aware expert bias": TopKRouter._apply_expert_bias is router._apply_expert_bias,
    "MTP loss under CP": gpt_model.process_mtp_loss is mtp.process_mtp_loss_cp,
}
shutdown()
print(json.dumps(state))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU machine without TE or Apex installs")
def test_process_group_start_installs_every_cpu_patch() -> None:
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    cpu_rows = {p.name for p in PATCHES if p.when not in ("CUDA without Apex", "TE installed")}
    assert set(state) == cpu_rows, "the probe must cover every row of PATCHES that acts on CPU"
    assert all(state.values()), {k: v for k, v in state.items() if not v}


def test_every_row_names_an_installer() -> None:
    import importlib

    for patch in PATCHES:
        module = importlib.import_module(f"joyai_megatron.compat.{patch.module}")
        assert callable(getattr(module, patch.install)), patch
        assert patch.upstream and patch.when, patch


def _megatron_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron"):
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(
                (a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("megatron")
            )
    return names


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
    return node


def test_no_module_outside_compat_patches_megatron() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "compat":
            continue
        tree = ast.parse(path.read_text(), str(path))
        upstream = _megatron_names(tree)
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else []
            targets += [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else []
            for target in targets:
                if not isinstance(target, ast.Attribute | ast.Subscript):
                    continue
                root = _root(target)
                patched_upstream = isinstance(root, ast.Name) and root.id in upstream
                class_swap = isinstance(target, ast.Attribute) and target.attr == "__class__"
                if patched_upstream or class_swap:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, f"patch Megatron-Core only in joyai_megatron/compat/: {offenders}"
