"""Gaps of Megatron-Core 0.19.2's ZeRO-1 optimizers outside the layouts and precisions it is run at.

None is about the device, so none is a CPU redirect: all are installed by the optimizer builder on
every machine and act only in the case they name.

1. Layer-wise Muon with FP32 parameters.  ``LayerWiseDistributedOptimizer.__init__``
   (``megatron/core/optimizer/layer_wise_optimizer.py``, the ``if config.bf16:`` block after
   ``shard_params``) wraps its base torch optimizers in ``Float16OptimizerWithFloat16Params`` for
   BF16 and leaves them raw otherwise.  ``LayerWiseDistributedOptimizer`` is a ``ChainedOptimizer``
   whose methods call the MegatronOptimizer API on each child (``get_loss_scale``,
   ``prepare_grads``, ``get_grads_for_grad_norm``, ``step_with_ready_grads``,
   ``sharded_state_dict``), so with FP32 parameters the first step fails (``'BatchedMuon' object
   has no attribute 'get_loss_scale'``); even past that, no wrapper would copy DDP's ``main_grad``
   into ``grad``.  The patch wraps each base optimizer in Megatron-Core's ``FP32Optimizer`` (the
   wrapper the non-layer-wise path uses for FP32) when the config is neither bf16 nor fp16; BF16 is
   left to upstream.  ``LayerWiseDistributedOptimizer.sharded_state_dict`` reads each child's state
   in the layout of ``Float16OptimizerWithFloat16Params.state_dict()`` (``{'optimizer': ...}``);
   :class:`LayerWiseFP32Optimizer` nests its sharded state the same way and accepts it back.

2. ZeRO-1 AdamW on torch's ``Adam`` (no TE/Apex: ``distrib_optimizer.HAVE_APEX_OR_TE`` is False,
   e.g. the CPU tests).  ``DistributedOptimizer.state_dict`` (distrib_optimizer.py l.837-839)
   reads the step from every per-parameter state (``assert len(steps) == 1``), so before the first
   step, when the torch optimizer has no state, saving (a step-0 checkpoint) and building the
   sharded state to load into (``sharded_state_dict(is_loading=True)`` calls ``state_dict()``
   first) both fail.  TE's and Apex's fused Adams keep the step in the param groups instead.  The
   patch gives an optimizer without state the state a fresh torch Adam creates on its first step
   (zero moments, ``step`` 0, through the optimizer's own ``init_state_fn``), which leaves the next
   update unchanged.  Loading the model-space format then copies every tensor of a parameter's
   torch state from the checkpoint (``_set_main_param_and_optimizer_states``, l.1216-1224), torch's
   per-parameter ``step`` tensor included, which the loader never provides (it skips ``step`` at
   l.2390; ``load_state_dict`` restores it from the param groups): the patch marks it absent, so
   that copy skips it as upstream skips non-tensor entries.  With FP32 parameters the main
   ``param`` is marked absent too when the checkpoint has none (written without ZeRO-1): it is a
   view of the weight itself, which the model load has already filled.  Last, ``load_state_dict``
   (l.1025-1032) hands one ``step`` tensor object to every parameter's state, and torch's Adam
   increments each parameter's ``step`` in place, so after a resume the shared counter advanced
   once per parameter per step (the bias correction went wrong from the second resumed step:
   measured 5e-2 off in the loss): the patch gives every state its own copy.

3. Layer-wise Muon at one dense data-parallel rank with expert data parallelism (TP=2 with expert
   TP=1 on two ranks: the two TP ranks are one expert-data-parallel group).
   ``LayerWiseDistributedOptimizer.shard_params`` (layer_wise_optimizer.py l.550-555) returns early
   when the dense DP group has one rank, assigning every parameter to every rank, but DDP, given the
   shard-aligned layout, reduce-scatters the expert gradients over the expert-DP group: each rank
   then stepped all experts, those of the other rank's shard with an unreduced gradient.  The
   weights came out right (the owner's copy is all-gathered), but the Muon momentum of half the
   experts was wrong on each rank, the gradient norm counted partial gradients (measured 2.5e-3
   relative off) and the checkpoint stored the wrong momentum (and, with every state tensor marked
   the main replica by ``sharded_state_dict``'s replica reset, could not be loaded: "Invalid access
   pattern").  The patch shards from the layout (``_shard_params_from_layout``, upstream's own path
   for DP > 1) whenever the expert-DP group has more than one rank, so each rank steps exactly the
   matrices whose gradients it reduced.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from megatron.core.optimizer import distrib_optimizer
from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer
from megatron.core.optimizer.optimizer import FP32Optimizer
from megatron.core.utils import get_pg_size


class LayerWiseFP32Optimizer(FP32Optimizer):
    """``FP32Optimizer`` whose sharded state has the ``{'optimizer': ...}`` nesting that
    ``LayerWiseDistributedOptimizer.sharded_state_dict`` expects of its children."""

    def sharded_state_dict(
        self, model_sharded_state_dict: Any, is_loading: bool = False, metadata: Any = None
    ):
        return {"optimizer": super().sharded_state_dict(model_sharded_state_dict, is_loading, metadata)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict.get("optimizer", state_dict))


def _no_state(optimizer: Any, config: Any = None) -> None:
    del optimizer, config


def _wrap_fp32_children(original: Any) -> Any:
    @functools.wraps(original)
    def __init__(  # noqa: N807 - replaces the upstream constructor
        self: LayerWiseDistributedOptimizer,
        optimizers: list,
        config: Any,
        pg_collection: Any = None,
        init_state_fn_list: list | None = None,
        model_chunks: list | None = None,
    ) -> None:
        if not (config.bf16 or config.fp16):
            init_fns = init_state_fn_list or [_no_state] * len(optimizers)
            optimizers = [
                opt
                if isinstance(opt, FP32Optimizer)
                else LayerWiseFP32Optimizer(opt, config, fn or _no_state)
                for opt, fn in zip(optimizers, init_fns, strict=True)
            ]
        original(self, optimizers, config, pg_collection, init_state_fn_list, model_chunks)

    return __init__


def _init_torch_adam_state(original: Any) -> Any:
    @functools.wraps(original)
    def state_dict(self: Any) -> dict:
        inner = self.optimizer
        if not distrib_optimizer.HAVE_APEX_OR_TE and isinstance(inner, torch.optim.Adam) and not inner.state:
            if self.init_state_fn is not None:
                self.init_state_fn(inner, self.config)
            for group in inner.param_groups:
                for p in group["params"]:
                    inner.state[p].setdefault("step", torch.tensor(0.0))
        return original(self)

    return state_dict


def _skip_absent_states(original: Any) -> Any:
    @functools.wraps(original)
    def set_states(self: Any, model_param: torch.Tensor, tensors: dict) -> None:
        absent = {}
        if not distrib_optimizer.HAVE_APEX_OR_TE:
            absent["step"] = None  # restored from the param groups by load_state_dict
        if not (self.config.bf16 or self.config.fp16):
            # FP32: the main parameter is a view of the weight (l.466-468), which the model load
            # fills; a checkpoint written without ZeRO-1 has no separate copy of it.
            absent["param"] = None
        original(self, model_param, {**absent, **tensors})

    return set_states


def _unshare_torch_adam_steps(original: Any) -> Any:
    @functools.wraps(original)
    def load_state_dict(self: Any, state_dict: dict) -> None:
        original(self, state_dict)
        if not distrib_optimizer.HAVE_APEX_OR_TE:
            for state in self.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()

    return load_state_dict


def _shard_experts_at_one_dense_rank(original: Any) -> Any:
    @functools.wraps(original)
    def shard_params(self: Any, optimizers: list, full_param_layouts: Any = None) -> None:
        dense, expert = get_pg_size(self.dp_cp), get_pg_size(self.expt_dp)
        if dense == 1 and expert > 1 and full_param_layouts is not None:
            self._shard_params_from_layout(optimizers, full_param_layouts, dense, expert)
        else:
            original(self, optimizers, full_param_layouts)

    return shard_params


# (owner, attribute, wrapper factory, upstream lines)
_PATCHES = (
    (
        LayerWiseDistributedOptimizer,
        "__init__",
        _wrap_fp32_children,
        "layer_wise_optimizer.py: `if config.bf16:`",
    ),
    (
        distrib_optimizer.DistributedOptimizer,
        "state_dict",
        _init_torch_adam_state,
        "distrib_optimizer.py:837-839",
    ),
    (
        distrib_optimizer.DistributedOptimizer,
        "_set_main_param_and_optimizer_states",
        _skip_absent_states,
        "distrib_optimizer.py:1216-1224,2390",
    ),
    (
        distrib_optimizer.DistributedOptimizer,
        "load_state_dict",
        _unshare_torch_adam_steps,
        "distrib_optimizer.py:1025-1032",
    ),
    (
        LayerWiseDistributedOptimizer,
        "shard_params",
        _shard_experts_at_one_dense_rank,
        "layer_wise_optimizer.py:550-555",
    ),
)


def use_zero1_fallbacks() -> None:
    """Install the patches (idempotent)."""
    for owner, attr, wrap, _lines in _PATCHES:
        original = getattr(owner, attr)
        if getattr(original, "__joyai_zero1__", False):
            continue
        patched = wrap(original)
        patched.__joyai_zero1__ = True
        setattr(owner, attr, patched)
