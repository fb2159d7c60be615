"""HuggingFace integration: the ``kvsieve`` attention function, :func:`apply` and :func:`generate`.

No model class is patched. kvsieve registers an attention function (and a mask function) under the name
``"kvsieve"`` with transformers' ``AttentionInterface``/``AttentionMaskInterface``. :func:`apply` builds an
:class:`~kvsieve.engine.Engine` (compressor, backend, schedule) and attaches it to the model; the attention
function finds the engine of the module HF hands it and calls :meth:`Engine.attention
<kvsieve.engine.Engine.attention>`. The :class:`~kvsieve.cache.SieveCache` only stores.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvsieve.backend import KVBackend
from kvsieve.composition import Preset
from kvsieve.compressor import Compressor
from kvsieve.engine import ATTENTION_NAME, Engine, cache_kwarg, engine_of
from kvsieve.fastpath import fast_generate
from kvsieve.params import parse_params
from kvsieve.plugins import build_compressor, registry

__all__ = [
    "ATTENTION_NAME",
    "SUPPORTED_MODEL_TYPES",
    "Engine",
    "GenerationResult",
    "UnsupportedModelError",
    "apply",
    "cache_kwarg",
    "check_config",
    "check_inputs",
    "generate",
    "resolve_backend",
    "resolve_compressor",
]

SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})


class UnsupportedModelError(ValueError):
    """The model cannot run with kvsieve (refused before any work starts)."""


# ---------------------------------------------------------------------------------------------- attention
def kvsieve_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``"kvsieve"`` (HF's signature; returns ``[B, Q, H, d]``): the
    engine attached to the module's model does the work."""
    engine = engine_of(module)
    if engine is None:
        raise RuntimeError(
            f"the kvsieve attention ran on {type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) of "
            "a model kvsieve.apply is not active on; use `with kvsieve.apply(model, ...)` instead of setting "
            "attn_implementation='kvsieve' by hand"
        )
    if engine.cache is None:  # this forward runs without a cache (use_cache=False): plain SDPA semantics
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = engine.attention(module, query, key, value, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None


def kvsieve_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """Mask function registered as ``"kvsieve"``: the SDPA boolean mask for a prefill into an empty cache;
    ``None`` afterwards (the attention function then masks from the cache's live ranges itself)."""
    q_offset = kwargs.get("q_offset")
    if q_offset is None and kwargs.get("cache_position") is not None:  # transformers < 5.24
        q_offset = int(kwargs["cache_position"][0])
    if q_offset:
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION_NAME, kvsieve_attention)
AttentionMaskInterface.register(ATTENTION_NAME, kvsieve_mask)
assert ATTENTION_NAME in ALL_MASK_ATTENTION_FUNCTIONS


# ---------------------------------------------------------------------------------------------- resolution
def resolve_compressor(compressor: str | Compressor, params: dict[str, Any] | None = None) -> Compressor:
    """A compressor instance from a registered name and parameters (an instance passes through).

    A name ``"a+b"`` that is not registered composes the registered ``a`` (prefill) and ``b`` (decode), with
    parameters addressed as ``a.param`` / ``b.param`` (:class:`kvsieve.composition.Preset`).
    """
    if params is not None and not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of compressor parameters (or None), got {params!r}")
    if isinstance(compressor, Compressor):
        if params:
            raise ValueError("pass parameters either to the compressor instance or as params, not both")
        return compressor
    if not isinstance(compressor, str):
        raise TypeError(f"compressor must be a registered name or a Compressor instance, got {compressor!r}")
    if "+" in compressor and compressor not in registry().names("compressor"):
        # "a+b" that no plugin registered as a preset: compose the registered a (prefill) and b (decode)
        return Preset.parse(compressor)(**parse_params(params, source="params"))
    return build_compressor(compressor, params)


