"""The GPU fast paths the throughput benchmark relies on compute the same function as before.

* ``GroupedMMExperts`` (``model.moe_grouped_gemm=true`` on the local backend) against a per-expert
  SwiGLU loop written here, and the whole tiny model against the ``SequentialMLP`` build with the
  same weights (loss and every gradient).
* ``SDPACoreAttention``'s THD paths (equal segments: causal SDPA per row; unequal: one call per
  segment on the host, one block-masked call on GPUs) against softmax attention computed here in
  float64.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from joyai_megatron.config.schema import ModelCfg, ParallelCfg, PrecisionCfg
from joyai_megatron.model.config import build_transformer_config
from joyai_megatron.model.presets import get_preset
from joyai_megatron.stages.pretrain import packed_token_losses


def tiny_config(**model: object):
    return build_transformer_config(get_preset("tiny"), ModelCfg(**model), ParallelCfg(), PrecisionCfg())


@pytest.fixture(scope="module")
def one_rank():
    """A 1-rank gloo group for building Megatron modules in this process; env restored after."""
    from megatron.core import parallel_state

    from joyai_megatron.training.distributed import init_distributed, set_seed, shutdown

    saved = dict(os.environ)
    init_distributed()
    parallel_state.initialize_model_parallel()
    set_seed(1)
    yield
    shutdown()
    os.environ.clear()
    os.environ.update(saved)


def build_tiny(grouped: bool, **model: object) -> torch.nn.Module:
    from joyai_megatron.model.build import build_joyai_model

    config = tiny_config(moe_grouped_gemm=grouped, mtp_enabled=True, **model)
    return build_joyai_model(config, get_preset("tiny"), "local", max_sequence_length=64)


def two_document_batch():
    from joyai_megatron.training.packing import pack_batch

    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, 8192, (2, 32), generator=gen)
    positions = torch.cat([torch.arange(20), torch.arange(12)]).repeat(2, 1)  # two documents per row
    return pack_batch(tokens, tokens.roll(-1, dims=1), torch.ones(2, 32), positions)


def test_grouped_experts_match_a_per_expert_loop(one_rank) -> None:
    from joyai_megatron.model.experts import GroupedMMExperts

    model = build_tiny(grouped=True)
    experts = [m for m in model.modules() if isinstance(m, GroupedMMExperts)]
    assert len(experts) == 2, "both MoE layers of tiny should use the grouped experts"
    layer = experts[0]
    counts = torch.tensor([5, 0, 3, 9, 1, 0, 6, 8])  # includes experts that receive no token
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(int(counts.sum()), 64, generator=gen, requires_grad=True)
    probs = torch.rand(int(counts.sum()), generator=gen)
    out, bias = layer(x, counts, probs)
    assert bias is None

    expected, start = [], 0
    for e, n in enumerate(counts.tolist()):
        w1 = layer.local_experts[e].linear_fc1.weight.detach().double()
        w2 = layer.local_experts[e].linear_fc2.weight.detach().double()
        xe = x.detach()[start : start + n].double()
        gate, up = (xe @ w1.T).chunk(2, dim=-1)
        expected.append((F.silu(gate) * up * probs[start : start + n, None].double()) @ w2.T)
        start += n
    torch.testing.assert_close(out.double(), torch.cat(expected), rtol=1e-5, atol=1e-6)

    out.sum().backward()
    assert layer.local_experts[1].linear_fc1.weight.grad.abs().max() == 0  # no tokens, no gradient
    assert layer.local_experts[3].linear_fc1.weight.grad.abs().max() > 0


def test_grouped_model_equals_sequential_model(one_rank) -> None:
    from megatron.core.transformer.moe.experts import SequentialMLP

    from joyai_megatron.model.experts import GroupedMMExperts

    sequential, grouped = build_tiny(grouped=False), build_tiny(grouped=True)
    assert not any(isinstance(m, GroupedMMExperts) for m in sequential.modules())
    assert sum(type(m) is SequentialMLP for m in sequential.modules()) == 2
    assert sequential.state_dict().keys() == grouped.state_dict().keys()  # same checkpoint layout
    grouped.load_state_dict(sequential.state_dict())

    packed = two_document_batch()
    losses = []
    for model in (sequential, grouped):
        losses.append(_forward_backward(model, packed))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-5)
    grads = dict(grouped.named_parameters())
    for name, p in sequential.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def reference_attention(q, k, v, cu_seqlens, scale):
    """Softmax attention in float64, causal inside each segment of a [t, h, d] packed sequence."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        s = torch.einsum("ihd,jhd->hij", q[start:end], k[start:end]) * scale
        causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        p = s.masked_fill(~causal, float("-inf")).softmax(-1)
        out[start:end] = torch.einsum("hij,jhd->ihd", p, v[start:end])
    return out


