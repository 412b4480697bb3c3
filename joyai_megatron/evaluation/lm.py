"""An ``lm-eval`` model over our Megatron GPTModel in this process (no Hugging Face export needed).

``lm-eval`` asks three things of a model: log-likelihoods of continuations (multiple choice),
rolling log-likelihoods of whole texts (perplexity) and generations up to stop strings.  Each is a
packed THD forward of the training model, as SFT evaluation decodes (:mod:`stages.generate`), so
every stage's checkpoint is scored by the code that trained it, on CPU or one GPU.  The tokenizer
and chat template are the checkpoint recipe's (``data.tokenizer``), loaded by transformers, so
lm-eval's own ``--apply_chat_template`` path renders prompts; ``enable_thinking`` is passed to the
template (JoyAI's thinking and non-thinking modes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from joyai_megatron.stages.generate import greedy_generate, pack_groups, pack_sequences
from joyai_megatron.stages.logprobs import mtp_skipped

END_OF_TURN = "<|im_end|>"


def _label_scores(
    *,
    hidden_states: torch.Tensor,
    output_layer: Any,
    output_weight: torch.Tensor | None,
    labels: torch.Tensor,
    scale_logits: Any,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTModel ``output_processor``: ``log p(label)`` and whether the label is the argmax, per token."""
    logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=True)
    logp = scale_logits(logits)[:, 0].float().log_softmax(-1)  # [T, vocab]
    target = labels[0].to(logp.device)
    return logp.gather(-1, target[:, None])[:, 0], logp.argmax(-1) == target


class MegatronLM(TemplateLM):
    """``lm_eval.api.model.LM`` for a loaded GPTModel; ``tokenizer`` is a transformers tokenizer."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_length: int,
        enable_thinking: bool = False,
        max_pack_tokens: int = 4096,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.enable_thinking = enable_thinking
        self.max_pack_tokens = max_pack_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.stop_ids = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids([END_OF_TURN])} - {None}

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=self.enable_thinking,
        )

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p, all greedy) of each continuation after its context (left-truncated to fit)."""
        rows = [(context + continuation)[-(self.max_length + 1) :] for context, continuation in pairs]
        results: list[tuple[float, bool]] = []
        for group in pack_groups([len(r) - 1 for r in rows], self.max_pack_tokens):
            inputs = [rows[i][:-1] for i in group]
            packed = pack_sequences(inputs, next(self.model.parameters()).device)
            labels = torch.tensor([t for i in group for t in rows[i][1:]], device=packed.tokens.device)[None]
            with mtp_skipped(self.model):
                logp, greedy = self.model(
                    packed.tokens,
                    packed.positions,
                    None,
                    labels=labels,
                    packed_seq_params=packed.params,
                    output_processor=_label_scores,
                )
            for start, i in zip(packed.starts, group, strict=True):
                # a continuation longer than the window is scored inside it only
                n = min(len(pairs[i][1]), len(rows[i]) - 1)
                end = start + len(rows[i]) - 1
                results.append((float(logp[end - n : end].sum()), bool(greedy[end - n : end].all())))
        return results

    def _loglikelihood_tokens(
        self, requests: list, disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        return self.score([(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of ``max_length`` (lm-eval's own windowing)."""
        out = []
        for request in requests:
            (text,) = request.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            out.append(sum(logp for logp, _ in self.score(windows)))
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with ``do_sample`` and a temperature, sampled) text up to the first stop string."""
        by_kwargs: dict[str, list[int]] = defaultdict(list)
        for k, request in enumerate(requests):
            by_kwargs[repr(sorted(request.args[1].items()))].append(k)
        out = [""] * len(requests)
        for indices in by_kwargs.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompts = [self.tok_encode(requests[k].args[0])[-self.max_length :] for k in indices]
            generated = greedy_generate(
                self.model,
                prompts,
                int(kwargs.get("max_gen_toks", 256)),
                self.stop_ids,
                self.max_pack_tokens,
                temperature=temperature,
                generator=self.generator,
            )
            for k, ids in zip(indices, generated, strict=True):
                text = self.tokenizer.decode([t for t in ids if t not in self.stop_ids])
                for stop in until:
                    text = text.split(stop, 1)[0]
                out[k] = text
        return out
