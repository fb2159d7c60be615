"""The engine: what :func:`kvsieve.apply` attaches to a model, and what the ``kvsieve`` attention function calls.

One :class:`Engine` per model owns the compressor, the backend, the observers and the schedule; the
:class:`~kvsieve.cache.SieveCache` only stores. Its lifecycle:

1. :meth:`Engine.attach` registers the engine for each attention module of the model (the attention function
   looks it up by the module HF hands it), switches the model to the ``kvsieve`` attention, adds a forward
   pre-hook that gives every forward its cache (a fresh :class:`~kvsieve.cache.SieveCache` when the forward
   starts with an empty one), and lets the compressor install model-level machinery (:meth:`Compressor.install
   <kvsieve.compressor.Compressor.install>`: token propagation).
2. Each forward: :meth:`Engine.begin_forward` decides, once, whether it is the prefill (a forward into an empty
   cache) or a decode step. HF appends each layer's new K/V through ``Cache.update``, then calls the attention
   function, which calls :meth:`Engine.attention`: backend attention over the live slots, the selector queries
   pushed, and the compressor's :meth:`~kvsieve.compressor.Compressor.after_attention` with a
   :class:`~kvsieve.compressor.LayerEvent`.
3. On the fast path (:mod:`kvsieve.fastpath`) a decode step is replayed from a CUDA graph, which runs no Python:
   :meth:`Engine.use_static` makes decode events wait, and the decode loop calls
   :meth:`Engine.run_decode_schedule` between steps.
4. :meth:`Engine.detach` restores the model.

An engine belongs to one model and one thread: attaching a second engine to a model (a nested ``apply``) or
running the model from another thread is refused with a message that says why.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache

from kvsieve.cache import SieveCache
from kvsieve.compressor import LayerEvent
from kvsieve.contracts import ContractGuard, checks_enabled
from kvsieve.indexing import ints_to_device
from kvsieve.parallel import HeadGroup, tensor_parallel_group
from kvsieve.plugins import describe_object, has_layer_compressed_observers, notify_layer_compressed
from kvsieve.prefill_graph import PrefillGraphs, prefill_graphs_enabled

if TYPE_CHECKING:
    from kvsieve.backend import KVBackend
    from kvsieve.compressor import Compressor
    from kvsieve.propagation import PropagationState

__all__ = ["ATTENTION_NAME", "Engine", "cache_kwarg", "engine_of"]

ATTENTION_NAME = "kvsieve"

# attention module -> the engine attached to its model (weak: a model that is garbage collected leaves no entry)
_ENGINES: weakref.WeakKeyDictionary[torch.nn.Module, Engine] = weakref.WeakKeyDictionary()


def engine_of(module: torch.nn.Module) -> Engine | None:
    """The engine attached to the model that owns attention ``module`` (None outside :func:`kvsieve.apply`)."""
    return _ENGINES.get(module)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name the model's forward uses for the cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules HF passes to the attention function: those with an integer ``layer_idx``."""
    found = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    if not found:
        raise ValueError(f"kvsieve cannot find the attention modules of {type(model).__name__} (no layer_idx)")
    return found


def padding_starts(attention_mask: torch.Tensor | None, batch: int, num_kv_heads: int,
                   device) -> tuple[torch.Tensor, list[int]]:
    """Leading padding slots per row, read off the last query row of the 4D prefill mask: ``int64 [B, Hkv]`` on
    the device and the same per row on the host (one host read, which also checks the padding is on the left)."""
    if attention_mask is None:
        return torch.zeros(batch, num_kv_heads, dtype=torch.long, device=device), [0] * batch
    last_row = attention_mask[:, 0, -1, :].to(torch.bool)  # [B, K]
    pad = (~last_row).long().cumprod(dim=-1).sum(dim=-1)  # leading False entries
    right_or_inner = (last_row.sum(dim=-1) + pad != last_row.shape[-1]).any()
    *pad_list, bad = torch.cat([pad, right_or_inner[None].long()]).tolist()
    if bad:
        raise ValueError(
            "kvsieve needs LEFT padding (padding only before each prompt); got an attention_mask with padding "
            "inside or after a prompt. Set tokenizer.padding_side = 'left'."
        )
    return pad[:, None].expand(batch, num_kv_heads).contiguous(), pad_list


