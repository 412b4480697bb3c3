"""CPU redirects for the few places where Megatron-Core 0.19 hard-codes CUDA.

Everything here is applied by :func:`apply_cpu_redirects` only when CUDA is absent, and only to the
named upstream functions; on a GPU machine this module changes nothing.  Each entry of ``_SITES``
names the upstream lines it covers.  Two mechanisms:

* *device redirect*: while a listed function runs, ``torch.cuda.current_device()`` answers
  ``"cpu"`` and tensor factories asked for a CUDA device build on the CPU.  Nothing else about the
  function changes, so upstream logic stays upstream.
* *replacement*: where upstream asserts a CUDA tensor type or reads CUDA RNG state, a small CPU
  equivalent is installed in its place.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like")
_lock = threading.RLock()
_depth = 0
_saved: dict[str, Any] = {}
_applied = False


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int):
        return True
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _redirect_factory(fn: Callable, target: str) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = target
        return fn(*args, **kwargs)

    return wrapper


class _NullEvent:
    """A recorded event on the CPU: the work before it has already happened."""

    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        del stream


class _NullStream:
    """Stands in for ``torch.cuda.current_stream()`` and ``torch.cuda.Stream()`` on the CPU, where
    work is synchronous (one object: every stream is the same one)."""

    def wait_event(self, event: Any) -> None:
        del event

    def wait_stream(self, stream: Any) -> None:
        del stream

    def synchronize(self) -> None:
        return None

    def record_event(self, event: Any = None) -> _NullEvent:
        del event
        return _NullEvent()


_NULL_STREAM = _NullStream()


@contextlib.contextmanager
def redirect_cuda_device(target: str = "cpu") -> Iterator[None]:
    """Inside this block, CUDA device requests build tensors on ``target`` (re-entrant: an outer
    block's target wins, so building on ``meta`` is not turned back into CPU by inner sites)."""
    global _depth
    with _lock:
        if _depth == 0:
            # torch caches the factory functions a `with torch.device(...)` block intercepts on first
            # use (lru_cache); fill that cache with the real functions before swapping in wrappers, or
            # a first use inside this block would leave every later device block (e.g. transformers'
            # meta-device model init) ignoring the real factories.
            _device_constructors = getattr(torch.utils._device, "_device_constructors", None)
            if _device_constructors is not None:
                _device_constructors()
            _saved["current_device"] = torch.cuda.current_device
            torch.cuda.current_device = lambda: target  # type: ignore[assignment]
            _saved["current_stream"] = torch.cuda.current_stream
            torch.cuda.current_stream = lambda *a, **k: _NULL_STREAM  # type: ignore[assignment]
            _saved["synchronize"] = torch.cuda.synchronize
            torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
            _saved["Stream"] = torch.cuda.Stream
            torch.cuda.Stream = lambda *a, **k: _NULL_STREAM  # type: ignore[assignment,misc]
            _saved["stream"] = torch.cuda.stream
            torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
            _saved["tensor_cuda"] = torch.Tensor.cuda
            torch.Tensor.cuda = lambda self, *a, **k: self.to(target)  # type: ignore[method-assign]
            for name in _FACTORIES:
                _saved[name] = getattr(torch, name)
                setattr(torch, name, _redirect_factory(_saved[name], target))
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.cuda.current_device = _saved.pop("current_device")
                torch.cuda.current_stream = _saved.pop("current_stream")
                torch.cuda.synchronize = _saved.pop("synchronize")
                torch.cuda.Stream = _saved.pop("Stream")  # type: ignore[misc]
                torch.cuda.stream = _saved.pop("stream")
                torch.Tensor.cuda = _saved.pop("tensor_cuda")  # type: ignore[method-assign]
                for name in _FACTORIES:
                    setattr(torch, name, _saved.pop(name))


def cuda_device_as_cpu() -> contextlib.AbstractContextManager[None]:
    return redirect_cuda_device("cpu")


_type_depth = 0


@contextlib.contextmanager
def cuda_type_names() -> Iterator[None]:
    """Inside this block a CPU tensor's ``.type()`` (no argument) answers with the name of its CUDA
    counterpart (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``): for upstream code that picks
    its fp32/fp16 branch by comparing type strings.  Conversions (``.type(dtype)``) are untouched."""
    global _type_depth
    with _lock:
        if _type_depth == 0:
            original = torch.Tensor.type
            _saved["tensor_type"] = original

            def type_name(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                name = original(self, *args, **kwargs)
                if args or kwargs or self.device.type != "cpu":
                    return name
                return name.replace("torch.", "torch.cuda.", 1)

            torch.Tensor.type = type_name  # type: ignore[method-assign]
        _type_depth += 1
    try:
        yield
    finally:
        with _lock:
            _type_depth -= 1
            if _type_depth == 0:
                torch.Tensor.type = _saved.pop("tensor_type")  # type: ignore[method-assign]


def _redirected(fn: Callable, type_names: bool = False) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cuda_device_as_cpu(), cuda_type_names() if type_names else contextlib.nullcontext():
            return fn(*args, **kwargs)

    wrapper.__joyai_cpu_redirect__ = True  # type: ignore[attr-defined]
    return wrapper


# (module, attribute path, upstream lines covered).  Megatron-Core 0.19.2.
# fmt: off
_SITES: list[tuple[str, str, str]] = [
    # rotary_pos_embedding.py l.78 `torch.cuda.current_device()` in __init__ and l.162 moving
    # inv_freq "to GPU once at the first micro-batch".
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "RotaryEmbedding.__init__", "78"),
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "RotaryEmbedding.get_emb", "162"),
    # router.py l.98-100 moves the gate weight to the GPU on every gating call; l.184-247 put the
    # expert bias and its token counters on `torch.cuda.current_device()`.
    ("megatron.core.transformer.moe.router", "Router.gating", "98-100"),
    ("megatron.core.transformer.moe.router", "TopKRouter.__init__", "184-247"),
    # multi_token_prediction.py l.374-378: MTP loss/accuracy trackers on the current device.
    ("megatron.core.transformer.multi_token_prediction", "MTPLossLoggingHelper.save_metrics_to_tracker", "374-378"),
    # language_module.py l.307: the MTP / last pipeline stage's embedding copy is moved with
    # `.cuda()` before the first/last-stage all-reduce.
    ("megatron.core.models.common.language_module.language_module", "LanguageModule.setup_embeddings_and_output_layer", "307"),
    # optimizer.py l.1249: FP32Optimizer's `_scale = torch.tensor([1.0], device='cuda')`.
    ("megatron.core.optimizer.optimizer", "FP32Optimizer.__init__", "1249"),
    # optimizer.py l.315 (`has_grad_norm_group` flag) and l.1492 (ChainedOptimizer loss scale).
    ("megatron.core.optimizer.optimizer", "MegatronOptimizer.has_grad_norm_group", "315"),
    ("megatron.core.optimizer.optimizer", "ChainedOptimizer.get_loss_scale", "1492"),
    # schedules.py l.749, l.1121, l.2292: `total_num_tokens = torch.zeros([], device="cuda")`, and
    # the P2P receive buffers pipeline schedules allocate on the current device.
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining", "749"),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_pipelining_with_interleaving", "1121"),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_pipelining_without_interleaving", "2292"),
    # param_and_grad_buffer.py l.1145-1186: DDP's parameter and gradient buffers; l.632
    # `torch.cuda.current_stream()` when starting the gradient reduction.
    ("megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBuffer.__init__", "1145-1186"),
    ("megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBucketGroup.start_grad_sync", "632"),
    # dist_checkpointing: filesystem_async.py l.248 and fully_parallel.py l.287-296
    # `torch.cuda.synchronize()`, state_dict_saver.py l.204/252 and async_utils.py l.224 flags on
    # the current device.  Wrapped at the package entry points the trainer calls.
    ("megatron.core.dist_checkpointing", "save", "filesystem_async.py:248"),
    ("megatron.core.dist_checkpointing", "load", "state_dict_saver.py:204"),
    # async saves: async_utils.py l.273 `torch.cuda.synchronize()` and filesystem_async.py l.248
    # when scheduling; l.224 and l.698 completion flags on the current device when finalising.
    ("megatron.core.dist_checkpointing.strategies.async_utils", "AsyncCallsQueue.schedule_async_request", "268-273"),
    ("megatron.core.dist_checkpointing.strategies.async_utils", "AsyncCallsQueue.maybe_finalize_async_calls", "224,698"),
    # token_dispatcher.py, the alltoall dispatcher (what the 48B recipes use): l.468-469 create a
    # `torch.cuda.Stream()` for device-to-host copies of the split sizes; l.921-943 copy on it
    # (`torch.cuda.stream`, `current_stream()`, `record_event()`) and l.947 wait for the event.
    ("megatron.core.transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher.__init__", "468-469"),
    ("megatron.core.transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize", "921-947"),
    # distrib_optimizer.py l.1362 `torch.cuda.current_device()`, l.1374 `.cuda()`: ZeRO-1's
    # model-space checkpoint (``fully_reshardable``) gathers every shard on the current device.
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero", "1362-1374"),
    # layer_wise_optimizer.py l.837: the same flag in the layer-wise (distributed Muon) optimizer.
    ("megatron.core.optimizer.layer_wise_optimizer", "LayerWiseDistributedOptimizer.has_grad_norm_group", "837"),
    # clip_grads.py l.96, l.108, l.112: norm accumulators with device='cuda'.
    # optimizer.py and layer_wise_optimizer.py import these by name, so their references too.
    ("megatron.core.optimizer.clip_grads", "get_grad_norm_fp32", "96-112"),
    ("megatron.core.optimizer.clip_grads", "count_zeros_fp32", "231"),
    ("megatron.core.optimizer.optimizer", "get_grad_norm_fp32", "96-112"),
    ("megatron.core.optimizer.optimizer", "count_zeros_fp32", "231"),
    ("megatron.core.optimizer.layer_wise_optimizer", "get_grad_norm_fp32", "96-112"),
    ("megatron.core.optimizer.layer_wise_optimizer", "count_zeros_fp32", "231"),
]
# fmt: on

