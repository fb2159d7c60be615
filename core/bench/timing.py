"""Clocks and sizes for the benchmarks: synchronised timing, copy bandwidth, what fits in GPU memory, peak memory,
the bytes a model's weights and its KV cache take, and the step time of HF's own eager decode loop.

Under tensor parallelism (transformers' ``tp_plan``) sizes are this rank's: its shards of the weights and its
``num_key_value_heads / world`` KV heads (:func:`kvsieve.parallel.tensor_parallel_size`); :func:`timed` given the
tensor-parallel group starts and stops its clock with every rank at the same point."""

from __future__ import annotations

import gc
import inspect
import time
from collections.abc import Callable
from typing import Any

import torch

from kvsieve.parallel import tensor_parallel_size

__all__ = [
    "cache_kwarg",
    "copy_bandwidth",
    "fits",
    "generate_step_seconds",
    "hf_eager_step_seconds",
    "kv_bytes_per_token",
    "kv_heads",
    "peak_gib",
    "reset_peak",
    "sync",
    "timed",
    "weight_bytes",
]


def sync(device: torch.device, group: Any = None) -> None:
    """Wait for the device's queued work (CUDA; nothing on the CPU), then, given a process group, for every rank of
    it to get here (a one-element all-reduce, waited for on the host)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(torch.zeros(1, device=device), group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, group: Any = None) -> tuple[float, Any]:
    """``(seconds, fn())``: wall time of ``fn`` with the device synchronised before and after; given a process group
    (the tensor-parallel one), with every rank of it synchronised there too, so that no rank's clock counts the
    time another took to arrive."""
    sync(device, group)
    start = time.perf_counter()
    out = fn()
    sync(device, group)
    return time.perf_counter() - start, out


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the bytes read and written (``2 * nbytes`` per copy)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)

    def copies():
        for _ in range(repeats):
            dst.copy_(src)

    seconds, _ = timed(copies, device)
    return 2 * nbytes * repeats / seconds

def fits(device: torch.device, nbytes: int, margin: float = 0.92) -> bool:
    """Whether ``nbytes`` more fit in ``margin`` of the GPU's free memory (always True off CUDA)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < margin * free


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kv_heads(model) -> int:
    """KV heads of one layer on this rank: the config's, divided among the tensor-parallel ranks."""
    return model.config.num_key_value_heads // tensor_parallel_size(model)


def kv_bytes_per_token(model) -> int:
    """K and V bytes of one token across every layer (this rank's KV heads)."""
    cfg = model.config
    return 2 * cfg.num_hidden_layers * kv_heads(model) * _head_dim(cfg) * next(model.parameters()).element_size()


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # a DTensor (tensor parallelism): this rank's shard


def weight_bytes(model) -> int:
    """Bytes of the model's parameters on this rank (what a decode step reads once)."""
    return sum(_local(p).numel() * p.element_size() for p in model.parameters())


def reset_peak(device: torch.device) -> None:
    """Free what finished work left behind and restart the peak-memory counter."""
    gc.collect()  # a finished probe's CUDA graph and static buffers
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since :func:`reset_peak`, in GiB (2 decimals); None off CUDA."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------- HF eager
class _Timestamps:
    """A stopping criterion that never stops and records when each generated token was done (host clock)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def cache_kwarg(model) -> str:
    """The name under which ``model.generate`` takes a cache: ``past_key_values`` (transformers 5.17), ``cache``
    (later versions, where the old name is deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate_step_seconds(model, ids: torch.Tensor, cache, tokens: int, **generate_kwargs) -> list[float]:
    """The host time between consecutive tokens of one greedy ``model.generate`` of ``tokens`` tokens after ``ids``
    over ``cache`` (which holds all but the last of ``ids``): ``tokens - 1`` decode steps, in order. HF's loop
    synchronises every step (its stopping check), so host timestamps time it."""
    from transformers import StoppingCriteriaList

    stamps = _Timestamps()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{cache_kwarg(model): cache},
                   max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                   stopping_criteria=StoppingCriteriaList([stamps]), **generate_kwargs)
    return [b - a for a, b in zip(stamps.times, stamps.times[1:])]


def hf_eager_step_seconds(model, batch: int, cached: int, steps: int = 12, seed: int = 0) -> float:
    """Median time of one step of HF's ``model.generate`` (no kvsieve) over a DynamicCache holding ``cached``
    random entries per layer (:func:`generate_step_seconds`, its first two steps left out)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cfg = model.config
    d, heads = _head_dim(cfg), kv_heads(model)
    dtype = next(model.parameters()).dtype
    cache = DynamicCache()
    gen = torch.Generator(device).manual_seed(seed)
    for layer in range(cfg.num_hidden_layers):
        shape = (batch, heads, cached, d)
        k = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        cache.update(k, torch.randn(shape, generator=gen, device=device, dtype=dtype), layer)
    ids = torch.randint(100, cfg.vocab_size, (batch, cached + 1), device=device)
    with torch.inference_mode():
        diffs = sorted(generate_step_seconds(model, ids, cache, steps)[2:])
    del cache
    if not diffs:
        raise ValueError(f"steps={steps} is too few to time HF's loop (at least 4)")
    return diffs[len(diffs) // 2]
