"""The static-capacity storage of the fast decode path (:mod:`kvsieve.fastpath`).

:func:`make_static` moves a prefilled :class:`~kvsieve.cache.SieveCache` into one of
:class:`StaticSieveLayer`: each layer's live slots move into buffers of a fixed capacity (per layer: what the
compressor needs at its peak, :func:`static_capacity`), and from then on every tensor a decode step touches keeps
its storage and shape. Nothing in a decode step reads a device value on the host, so the step can be captured in
a CUDA graph and replayed:

* append (:meth:`StaticSieveLayer.update`): scatter the new K/V at ``ends``, then ``ends += 1`` in place; the
  token's logical index (``positions``) comes from a device counter;
* selector queries (:meth:`StaticSieveLayer.push_queries`): written at a ring slot computed from a device counter
  (the fused decoder layer's :meth:`StaticSieveLayer.append_rotated` writes the rotated query there itself, in the
  same kernel as the append, and advances both counters with one increment);
* decode attention runs over the whole buffer with tensor ``starts``/``ends`` (the backend makes its cost follow
  the live length; the torch reference masks).

The device counters (``seen``, the selector-query count) are one tensor for all layers of a device
(:func:`share_step_counters`) that the decode loop advances once per step, outside the captured graph
(:func:`advance_step_counters`), rather than one increment kernel per layer inside it.

Compaction writes into the same buffers (``starts``/``ends`` are copied into their tensors; the capacity never
shrinks or grows), so a captured graph stays valid and reads the compacted data at its next replay. Host-side
counters (``seen``, ``num_queries``, the bound on ``ends``) cannot advance during a replay, so the decode loop
calls :meth:`StaticSieveLayer.advance` after every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from kvsieve.cache import SieveCache, SieveLayer
from kvsieve.layer_ops import append_at_ends

if TYPE_CHECKING:
    from kvsieve.compressor import Compressor

__all__ = [
    "StaticCapacityError",
    "StaticSieveLayer",
    "advance_step_counters",
    "make_static",
    "share_step_counters",
    "static_capacity",
]


class StaticCapacityError(RuntimeError):
    """A decode step would append past a static layer's capacity."""


