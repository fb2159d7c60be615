"""The static-capacity SieveCache of the fast decode path (:mod:`kvsieve.fastpath`).

A :class:`StaticSieveCache` is made from a prefilled :class:`~kvsieve.cache.SieveCache`
(:meth:`StaticSieveCache.from_cache`): each layer's live slots move into buffers of a fixed capacity (per layer:
what the compressor needs at its peak, :func:`static_capacity`), and from then on every tensor a decode step
touches keeps its storage and shape. Nothing in a decode step reads a device value on the host, so the step can
be captured in a CUDA graph and replayed:

* append (:meth:`StaticSieveLayer.update`): scatter the new K/V at ``ends``, then ``ends += 1`` in place; the
  token's logical index (``positions``) comes from a device counter;
* selector queries (:meth:`StaticSieveLayer.push_queries`): written at a ring slot computed from a device counter;
* decode attention runs over the whole buffer with tensor ``starts``/``ends`` (the backend makes its cost follow
  the live length; the torch reference masks).

The compressor's decode schedule does not run inside the step: the attention function hands decode events to
:meth:`StaticSieveCache.after_attention`, which keeps them, and the decode loop calls :meth:`StaticSieveCache.
compress` between steps. Compaction writes into the same buffers (``starts``/``ends`` are copied back into
their tensors; the capacity never shrinks or grows), so a captured graph stays valid and reads the compacted
data at its next replay. Host-side counters (``seen``, ``num_queries``, the bound on ``ends``) cannot advance
during a replay, so the loop calls :meth:`StaticSieveCache.advance` after every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import torch

from kvsieve.cache import SieveCache, SieveLayer
from kvsieve.composition import Composite

if TYPE_CHECKING:
    from kvsieve.backend import KVBackend
    from kvsieve.compressor import Compressor, LayerEvent

__all__ = ["StaticCapacityError", "StaticSieveCache", "StaticSieveLayer", "static_capacity"]


class StaticCapacityError(RuntimeError):
    """A decode step would append past a static layer's capacity."""


class StaticSieveLayer(SieveLayer):
    """A :class:`SieveLayer` of fixed capacity whose decode append is graph-capturable (one token per forward).

    Extra state: ``device_seen`` and ``device_queries`` (``int64 [1]``): ``seen`` and ``num_queries`` on the
    device, advanced inside the step; ``end_bound``: a host upper bound of ``max(ends)``, checked before a step.
    """

    def __init__(self, query_window: int = 0):
        super().__init__(query_window)
        self.device_seen: torch.Tensor | None = None
        self.device_queries: torch.Tensor | None = None
        self.end_bound = 0

    @classmethod
    def from_layer(cls, layer: SieveLayer, capacity: int) -> StaticSieveLayer:
        """Move a prefilled layer into static buffers of ``capacity`` slots; ``layer`` is emptied (its storage
        freed)."""
        used = layer.max_end
        if capacity < used:
            raise ValueError(f"static capacity {capacity} is smaller than the {used} slots the layer already holds")
        if layer.query_window and layer.queries is None:
            raise ValueError("the layer recorded no selector queries: prefill it before making it static")
        static = cls(layer.query_window)
        for name in ("keys", "values", "positions", "queries", "num_queries", "seen", "prompt_len", "compactions",
                     "dtype", "device", "is_initialized"):
            setattr(static, name, getattr(layer, name))
        static.starts, static.ends = layer.starts.contiguous().clone(), layer.ends.contiguous().clone()
        static._reallocate(capacity)  # fresh [B, Hkv, capacity, d] buffers holding slots [0, used)
        static.device_seen = torch.tensor([layer.seen], dtype=torch.long, device=layer.device)
        static.device_queries = torch.tensor([layer.num_queries], dtype=torch.long, device=layer.device)
        static.end_bound = used
        layer.reset()
        return static

    @property
    def max_end(self) -> int:
        # a static layer changes ends in place (inside the captured step): read it, never remember it
        return 0 if self.ends is None else int(self.ends.max())

    # ------------------------------------------------------------------ inside a decode step (graph-safe)
    def is_prefill(self, num_new: int) -> bool:
        return False  # made from a prefilled layer: every forward is a decode step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append one token ``[B, Hkv, 1, d]`` at ``ends`` in place; return the whole buffers."""
        B, Hkv, Q, d = key_states.shape
        if Q != 1:
            raise ValueError(f"a static cache layer appends one token per forward (decode), got {Q}")
        slot = self.ends[..., None]  # [B, Hkv, 1]
        self.keys.scatter_(2, slot[..., None].expand(B, Hkv, 1, d), key_states)
        self.values.scatter_(2, slot[..., None].expand(B, Hkv, 1, value_states.shape[-1]), value_states)
        self.positions.scatter_(2, slot, self.device_seen.expand(B, Hkv, 1))
        self.ends += 1
        self.device_seen += 1
        return self.keys, self.values

    def push_queries(self, queries: torch.Tensor) -> None:
        """Write the step's query ``[B, H, 1, d]`` at ring slot ``device_queries % query_window``."""
        if self.query_window == 0:
            return
        self.queries.index_copy_(2, self.device_queries % self.query_window, queries)
        self.device_queries += 1

    # ------------------------------------------------------------------ between steps (host)
    def advance(self) -> None:
        """The host side of one decode step (a replayed graph runs no Python)."""
        self.seen += 1
        if self.query_window:
            self.num_queries += 1
        self.end_bound += 1

    def ensure_room(self) -> None:
        if self.end_bound + 1 > self.capacity:
            raise StaticCapacityError(
                f"the static cache is full ({self.capacity} slots per layer) after {self.seen - self.prompt_len} "
                "generated tokens: the compressor keeps more than static_capacity allows; pass a larger "
                "static_capacity (or leave it unset to size it from the compressor)"
            )

    def compact(self, backend: KVBackend, keep_slots, counts, dest_starts, reserve: int = 0) -> None:
        starts, ends = self.starts, self.ends
        super().compact(backend, keep_slots, counts, dest_starts, reserve)
        # SieveLayer.compact rebinds starts/ends; a captured graph reads the old tensors: write the new values there
        starts.copy_(self.starts)
        ends.copy_(self.ends)
        self.starts, self.ends = starts, ends
        self.end_bound = int(ends.max())

    def shrink_to_fit(self, reserve: int = 0) -> None:
        return None  # the capacity is static: buffers keep their storage (a captured graph holds their addresses)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a static cache cannot change its batch (beam search is not supported)")