# Sites that also pick their fp32 branch by type string (``param.type() == 'torch.cuda.FloatTensor'``):
# they run with both the device redirect and :func:`cuda_type_names`.
_TYPE_NAME_SITES: list[tuple[str, str, str]] = [
    # ZeRO-1 (distrib_optimizer.py): __init__ builds MixedPrecisionOptimizer's flags with
    # device='cuda' (optimizer.py l.698-705) and its shard groups by type string (l.401, l.466, l.758).
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.__init__",
        "401,466,758; optimizer.py:698-705",
    ),
    # BF16/FP16 without ZeRO-1: the same flags (optimizer.py l.690-702) and the main-parameter copies
    # made only for parameters whose type string is a CUDA half type (l.1009, l.1028).
    (
        "megatron.core.optimizer.optimizer",
        "Float16OptimizerWithFloat16Params.__init__",
        "690-702,1009,1028",
    ),
]

# Sites in optional packages, patched only once their module has been imported (importing ModelOpt
# takes seconds, so runs that never quantize do not pay for it); a later apply_cpu_redirects() call
# picks up modules imported since the first one.
_OPTIONAL_SITES: list[tuple[str, str, str]] = [
    # modelopt/torch/opt/plugins/megatron.py l.86 (ModelOpt 0.47): `torch.cuda.synchronize()` before
    # serialising a quantized layer's extra state, i.e. on every checkpoint save of a QAT model.
    ("modelopt.torch.opt.plugins.megatron", "_modelopt_get_extra_state", "86"),
]


