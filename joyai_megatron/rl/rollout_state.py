"""RL state that does not fit the trainer's JSON: mid-rollout tensors and the in-flight rollout.

A checkpoint taken between two mini-batches of one rollout (``rl.steps_per_rollout`` > 1), or in
async mode (the next rollout is already generated), must carry those tensors to resume exactly.
Each rank writes its own file ``<checkpoint.dir>/rl_state/iter_XXXXXXX/rank_NNNNN.pt`` just before
the trainer's checkpoint; the trainer's JSON names the directory. Resuming from it needs the same
world size (the files are per rank); a different layout raises instead of guessing.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from joyai_megatron.config.schema import CheckpointCfg
from joyai_megatron.rl.replay import RoutingReplay
from joyai_megatron.rl.rollout import SamplingParams
from joyai_megatron.rl.rollouts import RolloutManager


def _rank_file(directory: Path) -> Path:
    return directory / f"rank_{dist.get_rank():05d}.pt"


@dataclass
class RolloutProgress:
    """Where the RL stage is inside its current rollout: what a mid-rollout checkpoint carries."""

    rollout_index: int = -1  # the rollout the steps below come from
    steps: list[list[dict[str, torch.Tensor]]] = field(default_factory=list)  # micro-batches per step
    # Per micro-batch: the policy's log-probs before the rollout's first update ("old") and the
    # reference policy's ("ref", with a KL term).
    store: dict[str, dict[int, torch.Tensor]] = field(default_factory=lambda: {"old": {}, "ref": {}})
    empty_steps: set[int] = field(default_factory=set)  # steps of the rollout with no trajectory


def save_side_state(
    progress: RolloutProgress,
    replay: RoutingReplay | None,
    manager: RolloutManager,
    checkpoint: CheckpointCfg,
    iteration: int,
) -> Path:
    directory = Path(checkpoint.dir) / "rl_state" / f"iter_{iteration:07d}"
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "world_size": dist.get_world_size(),
        "rollout_index": progress.rollout_index,
        "steps": progress.steps,
        "store": {k: {mb: t.cpu() for mb, t in v.items()} for k, v in progress.store.items()},
        "routes": replay.routes if replay is not None else {},
        "empty_steps": sorted(progress.empty_steps),
        "pending": manager.pending_state(),
    }
    torch.save(state, _rank_file(directory))
    dist.barrier()
    if dist.get_rank() == 0:  # keep the side states of the checkpoints the trainer keeps
        keep = max(checkpoint.keep_last, 0) + 1
        old = sorted(p for p in directory.parent.iterdir() if p.name.startswith("iter_"))
        for stale in old[:-keep] if keep > 1 else []:
            shutil.rmtree(stale, ignore_errors=True)
    return directory


def load_side_state(
    progress: RolloutProgress, replay: RoutingReplay | None, manager: RolloutManager, directory: str
) -> None:
    path = _rank_file(Path(directory))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the RL checkpoint's mid-rollout state is missing (resume needs the same world size)"
        )
    state = torch.load(path, weights_only=False)
    if state["world_size"] != dist.get_world_size():
        raise ValueError(
            f"{directory} was saved by {state['world_size']} ranks; resume with the same world size"
        )
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    progress.rollout_index = state["rollout_index"]
    progress.steps = state["steps"]
    progress.store = {
        k: {mb: t.to(device) if device else t for mb, t in v.items()} for k, v in state["store"].items()
    }
    if replay is not None:
        replay.routes = state["routes"]
    progress.empty_steps = set(state["empty_steps"])
    manager.restore(state["pending"])


def measure_pass_rates(manager: RolloutManager, model: list, iteration: int, batch: int = 64) -> list[float]:
    """p_i over ``rl.pass_rate_rollouts`` samples of the starting policy, generated here (the report
    uses 10; ``curriculum.estimate_pass_rates`` turns already-scored rewards into rates),
    split over data-parallel ranks and gathered everywhere."""
    rl = manager.rl
    manager.sync(model, iteration)
    prompts = manager.prompts
    per_rank = -(-len(prompts) // manager.dp_size)
    start = manager.dp_rank * per_rank
    mine = list(range(start, min(start + per_rank, len(prompts))))
    params = SamplingParams(
        rl.max_new_tokens, rl.temperature, rl.top_p, manager.stop_ids, manager.tokenizer.pad
    )
    rates: dict[int, float] = {}
    if manager.is_generator:
        for b in range(0, len(mine), batch):
            chunk = mine[b : b + batch]
            seed = int(np.random.SeedSequence([manager.recipe.train.seed, 1 << 20, b]).generate_state(1)[0])
            gens = manager.engine.generate(
                [prompts[i].token_ids for i in chunk], rl.pass_rate_rollouts, params, seed
            )
            for i, samples in zip(chunk, gens, strict=True):
                verify = manager.reward_fn(prompts[i])
                scores = [verify(manager.decode(s.token_ids), prompts[i].reference) for s in samples]
                rates[i] = float(np.mean([score >= 1.0 for score in scores]))
    gathered: list[dict[int, float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rates)
    merged = {k: v for part in gathered for k, v in (part or {}).items()}
    return [merged[i] for i in range(len(prompts))]