def resolve_backend(backend: str | KVBackend, device: torch.device, dtype: torch.dtype) -> KVBackend:
    """A backend instance that can run on ``device``/``dtype``; ``"auto"`` picks the best available one.

    Raises:
        ValueError: the named backend is unknown or cannot run here (the message says why).
    """
    device = torch.device(device)
    if not isinstance(backend, str | KVBackend):
        raise TypeError(f"backend must be a registered backend name, 'auto' or a KVBackend instance, got {backend!r}")
    if isinstance(backend, KVBackend):
        ok, why = backend.supports(device, dtype)
        if not ok:
            raise ValueError(f"backend {backend.name!r} cannot be used here: {why}")
        return backend
    if backend == "auto":  # a faulty third-party backend is reported by the registry and left out
        candidates = registry().available_backends(device, dtype)
        if not candidates:
            raise ValueError(f"no kvsieve backend can run {dtype} on {device.type}")
        return candidates[0]
    instance = registry().backend(backend)
    ok, why = registry().backend_status(backend, device, dtype)
    if not ok:
        raise ValueError(f"backend {backend!r} cannot be used here: {why}")
    return instance


def check_model(model: torch.nn.Module, allow_unsupported: bool = False) -> None:
    """Refuse models kvsieve cannot compress correctly, with a message that says why."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"expected a HuggingFace PreTrainedModel, got {type(model).__name__}")
    check_config(config, allow_unsupported)


def check_config(config: Any, allow_unsupported: bool = False) -> None:
    """:func:`check_model` from the model's config alone (before its weights are loaded)."""
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{config.model_type!r} is an encoder-decoder model; kvsieve compresses decoder-only models only"
        )
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None)
    uses_sliding = any("sliding" in str(t) for t in layer_types) or (
        sliding is not None and getattr(config, "use_sliding_window", True)
    )
    if uses_sliding:
        raise UnsupportedModelError(
            f"{config.model_type!r} model uses sliding-window attention (sliding_window={sliding}); kvsieve does "
            "not support sliding-window layers yet. If your contexts fit inside the window, load the model with "
            "sliding_window=None."
        )
    if config.model_type not in SUPPORTED_MODEL_TYPES and not allow_unsupported:
        raise UnsupportedModelError(
            f"model type {config.model_type!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}); pass allow_unsupported=True to try anyway"
        )


# ---------------------------------------------------------------------------------------------- apply
@contextlib.contextmanager
def apply(
    model: torch.nn.Module,
    compressor: str | Compressor = "none",
    backend: str | KVBackend = "auto",
    *,
    params: dict[str, Any] | None = None,
    allow_unsupported: bool = False,
    checks: bool | None = None,
    prefill_graphs: bool | None = None,
) -> Iterator[Engine]:
    """Compress the KV cache of ``model`` while the context is active.

    Inside the context every forward that starts with an empty cache (so every ``model.generate`` call) gets a
    fresh :class:`~kvsieve.cache.SieveCache` driven by ``compressor`` over ``backend``. On exit the model is
    restored. One ``apply`` per model at a time, from one thread (nesting is refused).

    Args:
        model: a HuggingFace decoder-only model (Llama, Qwen2, Qwen3, Mistral families).
        compressor: a registered compressor name (see ``kvsieve plugins``) or a Compressor instance.
        backend: a registered backend name, ``"auto"``, or a KVBackend instance.
        params: compressor parameters when ``compressor`` is a name (:mod:`kvsieve.params`: ``{"ratio": 0.2,
            "scoring.pooling": "max"}``).
        allow_unsupported: try model types kvsieve has not been tested on.
        checks: check plugin output on the device before it enters the cache (:mod:`kvsieve.contracts`).
            Default: on, unless the environment sets ``KVSIEVE_CHECKS=off``.
        prefill_graphs: on CUDA, replay each layer's prompt compression from a captured CUDA graph
            (:mod:`kvsieve.prefill_graph`: the same results, less host time). Default: on, unless the environment
            sets ``KVSIEVE_PREFILL_GRAPHS=0``.

    Yields:
        the :class:`~kvsieve.engine.Engine` (``engine.last_cache`` is the cache of the latest forward).
    """
    check_model(model, allow_unsupported)
    compressor = resolve_compressor(compressor, params)
    compressor.check_model(model.config)
    first = next(model.parameters())
    engine = Engine(model, compressor, resolve_backend(backend, first.device, first.dtype), checks=checks,
                    prefill_graphs=prefill_graphs)
    engine.attach()
    try:
        yield engine
    finally:
        engine.detach()