def clip_grad_by_total_norm_cpu(
    parameters: list[torch.Tensor] | torch.Tensor,
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """Replaces clip_grads.py ``clip_grad_by_total_norm_fp32``, whose l.174 asserts
    ``param.grad.type() == 'torch.cuda.FloatTensor'``: same scaling, any device."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(coeff, torch.Tensor):
        torch._foreach_mul_(grads, coeff.clamp_max(1.0))
    elif coeff < 1.0:
        torch._foreach_mul_(grads, coeff)


def _get_rng_state_cpu(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Replaces random.py ``_get_cuda_rng_state`` (l.104): the CPU generator stands in."""
    return torch.get_rng_state()


def _set_rng_state_cpu(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    """Replaces random.py ``_set_cuda_rng_state`` (l.134)."""
    torch.set_rng_state(new_state)


def _tracker_add_cpu(self: Any, name: str, seed: int) -> None:
    """Replaces random.py ``CudaRNGStatesTracker.add`` (l.285-308), which seeds through
    ``torch.cuda.get_rng_state``/``manual_seed``: the same bookkeeping with a CPU generator state."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise ValueError(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise ValueError(f"rng state {name} already exists")
    generator = torch.Generator()
    generator.manual_seed(seed)
    self.states_[name] = generator.get_state()


def _maybe_move_tensor_to_cpu_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """Replaces moe_utils.py ``maybe_move_tensor_to_cpu`` (l.1169-1191), which converts only CUDA
    tensors (``if ... tensor.is_cuda``): on the CPU the alltoall dispatcher's split sizes stayed
    tensors, which ``all_to_all_single`` rejects as split sizes.  Same result as the CUDA path: a
    host copy, as a numpy array when asked."""
    del record_stream
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().cpu().numpy().copy()
    return tensor


_REPLACEMENTS: list[tuple[str, str, Callable]] = [
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.add", _tracker_add_cpu),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_cpu),
    # optimizer.py imports the function by name, so its reference is replaced too.
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_cpu),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", _get_rng_state_cpu),
    # token_dispatcher.py imports it by name (l.39) and calls it at l.927-943.
    (
        "megatron.core.transformer.moe.token_dispatcher",
        "maybe_move_tensor_to_cpu",
        _maybe_move_tensor_to_cpu_cpu,
    ),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", _set_rng_state_cpu),
]


def _resolve(module_name: str, path: str) -> tuple[Any, str]:
    owner: Any = importlib.import_module(module_name)
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    return owner, attr


def apply_cpu_redirects(force: bool = False) -> bool:
    """Install the redirects once, if CUDA is absent (or ``force``).  Returns whether applied."""
    global _applied
    if _applied:
        _apply_optional_sites()
        return True
    if torch.cuda.is_available() and not force:
        return False
    for sites, type_names in ((_SITES, False), (_TYPE_NAME_SITES, True)):
        for module_name, path, _lines in sites:
            owner, attr = _resolve(module_name, path)
            original = getattr(owner, attr)
            if not getattr(original, "__joyai_cpu_redirect__", False):
                setattr(owner, attr, _redirected(original, type_names))
    for module_name, path, replacement in _REPLACEMENTS:
        owner, attr = _resolve(module_name, path)
        if not hasattr(owner, attr):
            raise RuntimeError(f"compat: {module_name}.{path} is gone; update joyai_megatron/compat")
        setattr(owner, attr, replacement)
    _applied = True
    _apply_optional_sites()
    return True


def _apply_optional_sites() -> None:
    for module_name, path, _lines in _OPTIONAL_SITES:
        if module_name not in sys.modules:
            continue
        owner, attr = _resolve(module_name, path)
        original = getattr(owner, attr)
        if not getattr(original, "__joyai_cpu_redirect__", False):
            setattr(owner, attr, _redirected(original))


def redirect_sites() -> list[tuple[str, str, str]]:
    """The patched upstream functions, for tests and docs."""
    return list(_SITES) + list(_TYPE_NAME_SITES) + list(_OPTIONAL_SITES)
