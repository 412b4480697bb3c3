"""MTP self-speculative decoding: plain greedy's tokens, and an acceptance the trained MTP block earns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.stages.stage_helpers import Run


@pytest.fixture(scope="module")
def sft_prompts(sft_run: Run, demo_data: Path):
    """The tiny SFT model (MTP trained with it) and 50 held-out chat prompts."""
    from joyai_megatron.stages.sft_eval import encode_prompts, load_checkpoint_model, read_records
    from joyai_megatron.training.distributed import shutdown
    from joyai_megatron.training.tokenizer import HFTokenizer

    tokenizer = str(demo_data / "tokenizer")
    prompts = encode_prompts(read_records(demo_data / "corpus" / "sft" / "eval.jsonl", limit=50), tokenizer)
    model, _ = load_checkpoint_model(sft_run.checkpoint_dir)
    yield model, prompts, {HFTokenizer(tokenizer).token_to_id("<|im_end|>")}
    shutdown()


def test_speculative_equals_greedy_and_mtp_is_accepted(sft_prompts) -> None:
    from joyai_megatron.stages.generate import greedy_generate
    from joyai_megatron.stages.speculative import speculative_generate

    model, prompts, stop = sft_prompts
    greedy = greedy_generate(model, prompts, 24, stop)
    for k in (1, 3):
        tokens, stats = speculative_generate(model, prompts, 24, stop, num_draft_tokens=k)
        assert tokens == greedy, k
        summary = stats.summary()
        print(f"MTP k={k}:", json.dumps(summary))
        assert stats.emitted == sum(len(t) for t in greedy)
        # measured on the demo's SFT model: 1.99 (k=1), 3.16 (k=3)
        assert summary["acceptance_length"] > 1.5, summary
        assert summary["tokens_per_target_forward"] > 1.2, summary


def test_reinitialised_mtp_block_scores_lower(sft_prompts) -> None:
    from joyai_megatron.stages.speculative import speculative_generate

    model, prompts, stop = sft_prompts
    _, trained = speculative_generate(model, prompts, 24, stop, num_draft_tokens=2)
    saved = {n: p.detach().clone() for n, p in model.mtp.named_parameters()}
    try:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.mtp.named_parameters():
                fresh = torch.randn(p.shape, generator=generator) * 0.02
                p.copy_(1 + fresh if name.endswith(("norm.weight", "layer_norm_weight")) else fresh)
        _, fresh_stats = speculative_generate(model, prompts, 24, stop, num_draft_tokens=2)
    finally:
        with torch.no_grad():
            for name, p in model.mtp.named_parameters():
                p.copy_(saved[name])
    a, b = trained.summary(), fresh_stats.summary()
    assert b["acceptance_length"] < a["acceptance_length"] - 0.3, (a, b)
    assert b["acceptance_ratio"] < a["acceptance_ratio"], (a, b)
