"""MoE routing replay through Megatron-Core's ``RouterReplay`` (``moe_enable_routing_replay``).

The old-log-prob pass records every router's top-k expert choice per micro-batch; the update's
forward replays exactly those choices (``REPLAY_FORWARD``: the router still computes its scores,
so the gate weights stay differentiable, but the selected experts are the recorded ones). Without
it, a parameter update that flips a near-tied top-k choice changes pi_theta discontinuously and
the importance ratio measures routing noise rather than policy change (the "R2" mode of verl).
Replaying the rollout engine's own routing ("R3") needs the engine to return routed experts and is
not done here (docs/rl.md).

Only the routers of the trainer's model chunks are driven (``RouterReplay`` also keeps a
process-wide list, which other models built in the same process would join).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplayAction


def replay_handles(chunk: torch.nn.Module) -> list:
    """The ``RouterReplay`` objects of one model chunk, in layer order."""
    handles = [m.router_replay for m in chunk.modules() if isinstance(m, TopKRouter)]
    if any(h is None for h in handles):
        raise RuntimeError(
            "routing replay requested but the model was built without moe_enable_routing_replay"
        )
    return handles


class RoutingReplay:
    """Recorded top-k indices per (micro-batch, chunk); record, replay, clear."""

    def __init__(self) -> None:
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
        """Before an update forward: make every router use the recorded choices."""
        key = (mb_index, chunk_index)
        if key not in self.routes:
            raise KeyError(f"routing replay: no recorded routing for micro-batch {mb_index}")
        for h, idx in zip(replay_handles(chunk), self.routes[key], strict=True):
            h.clear_indices()
            h.set_target_indices(idx)
            h.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    @staticmethod
    def release(chunk: torch.nn.Module) -> None:
        """Route freely again (reference pass, evaluation)."""
        for h in replay_handles(chunk):
            h.clear_indices()
            h.clear_router_replay_action()

    def clear(self) -> None:
        self.routes.clear()