@pytest.mark.parametrize("segment_loop", [True, False], ids=["segment-loop", "block-mask"])
@pytest.mark.parametrize("lengths", [[16, 16, 16], [48], [10, 22, 16]])
def test_sdpa_core_attention_thd_paths(
    lengths: list[int], segment_loop: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from joyai_megatron.model.attention import SDPACoreAttention, _equal_segments

    config = tiny_config(qk_clip=True)
    attn = SDPACoreAttention(config, 1, AttnMaskType.causal, "self", k_channels=24, v_channels=16)
    monkeypatch.setattr(attn, "segment_loop_devices", ("cpu",) if segment_loop else ())
    calls = []
    monkeypatch.setattr(
        attn, "_attend_per_segment", lambda *a: calls.append(1) or type(attn)._attend_per_segment(attn, *a)
    )
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max(lengths),
        max_seqlen_kv=max(lengths),
    )
    total = sum(lengths)
    assert _equal_segments(params, total) == (len(lengths) if len(set(lengths)) == 1 else 0)
    gen = torch.Generator().manual_seed(len(lengths))
    q, k = (torch.randn(total, 4, 24, generator=gen) for _ in range(2))
    v = torch.randn(total, 4, 16, generator=gen)
    out = attn(q, k, v, None, packed_seq_params=params)
    assert out.shape == (total, 4, 16)
    assert bool(calls) == (segment_loop and len(set(lengths)) > 1)  # equal segments: one batched call
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, cu, 24**-0.5), rtol=1e-5, atol=1e-5)
    # qk-clip reads the largest allowed logit per head, on either path
    logits = torch.einsum("ihd,jhd->hij", q.double(), k.double()) * 24**-0.5
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        allowed[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    expected_max = logits.masked_fill(~allowed, float("-inf")).amax(dim=(1, 2))
    torch.testing.assert_close(attn.current_max_attn_logits.double(), expected_max, rtol=1e-5, atol=1e-5)


def _muon_pair(precision: str, coefficient_type: str = "quintic"):
    """The same three-shape parameter set under TensorParallelMuon and BatchedMuon."""
    from megatron.core.optimizer.emerging_optimizers import TensorParallelMuon

    from joyai_megatron.optim.muon import BatchedMuon

    gen = torch.Generator().manual_seed(3)
    shapes = [(24, 16)] * 5 + [(16, 40)] * 3 + [(8, 8)]
    base = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    kwargs = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, fp32_matmul_prec=precision,
                  coefficient_type=coefficient_type, num_ns_steps=5, scale_mode="spectral",
                  extra_scale_factor=0.2, tp_mode="blockwise")  # fmt: skip
    runs = []
    for cls in (TensorParallelMuon, BatchedMuon):
        params = [torch.nn.Parameter(b.clone()) for b in base]
        opt = cls(params, **kwargs)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        runs.append((params, opt))
    return base, grads, runs


def test_batched_muon_matches_per_matrix_muon() -> None:
    _, _, [(ref, ref_opt), (got, got_opt)] = _muon_pair("highest")
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(ref, got, strict=True):  # same state layout: checkpoints interchange
        torch.testing.assert_close(got_opt.state[b]["momentum_buffer"], ref_opt.state[a]["momentum_buffer"])
    _, _, [(ref, _), (got, _)] = _muon_pair("medium")  # bf16 Newton-Schulz, as in training
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3)


def test_batched_muon_against_the_update_written_out() -> None:
    """Decoupled weight decay, momentum with Nesterov, 5 Newton-Schulz steps (a, b, c) on the
    Frobenius-normalised matrix (transposed when tall), spectral scale sqrt(max(m, n)) * 0.2."""
    base, grads, [_, (got, _)] = _muon_pair("highest", coefficient_type="simple")
    a, b, c = 3.4445, -4.7750, 2.0315
    for i, p0 in enumerate(base):
        p, buf = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64)
        for step_grads in grads:
            g = step_grads[i].double()
            p = p - 0.05 * 0.1 * p
            buf = 0.9 * buf + 0.1 * g
            m = g + 0.9 * (buf - g)
            x = m.T if m.shape[0] > m.shape[1] else m
            x = x / x.norm()
            for _ in range(5):
                gram = x @ x.T
                x = a * x + (b * gram + c * gram @ gram) @ x
            x = x.T if m.shape[0] > m.shape[1] else x
            p = p - 0.05 * x * max(m.shape) ** 0.5 * 0.2
        torch.testing.assert_close(got[i].double(), p, rtol=1e-4, atol=1e-5)


