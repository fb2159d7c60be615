"""HuggingFace integration: the ``kvsieve`` attention function, :func:`apply` and :func:`generate`.

No model class is patched. kvsieve registers an attention function (and a mask function) under the name
``"kvsieve"`` with transformers' ``AttentionInterface``/``AttentionMaskInterface``, switches the model to it
inside :func:`apply`, and puts a :class:`~kvsieve.cache.SieveCache` into the model's forward through a forward
pre-hook whenever a forward starts with an empty cache. The cache carries the compressor and the backend; the
attention function appends through ``Cache.update`` (as every HF model does), computes attention over the live
slots with the backend, then lets the compressor compress the layer.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvsieve.backend import KVBackend
from kvsieve.cache import SieveCache, SieveLayer, active
from kvsieve.composition import Preset
from kvsieve.compressor import Compressor, LayerEvent
from kvsieve.plugins import registry

__all__ = [
    "ATTENTION_NAME",
    "SUPPORTED_MODEL_TYPES",
    "GenerationResult",
    "Session",
    "UnsupportedModelError",
    "apply",
    "cache_kwarg",
    "generate",
    "resolve_backend",
    "resolve_compressor",
]

ATTENTION_NAME = "kvsieve"
SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})


class UnsupportedModelError(ValueError):
    """The model cannot run with kvsieve (refused before any work starts)."""


# ---------------------------------------------------------------------------------------------- attention
def _padding_starts(attention_mask: torch.Tensor | None, batch: int, num_kv_heads: int, device) -> torch.Tensor:
    """``int64 [B, Hkv]`` leading padding slots, read off the last query row of the 4D prefill mask."""
    if attention_mask is None:
        return torch.zeros(batch, num_kv_heads, dtype=torch.long, device=device)
    last_row = attention_mask[:, 0, -1, :].to(torch.bool)  # [B, K]
    pad = (~last_row).long().cumprod(dim=-1).sum(dim=-1)  # leading False entries
    if bool((last_row.sum(dim=-1) + pad != last_row.shape[-1]).any()):
        raise ValueError(
            "kvsieve needs LEFT padding (padding only before each prompt); got an attention_mask with padding "
            "inside or after a prompt. Set tokenizer.padding_side = 'left'."
        )
    return pad[:, None].expand(batch, num_kv_heads).contiguous()


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
    """The attention function registered as ``"kvsieve"`` (HF's signature; returns ``[B, Q, H, d]``)."""
    cache, layer_idx = active.cache, active.layer_idx
    active.cache = None
    if cache is None or cache.compressor is None or layer_idx != module.layer_idx:
        # no SieveCache in this forward (use_cache=False, a plain DynamicCache): plain SDPA semantics
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    layer: SieveLayer = cache.layers[layer_idx]
    backend: KVBackend = cache.backend
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    Q = query.shape[2]
    # prefill = the first forward into this layer (its Q tokens are all it holds). With token propagation a
    # later layer receives fewer tokens than the prompt has, so ``seen`` (the logical length) may exceed Q.
    prefill = layer.is_prefill(Q)
    if prefill:
        B, Hkv = layer.ends.shape
        layer.starts = _padding_starts(attention_mask, B, Hkv, query.device)
        layer.prompt_len = layer.seen  # the logical prompt length (Q unless token propagation thinned it)
        end = layer.max_end
        out = backend.prefill_attention(query, key[:, :, :end], value[:, :, :end], attention_mask, scale)
    else:
        out = backend.decode_attention(query, key, value, layer.starts, layer.ends, scale)
    layer.push_queries(query)
    cache.after_attention(
        LayerEvent(
            phase="prefill" if prefill else "decode",
            layer=layer,
            layer_idx=layer_idx,
            num_layers=cache.num_layers,
            cache=cache,
            backend=backend,
            scale=scale,
            generated=layer.seen - layer.prompt_len,
        )
    )
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
    if isinstance(compressor, Compressor):
        if params:
            raise ValueError("pass parameters either to the compressor instance or as params, not both")
        return compressor
    if "+" in compressor and compressor not in registry().names("compressor"):
        # "a+b" that no plugin registered as a preset: compose the registered a (prefill) and b (decode)
        return Preset.parse(compressor)(**(params or {}))
    return registry().compressor(compressor, **(params or {}))


def resolve_backend(backend: str | KVBackend, device: torch.device, dtype: torch.dtype) -> KVBackend:
    """A backend instance that can run on ``device``/``dtype``; ``"auto"`` picks the best available one.

    Raises:
        ValueError: the named backend is unknown or cannot run here (the message says why).
    """
    device = torch.device(device)
    if isinstance(backend, KVBackend):
        instance = backend
    elif backend == "auto":
        candidates = []
        for entry in registry().entries("backend"):
            instance = entry.obj()
            if instance.supports(device, dtype)[0]:
                candidates.append(instance)
        if not candidates:
            raise ValueError(f"no kvsieve backend can run {dtype} on {device.type}")
        return max(candidates, key=lambda b: b.auto_priority)
    else:
        instance = registry().backend(backend)
    ok, why = instance.supports(device, dtype)
    if not ok:
        raise ValueError(f"backend {instance.name!r} cannot be used here: {why}")
    return instance


def check_model(model: torch.nn.Module, allow_unsupported: bool = False) -> None:
    """Refuse models kvsieve cannot compress correctly, with a message that says why."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"expected a HuggingFace PreTrainedModel, got {type(model).__name__}")
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
@attrs.define
class Session:
    """What :func:`apply` set up: the compressor, the backend, and the cache of the most recent forward."""

    compressor: Compressor
    backend: KVBackend
    num_layers: int
    max_positions: int | None
    last_cache: SieveCache | None = None

    def new_cache(self) -> SieveCache:
        cache = SieveCache(
            query_window=self.compressor.query_window, reserve=self.compressor.reserve, num_layers=self.num_layers
        )
        cache.compressor, cache.backend = self.compressor, self.backend
        return cache


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name the model's forward uses for the cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prompt_len(args: tuple, kwargs: dict) -> int | None:
    for name in ("input_ids", "inputs_embeds"):
        tensor = kwargs.get(name)
        if tensor is not None:
            return tensor.shape[1]
    return args[0].shape[1] if args and isinstance(args[0], torch.Tensor) else None


@contextlib.contextmanager
def apply(
    model: torch.nn.Module,
    compressor: str | Compressor = "none",
    backend: str | KVBackend = "auto",
    *,
    params: dict[str, Any] | None = None,
    allow_unsupported: bool = False,
) -> Iterator[Session]:
    """Compress the KV cache of ``model`` while the context is active.

    Inside the context every forward that starts with an empty cache (so every ``model.generate`` call) gets a
    fresh :class:`SieveCache` driven by ``compressor`` over ``backend``. On exit the model is restored.

    Args:
        model: a HuggingFace decoder-only model (Llama, Qwen2, Qwen3, Mistral families).
        compressor: a registered compressor name (see ``kvsieve plugins``) or a Compressor instance.
        backend: a registered backend name, ``"auto"``, or a KVBackend instance.
        params: compressor parameters when ``compressor`` is a name.
        allow_unsupported: try model types kvsieve has not been tested on.

    Yields:
        the :class:`Session` (``session.last_cache`` is the cache of the latest forward).
    """
    check_model(model, allow_unsupported)
    compressor = resolve_compressor(compressor, params)
    compressor.check_model(model.config)
    first = next(model.parameters())
    backend = resolve_backend(backend, first.device, first.dtype)
    config = model.config
    session = Session(
        compressor, backend, config.num_hidden_layers, getattr(config, "max_position_embeddings", None)
    )
    cache_kw = cache_kwarg(model)

    def inject_cache(module, args, kwargs):
        cache = kwargs.get(cache_kw)
        if cache is None and kwargs.get("use_cache") is False:
            return None
        if isinstance(cache, SieveCache):
            if cache.compressor is None:
                cache.compressor, cache.backend = session.compressor, session.backend
            session.last_cache = cache
            return None
        if cache is not None and (not isinstance(cache, Cache) or cache.get_seq_length() > 0):
            raise ValueError("kvsieve.apply: the model was given a non-empty cache kvsieve did not create")
        prompt_len = _prompt_len(args, kwargs)
        if prompt_len is not None:
            if session.max_positions is not None and prompt_len > session.max_positions:
                raise ValueError(
                    f"prompt of {prompt_len} tokens is longer than the model's context "
                    f"(max_position_embeddings={session.max_positions})"
                )
            session.compressor.check_prompt(prompt_len)
        session.last_cache = session.new_cache()
        kwargs[cache_kw] = session.last_cache
        return args, kwargs

    previous_impl = config._attn_implementation
    handles = []
    try:
        model.set_attn_implementation(ATTENTION_NAME)
        handles.append(model.register_forward_pre_hook(inject_cache, with_kwargs=True))
        handles += compressor.install(model)
        yield session
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous_impl)


# ---------------------------------------------------------------------------------------------- generate
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
    **generate_kwargs: Any,
) -> GenerationResult:
    """``model.generate`` with a compressed KV cache; returns the sequences and the cache's measurements.

    ``generate_kwargs`` go to ``model.generate`` unchanged (``max_new_tokens``, ``do_sample``,
    ``num_return_sequences``, ...).

    ``fast=True`` decodes through the fast path instead (:func:`kvsieve.fastpath.fast_generate`, docs/fast-path.md):
    a static-capacity cache whose decode step is replayed from a CUDA graph (``use_cuda_graph``, default on CUDA),
    ``static_capacity`` slots per layer (default: sized from the compressor); greedy search and sampling (a
    ``generator=`` may be passed), same tokens as the eager path.
    """
    if not fast and (static_capacity is not None or use_cuda_graph is not None):
        raise ValueError("static_capacity and use_cuda_graph belong to the fast path: pass fast=True")
    with apply(model, compressor, backend, params=params) as session:
        start = time.perf_counter()
        with torch.inference_mode():
            if fast:
                from kvsieve.fastpath import fast_generate  # imports this module

                sequences = fast_generate(model, input_ids, attention_mask, session, static_capacity=static_capacity,
                                          use_cuda_graph=use_cuda_graph, **generate_kwargs)
            else:
                sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    cache = session.last_cache
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
        compressor=session.compressor.config(),
        backend=session.backend.name,
    )
