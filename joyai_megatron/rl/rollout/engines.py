"""GPU rollout engines: vLLM and SGLang, colocated with training, synced through their public APIs.

Both start from a ``config.json`` written from the recipe's architecture with dummy weights, and
receive the trainer's weights through the shared HF-checkpoint-named stream before the first
rollout (and after every optimizer step):

* vLLM: ``LLM(..., load_format="dummy")``; weights go in with ``LLM.collective_rpc`` running the
  model's own ``load_weights`` in each worker (in-process when ``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
  then ``reset_prefix_cache``; ``sleep``/``wake_up`` free GPU memory for training between rollouts.
* SGLang: ``sglang.Engine(..., load_format="dummy")``; ``update_weights_from_tensor`` in buckets,
  ``release_memory_occupation``/``resume_memory_occupation`` around training.

Neither engine can run on the CPU machines this project is tested on; importing one without the
package installed raises a clear error, and the payload both receive is unit-tested through the
conversion table (tests/stages/test_rl.py).
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from joyai_megatron.convert.hf_config import arch_to_hf_config, generation_config
from joyai_megatron.model.presets import ModelArch
from joyai_megatron.rl.rollout.base import Request, RolloutEngine, Sample


def require(package: str, backend: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise RuntimeError(
            f"rl.rollout_backend={backend} needs the '{package}' package on a GPU machine "
            f"(pip install {package}); use rl.rollout_backend=local on CPU"
        ) from err


def write_config_dir(arch: ModelArch, include_mtp: bool, dtype: str) -> Path:
    """A directory with config.json (+ generation_config.json) from which an engine builds the model."""
    path = Path(tempfile.mkdtemp(prefix="joyai_rollout_"))
    (path / "config.json").write_text(
        json.dumps(arch_to_hf_config(arch, include_mtp=include_mtp, dtype=dtype))
    )
    (path / "generation_config.json").write_text(json.dumps(generation_config(arch)))
    return path


def buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group the stream into lists of at most ``max_bytes`` (one oversized tensor travels alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Runs inside a vLLM worker: the model's own HF-name loader does the sharding."""
    worker.model_runner.model.load_weights(weights=weights)
    return len(weights)


class VLLMEngine(RolloutEngine):
    name = "vllm"

    def __init__(self, arch: ModelArch, args: dict[str, Any], dtype: str = "bfloat16") -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # tensors pass in-process
        vllm = require("vllm", self.name)
        self._vllm = vllm
        args = dict(args)
        self.bucket_bytes = int(args.pop("weight_bucket_bytes", 1 << 30))
        self.sleep_between = bool(args.pop("sleep_between_rollouts", True))
        engine_args = {
            "model": str(write_config_dir(arch, include_mtp=False, dtype=dtype)),
            "load_format": "dummy",
            "skip_tokenizer_init": True,
            "dtype": dtype,
            "enable_sleep_mode": self.sleep_between,
            "logprobs_mode": "processed_logprobs",  # the temperature-scaled distribution we train
            "gpu_memory_utilization": 0.4,
            **args,
        }
        self.llm = vllm.LLM(**engine_args)
        self.asleep = False

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        self._wake()
        count = 0
        for bucket in buckets(named_tensors, self.bucket_bytes):
            count += sum(self.llm.collective_rpc(_load_weights_on_worker, args=(bucket,))[:1])
        self.llm.reset_prefix_cache()
        return count

    def _sample(self, request: Request) -> list[list[Sample]]:
        prompts, n, params, seed = request.prompts, request.n, request.params, request.seed
        self._wake()
        sampling = self._vllm.SamplingParams(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            stop_token_ids=list(params.stop_token_ids),
            logprobs=0,
            seed=seed,
            detokenize=False,
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
        result = []
        for out in outputs:
            samples = []
            for completion in out.outputs:
                ids = list(completion.token_ids)
                logps = [step[tok].logprob for step, tok in zip(completion.logprobs, ids, strict=True)]
                samples.append(Sample(ids, logps, stopped=completion.finish_reason == "stop"))
            result.append(samples)
        if self.sleep_between:
            self.llm.sleep(level=1)
            self.asleep = True
        return result


class SGLangEngine(RolloutEngine):
    name = "sglang"

    def __init__(self, arch: ModelArch, args: dict[str, Any], dtype: str = "bfloat16") -> None:
        sglang = require("sglang", self.name)
        args = dict(args)
        self.bucket_bytes = int(args.pop("weight_bucket_bytes", 1 << 30))
        self.release_between = bool(args.pop("release_between_rollouts", True))
        engine_args = {
            "model_path": str(write_config_dir(arch, include_mtp=False, dtype=dtype)),
            "load_format": "dummy",
            "skip_tokenizer_init": True,
            "dtype": dtype,
            "enable_memory_saver": self.release_between,
            "mem_fraction_static": 0.4,
            **args,
        }
        self.engine = sglang.Engine(**engine_args)
        self.released = False

    def _resume(self) -> None:
        if self.released:
            self.engine.resume_memory_occupation()
            self.released = False

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        self._resume()
        count = 0
        for bucket in buckets(named_tensors, self.bucket_bytes):
            self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=True)
            count += len(bucket)
        return count

    def _sample(self, request: Request) -> list[list[Sample]]:
        prompts, n, params, seed = request.prompts, request.n, request.params, request.seed
        self._resume()
        rows = [p for p in prompts for _ in range(n)]
        sampling = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_new_tokens": params.max_new_tokens,
            "stop_token_ids": list(params.stop_token_ids),
            "sampling_seed": seed,
        }
        outputs = self.engine.generate(input_ids=rows, sampling_params=sampling, return_logprob=True)
        samples = []
        for out in outputs:
            meta = out["meta_info"]
            logps = [entry[0] for entry in meta["output_token_logprobs"]]
            stopped = (meta.get("finish_reason") or {}).get("type") == "stop"
            samples.append(Sample(list(out["output_ids"]), logps, stopped=stopped))
        if self.release_between:
            self.engine.release_memory_occupation()
            self.released = True
        return [samples[k * n : (k + 1) * n] for k in range(len(prompts))]

    def shutdown(self) -> None:
        self.engine.shutdown()
