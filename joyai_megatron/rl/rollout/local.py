"""The ``local`` rollout engine: an in-process ``transformers.DeepseekV3ForCausalLM``.

Used on CPU (demo, tests) and as the reference the GPU engines are checked against. Weights come
from the trainer through the same HF-checkpoint-named stream the vLLM/SGLang backends receive; this
engine only adapts it to transformers' in-memory layout, which fuses each MoE layer's experts into
``experts.gate_up_proj`` [E, 2I, H] (gate rows first) and ``experts.down_proj`` [E, H, I].

Decoding is our own loop over the model's KV cache rather than ``generate``: sampling then draws
from a private ``torch.Generator`` (so rollouts are a function of the seed, which makes resume
exact, and a background thread never touches the global RNG), and the log-prob of each sampled
token is taken from the very distribution it was drawn from.

With ``record_routing`` (rollout routing replay, R3) forward hooks on every MoE gate keep the
top-k expert indices of each forward call: the left-padded prompt block, then one column per
decoding step (the token sampled at the step before). Row i's prompt of length p and response of
length r then occupy the contiguous columns [W - p, W + r - 1) of the W-wide prompt block plus the
decoding columns: exactly the p + r - 1 input tokens of the trainer's row whose outputs predict a
response token (the last response token is never fed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from joyai_megatron.convert.hf_config import arch_to_hf_config
from joyai_megatron.model.presets import ModelArch
from joyai_megatron.rl.rollout.base import Request, RolloutEngine, Sample, SamplingParams

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def build_hf_model(arch: ModelArch, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised DeepseekV3ForCausalLM of ``arch`` without the MTP layer (transformers
    does not implement it); the trainer's weights are synced in afterwards."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(**arch_to_hf_config(arch, include_mtp=False, dtype="float32"))
    # The per-expert loop: transformers' default grouped_mm kernel on CPU read uninitialised memory
    # in our tests (NaN or slightly wrong logits depending on what the allocator handed back).
    config._attn_implementation = "sdpa"
    config._experts_implementation = "eager"
    model = DeepseekV3ForCausalLM(config).to(dtype)
    return model.eval().requires_grad_(False)


class HFWeightWriter:
    """Writes HF-checkpoint-named tensors into a transformers model's (fused-expert) parameters."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.targets = dict(model.state_dict(keep_vars=False))
        self.intermediate = model.config.moe_intermediate_size
        self._required: set[str] | None = None

    def _slot(self, name: str) -> tuple[str, torch.Tensor]:
        m = _EXPERT.match(name)
        if not m:
            if name not in self.targets:
                raise KeyError(f"rollout weight sync: {name} has no counterpart in the HF model")
            return name, self.targets[name]
        prefix, expert, kind = m.group(1), int(m.group(2)), m.group(3)
        if kind == "down_proj":
            key = f"{prefix}.down_proj"
            return f"{key}[{expert}]", self.targets[key][expert]
        key, width = f"{prefix}.gate_up_proj", self.intermediate
        rows = slice(0, width) if kind == "gate_proj" else slice(width, 2 * width)
        return f"{key}[{expert},{kind}]", self.targets[key][expert, rows]

    @torch.no_grad()
    def write(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy every tensor in; returns the set of target slots written (for coverage checks)."""
        written: set[str] = set()
        for name, tensor in named_tensors:
            slot, target = self._slot(name)
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"rollout weight sync: {name} has shape {tuple(tensor.shape)}, "
                    f"the HF model expects {tuple(target.shape)}"
                )
            target.copy_(tensor)
            written.add(slot)
        return written

    def write_all(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """A full weight sync: every tensor in, and every slot of the model written (a sync that
        left some unwritten would sample from stale weights); returns how many tensors came."""
        if self._required is None:
            self._required = self.expected_slots()
        written = self.write(named_tensors)
        missing = self._required - written
        if missing:
            raise ValueError(
                f"rollout weight sync left {len(missing)} HF tensors unwritten, e.g. {sorted(missing)[0]}"
            )
        return len(written)

    def expected_slots(self) -> set[str]:
        """Every slot a full sync must write (fused experts counted per expert and half)."""
        slots: set[str] = set()
        persistent = {n for n, _ in self.model.named_parameters()}
        persistent |= {n for n in self.targets if n.endswith("e_score_correction_bias")}
        for name in persistent:
            if name.endswith("experts.down_proj"):
                slots |= {f"{name}[{e}]" for e in range(self.targets[name].shape[0])}
            elif name.endswith("experts.gate_up_proj"):
                experts = range(self.targets[name].shape[0])
                slots |= {f"{name}[{e},{k}]" for e in experts for k in ("gate_proj", "up_proj")}
            else:
                slots.add(name)
        return slots


class RoutingRecorder:
    """Forward hooks on the MoE gates of a transformers DeepseekV3 model (layer order): each
    forward call's top-k expert indices, as [batch, tokens, top_k] per layer."""

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

        self.gates = [m for m in model.modules() if isinstance(m, DeepseekV3TopkRouter)]
        if any(g.num_experts > torch.iinfo(torch.int16).max for g in self.gates):
            raise ValueError("routing record: more experts than int16 indices hold")
        self.calls: list[list[torch.Tensor]] = [[] for _ in self.gates]
        self.handles: list = []

    def __enter__(self) -> RoutingRecorder:
        for layer, gate in enumerate(self.gates):
            self.handles.append(gate.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, layer: int):
        def keep(module: torch.nn.Module, args: tuple, output: tuple) -> None:
            del module
            batch, tokens = args[0].shape[:2]
            self.calls[layer].append(output[2].view(batch, tokens, -1).to(torch.int16))

        return keep

    def columns(self) -> torch.Tensor:
        """[batch, columns fed, moe_layers, top_k] on the host."""
        return torch.stack([torch.cat(calls, dim=1) for calls in self.calls], dim=2).cpu()


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest set of tokens whose mass reaches top_p (renormalised)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


class LocalHFEngine(RolloutEngine):
    """Batched sampling with a KV cache on a transformers DeepseekV3 model held in this process."""

    name = "local"
    records_routing = True

    def __init__(
        self,
        arch: ModelArch,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        model: torch.nn.Module | None = None,
    ) -> None:
        self.model = (model if model is not None else build_hf_model(arch, dtype)).to(device)
        self.device = torch.device(device)
        self.writer = HFWeightWriter(self.model)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        return self.writer.write_all(named_tensors)

    @torch.no_grad()
    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits [b, s, V] (weight-sync checks compare these with Megatron's)."""
        return self.model(input_ids=input_ids.to(self.device)).logits.float()

    def _sample(self, request: Request) -> list[list[Sample]]:
        r = request
        if not r.record_routing:
            return self._generate(r.prompts, r.n, r.params, r.seed, None)
        with RoutingRecorder(self.model) as recorder:
            return self._generate(r.prompts, r.n, r.params, r.seed, recorder)

    @torch.no_grad()
    def _generate(
        self,
        prompts: list[list[int]],
        n: int,
        params: SamplingParams,
        seed: int,
        recorder: RoutingRecorder | None,
    ) -> list[list[Sample]]:
        from transformers import DynamicCache

        rows = [p for p in prompts for _ in range(n)]
        width = max(len(p) for p in rows)
        ids = torch.full((len(rows), width), params.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(rows):  # left padding keeps every row's next position at the end
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        stop = torch.tensor(params.stop_token_ids or (-1,), device=self.device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        tokens, logprobs = [], []
        cache = DynamicCache(config=self.model.config)
        step_ids, step_pos = ids, position
        for _ in range(params.max_new_tokens):
            out = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_pos,
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1].float()
            if params.temperature == 0:
                next_ids = logits.argmax(-1)
                logp = torch.log_softmax(logits, -1)
            else:
                logp = torch.log_softmax(logits / params.temperature, -1)
                probs = _top_p_filter(logp.exp(), params.top_p)
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            next_ids = torch.where(done, torch.full_like(next_ids, params.pad_token_id), next_ids)
            tokens.append(next_ids)
            logprobs.append(logp.gather(-1, next_ids[:, None]).squeeze(-1))
            finished_now = torch.isin(next_ids, stop) & ~done
            done = done | finished_now
            if bool(done.all()):
                break
            step_ids, step_pos = next_ids[:, None], step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        routes = recorder.columns() if recorder is not None else None
        return _split(
            rows, torch.stack(tokens, 1).cpu(), torch.stack(logprobs, 1).cpu(), stop.cpu(), n, routes
        )


def _split(
    rows: list[list[int]],
    tokens: torch.Tensor,
    logprobs: torch.Tensor,
    stop: torch.Tensor,
    n: int,
    routes: torch.Tensor | None = None,
) -> list[list[Sample]]:
    """Cut each row after its first stop token and group rows back per prompt; with ``routes``
    [rows, columns, moe_layers, top_k] (left-padded prompt block first), each sample's routing."""
    samples = []
    width = max(len(p) for p in rows)
    for i, prompt in enumerate(rows):
        hits = torch.nonzero(torch.isin(tokens[i], stop)).flatten()
        length = int(hits[0]) + 1 if hits.numel() else tokens.shape[1]
        sample = Sample(
            tokens[i, :length].tolist(), logprobs[i, :length].tolist(), stopped=bool(hits.numel())
        )
        if routes is not None:  # a copy: a view would pickle (and save) the whole batch's storage
            sample.routed_experts = routes[i, width - len(prompt) : width + length - 1].clone()
        samples.append(sample)
    return [samples[k * n : (k + 1) * n] for k in range(len(rows) // n)]