class Engine:
    """Runs a compressor over a backend for one model (see the module docstring).

    Args:
        model: a HuggingFace decoder-only model.
        compressor: the compressor (already built).
        backend: the kernel backend (already resolved for the model's device and dtype).
        checks: run the device-side contract checks on plugin output (:mod:`kvsieve.contracts`). Default: on,
            unless ``KVSIEVE_CHECKS=off``.
        prefill_graphs: on CUDA, replay each layer's prompt compression from a captured CUDA graph
            (:mod:`kvsieve.prefill_graph`; the same results, less host time). Default: on, unless
            ``KVSIEVE_PREFILL_GRAPHS=0``.

    Attributes:
        cache: the cache of the forward that runs (or ran last); ``None`` while a forward runs without one
            (``use_cache=False``: plain SDPA attention).
        last_cache: the latest :class:`~kvsieve.cache.SieveCache` a forward used (what results report).
        phase: ``"prefill"`` or ``"decode"``: the current forward's phase.
        propagation: the current forward's token-propagation state (:mod:`kvsieve.propagation`), if any.
        observed: whether a plugin observes compactions (``kvsieve_layer_compressed``).
        guard: the :class:`~kvsieve.contracts.ContractGuard` every compaction's plugin output goes through.
        heads: the :class:`~kvsieve.parallel.HeadGroup` scores that span heads are reduced over (a
            tensor-parallel group when the model is split by heads).
        prefill_graphs: whether prompt compressions may be replayed from CUDA graphs; ``prefill_graph_cache`` the
            :class:`~kvsieve.prefill_graph.PrefillGraphs` (captured graphs, freed on :meth:`detach`).
        forwards: forwards begun so far (a new forward clears the graphs' fault flags).
    """

    def __init__(self, model: torch.nn.Module, compressor: Compressor, backend: KVBackend,
                 checks: bool | None = None, prefill_graphs: bool | None = None):
        config = model.config
        self.model, self.compressor, self.backend = model, compressor, backend
        self.num_layers: int = config.num_hidden_layers
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        self.cache: SieveCache | None = None
        self.last_cache: SieveCache | None = None
        self.phase = "prefill"
        self.propagation: PropagationState | None = None
        self.decode_between_steps = False
        self.scales: dict[int, float] = {}
        self.thread = threading.get_ident()
        self.cache_kw = cache_kwarg(model)
        self._handles: list[Any] = []
        self._previous_attention: str | None = None
        self.observed = has_layer_compressed_observers()
        self.guard = ContractGuard(checks_enabled(checks), describe=describe_object)
        self.heads = HeadGroup(tensor_parallel_group(model))  # this rank's KV heads, or a tensor-parallel group
        self.prefill_graphs = prefill_graphs_enabled(prefill_graphs)
        self.prefill_graph_cache = PrefillGraphs()
        self.forwards = 0
        # the prefill's left padding, read once per mask (every layer of a forward gets the same mask object)
        self._padding_memo: tuple[Any, ...] | None = None
        self._told_padding: tuple[Any, list[int]] | None = None  # (mask, its left padding per row)

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> None:
        """Attach to the model (refused if another engine is attached to it)."""
        modules = _attention_modules(self.model)
        for module in modules:
            other = _ENGINES.get(module)
            if other is not None:
                raise RuntimeError(
                    f"kvsieve.apply is already active on this model (compressor {other.compressor.name!r}); nested "
                    "apply on one model is not supported: exit the outer one first, or compose compressors in one "
                    "apply (e.g. compressor='fastkv+rpc')"
                )
        self._previous_attention = self.model.config._attn_implementation
        try:
            for module in modules:
                _ENGINES[module] = self
            self.model.set_attn_implementation(ATTENTION_NAME)
            self._handles.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._after_forward))
            self._handles += self.compressor.install(self)
        except BaseException:
            self.detach()
            raise

    def add_handle(self, handle: Any) -> None:
        """Remove ``handle`` (anything with ``remove()``, e.g. a hook handle) when the engine detaches."""
        self._handles.append(handle)

    def detach(self) -> None:
        """Restore the model: its attention implementation, no hooks, no engine."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in list(_ENGINES):
            if _ENGINES.get(module) is self:
                del _ENGINES[module]
        if self._previous_attention is not None:
            self.model.set_attn_implementation(self._previous_attention)
            self._previous_attention = None
        self.cache, self.propagation = None, None
        self.prefill_graph_cache.clear()
        self._padding_memo = self._told_padding = None

    # ------------------------------------------------------------------ forwards
    def new_cache(self) -> SieveCache:
        """An empty cache sized for the model and the compressor's selector window."""
        return SieveCache(query_window=self.compressor.query_window, num_layers=self.num_layers)

    def _before_forward(self, module, args, kwargs):
        cache = kwargs.get(self.cache_kw)
        if cache is None and kwargs.get("use_cache") is False:
            self.begin_forward(None)
            return None
        if isinstance(cache, SieveCache):
            self.begin_forward(cache)
            return None
        if cache is not None and (not isinstance(cache, Cache) or cache.get_seq_length() > 0):
            raise ValueError("kvsieve.apply: the model was given a non-empty cache kvsieve did not create")
        prompt_len = _prompt_len(args, kwargs)
        if prompt_len == 0:
            raise ValueError("the prompt is empty: give at least one token")
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(mask, torch.Tensor) and isinstance(ids, torch.Tensor) and mask.dim() == 2 \
                and mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, but the prompt's input_ids have "
                             f"{tuple(ids.shape)}: they must match")
        if prompt_len is not None:
            if self.max_positions is not None and prompt_len > self.max_positions:
                raise ValueError(
                    f"prompt of {prompt_len} tokens is longer than the model's context "
                    f"(max_position_embeddings={self.max_positions})"
                )
            self.compressor.check_prompt(prompt_len)
        cache = self.new_cache()
        kwargs[self.cache_kw] = cache
        self.begin_forward(cache)
        return args, kwargs

    def _after_forward(self, module, args, output):
        self._padding_memo = self._told_padding = None
        self.prefill_graph_cache.join()  # the prompt compressions issued on side streams (kvsieve.prefill_graph)
        self.guard.flush()  # a contract fault of this forward's last compactions (one read, only if pending)

    def begin_forward(self, cache: SieveCache | None) -> None:
        """Start a forward that uses ``cache`` (None: no kvsieve cache); decide its phase."""
        if threading.get_ident() != self.thread:
            raise RuntimeError(
                "a model inside kvsieve.apply was run from another thread than the one that called apply; one model "
                "instance cannot be shared between threads: give each thread its own model (and apply)"
            )
        self.cache = cache
        self.forwards += 1
        self._padding_memo = self._told_padding = None
        if cache is not None:
            self.last_cache = cache
            self.phase = "prefill" if cache.get_seq_length() == 0 else "decode"

    def attention(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scale: float, queries_recorded: bool = False) -> torch.Tensor:
        """One layer's attention over its live slots, then the compressor's turn.

        Args:
            module: the attention module (its ``layer_idx`` names the layer).
            query: ``[B, H, Q, d]`` post-RoPE queries.
            key, value: ``[B, Hkv, C, d]``: the whole buffers ``Cache.update`` returned.
            attention_mask: the 4D prefill mask, or None.
            scale: the softmax scale.
            queries_recorded: the layer's cache already holds ``query`` in its selector-query ring (the fused
                decoder layer's append writes it there); otherwise it is pushed here.

        Returns:
            ``[B, H, Q, d]``.
        """
        layer_idx = module.layer_idx
        layer = self.cache.layers[layer_idx]
        self.scales[layer_idx] = scale
        if self.phase == "prefill":
            padding, pad_list = self._padding(attention_mask, *layer.ends.shape, query.device)
            end = layer.max_end
            layer.begin_prompt(padding, tuple(end - pad for pad in pad_list))
            out = self.backend.prefill_attention(query, key[:, :, :end], value[:, :, :end], attention_mask, scale)
        else:
            out = self.backend.decode_attention(query, key, value, layer.starts, layer.ends, scale)
        if not queries_recorded:
            layer.push_queries(query)
        # a compressor hears only the phases it declares (eager and fast path alike); on the fast path decode
        # events wait for run_decode_schedule
        if self.phase in self.compressor.phases and (self.phase == "prefill" or not self.decode_between_steps):
            self.compressor.after_attention(self.layer_event(layer_idx, queries=query))
        return out

    def _padding(self, attention_mask: torch.Tensor | None, B: int, Hkv: int,
                 device) -> tuple[torch.Tensor, list[int]]:
        """:func:`padding_starts`, read once per mask object in a forward (HF hands every layer the same mask;
        token propagation one gathered mask to the layers after it), so no layer reads the device for it; none
        at all for a mask whose padding the host was told (:meth:`known_padding`)."""
        memo = self._padding_memo
        if memo is not None and memo[0] is attention_mask and memo[1:4] == (B, Hkv, device):
            return memo[4], memo[5]
        told = self._told_padding
        if told is not None and told[0] is attention_mask and len(told[1]) == B:
            pad_list = told[1]
            padding = ints_to_device(pad_list, device)[:, None].expand(B, Hkv).contiguous()
        else:
            padding, pad_list = padding_starts(attention_mask, B, Hkv, device)
        self._padding_memo = (attention_mask, B, Hkv, device, padding, pad_list)
        return padding, pad_list

    def known_padding(self, attention_mask: torch.Tensor, pad_list: list[int]) -> None:
        """The left padding of ``attention_mask`` per row, known on the host (token propagation gathers a mask
        whose padding the propagating compressor declared): the layers given that mask read nothing to find it."""
        self._told_padding = (attention_mask, list(pad_list))

    @property
    def current_padding(self) -> torch.Tensor | None:
        """``int64 [B]``: the left padding of the mask the last layer attended with in this forward (None before
        any)."""
        return None if self._padding_memo is None else self._padding_memo[4][:, 0]

    def layer_event(self, layer_idx: int, cache: SieveCache | None = None,
                    queries: torch.Tensor | None = None) -> LayerEvent:
        """The :class:`~kvsieve.compressor.LayerEvent` of layer ``layer_idx`` of ``cache`` (default: the current
        forward's) in the current phase; ``queries``: the forward's own queries, when the forward delivers it."""
        layer = (self.cache if cache is None else cache).layers[layer_idx]
        return LayerEvent(
            phase=self.phase,
            layer=layer,
            layer_idx=layer_idx,
            num_layers=self.num_layers,
            engine=self,
            backend=self.backend,
            scale=self.scales[layer_idx],
            generated=layer.seen - layer.prompt_len,
            reserve=self.compressor.reserve,
            queries=queries,
        )

    # ------------------------------------------------------------------ the fast path
    def use_static(self, cache: SieveCache) -> None:
        """From now on the model decodes from ``cache`` (static layers) in replayed steps: decode events wait for
        :meth:`run_decode_schedule`, which the decode loop calls between steps."""
        self.cache = self.last_cache = cache
        self.decode_between_steps = True

    def run_decode_schedule(self, cache: SieveCache) -> None:
        """Run the compressor's decode schedule on ``cache`` for the step that just ran (host code, between
        replays). The cache is named: a replayed step runs no Python, so the engine has not seen which cache it
        used (two decoders may share one model)."""
        if "decode" not in self.compressor.phases:
            return
        self.phase = "decode"
        for layer_idx in range(len(cache.layers)):
            self.compressor.after_attention(self.layer_event(layer_idx, cache))
        self.guard.flush()

    # ------------------------------------------------------------------ observers
    def notify_compressed(self, event: LayerEvent, before: int, after: int) -> None:
        """Tell the ``kvsieve_layer_compressed`` observers that ``event``'s layer went from ``before`` to ``after``
        live slots."""
        notify_layer_compressed(
            layer_idx=event.layer_idx, phase=event.phase, before=before, after=after,
            info={"compressor": self.compressor.name, "generated": event.generated},
        )


def _prompt_len(args: tuple, kwargs: dict) -> int | None:
    for name in ("input_ids", "inputs_embeds"):
        tensor = kwargs.get(name)
        if tensor is not None:
            return tensor.shape[1]
    return args[0].shape[1] if args and isinstance(args[0], torch.Tensor) else None
