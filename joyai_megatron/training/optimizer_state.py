"""Optimizer state in ``torch_dist`` checkpoints, saved in model space and loadable on any layout.

Saving is Megatron-Core's own ``optimizer.sharded_state_dict`` with Megatron-LM's production
metadata (see ``OPTIMIZER_METADATA``): every state tensor (Muon's ``momentum_buffer``, AdamW's
``exp_avg``/``exp_avg_sq``, ZeRO-1's FP32 main ``param``) is stored as
``optimizer.state.<name>.<model parameter key>`` with the model parameter's global shape, so the
tensors themselves reshard across TP/EP/PP/DP like the weights do.

Loading cannot go through Megatron-Core's merge of the saved non-tensor part, because that part
mirrors the *saving* run's chain of optimizers: one process holds [Muon, AdamW]; ZeRO-1 holds
[LayerWise[Muon], DistributedOptimizer[AdamW]]; EP > 1 adds expert optimizers.  Its entries are
merged by position into the loading run's structure, which fails ("Cannot merge") or, worse, pairs
the wrong entries when the chains differ.  So a load asks dist_checkpointing for the *tensors* of
this run's own optimizer structure (by their model-space keys), leaves every non-tensor entry as
this run built it, and restores the only non-tensor value that is state rather than configuration:
the AdamW step count (bias correction).  Learning rate and weight decay of every group are set by
the LR scheduler when its state is loaded.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

# Megatron-LM's production metadata (megatron/training/checkpointing.py
# ``_build_sharded_state_dict_metadata`` with --dist-ckpt-optim-fully-reshardable):
# ``fully_reshardable`` is ZeRO-1's model-space format (the older ``fully_sharded_model_space`` uses
# flattened ShardedTensors, which Megatron-Core 0.19 refuses to save); ``chained_optim_avoid_prefix``
# drops the ``chained_<i>.`` key prefix, the sub-optimizer's position in the chain, which depends on
# the layout.
OPTIMIZER_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": False,
    "chained_optim_avoid_prefix": True,
}

# Names of the FP32 main copy of a parameter: ZeRO-1's model-space format calls it ``param``,
# Megatron's BF16 optimizers (``Float16OptimizerWithFloat16Params``, layer-wise Muon) ``fp32_param``.
_MAIN_PARAM_PREFIXES = ("optimizer.state.param.", "optimizer.state.fp32_param.")
_CHAIN_PREFIX = re.compile(r"^chained_\d+\.")


class OptimizerLoad:
    """This run's optimizer structure, with its tensors requested by model-space key."""

    def __init__(self, optimizer: Any, model_state: dict, saved_keys: set[str]) -> None:
        self.optimizer = optimizer
        self.structure = optimizer.sharded_state_dict(
            model_state, is_loading=True, metadata=OPTIMIZER_METADATA
        )
        fp32 = not (optimizer.config.bf16 or optimizer.config.fp16)
        stored = _stored_names(saved_keys)
        self._slots: list[tuple[Any, Any]] = []
        self.tensors: dict[str, ShardedBase] = {}
        for container, key, value in list(_leaves(self.structure)):
            if isinstance(value, LocalNonpersistentObject):
                container[key] = value.unwrap()
            elif isinstance(value, ShardedBase):
                if value.key in stored:
                    value.key = stored[value.key]
                elif value.key.startswith(_MAIN_PARAM_PREFIXES):
                    alias = _main_param_alias(value.key, stored)
                    if alias is not None:
                        value.key = alias
                    elif fp32 and isinstance(container, dict):
                        # An FP32 run's main parameter is the weight itself, which the model load
                        # fills; a checkpoint written without ZeRO-1 stores no separate copy.
                        del container[key]
                        continue
                self.tensors[str(len(self._slots))] = value
                self._slots.append((container, key))

    def finish(self, loaded_tensors: dict, saved_optimizer: Any) -> None:
        """Put the loaded tensors and the saved AdamW step into the structure and load it."""
        for i, (container, key) in enumerate(self._slots):
            container[key] = loaded_tensors[str(i)]
        _set_adam_step(
            self.structure, saved_adam_step(saved_optimizer), per_param=_adam_step_per_param(self.optimizer)
        )
        self.optimizer.load_state_dict(self.structure)