def test_foreach_multi_tensor_ops_match_their_definitions() -> None:
    from megatron.core.optimizer import clip_grads

    from joyai_megatron.compat.multi_tensor import (
        apply_multi_tensor_fallbacks,
        foreach_l2_norm,
        foreach_scale,
    )

    gen = torch.Generator().manual_seed(4)
    tensors = [torch.randn(n, generator=gen) for n in (3, 17, 256)]
    norm, _ = foreach_l2_norm(0, None, [tensors], False)
    assert norm.shape == (1,)
    torch.testing.assert_close(norm[0].double(), torch.cat(tensors).double().norm(), rtol=1e-6, atol=0)
    expected = [t * 0.5 for t in tensors]
    foreach_scale(0, None, [tensors, tensors], 0.5)  # in place, as gradient clipping calls it
    for t, e in zip(tensors, expected, strict=True):
        torch.testing.assert_close(t, e)
    low = [torch.empty(t.shape, dtype=torch.bfloat16) for t in tensors]
    foreach_scale(0, None, [tensors, low], 1.0)  # fp32 main params -> bf16 model params
    for t, lo in zip(tensors, low, strict=True):
        torch.testing.assert_close(lo, t.bfloat16())
    apply_multi_tensor_fallbacks()  # this environment has neither TE nor Apex
    assert clip_grads.l2_norm_impl is foreach_l2_norm and clip_grads.multi_tensor_scale_impl is foreach_scale


def test_fused_swiglu_model_equals_unfused(one_rank, monkeypatch) -> None:
    """``model.bias_activation_fusion``: Megatron-Core's fused SwiGLU in the dense MLP, the shared
    expert and MTP, and with the routing weight in the grouped experts, computes what the unfused
    activations compute (loss and every gradient), and the experts really take the fused call."""
    from megatron.core.fusions import fused_bias_swiglu

    from joyai_megatron.model import experts as experts_module

    calls = {"weighted": 0, "plain": 0}
    weighted, plain = experts_module.weighted_bias_swiglu_impl, fused_bias_swiglu.bias_swiglu_impl

    def count(kind, fn):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(experts_module, "weighted_bias_swiglu_impl", count("weighted", weighted))
    monkeypatch.setattr("megatron.core.transformer.mlp.bias_swiglu_impl", count("plain", plain))
    unfused, fused = build_tiny(grouped=True), build_tiny(grouped=True, bias_activation_fusion=True)
    fused.load_state_dict(unfused.state_dict())
    packed = two_document_batch()
    losses = [_forward_backward(model, packed) for model in (unfused, fused)]
    # Two MoE layers; the dense layer 0, two shared experts and the MTP layer's shared expert.
    assert calls == {"weighted": 2, "plain": 4}, calls
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-5)
    grads = dict(fused.named_parameters())
    for name, p in unfused.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def _forward_backward(model: torch.nn.Module, packed) -> torch.Tensor:
    loss = packed_token_losses(model, packed).sum()
    loss.backward()
    return loss.detach()


