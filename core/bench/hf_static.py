"""HF's static cache with its compiled forward: the decode a transformers user picks for speed, timed at chosen
cache lengths (``kvsieve bench decode``'s ``hf-static:*`` rows).

What transformers does (read in its 5.17.0 source, the version on the benchmark GPU; 5.24 agrees unless said):

* ``generate(cache_implementation="static")`` builds ``StaticCache(config, max_cache_len)``
  (``generation/utils.py::_prepare_static_cache``); passing a ``StaticCache`` as the cache is the same thing.
  Every layer holds ``max_cache_len`` slots from the start and is written in place (``cache_utils.py::StaticLayer``:
  ``index_copy_`` at ``cumulative_length``, a device tensor; the K/V buffers are ``mark_static_address``-ed).
* Auto-compile (``generation/utils.py::_valid_auto_compile_criteria``): the decode steps run
  ``model.get_compiled_call(generation_config.compile_config)`` = ``torch.compile(model.__call__, ...)`` when
  ``disable_compile`` is not set, the model is on cuda/xpu/neuron/tpu (or ``compile_config._compile_all_devices``),
  the cache is compileable and not a ``DynamicCache``, no quantizer forbids it and no CPU/disk offload is in the
  device map. ``_can_compile_fullgraph`` is not consulted there. The default ``CompileConfig`` is inductor,
  ``mode="reduce-overhead"`` (CUDA graphs), ``fullgraph=False``, ``dynamic=None``. The prefill is never compiled.
* The attention mask: for a compileable cache ``prepare_inputs_for_generation`` builds a 4D mask over all
  ``max_cache_len`` slots before each step (its step 4), and under tracing ``masking_utils._ignore_causal_mask_sdpa``
  never drops it. SDPA (``integrations/sdpa_attention.py``) uses ``enable_gqa=True`` only when there is no mask
  (``use_gqa_in_sdpa``: CUDA needs ``attention_mask is None`` and head_dim <= 256; XPU torch >= 2.8); otherwise it
  ``repeat_kv``-s K and V to every query head. So every compiled static decode step copies each layer's whole
  static K/V from the KV heads to the query heads (28 from 4 for R1-Distill-Qwen-7B) and attends over all
  ``max_cache_len`` slots, whatever the live length. (5.24 adds ``pack_gqa`` for single-token queries, but only
  when not compiling, and a ``TRANSFORMERS_SDPA_FORCE_GQA`` switch; 5.17 has neither.)
* ``flex_attention`` (``integrations/flex_attention.py``) gets a block mask (it can skip the empty blocks past the
  live length) and ``enable_gqa=True``, except when the number of query heads is not a power of two (28, 40):
  then it ``repeat_kv``-s as well.

This module builds such a cache at a chosen live length (random K/V in every slot, ``cumulative_length`` set in
place, which is all a ``StaticLayer`` knows of its length), times ``model.generate`` steps over it with the step
timestamps of :func:`~kvsieve.bench.timing.generate_step_seconds`, and reports whether generate compiled its forward
(its ``_compiled_call``, dynamo's graph counters) and whether CUDA graphs ran (inductor's cudagraph-skip counter).
"""

from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

from kvsieve.bench.timing import generate_step_seconds

__all__ = ["HF_STATIC_VARIANTS", "HFStaticTiming", "HFStaticVariant", "hf_static_step_seconds", "random_static_cache",
           "set_static_length"]


@dataclass(frozen=True)
class HFStaticVariant:
    """One HF setting: the attention implementation and whether generate may auto-compile its forward."""

    name: str
    attn_implementation: str
    compile: bool
    help: str


#: The settings ``kvsieve bench decode --hf-static`` can run, by name.
HF_STATIC_VARIANTS: dict[str, HFStaticVariant] = {
    v.name: v
    for v in (
        HFStaticVariant("sdpa", "sdpa", True, "HF's default: sdpa, generate's auto-compile (inductor, "
                        "reduce-overhead)"),
        HFStaticVariant("flex_attention", "flex_attention", True, "flex_attention (block mask over the live "
                        "blocks), generate's auto-compile"),
        HFStaticVariant("sdpa-uncompiled", "sdpa", False, "sdpa, disable_compile=True: the same static cache "
                        "without compile, the control"),
    )
}


def random_static_cache(model, batch: int, capacity: int, seed: int = 0):
    """A ``transformers.StaticCache`` with ``max_cache_len=capacity`` whose every slot of every layer holds random K/V
    (allocated by HF's own lazy initialisation, so its buffers are marked static as in ``generate``). Its length is
    set by :func:`set_static_length`."""
    from transformers import StaticCache

    cfg = model.config
    param = next(model.parameters())
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = StaticCache(config=cfg, max_cache_len=capacity)
    gen = torch.Generator(param.device).manual_seed(seed)
    one = torch.zeros(batch, cfg.num_key_value_heads, 1, d, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        for layer_idx, layer in enumerate(cache.layers):
            if type(layer).__name__ != "StaticLayer":
                raise ValueError(f"{type(layer).__name__} (layer {layer_idx}): the HF static rows time full static "
                                 "layers only (no sliding window)")
            cache.update(one, one, layer_idx)  # allocates [batch, heads, capacity, d] in place
            layer.keys.normal_(generator=gen)
            layer.values.normal_(generator=gen)
    return cache


def set_static_length(cache, length: int) -> None:
    """Every layer of ``cache`` holds ``length`` entries: the next token is written at slot ``length``."""
    for layer in cache.layers:
        if not 0 <= length <= layer.max_cache_len:
            raise ValueError(f"length {length} is outside the static cache's 0..{layer.max_cache_len}")
        layer.cumulative_length.fill_(length)  # in place: the compiled graph holds its address


@dataclass
class _Counts:
    graphs: int
    graph_breaks: int
    cudagraph_skips: int

    @staticmethod
    def now() -> _Counts:
        from torch._dynamo.utils import counters

        return _Counts(counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()),
                       counters["inductor"]["cudagraph_skips"])

    def __sub__(self, other: _Counts) -> _Counts:
        return _Counts(self.graphs - other.graphs, self.graph_breaks - other.graph_breaks,
                       self.cudagraph_skips - other.cudagraph_skips)