# ---------------------------------------------------------------------------------------------- generate
def check_inputs(input_ids: Any, attention_mask: Any) -> None:
    """Refuse prompts :func:`generate` cannot run, before any work: ``input_ids`` must be an integer tensor
    ``[B, L]`` with ``L >= 1``, ``attention_mask`` None or of the same shape with 0/1 entries."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        got = f"a {input_ids.dim()}-D {input_ids.dtype} tensor" if isinstance(input_ids, torch.Tensor) else repr(
            type(input_ids).__name__)
        raise TypeError(f"input_ids must be an integer tensor of shape [batch, length], got {got}"
                        + (" (add a batch dimension: input_ids[None])" if isinstance(input_ids, torch.Tensor)
                           and input_ids.dim() == 1 else ""))
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one prompt token")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor of shape {tuple(input_ids.shape)} or None, "
                        f"got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, but input_ids has {tuple(input_ids.shape)}: "
            "they must match (one 0/1 entry per token)"
        )
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if bool((attention_mask.sum(dim=1) == 0).any()):
        raise ValueError("attention_mask has a row with no token (all padding)")



@attrs.frozen
class GenerationResult:
    """What :func:`generate` returns.

    Attributes:
        sequences: ``int64 [B * num_return_sequences, Lp + new]`` prompt and generated ids (as HF returns them).
        prompt_tokens: ``Lp`` (padded prompt length).
        generated_tokens: new tokens per row (max over rows).
        kv_lengths: physical cached tokens per layer at the end (max over rows and KV heads).
        kv_bytes: K/V storage allocated at the end; ``kv_bytes_peak`` the most allocated at once.
        seconds: wall time of the generate call; ``tokens_per_s`` = generated tokens of all rows / seconds.
        compressor: the compressor's resolved configuration; ``backend`` the backend's name.
    """

    sequences: torch.Tensor
    prompt_tokens: int
    generated_tokens: int
    kv_lengths: list[int]
    kv_bytes: int
    kv_bytes_peak: int
    seconds: float
    tokens_per_s: float
    compressor: dict[str, Any]
    backend: str


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    compressor: str | Compressor = "none",
    backend: str | KVBackend = "auto",
    params: dict[str, Any] | None = None,
    fast: bool = False,
    static_capacity: int | None = None,
    use_cuda_graph: bool | None = None,
    fuse_layers: bool | None = None,
    checks: bool | None = None,
    prefill_graphs: bool | None = None,
    **generate_kwargs: Any,
) -> GenerationResult:
    """``model.generate`` with a compressed KV cache; returns the sequences and the cache's measurements.

    ``generate_kwargs`` go to ``model.generate`` unchanged (``max_new_tokens``, ``do_sample``,
    ``num_return_sequences``, ...).

    ``fast=True`` decodes through the fast path instead (:func:`kvsieve.fastpath.fast_generate`, docs/fast-path.md):
    a static-capacity cache whose decode step is replayed from a CUDA graph (``use_cuda_graph``, default on CUDA),
    ``static_capacity`` slots per layer (default: sized from the compressor), decode steps through the fused
    decoder layer (``fuse_layers``, default when the model allows it: :mod:`kvsieve.fused_layer`); greedy search and
    sampling (a ``generator=`` may be passed), same tokens as the eager path. ``checks``, ``prefill_graphs``: see
    :func:`apply`.
    """
    if not fast and (static_capacity is not None or use_cuda_graph is not None or fuse_layers is not None):
        raise ValueError("static_capacity, use_cuda_graph and fuse_layers belong to the fast path: pass fast=True")
    check_inputs(input_ids, attention_mask)
    with apply(model, compressor, backend, params=params, checks=checks, prefill_graphs=prefill_graphs) as engine:
        start = time.perf_counter()
        with torch.inference_mode():
            if fast:
                sequences = fast_generate(model, input_ids, attention_mask, engine, static_capacity=static_capacity,
                                          use_cuda_graph=use_cuda_graph, fuse_layers=fuse_layers,
                                          **generate_kwargs)
            else:
                sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    cache = engine.last_cache
    prompt = input_ids.shape[1]
    new = sequences.shape[1] - prompt
    return GenerationResult(
        sequences=sequences,
        prompt_tokens=prompt,
        generated_tokens=new,
        kv_lengths=cache.kv_lengths(),
        kv_bytes=cache.nbytes(),
        kv_bytes_peak=cache.peak_nbytes,
        seconds=seconds,
        tokens_per_s=sequences.shape[0] * new / seconds if seconds > 0 else float("inf"),
        compressor=engine.compressor.config(),
        backend=engine.backend.name,
    )
