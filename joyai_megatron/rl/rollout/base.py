"""The one interface every rollout engine implements: take weights, generate with log-probs.

Weights arrive as ``(name, tensor)`` pairs in the Hugging Face *checkpoint* layout of
DeepseekV3 (per-expert ``mlp.experts.E.gate_proj.weight`` ...), produced from the live Megatron
model by :mod:`joyai_megatron.rl.rollout.weight_sync` through the conversion table.  That is the
format vLLM's and SGLang's ``load_weights`` consume, so every backend shares one sync path; an
engine with a different in-memory layout (transformers fuses experts) adapts on its side.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What a rollout samples with. ``temperature == 0`` is greedy decoding (evaluation)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"rl.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"rl.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rl.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Sample:
    """One generated response: its token ids (stop token included) and the engine's log-probs.

    ``logprobs[i]`` is log pi(token_ids[i]) under the temperature-scaled distribution the engine
    sampled from (before top-p truncation), i.e. the quantity the trainer recomputes.
    """

    token_ids: list[int]
    logprobs: list[float]
    stopped: bool  # ended on a stop token (False: cut at max_new_tokens)
    text: str = ""
    reward: float = 0.0
    meta: dict = field(default_factory=dict)
    # With ``record_routing``: int16 [len(prompt) + len(token_ids) - 1, moe_layers, top_k], the
    # experts every MoE layer routed each input token to (prompt, then the response tokens fed back
    # while decoding; the last response token is never fed). Rollout routing replay (R3) input.
    routed_experts: torch.Tensor | None = None


@dataclass(frozen=True)
class Request:
    """One ``generate`` call, as the engines receive it."""

    prompts: list[list[int]]
    n: int
    params: SamplingParams
    seed: int
    record_routing: bool = False


class RolloutEngine(ABC):
    """A generator whose weights the trainer replaces after every optimizer step."""

    name = "engine"
    records_routing = False  # can fill Sample.routed_experts (``generate(record_routing=True)``)

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load HF-checkpoint-named tensors; returns how many tensors were received."""

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        params: SamplingParams,
        seed: int,
        *,
        record_routing: bool = False,
    ) -> list[list[Sample]]:
        """``n`` samples for each prompt (token ids), as ``[prompt][sample]``.

        Sampling must be a function of (weights, prompts, params, seed) so a resumed run redraws
        the rollouts the interrupted one drew. ``record_routing`` fills ``Sample.routed_experts``
        (engines with ``records_routing`` only).
        """
        if record_routing and not self.records_routing:
            raise ValueError(
                f"the {self.name} rollout engine does not return the experts it routed tokens to "
                "(needed by rl.routing_replay=r3); use rl.routing_replay=r2"
            )
        if not prompts:
            return []
        return self._sample(Request(prompts, n, params, seed, record_routing))

    @abstractmethod
    def _sample(self, request: Request) -> list[list[Sample]]:
        """The engine's sampling of a non-empty request (routing recorded only if it can)."""

    def shutdown(self) -> None:  # noqa: B027 - engines without resources need nothing
        """Release the engine's resources (processes, GPU memory)."""
