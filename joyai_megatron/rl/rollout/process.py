"""The ``local`` engine in a child process, its weights in shared memory (``rollout_args.process``).

Asynchronous rollouts on a background *thread* share the interpreter lock with training; with a
small model, where much of the time is Python dispatch rather than kernels, the two barely overlap.
Here the HF model lives in a spawned process: its parameters are shared-memory tensors that the
trainer's weight sync writes in place (only while the child is idle: the caller always waits for
the previous request first), and generation requests and results travel over a pipe. This is the
disaggregated-engine design of the GPU backends at CPU scale. CPU only (CUDA tensors would need IPC).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.multiprocessing as mp

from joyai_megatron.model.presets import ModelArch
from joyai_megatron.rl.rollout.base import Request, RolloutEngine, Sample
from joyai_megatron.rl.rollout.local import HFWeightWriter, LocalHFEngine, build_hf_model


def _serve(
    conn: Any, arch: ModelArch, dtype: torch.dtype, shared: dict[str, torch.Tensor], threads: int
) -> None:
    """Child loop: alias the shared tensors, then answer requests until told to stop."""
    torch.set_num_threads(threads)
    model = build_hf_model(arch, dtype)
    model.load_state_dict(shared, assign=True, strict=True)
    engine = LocalHFEngine(arch, dtype, "cpu", model=model)
    while True:
        request = conn.recv()
        if request is None:
            break
        kind, args = request
        try:
            if kind == "generate":
                prompts, n, params, seed, record_routing = args
                result = engine.generate(prompts, n, params, seed, record_routing=record_routing)
                for sample in (s for group in result for s in group if s.routed_experts is not None):
                    sample.routed_experts = sample.routed_experts.numpy()  # pickled, not shared fds
            else:
                result = engine.forward_logits(*args)
            conn.send(("ok", result))
        except Exception as err:  # noqa: BLE001 - re-raised in the parent
            conn.send(("error", repr(err)))


class ProcessHFEngine(RolloutEngine):
    name = "local"
    records_routing = True

    def __init__(self, arch: ModelArch, dtype: torch.dtype = torch.float32, threads: int = 1) -> None:
        if torch.cuda.is_available():
            raise ValueError("rl.rollout_args.process is for CPU runs; on GPU use vllm or sglang")
        self.model = build_hf_model(arch, dtype)
        self.model.share_memory()
        self.writer = HFWeightWriter(self.model)
        shared = self.model.state_dict()
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, arch, dtype, shared, threads), daemon=True)
        self.proc.start()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        return self.writer.write_all(named_tensors)  # in place: the child sees the same storage

    def _call(self, kind: str, *args: Any) -> Any:
        self.conn.send((kind, args))
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"rollout process failed: {value}")
        return value

    def _sample(self, request: Request) -> list[list[Sample]]:
        r = request
        result = self._call("generate", r.prompts, r.n, r.params, r.seed, r.record_routing)
        for sample in (s for group in result for s in group if s.routed_experts is not None):
            sample.routed_experts = torch.from_numpy(sample.routed_experts)
        return result

    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._call("logits", input_ids)

    def shutdown(self) -> None:
        if self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(timeout=30)