class StaticSieveLayer(SieveLayer):
    """A :class:`~kvsieve.cache.SieveLayer` of fixed capacity whose decode append is graph-capturable (one token
    per forward). Made from a prefilled layer by :meth:`from_layer`.

    Extra state: ``device_counters`` (``int64 [2]``): ``seen`` and ``num_queries`` on the device, advanced inside
    the step; ``device_seen`` and ``device_queries`` are its two ``[1]`` views; ``end_bound``: a host upper bound of
    ``max(ends)``, checked before a step. With ``shared_counters`` (:func:`share_step_counters`) the counters are
    one tensor for every layer of the same device and state, and the layer's own methods do not advance them: the
    decode loop does, once per step (:func:`advance_step_counters`).
    """

    shared_counters: bool = False

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
        static.dtype, static.device, static.is_initialized = layer.dtype, layer.device, True
        B, Hkv, _, d = layer.keys.shape
        static.keys = layer.keys.new_zeros(B, Hkv, capacity, d)
        static.values = layer.values.new_zeros(B, Hkv, capacity, layer.values.shape[-1])
        static.positions = layer.positions.new_full((B, Hkv, capacity), -1)
        static.keys[:, :, :used] = layer.keys[:, :, :used]
        static.values[:, :, :used] = layer.values[:, :, :used]
        static.positions[:, :, :used] = layer.positions[:, :, :used]
        static.starts, static.ends = layer.starts.contiguous().clone(), layer.ends.contiguous().clone()
        static.queries, static.num_queries = layer.queries, layer.num_queries
        static.seen, static.prompt_len, static.compactions = layer.seen, layer.prompt_len, layer.compactions
        static.row_lengths = layer.row_lengths
        static.slot_fills = dict(layer.slot_fills)
        static.slot_buffers = layer._resized_slot_buffers(capacity, used)
        static.device_counters = torch.tensor([layer.seen, layer.num_queries], dtype=torch.long, device=layer.device)
        static.device_seen, static.device_queries = static.device_counters[0:1], static.device_counters[1:2]
        static.end_bound = used
        layer.reset()
        return static

    @property
    def max_end(self) -> int:
        # a static layer changes ends in place (inside the captured step): read it, never remember it
        return 0 if self.ends is None else int(self.ends.max())

    # ------------------------------------------------------------------ inside a decode step (graph-safe)
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append one token ``[B, Hkv, 1, d]`` at ``ends`` in place; return the whole buffers."""
        Q = key_states.shape[2]
        if Q != 1:
            raise ValueError(f"a static cache layer appends one token per forward (decode), got {Q}")
        append_at_ends(key_states, value_states, self.keys, self.values, self.positions, self.ends, self.device_seen)
        if not self.shared_counters:
            self.device_seen += 1
        return self.keys, self.values

    def append_rotated(self, backend, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, record_query: bool = True) -> bool:
        """:meth:`update` fused with the rotary embedding (the fused decoder layer's step): rotate ``query
        [B, H, 1, d]`` in place and append the rotated ``key``/``value [B, Hkv, 1, d]`` through the backend's
        :meth:`~kvsieve.backend.KVBackend.rope_append` (``cos``/``sin [B, 1, d]``). With ``record_query``, a
        layer that keeps selector queries has the same launch write the rotated query into its ring (what
        :meth:`push_queries` does), and both device counters advance in one increment (none with
        ``shared_counters``: the step's single one).

        Returns:
            Whether the step's query was recorded (the caller must not push it again).
        """
        if self.query_window and record_query:
            backend.rope_append(query, key, value, cos, sin, self.keys, self.values, self.positions, self.ends,
                                self.device_seen, query_ring=self.queries, ring_count=self.device_queries)
            if not self.shared_counters:
                self.device_counters += 1
            return True
        backend.rope_append(query, key, value, cos, sin, self.keys, self.values, self.positions, self.ends,
                            self.device_seen)
        if not self.shared_counters:
            self.device_seen += 1
        return False

    def push_queries(self, queries: torch.Tensor) -> None:
        """Write the step's query ``[B, H, 1, d]`` at ring slot ``device_queries % query_window``."""
        if self.query_window == 0:
            return
        self.queries.index_copy_(2, self.device_queries % self.query_window, queries)
        if not self.shared_counters:
            self.device_queries += 1

    # ------------------------------------------------------------------ between steps (host)
    def advance(self) -> None:
        """The host side of one decode step (a replayed graph runs no Python)."""
        self.seen += 1
        if self.query_window:
            self.num_queries += 1
        self.end_bound += 1

    def ensure_room(self) -> None:
        """Raise :class:`StaticCapacityError` if the next step would append past the capacity."""
        if self.end_bound + 1 > self.capacity:
            raise StaticCapacityError(
                f"the static cache is full ({self.capacity} slots per layer) after {self.seen - self.prompt_len} "
                "generated tokens: the compressor keeps more than static_capacity allows; pass a larger "
                "static_capacity (or leave it unset to size it from the compressor)"
            )

    def _store_range(self, starts: torch.Tensor, ends: torch.Tensor, reserve: int) -> None:
        # a captured graph reads these tensors: write the new range into them; the capacity stays as it is
        self.starts.copy_(starts)
        self.ends.copy_(ends)
        self.end_bound = int(ends.max())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Reorder rows in place (the storage, which a captured graph holds, is kept); the batch size cannot
        change."""
        if indices.shape[0] != self.keys.shape[0]:
            raise ValueError(
                f"a static cache keeps its batch size ({self.keys.shape[0]} rows); got {indices.shape[0]} indices"
            )
        indices = indices.to(self.device)
        self._reorder_row_lengths(indices)
        for tensor in (self.keys, self.values, self.positions, self.starts, self.ends, self.queries,
                       *self.slot_buffers.values()):
            if tensor is not None:
                tensor.copy_(tensor.index_select(0, indices))


def make_static(cache: SieveCache, capacities: Sequence[int]) -> SieveCache:
    """A cache of :class:`StaticSieveLayer` (layer ``i`` with ``capacities[i]`` slots) holding what the prefilled
    ``cache`` holds; ``cache`` is emptied layer by layer. ``peak_nbytes`` counts the moment both copies of a layer
    exist."""
    layers, built, remaining, peak = [], 0, cache.nbytes(), cache.peak_nbytes
    for layer, capacity in zip(cache.layers, capacities, strict=True):
        size = layer.nbytes()
        layers.append(StaticSieveLayer.from_layer(layer, capacity))
        peak = max(peak, built + remaining + layers[-1].nbytes())
        built, remaining = built + layers[-1].nbytes(), remaining - size
    static = SieveCache(cache.query_window, layers=layers)
    static.peak_nbytes = peak
    return static


def share_step_counters(cache: SieveCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Give the static layers of ``cache`` shared device counters: one ``int64 [2]`` tensor per group of layers on
    one device with the same query window and counts (usually one group: every layer sees every token), so that a
    decode step advances them with one increment per group (:func:`advance_step_counters`) instead of one per
    layer inside the step (28 small kernels for a 28-layer model).

    Returns:
        ``(counters, step)`` per group: ``counters`` as each layer's ``device_counters``, ``step`` = ``[1, 1]``
        (the layers record a selector query every step) or ``[1, 0]`` (they keep none).
    """
    groups: dict[tuple, list[StaticSieveLayer]] = {}
    for layer in cache.layers:
        groups.setdefault((layer.device, layer.query_window, layer.seen, layer.num_queries), []).append(layer)
    shared = []
    for (device, window, seen, queries), layers in groups.items():
        counters = torch.tensor([seen, queries], dtype=torch.long, device=device)
        for layer in layers:
            layer.device_counters = counters
            layer.device_seen, layer.device_queries = counters[0:1], counters[1:2]
            layer.shared_counters = True
        shared.append((counters, torch.tensor([1, 1 if window else 0], dtype=torch.long, device=device)))
    return shared


def advance_step_counters(shared: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The device side of one decode step for :func:`share_step_counters`'s layers (after the step's forward,
    outside any captured graph): each group's ``seen`` and ``num_queries`` advance by its step."""
    for counters, step in shared:
        counters += step


# ---------------------------------------------------------------------------------------------- sizing
def static_capacity(
    compressor: Compressor, prompt_len: int, max_new_tokens: int, prompt_slots: int | None = None
) -> int:
    """Slots one layer needs to generate ``max_new_tokens`` after a (padded) prompt of ``prompt_len`` tokens:
    the slots it holds after prefill (``prompt_slots``, default ``prompt_len``: nothing was evicted) plus the most
    generated entries it ever holds (:meth:`Compressor.peak_generated`). The last generated token is never fed
    back, so ``max_new_tokens - 1`` are appended.

    Raises:
        ValueError: the compressor cannot say how much it holds (pass ``static_capacity`` yourself).
    """
    slots = prompt_len if prompt_slots is None else prompt_slots
    appends = max(max_new_tokens - 1, 0)
    peak = compressor.peak_generated(prompt_len, slots, appends)
    if peak is None:
        raise ValueError(
            f"cannot size a static cache for the compressor {compressor.name!r}: it compresses during decode and "
            "does not implement peak_generated(); implement it, or pass static_capacity to kvsieve.generate"
        )
    return slots + peak