@dataclass
class HFStaticTiming:
    """What :func:`hf_static_step_seconds` measured.

    Attributes:
        points, step_seconds: median decode-step time at each cache length (entries held before the step).
        auto_compiled: generate ran its decode steps through ``model.get_compiled_call`` (its criteria held).
        compiled: that, and dynamo compiled at least one graph of the forward.
        graphs, graph_breaks: dynamo graphs compiled and graph breaks met during the warm-up (one graph and no
            break = the whole forward in one graph).
        graphs_while_timed: graphs compiled during the timed steps (recompilations; 0 expected).
        cuda_graphs: the compiled forward replays CUDA graphs (a cudagraph mode and no skip); None if not compiled.
        compile_seconds: the warm-up's decode time beyond its steps at the measured rate (dynamo + inductor + graph
            capture); None if not compiled.
        compile_config: the ``CompileConfig`` generate used, as a dict.
    """

    points: list[int]
    step_seconds: list[float]
    auto_compiled: bool
    compiled: bool
    graphs: int
    graph_breaks: int
    graphs_while_timed: int
    cuda_graphs: bool | None
    compile_seconds: float | None
    compile_config: dict[str, Any] | None = field(default=None)


def _forget_compiled(model) -> None:
    """Drop generate's compiled forward and every dynamo cache and CUDA-graph pool, so that the next run compiles
    afresh for its own shapes (as a process running one configuration does) and the memory comes back."""
    for name in ("_compiled_call", "_last_compile_config"):
        model.__dict__.pop(name, None)
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_static_step_seconds(model, batch: int, capacity: int, points: list[int], *, variant: str = "sdpa",
                           steps: int = 12, warmup: int = 4, compile_config=None, seed: int = 0) -> HFStaticTiming:
    """Median time of a decode step of HF's ``model.generate`` (no kvsieve) over a ``StaticCache`` of ``capacity``
    slots holding each of ``points`` entries, with the ``variant``'s attention and compile setting
    (:data:`HF_STATIC_VARIANTS`). One warm-up generate of ``warmup`` tokens at ``points[0]`` takes the compilation and
    the CUDA-graph capture; then one generate of ``steps`` tokens per point is timed (its first two steps left out,
    as in :func:`~kvsieve.bench.timing.hf_eager_step_seconds`).

    ``compile_config`` (a ``transformers.CompileConfig``) replaces generate's default; None keeps HF's default. The
    model's attention implementation is restored and its compiled forward dropped on return.
    """
    setting = HF_STATIC_VARIANTS[variant]
    if steps < 4 or warmup < 2:
        raise ValueError(f"steps={steps}, warmup={warmup}: HF's loop needs steps >= 4 and warmup >= 2 to be timed")
    if not points or min(points) < 1 or max(points) + max(steps, warmup) > capacity:
        raise ValueError(f"cache lengths {points} (+{max(steps, warmup)} steps) do not fit a static cache of "
                         f"{capacity} slots")
    device = next(model.parameters()).device
    original = model.config._attn_implementation
    _forget_compiled(model)
    gen = torch.Generator().manual_seed(seed)
    cache = None
    options: dict[str, Any] = dict(disable_compile=not setting.compile)
    if compile_config is not None:
        options["compile_config"] = compile_config

    def run(length: int, tokens: int) -> list[float]:
        set_static_length(cache, length)
        ids = torch.randint(100, model.config.vocab_size, (batch, length + 1), generator=gen).to(device)
        return generate_step_seconds(model, ids, cache, tokens, **options)

    try:
        if setting.attn_implementation != original:
            model.set_attn_implementation(setting.attn_implementation)
        cache = random_static_cache(model, batch, capacity, seed)
        start = _Counts.now()
        warm = run(points[0], warmup)
        warmed = _Counts.now()
        auto_compiled = "_compiled_call" in model.__dict__
        used = model.__dict__.get("_last_compile_config") if auto_compiled else None
        times = [statistics.median(run(p, steps)[2:]) for p in points]
        timed_counts = _Counts.now() - warmed
        compiled_counts = warmed - start
    finally:
        cache = None  # frees the static K/V before the dynamo reset below
        if model.config._attn_implementation != original:
            model.set_attn_implementation(original)
        _forget_compiled(model)
    compiled = auto_compiled and compiled_counts.graphs > 0
    cuda_graphs = None
    if compiled:
        mode = getattr(used, "mode", None)
        cuda_graphs = (device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
                       and compiled_counts.cudagraph_skips == 0 and timed_counts.cudagraph_skips == 0)
    return HFStaticTiming(
        points=list(points),
        step_seconds=times,
        auto_compiled=auto_compiled,
        compiled=compiled,
        graphs=compiled_counts.graphs,
        graph_breaks=compiled_counts.graph_breaks,
        graphs_while_timed=timed_counts.graphs,
        cuda_graphs=cuda_graphs,
        compile_seconds=max(sum(warm) - len(warm) * times[0], 0.0) if compiled else None,
        compile_config=({k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
                         for k, v in used.to_dict().items()} if used is not None else None),
    )