def _stored_names(saved_keys: set[str]) -> dict[str, str]:
    """Optimizer key -> the key it is stored under.  Checkpoints written before
    ``chained_optim_avoid_prefix`` carry a ``chained_<i>.`` prefix; they still load."""
    stored = {k: k for k in saved_keys if k.startswith("optimizer.")}
    for k in saved_keys:
        bare = _CHAIN_PREFIX.sub("", k, count=1)
        if bare != k and bare.startswith("optimizer."):
            stored.setdefault(bare, k)
    return stored


def _main_param_alias(key: str, stored: dict[str, str]) -> str | None:
    name = next(key[len(p) :] for p in _MAIN_PARAM_PREFIXES if key.startswith(p))
    return next((stored[p + name] for p in _MAIN_PARAM_PREFIXES if p + name in stored), None)


def _leaves(tree: Any):
    """(container, key, value) for every non-container value of nested dicts/lists."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        if isinstance(value, (dict, list)):
            yield from _leaves(value)
        else:
            yield tree, key, value


def saved_adam_step(saved_optimizer: Any) -> float | None:
    """The AdamW step count stored in a checkpoint's non-tensor optimizer state, whatever chain of
    optimizers wrote it (``common_step`` of a plain optimizer, ``step`` of ZeRO-1's param groups)."""
    steps: set[float] = set()

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("step", "common_step") and isinstance(v, (int, float, torch.Tensor)):
                    steps.add(float(v))
                else:
                    visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(saved_optimizer)
    if len(steps) > 1:
        raise RuntimeError(f"checkpoint optimizer state has different AdamW step counts {sorted(steps)}")
    return steps.pop() if steps else None


def _torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside Megatron-Core's wrappers (chains, ZeRO-1, mixed precision)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    if hasattr(optimizer, "chained_optimizers"):  # its `.optimizer` asserts a chain of one
        return [o for chained in optimizer.chained_optimizers for o in _torch_optimizers(chained)]
    inner = getattr(optimizer, "optimizer", None)
    return _torch_optimizers(inner) if inner is not None else []


def _adam_step_per_param(optimizer: Any) -> bool:
    """Whether this run's AdamW counts steps per parameter (torch's) or per param group (the fused
    Adams of Transformer Engine and Apex, which Megatron-Core picks whenever one is installed: their
    ``load_state_dict`` accepts only tensor state per parameter, so a per-parameter ``step`` fails
    there with ``KeyError: 'step'``, found by the first stage-2 smoke run on an H200)."""
    adams = [o for o in _torch_optimizers(optimizer) if any("betas" in g for g in o.param_groups)]
    return all(isinstance(o, torch.optim.Adam | torch.optim.AdamW) for o in adams)


def _set_adam_step(tree: Any, step: float | None, *, per_param: bool) -> None:
    """Write ``step`` wherever this run's structure keeps an AdamW step: the per-parameter states
    holding ``exp_avg`` (torch's Adam), else the AdamW param groups (fused Adams; ZeRO-1 keeps it in
    its param groups too)."""
    if isinstance(tree, list):
        for v in tree:
            _set_adam_step(v, step, per_param=per_param)
        return
    if not isinstance(tree, dict):
        return
    per_param_state = per_param and "exp_avg" in tree
    adam_group = isinstance(tree.get("step"), (int, float)) or (not per_param and "betas" in tree)
    if per_param_state and step is None:
        raise RuntimeError("the checkpoint has AdamW state but no AdamW step count")
    if per_param_state:
        tree["step"] = torch.tensor(step)
    elif adam_group and step is not None:  # None: a fused Adam saved before its first step
        tree["step"] = type(tree["step"])(step) if "step" in tree else int(step)
    for v in tree.values():
        _set_adam_step(v, step, per_param=per_param)
