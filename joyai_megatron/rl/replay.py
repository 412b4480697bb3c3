"""MoE routing replay through Megatron-Core's ``RouterReplay`` (``moe_enable_routing_replay``).

``rl.routing_replay`` picks whose top-k expert choice the trainer's routers use:

* ``r2``: the old-log-prob pass records every router's choice per micro-batch and the update
  replays it. A parameter update that flips a near-tied top-k choice would otherwise change
  pi_theta discontinuously, and the importance ratio would measure routing noise rather than
  policy change.
* ``r3`` (rollout routing replay): the rollout engine records the experts it routed each token to
  while generating (``Sample.routed_experts``); the old-log-prob pass and the update both replay
  them, so the policy gradient is taken through the experts that produced the sampled tokens and
  the old log-probs match the engine's up to numerics, not up to routing flips.

Replay is ``REPLAY_FORWARD``: the router still computes its scores, so the gate weights stay
differentiable, but the selected experts are the given ones.

Activation recompute: a recomputed router (``model.recompute=full``, or selective with ``moe``)
runs a second time inside backward. ``RouterReplay`` keeps every target it was given in a FIFO
(``replay_backward_list``) that ``REPLAY_BACKWARD`` pops, so after each replayed forward the
routers switch to ``REPLAY_BACKWARD`` and the FIFO is left alone until the step ends. Megatron's
schedules run a chunk's backward passes in the order of its forwards (1F1B keeps up to ``pp``
micro-batches in flight), so each recompute pops its own micro-batch's routing.

Only the routers of the trainer's model chunks are driven (``RouterReplay`` also keeps a
process-wide list, which other models built in the same process would join).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

REPLAY_MODES = ("none", "r2", "r3")
UNSET = -1  # a token the engine never routed (the last response token, padding)


def replay_mode(value: object) -> str:
    """``rl.routing_replay`` as one of REPLAY_MODES (the old boolean spelling: true is r2)."""
    text = str(value).strip().lower()
    mode = {"true": "r2", "false": "none"}.get(text, text)
    if mode not in REPLAY_MODES:
        raise ValueError(f"rl.routing_replay must be one of {'|'.join(REPLAY_MODES)}, got {value!r}")
    return mode


def routers(chunk: torch.nn.Module) -> list[TopKRouter]:
    """The MoE routers of one model chunk, in layer order."""
    found = [m for m in chunk.modules() if isinstance(m, TopKRouter)]
    if any(m.router_replay is None for m in found):
        raise RuntimeError(
            "routing replay requested but the model was built without moe_enable_routing_replay"
        )
    return found


def replay_handles(chunk: torch.nn.Module) -> list[RouterReplay]:
    """The ``RouterReplay`` objects of one model chunk, in layer order."""
    return [m.router_replay for m in routers(chunk)]


def moe_ordinals(chunk: torch.nn.Module, moe_layer_freq: list[int]) -> list[int]:
    """For each router of the chunk, the index of its layer among the model's MoE layers: the
    layer axis of an engine's routing record (a pipeline chunk holds a subset of the layers)."""
    moe_layers = [i for i, f in enumerate(moe_layer_freq) if f]
    return [moe_layers.index(r.layer_number - 1) for r in routers(chunk)]


def rollout_targets(
    routes: torch.Tensor, ordinals: list[int], num_experts: int, token_slice: slice | None = None
) -> list[torch.Tensor]:
    """Per router, the [tokens, top_k] indices to replay from a micro-batch's rollout routing
    ``routes`` [tokens, moe_layers, top_k] (packed order; ``token_slice``: this rank's
    sequence-parallel part).

    Tokens the engine never routed (UNSET) influence no loss position (causal attention; padding
    is its own segment), but their experts still count towards the expert-bias load and the
    expert-parallel all-to-all. They get experts in round-robin, (t * k + j) mod E, so they load
    every expert alike instead of piling onto one expert set."""
    tokens, _, k = routes.shape
    flat = torch.arange(tokens, device=routes.device)[:, None] * k + torch.arange(k, device=routes.device)
    filler = flat % num_experts
    if token_slice is not None:
        routes, filler = routes[token_slice], filler[token_slice]
    return [torch.where(routes[:, o] < 0, filler, routes[:, o].long()).contiguous() for o in ordinals]


class RoutingReplay:
    """Drives the routers of the trainer's chunks; holds the R2 recordings per (micro-batch, chunk)."""

    def __init__(self, mode: str = "r2") -> None:
        self.mode = mode
        self.routes: dict[tuple[int, int], list[torch.Tensor]] = {}

    @staticmethod
    def record(chunk: torch.nn.Module) -> None:
        for h in replay_handles(chunk):
            h.clear_indices()
            h.set_router_replay_action(RouterReplayAction.RECORD)

    def collect(self, mb_index: int, chunk_index: int, chunk: torch.nn.Module) -> None:
        """After a recording forward: keep this micro-batch's choices."""
        routes = []
        for h in replay_handles(chunk):
            recorded = h.get_recorded_indices()
            if recorded is None:
                raise RuntimeError("routing replay: a router recorded nothing in the old-log-prob pass")
            routes.append(recorded.detach().clone())
        self.routes[(mb_index, chunk_index)] = routes

    def replay(self, mb_index: int, chunk_index: int, chunk: torch.nn.Module) -> None:
        """Before an update forward (R2): make every router use the recorded choices."""
        key = (mb_index, chunk_index)
        if key not in self.routes:
            raise KeyError(f"routing replay: no recorded routing for micro-batch {mb_index}")
        self.set_targets(chunk, self.routes[key])

    @staticmethod
    def set_targets(chunk: torch.nn.Module, targets: list[torch.Tensor]) -> None:
        """Replay ``targets`` (one [tokens, top_k] tensor per router) in the next forward; each is
        also queued for that micro-batch's recompute in backward."""
        for h, idx in zip(replay_handles(chunk), targets, strict=True):
            h.set_target_indices(idx)  # also appends to the recompute FIFO
            h.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    @staticmethod
    def after_forward(chunk: torch.nn.Module) -> None:
        """After a replayed forward: a recompute in backward pops its routing from the FIFO."""
        for h in replay_handles(chunk):
            h.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)

    @staticmethod
    def reset(chunk: torch.nn.Module) -> None:
        """Empty the targets and recompute FIFOs (between passes; a step's FIFO holds its own)."""
        for h in replay_handles(chunk):
            h.clear_indices()

    @staticmethod
    def release(chunk: torch.nn.Module) -> None:
        """Route freely again (reference pass, evaluation)."""
        for h in replay_handles(chunk):
            h.clear_indices()
            h.clear_router_replay_action()

    def clear(self) -> None:
        self.routes.clear()
