"""One training step's losses and gradients under a layout: ``python -m tests.parallel.cp_worker RECIPE OUT [k=v ...]``
(one process) or under ``torchrun --nproc-per-node 2`` (``parallel.cp=2``), as the module
``tests.parallel.cp_worker`` from the repository root.

The trainer is the real one (recipe -> layout -> model -> checkpoint.load); the micro-batches are
fixed here, identical on every rank and in every layout, so the two layouts compute the same
global batch from the same weights.  For each case (whole causal rows through the pretraining
stage; packed documents through the pretraining stage with position resets; packed conversations
with a prompt-masked loss through the SFT stage) it runs Megatron-Core's forward-backward
schedule and ``finalize_model_grads`` (no optimizer step) and records the LM and MTP losses as the
trainer logs them, every parameter's finalized gradient and the routers' expert bias.  Finally it
counts the bytes autograd saves for one micro-batch's forward (the activation memory ``plan``
estimates).  Rank 0 writes everything to OUT with ``torch.save``.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.distributed as dist

from tests.joyai_helpers import saved_activation_bytes

ROWS, LENGTH = 2, 128
# Documents per row (each row sums to LENGTH); none is a multiple of 4, so CP=2 pads every one.
DOCUMENTS = [[37, 50, 41], [19, 6, 103]]
MICROBATCHES = 2


def _batches(vocab: int, case: str) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(MICROBATCHES):
        # Mock-data-like documents (token t+1 follows t) from random starts, so a trained model's
        # per-token losses differ along the sequence.
        starts = torch.randint(2, vocab, (ROWS, 1), generator=gen)
        tokens = (starts + torch.arange(LENGTH + 1)) % (vocab - 2) + 2
        positions = torch.cat([torch.cat([torch.arange(n) for n in row]) for row in DOCUMENTS]).reshape(
            ROWS, LENGTH
        )
        loss_mask = torch.ones(ROWS, LENGTH)
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": positions}
        if case == "sft":
            # A "prompt" (the first third of each conversation) carries no loss.
            prompt = torch.cat([torch.full((n,), n // 3) for row in DOCUMENTS for n in row]).reshape(
                ROWS, LENGTH
            )
            loss_mask = (positions >= prompt).float()
            bounds, offset = [0], 0
            for row in DOCUMENTS:
                cuts = torch.tensor(row).cumsum(0)
                bounds += (cuts + offset).tolist()
                offset += LENGTH
            batch["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
        batch["loss_mask"] = loss_mask
        batches.append(batch)
    return batches


def _grads(trainer) -> dict[str, torch.Tensor]:
    from joyai_megatron.training.checkpoint import unwrap

    return {
        name: p.main_grad.detach().to("cpu", torch.float32, copy=True)
        for name, p in unwrap(trainer.model[0]).named_parameters()
        if getattr(p, "main_grad", None) is not None
    }


def _expert_bias(trainer) -> torch.Tensor:
    return torch.stack(
        [r.expert_bias.detach().to("cpu", torch.float32, copy=True) for r in trainer._routers()]
    )


def _saved_bytes(trainer, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward during one micro-batch's forward."""
    from joyai_megatron.compat import cuda_device_as_cpu
    from joyai_megatron.training.checkpoint import unwrap

    redirect = contextlib.nullcontext() if torch.cuda.is_available() else cuda_device_as_cpu()
    with redirect, saved_activation_bytes(unwrap(trainer.model[0])) as saved:
        trainer.stage.forward_step(iter([batch]), trainer.model[0])
    return saved[0]


def main(argv: list[str]) -> None:
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from joyai_megatron.config.recipe import load_recipe
    from joyai_megatron.stages.pretrain import PretrainStage
    from joyai_megatron.stages.sft import SFTStage
    from joyai_megatron.training.distributed import shutdown
    from joyai_megatron.training.trainer import Trainer

    recipe_path, out, *overrides = argv
    recipe = load_recipe(recipe_path, overrides)
    trainer = Trainer(recipe, PretrainStage)
    sft = SFTStage(recipe)
    pretrain_step = trainer.stage.forward_step
    result: dict = {"cp": trainer.layout.cp}
    for case in ("rows", "documents", "sft"):
        batches = _batches(trainer.arch.vocab_size, case)
        trainer.stage.recipe.data.reset_position_ids = case != "rows"
        trainer.stage.forward_step = sft.forward_step if case == "sft" else pretrain_step
        for chunk in trainer.model:
            chunk.zero_grad_buffer()
        losses = trainer.run_microbatches(batches, forward_only=False)
        values = trainer._reduce_losses(losses)
        values["mtp_loss"] = trainer._mtp_loss(len(batches))
        result[case] = {"losses": values, "grads": _grads(trainer), "expert_bias": _expert_bias(trainer)}
    trainer.stage.forward_step = pretrain_step
    trainer.stage.recipe.data.reset_position_ids = False
    result["saved_bytes"] = _saved_bytes(trainer, _batches(trainer.arch.vocab_size, "rows")[0])
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    if dist.get_rank() == 0:
        torch.save(result, out)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