class StaticSieveCache(SieveCache):
    """A :class:`SieveCache` of :class:`StaticSieveLayer` whose decode schedule runs between steps."""

    def __init__(self, layers: Sequence[StaticSieveLayer], query_window: int = 0, reserve: int = 0):
        super().__init__(query_window, reserve, num_layers=len(layers))
        self.layers = list(layers)
        self.decode_events: list[LayerEvent | None] = [None] * len(self.layers)

    @classmethod
    def from_cache(cls, cache: SieveCache, capacities: Sequence[int]) -> StaticSieveCache:
        """Move a prefilled cache into static layers of ``capacities[i]`` slots; ``cache`` is emptied layer by
        layer. ``peak_nbytes`` counts the moment both copies of a layer exist."""
        layers, built, remaining, peak = [], 0, cache.nbytes(), cache.peak_nbytes
        for layer, capacity in zip(cache.layers, capacities, strict=True):
            size = layer.nbytes()
            layers.append(StaticSieveLayer.from_layer(layer, capacity))
            peak = max(peak, built + remaining + layers[-1].nbytes())
            built, remaining = built + layers[-1].nbytes(), remaining - size
        static = cls(layers, cache.query_window, cache.reserve)
        static.compressor, static.backend, static.peak_nbytes = cache.compressor, cache.backend, peak
        return static

    def after_attention(self, event: LayerEvent) -> None:
        # kept for compress(), between steps (a replayed graph runs no Python, so the captured step's events are
        # reused); stored without the back-reference to this cache, which would make a cycle that keeps the
        # static buffers alive until the garbage collector runs
        self.decode_events[event.layer_idx] = attrs.evolve(event, cache=None)

    def advance(self) -> None:
        for layer in self.layers:
            layer.advance()

    def ensure_room(self) -> None:
        for layer in self.layers:
            layer.ensure_room()

    def compress(self) -> None:
        """Run the compressor's decode schedule for the step that just ran (host code: between replays)."""
        if "decode" not in self.compressor.phases:
            return
        for layer, event in zip(self.layers, self.decode_events):
            self.compressor.after_attention(attrs.evolve(event, cache=self, generated=layer.seen - layer.prompt_len))


# ---------------------------------------------------------------------------------------------- sizing
def static_capacity(
    compressor: Compressor, prompt_len: int, max_new_tokens: int, prompt_slots: int | None = None
) -> int:
    """Slots one layer needs to generate ``max_new_tokens`` after a (padded) prompt of ``prompt_len`` tokens.

    The peak a layer reaches: the slots it holds after prefill (``prompt_slots``, default ``prompt_len``: nothing
    was evicted) plus the most generated entries it ever holds, counted before a compaction runs. The last
    generated token is never fed back, so ``max_new_tokens - 1`` are appended. Per decode compressor:

    * none (no decode phase, e.g. ``none``, ``snapkv``, ``fastkv``): every appended token;
    * a compressor with ``cache_length(prompt_len, generated)`` (RPC: ``Lp + k * P // c + R`` after the k-th
      compression): the largest held count plus the token appended before the next compaction, i.e.
      ``(k - 1) * P // c + R + P`` generated entries just before the k-th compression;
    * a compressor with ``cache_budget(prompt_len)`` (StreamingLLM): the budget plus one appended token;
    * anything else: ``ValueError`` (pass ``static_capacity`` to :func:`kvsieve.generate` yourself).

    A composite uses its decode parts (and the plain growth when a part covers only some layers).
    """
    slots = prompt_len if prompt_slots is None else prompt_slots
    appends = max(max_new_tokens - 1, 0)
    if isinstance(compressor, Composite):
        parts = [part for part in compressor.parts if part.phase == "decode"]
        peaks = [_generated_peak(part.compressor, prompt_len, slots, appends) for part in parts]
        if not parts or any(part.layers is not None for part in parts):
            peaks.append(appends)  # layers no decode part touches
    elif "decode" in compressor.phases:
        peaks = [_generated_peak(compressor, prompt_len, slots, appends)]
    else:
        peaks = [appends]
    return slots + max(peaks)


def _generated_peak(compressor: Compressor, prompt_len: int, slots: int, appends: int) -> int:
    """Most slots past the prefilled ``slots`` a decode-time compressor's layer holds over ``appends`` steps."""
    if hasattr(compressor, "cache_length"):
        return max((compressor.cache_length(0, g) for g in range(appends)), default=-1) + 1
    if hasattr(compressor, "cache_budget"):
        return min(appends, max(compressor.cache_budget(prompt_len) - slots, 0) + 1)
    raise ValueError(
        f"cannot size a static cache for the decode-time compressor {compressor.name!r} (it has neither "
        "cache_length() nor cache_budget()): pass static_capacity explicitly"
    )