def test_sync_free_dispatch_is_bitwise_the_upstream_dispatcher(one_rank) -> None:
    """The tiny model (packed documents, grouped and per-expert experts) gives bitwise the same
    loss and gradients with the sync-free dispatcher as with Megatron's all-gather dispatcher."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    from joyai_megatron.compat.dispatch import LocalAllGatherDispatcher, sync_free_applies
    from joyai_megatron.training.packing import pack_batch

    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(2, 8192, (2, 32), generator=gen)
    positions = torch.cat([torch.arange(20), torch.arange(12)]).repeat(2, 1)
    packed = pack_batch(tokens, tokens.roll(-1, dims=1), torch.ones(2, 32), positions)
    for grouped in (True, False):
        ours = build_tiny(grouped=grouped)
        dispatchers = [m.token_dispatcher for m in ours.modules() if hasattr(m, "token_dispatcher")]
        assert len(dispatchers) == 2 and all(type(d) is LocalAllGatherDispatcher for d in dispatchers)
        upstream = build_tiny(grouped=grouped)
        for d in (m.token_dispatcher for m in upstream.modules() if hasattr(m, "token_dispatcher")):
            d.__class__ = MoEAllGatherTokenDispatcher
        upstream.load_state_dict(ours.state_dict())
        assert _forward_backward(ours, packed).item() == _forward_backward(upstream, packed).item()
        grads = dict(upstream.named_parameters())
        for name, p in ours.named_parameters():
            assert torch.equal(p.grad, grads[name].grad), name
    # token dropping makes the permuted length data-dependent: the upstream class stays
    d = dispatchers[0]
    d.__class__ = MoEAllGatherTokenDispatcher
    assert sync_free_applies(d)
    d.config.moe_expert_capacity_factor = 1.0
    assert not sync_free_applies(d)
    d.config.moe_expert_capacity_factor = None


@pytest.mark.parametrize("lengths", [[10, 22, 16], [48], [16, 16, 16]])
@pytest.mark.parametrize("interleaved", [True, False])
def test_sync_free_thd_rope_equals_upstream(lengths: list[int], interleaved: bool) -> None:
    """Per segment (freqs of the longest segment) and whole-batch (freqs of every packed position)
    layouts, values and input gradients, against Megatron's per-segment loop."""
    from megatron.core.models.common.embeddings import rope_utils

    from joyai_megatron.compat.rope import _UPSTREAM, apply_rotary_pos_emb_thd, use_sync_free_thd_rope

    class OneRank:
        def size(self) -> int:
            return 1

        def rank(self) -> int:
            return 0

    use_sync_free_thd_rope()
    assert rope_utils._apply_rotary_pos_emb_thd is apply_rotary_pos_emb_thd
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = sum(lengths)
    gen = torch.Generator().manual_seed(total)
    for max_s in (max(lengths), total):
        freqs = torch.randn(max_s, 1, 1, 16, generator=gen)
        t = torch.randn(total, 4, 16, generator=gen, requires_grad=True)
        kwargs = dict(mla_rotary_interleaved=interleaved, mscale=1.3, cp_group=OneRank())
        ours = apply_rotary_pos_emb_thd(t, cu, freqs, **kwargs)
        (g_ours,) = torch.autograd.grad(ours.square().sum(), t)
        ref = _UPSTREAM(t, cu, freqs, **kwargs)
        (g_ref,) = torch.autograd.grad(ref.square().sum(), t)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-6)


def test_torch_wgrad_accumulation_is_apex_s_contract() -> None:
    """``main_grad += grad_output^T @ input`` in place (what Megatron calls Apex for), and nothing
    is installed without CUDA."""
    from megatron.core.tensor_parallel import layers

    from joyai_megatron.compat.grad_accum import (
        use_torch_wgrad_accumulation,
        wgrad_gemm_accum_fp16,
        wgrad_gemm_accum_fp32,
    )

    gen = torch.Generator().manual_seed(6)
    x, dy = torch.randn(32, 24, generator=gen), torch.randn(32, 40, generator=gen)
    main_grad = torch.randn(40, 24, generator=gen)
    expected = main_grad.double() + dy.double().T @ x.double()
    buffer = main_grad.data_ptr()
    wgrad_gemm_accum_fp32(x, dy, main_grad)
    assert main_grad.data_ptr() == buffer
    torch.testing.assert_close(main_grad.double(), expected, rtol=1e-5, atol=1e-5)
    half = torch.zeros(40, 24, dtype=torch.bfloat16)
    wgrad_gemm_accum_fp16(x.bfloat16(), dy.bfloat16(), half)
    torch.testing.assert_close(half.double(), dy.double().T @ x.double(), rtol=2e-2, atol=0.3)
    if not torch.cuda.is_available():
        assert use_torch_wgrad_accumulation() is layers._grad_accum_fusion_available is False
        assert tiny_config().gradient_accumulation_fusion is False


def test_trainer_batches_every_muon_matrix_at_one_tp_rank(one_rank) -> None:
    """With ``muon_tp_mode=duplicated`` (the default) and one TP rank, every 2-D Muon parameter
    (TP-parallel linears carry a partition_dim even then) takes the batched Newton-Schulz."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from joyai_megatron.config.schema import OptimCfg
    from joyai_megatron.optim.builder import build_optimizer
    from joyai_megatron.optim.muon import BatchedMuon

    recipe_optim = OptimCfg(optimizer="muon")
    assert recipe_optim.muon_tp_mode == "duplicated"

    model = build_tiny(grouped=True)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    optimizer = build_optimizer(recipe_optim, ParallelCfg(), PrecisionCfg(), [ddp])
    leaves = [o for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    muon = [o.optimizer for o in leaves if isinstance(o.optimizer, BatchedMuon)]
    assert len(muon) == 1
    params = [p for g in muon[0].param_groups for p in g["params"]]
    partitioned = [p for p in params if getattr(p, "partition_dim", None) not in (None, -1)]
    assert partitioned, "expected TP-parallel linears among the Muon parameters"
    assert all(muon[0]._batchable(p) for p in params)


def test_grouped_experts_accumulate_into_ddp_main_grads(one_rank) -> None:
    """Under Megatron's DDP the grouped experts add their weight gradients to ``main_grad``
    themselves (once per micro-batch, flagged so DDP's hook skips them): after two micro-batches
    every main_grad equals the per-expert ``SequentialMLP`` model's, accumulated by DDP's hooks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from joyai_megatron.training.packing import pack_batch

    sequential, grouped = build_tiny(grouped=False), build_tiny(grouped=True)
    grouped.load_state_dict(sequential.state_dict())
    gen = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(2):
        tokens = torch.randint(2, 8192, (2, 32), generator=gen)
        positions = torch.arange(32).repeat(2, 1)
        batches.append(pack_batch(tokens, tokens.roll(-1, dims=1), torch.ones(2, 32), positions))
    wrapped = []
    for model in (sequential, grouped):
        ddp = DistributedDataParallel(
            model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
        )
        ddp.zero_grad_buffer()
        for packed in batches:
            _forward_backward(ddp, packed)
        wrapped.append(ddp)
    experts = [p for n, p in grouped.named_parameters() if ".experts.local_experts." in n]
    assert experts and all(p.grad_added_to_main_grad and p.grad is None for p in experts)
    main = {n: p.main_grad for n, p in grouped.named_parameters()}
    for name, p in sequential.named_parameters():
        assert p.main_grad.abs().sum() > 0 or "experts.local_experts" in name, name
        torch.testing.assert_close(main[name], p.main_grad, rtol=1e-5, atol=1e-6, msg=name)


def test_frozen_expert_weights_stack_once_per_pass(one_rank) -> None:
    """Inside ``frozen_expert_weights`` (the trainer's forward-backward pass) each layer stacks its
    experts' weights once for all micro-batches, with the same outputs and gradients as stacking
    per micro-batch; outside it nothing is cached, and the cache is gone after the block."""
    from joyai_megatron.model import experts as experts_mod

    layer = next(m for m in build_tiny(grouped=True).modules() if isinstance(m, experts_mod.GroupedMMExperts))
    counts = torch.tensor([3, 0, 2, 4, 1, 0, 5, 1])
    gen = torch.Generator().manual_seed(3)
    inputs = [(torch.randn(16, 64, generator=gen), torch.rand(16, generator=gen)) for _ in range(2)]
    params = [p for _, p in sorted(layer.named_parameters())]

    def two_microbatches() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        for p in params:
            p.grad = None
        outs = []
        for x, probs in inputs:
            out, _ = layer(x, counts, probs)
            (out * out).sum().backward()
            outs.append(out.detach())
        return outs, [p.grad.clone() for p in params]

    stacks = []
    real_stack = torch.stack
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "stack", lambda ts, *a, **k: stacks.append(len(ts)) or real_stack(ts, *a, **k))
        plain = two_microbatches()
        assert stacks == [8, 8, 8, 8]  # fc1 and fc2 per micro-batch
        stacks.clear()
        with experts_mod.frozen_expert_weights():
            cached = two_microbatches()
            assert len(experts_mod._STACKS) == 2
        assert stacks == [8, 8]  # once per layer for the pass
    assert experts_mod._STACKS is None
    for a, b in zip(plain[0] + plain[1], cached[0] + cached[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_grouped_experts_run_the_bypassed_linears_pre_hooks(one_rank) -> None:
    """DDP's overlapped param all-gather waits in each module's forward pre-hook; the grouped
    forward never calls the expert linears, so it must run their hooks itself."""
    from joyai_megatron.model.experts import GroupedMMExperts

    layer = next(m for m in build_tiny(grouped=True).modules() if isinstance(m, GroupedMMExperts))
    seen = []
    for e, expert in enumerate(layer.local_experts):
        expert.linear_fc1.register_forward_pre_hook(lambda m, args, e=e: seen.append(("fc1", e)))
        expert.linear_fc2.register_forward_pre_hook(lambda m, args, e=e: seen.append(("fc2", e)))
    counts = torch.tensor([2, 2, 2, 2, 2, 2, 2, 2])
    layer(torch.randn(16, 64), counts, torch.rand(16))
    assert sorted(seen) == sorted((name, e) for e in range(8) for name in ("fc1", "fc2"))
