"""SieveCache: a ``transformers.Cache`` whose layers hold compacted K/V at KV-head size. It only stores: the
compressor, the backend and the schedule belong to the :class:`~kvsieve.engine.Engine` that drives it.

Every layer implements one interface, :class:`SieveLayer`:

* ``keys``, ``values``: ``[B, Hkv, C, d]`` buffers with ``C`` slots of capacity (never repeated to ``H`` heads).
* ``starts``, ``ends``: ``int64 [B, Hkv]`` the live slot range. Slots ``[0, starts)`` hold left padding (until a
  compaction drops it); slots ``[ends, C)`` are free capacity that appends write into.
* ``positions``: ``int64 [B, Hkv, C]`` the logical index of the token in each slot, i.e. its column in the
  (left-padded) batch, which is what ``seen`` counts; -1 for free slots. Padding slots hold their own indices
  until a compaction drops them. (For a padded row the RoPE position is this index minus the row's padding.)
* a ring buffer of the most recent ``query_window`` post-RoPE queries ``[B, H, R, d]`` (the selector window).
* ``seen``: the *logical* length: tokens ever appended, padding included. HF derives positions and masks from it,
  so new tokens always get their true absolute positions however much was evicted.
* ``row_lengths``: the real (not padding) tokens of each row that the layer's prefill computed on, on the host:
  budgets given as a ratio resolve against them, so a row is compressed as it would be alone.
* per-slot side buffers (:meth:`SieveLayer.slot_buffer`): ``[B, Hkv, C]`` values a compressor keeps for each
  cached token (H2O's accumulated attention). They move with the tokens: compaction, growth, shrinking and row
  reordering treat them like ``positions``, and a slot that holds no token holds the buffer's fill value.

Two implementations:

* :class:`DynamicSieveLayer` (the default): grows by amortised reallocation, and after a compaction that left the
  live set far below the capacity moves it into a smaller buffer, so the memory is really freed (``reserve``
  slots of headroom are kept for what the compressor appends before its next compaction).
* :class:`kvsieve.static.StaticSieveLayer` (the fast path): a fixed capacity; every tensor a decode step touches
  keeps its storage, so the step can be captured in a CUDA graph.

Compaction (:meth:`SieveLayer.compact`) gathers kept slots to the front of a region in place through the backend;
each implementation then stores the new live range its own way (:meth:`SieveLayer._store_range`).
"""

from __future__ import annotations

import abc

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvsieve.backend import KVBackend
from kvsieve.indexing import compaction_moves, range_mask

__all__ = ["DynamicSieveLayer", "SieveCache", "SieveLayer"]

_ALIGN = 64  # capacity granularity in slots


def _round_up(n: int, multiple: int = _ALIGN) -> int:
    return -(-n // multiple) * multiple


class SieveLayer(CacheLayerMixin, abc.ABC):
    """One decoder layer's compacted KV cache (the layout is in the module docstring).

    Implementations supply how tokens and queries are appended (:meth:`update`, :meth:`push_queries`), how the
    live range is stored after a compaction (:meth:`_store_range`), how rows are reordered
    (:meth:`batch_select_indices`) and ``max_end``.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, query_window: int = 0):
        super().__init__()
        self.query_window = query_window
        self.starts: torch.Tensor | None = None
        self.ends: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.queries: torch.Tensor | None = None  # [B, H, R, d] ring buffer
        self.num_queries = 0  # queries pushed so far (ring index = num_queries % R)
        self.seen = 0
        self.prompt_len = 0
        self.row_lengths: tuple[int, ...] = ()
        self.compactions = 0
        self.slot_buffers: dict[str, torch.Tensor] = {}  # name -> [B, Hkv, C] (see slot_buffer)
        self.slot_fills: dict[str, float] = {}  # name -> the value of slots that hold no token

    # ------------------------------------------------------------------ shape facts
    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def max_live(self) -> int:
        """Largest live length over rows and KV heads (``max(ends - starts)``): the physical cache length."""
        if self.ends is None:
            return 0
        return int((self.ends - self.starts).max())

    @property
    @abc.abstractmethod
    def max_end(self) -> int:
        """``max(ends)``: slots in use (0 before the first append)."""

    def prompt_ends(self) -> torch.Tensor:
        """``int64 [B, Hkv]``: end of the prompt region. Prompt tokens (position < ``prompt_len``) sit at the front
        of the live range, however a prefill compressor thinned them; decode-time compressors start after them."""
        live = range_mask(self.starts, self.ends, self.capacity)
        in_prompt = live & (self.positions >= 0) & (self.positions < self.prompt_len)
        return self.starts + in_prompt.sum(dim=-1)

    def nbytes(self) -> int:
        """Bytes of storage allocated for keys and values, and for the per-slot side buffers if any (what the cache
        really occupies)."""
        if self.keys is None:
            return 0
        tensors = (self.keys, self.values, *self.slot_buffers.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def live_nbytes(self) -> int:
        """Bytes of K/V in live slots (the sum over rows and heads of live lengths)."""
        if self.keys is None:
            return 0
        per_slot = (self.keys.shape[-1] * self.keys.element_size() + self.values.shape[-1]
                    * self.values.element_size())
        return int((self.ends - self.starts).sum()) * per_slot

    # ------------------------------------------------------------------ the prompt
    def begin_prompt(self, padding: torch.Tensor, row_lengths: tuple[int, ...]) -> None:
        """Record that the tokens appended so far are the prompt: ``padding`` (``int64 [B, Hkv]``) leading slots
        of each row are left padding, ``row_lengths[b]`` real (not padding) tokens of row ``b`` reached this layer
        (the prompt's real length, or fewer after token propagation), and the prompt's logical length is
        ``seen``."""
        self.starts = padding
        self.row_lengths = tuple(row_lengths)
        self.prompt_len = self.seen

    # ------------------------------------------------------------------ CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, Hkv, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty(B, Hkv, 0, d)
        self.values = value_states.new_empty(B, Hkv, 0, value_states.shape[-1])
        self.positions = torch.full((B, Hkv, 0), -1, dtype=torch.long, device=self.device)
        self.starts = torch.zeros(B, Hkv, dtype=torch.long, device=self.device)
        self.ends = torch.zeros(B, Hkv, dtype=torch.long, device=self.device)
        self.is_initialized = True

    @abc.abstractmethod
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, Hkv, Q, d]`` new keys/values after each row's live range; return the whole buffers
        ``[B, Hkv, C, d]`` (only code that knows ``starts``/``ends`` may read them)."""

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.batch_select_indices(
                torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats)
            )

    @abc.abstractmethod
    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` (``int64 [B']``, possibly repeated) of every per-row tensor, in that order."""

    def _reorder_row_lengths(self, indices: torch.Tensor) -> None:
        if self.row_lengths:
            self.row_lengths = tuple(self.row_lengths[i] for i in indices.tolist())

    # ------------------------------------------------------------------ selector window
    @abc.abstractmethod
    def push_queries(self, queries: torch.Tensor) -> None:
        """Remember the last ``query_window`` of ``[B, H, Q, d]`` post-RoPE queries (ring buffer)."""

    def window_queries(self) -> torch.Tensor:
        """``[B, H, W, d]`` the most recent ``W = min(num_queries, query_window)`` queries, oldest first.

        Chronological order matters to scoring with ``queries_are_last`` (query ``w`` is the token at slot
        ``ends - W + w``, which sets its causal range), so the ring is rotated when it has wrapped.
        """
        if self.queries is None:
            raise RuntimeError("no queries were recorded for this layer (query_window is 0)")
        R, n = self.query_window, self.num_queries
        if n <= R or n % R == 0:
            return self.queries[:, :, : min(n, R)]
        oldest_first = (n + torch.arange(R, device=self.queries.device)) % R  # the oldest sits at slot n % R
        return self.queries[:, :, oldest_first]

    # ------------------------------------------------------------------ per-slot side buffers
    def slot_buffer(self, name: str, fill: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[B, Hkv, C]`` side buffer ``name``: one value per cache slot that moves with the slot's token.

        Created on first use (after the first append), every slot holding ``fill`` (``fill`` and ``dtype`` are
        only read then). Compaction moves each kept token's value with it and sets every slot that no longer holds
        a token back to ``fill``; free slots always hold ``fill``, so a token appended later starts from it.
        Growth, shrinking and row reordering keep the buffer aligned with ``keys``. A layer may replace the
        tensor when it reallocates: ask for it again rather than keeping it across steps.
        """
        buffer = self.slot_buffers.get(name)
        if buffer is None:
            if self.positions is None:
                raise RuntimeError(f"slot buffer {name!r}: the layer holds no tokens yet (ask after the first append)")
            buffer = torch.full(self.positions.shape, fill, dtype=dtype, device=self.positions.device)
            self.slot_buffers[name], self.slot_fills[name] = buffer, fill
        return buffer

    def _resized_slot_buffers(self, capacity: int, used: int) -> dict[str, torch.Tensor]:
        """Every side buffer moved into a new one of ``capacity`` slots (slots ``[0, used)`` copied, the rest
        the buffer's fill)."""
        out = {}
        for name, old in self.slot_buffers.items():
            new = old.new_full((*old.shape[:2], capacity), self.slot_fills[name])
            new[:, :, :used] = old[:, :, :used]
            out[name] = new
        return out

    # ------------------------------------------------------------------ compaction
    def compact(
        self,
        backend: KVBackend,
        keep_slots: torch.Tensor,
        counts: torch.Tensor,
        dest_starts: torch.Tensor,
        reserve: int = 0,
    ) -> None:
        """Keep only ``keep_slots`` of the region ``[dest_starts, ends)``, packed from ``dest_starts`` on.

        Slots before ``dest_starts`` (e.g. the protected prompt) are untouched; everything in the region that is
        not kept is dropped, padding included.

        Args:
            backend: moves the K/V data (``KVBackend.compact``).
            keep_slots: ``int64 [B, Hkv, K]`` absolute slots inside the region, sorted; first ``counts`` real.
            counts: ``int64 [B, Hkv]``.
            dest_starts: ``int64 [B, Hkv]`` first slot of the region.
            reserve: slots of headroom to keep allocated for appends before the next compaction.
        """
        backend.compact(self.keys, self.values, keep_slots, counts, dest_starts)
        src, dst = compaction_moves(keep_slots, counts, dest_starts)
        self.positions.scatter_(2, dst, self.positions.gather(2, src))
        ends = dest_starts + counts
        free = ~range_mask(torch.zeros_like(ends), ends, self.capacity)
        self.positions.masked_fill_(free, -1)
        for name, buffer in self.slot_buffers.items():
            buffer.scatter_(2, dst, buffer.gather(2, src))
            buffer.masked_fill_(free, self.slot_fills[name])
        self.compactions += 1
        # padding inside the region is gone
        self._store_range(torch.minimum(self.starts, dest_starts), ends, reserve)

    @abc.abstractmethod
    def _store_range(self, starts: torch.Tensor, ends: torch.Tensor, reserve: int) -> None:
        """Make ``[starts, ends)`` (``int64 [B, Hkv]``) the live range after a compaction; ``reserve``: slots of
        headroom the compressor will append before its next compaction."""


class DynamicSieveLayer(SieveLayer):
    """A :class:`SieveLayer` that grows as tokens are appended and frees what a compaction evicted."""

    def __init__(self, query_window: int = 0):
        super().__init__(query_window)
        # set by token propagation (see propagated_append) for the next update only
        self.next_offsets: torch.Tensor | None = None
        self.next_span = 0
        self._max_end_memo: tuple[torch.Tensor, int] | None = None  # (ends, max(ends)): see max_end

    @property
    def max_end(self) -> int:
        """``max(ends)``. Reading it waits for the device, so the value is remembered for the current ``ends``
        tensor (this layer never changes ``ends`` in place: every change binds a new tensor)."""
        if self.ends is None:
            return 0
        memo = self._max_end_memo
        if memo is not None and memo[0] is self.ends:
            return memo[1]
        value = int(self.ends.max())
        self._max_end_memo = (self.ends, value)
        return value

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._max_end_memo = (self.ends, 0)  # empty: known without a read

    def reset(self) -> None:
        """Empty the layer; its storage is freed."""
        self.__init__(self.query_window)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, Hkv, Q, d = key_states.shape
        max_end = self.max_end
        self._reserve(max_end + Q)
        slots = self.ends[..., None] + torch.arange(Q, device=self.device)  # [B, Hkv, Q]
        self.keys.scatter_(2, slots[..., None].expand(B, Hkv, Q, d), key_states)
        self.values.scatter_(2, slots[..., None].expand(B, Hkv, Q, value_states.shape[-1]), value_states)
        if self.next_offsets is None:
            offsets, span = torch.arange(Q, device=self.device), Q
        else:  # token propagation: only some of the forward's tokens reach this layer (see propagated_append)
            offsets, span = self.next_offsets.to(self.device), self.next_span
            self.next_offsets = None
        new_positions = self.seen + offsets  # [Q] or [B, Q]
        self.positions.scatter_(2, slots, new_positions[..., None, :].expand(B, Hkv, Q))
        self.ends = self.ends + Q
        self._max_end_memo = (self.ends, max_end + Q)  # every row and head grew by Q: known without a read
        self.seen += span
        return self.keys, self.values

    def propagated_append(self, offsets: torch.Tensor, span: int) -> None:
        """Announce that the next :meth:`update` appends only some tokens of a forward of ``span`` tokens.

        Used by token propagation (:mod:`kvsieve.propagation`): after a propagation layer only the kept tokens
        reach later layers. ``offsets`` (``int64 [B, Q]``, sorted) are their indices among the forward's
        ``span`` tokens; they are stored at their original positions ``seen + offsets``, and ``seen`` (the
        logical length) advances by ``span``, so positions and masks of later tokens are those of the full
        sequence.
        """
        self.next_offsets, self.next_span = offsets, span

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = indices.to(self.device)
        self._reorder_row_lengths(indices)
        for name in ("keys", "values", "positions", "starts", "ends", "queries"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, indices))
        self.slot_buffers = {name: buffer.index_select(0, indices) for name, buffer in self.slot_buffers.items()}

    def push_queries(self, queries: torch.Tensor) -> None:
        R = self.query_window
        if R == 0:
            return
        B, H, Q, d = queries.shape
        if self.queries is None:
            self.queries = queries.new_zeros(B, H, R, d)
        take = min(Q, R)
        ring = (self.num_queries + Q - take + torch.arange(take, device=queries.device)) % R
        self.queries[:, :, ring] = queries[:, :, Q - take :]
        self.num_queries += Q

    # ------------------------------------------------------------------ storage
    def _reserve(self, needed: int) -> None:
        """Grow the buffers so that ``needed`` slots fit (amortised: by at least a quarter of the capacity)."""
        if needed <= self.capacity:
            return
        self._reallocate(_round_up(max(needed, self.capacity + self.capacity // 4)))

    def _reallocate(self, capacity: int) -> None:
        """Move the slots ``[0, max_end)`` into fresh buffers of ``capacity`` slots; the old storage is freed."""
        used = self.max_end
        B, Hkv, _, d = self.keys.shape
        for name, fill in (("keys", 0.0), ("values", 0.0), ("positions", -1)):
            old = getattr(self, name)
            new = old.new_full((B, Hkv, capacity, *old.shape[3:]), fill)
            new[:, :, :used] = old[:, :, :used]
            setattr(self, name, new)
        self.slot_buffers = self._resized_slot_buffers(capacity, used)

    def shrink_to_fit(self, reserve: int = 0) -> None:
        """Free capacity well beyond ``max_end + reserve`` slots (a quarter of slack is tolerated)."""
        target = _round_up(self.max_end + reserve)
        if self.capacity > target + target // 4:
            self._reallocate(target)

    def _store_range(self, starts: torch.Tensor, ends: torch.Tensor, reserve: int) -> None:
        self.starts, self.ends = starts, ends
        self.shrink_to_fit(reserve)


class SieveCache(Cache):
    """A ``transformers.Cache`` of :class:`SieveLayer` (one per decoder layer).

    Args:
        query_window: selector queries each layer keeps (:attr:`SieveLayer.query_window`).
        num_layers: decoder layers; when None, layers are created as HF first touches them.
        layers: ready-made layers instead (e.g. the static layers of the fast path).
    """

    def __init__(self, query_window: int = 0, num_layers: int | None = None,
                 layers: list[SieveLayer] | None = None):
        self.query_window = query_window
        self.peak_nbytes = 0
        if layers is not None:
            super().__init__(layers=list(layers))
        elif num_layers is None:
            super().__init__(layer_class_to_replicate=lambda: DynamicSieveLayer(query_window))
        else:
            super().__init__(layers=[DynamicSieveLayer(query_window) for _ in range(num_layers)])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes())
        return keys, values

    # ------------------------------------------------------------------ reporting
    def kv_lengths(self) -> list[int]:
        """Physical cached tokens per layer (max over rows and KV heads)."""
        return [layer.max_live for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes of K/V storage allocated by all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def live_nbytes(self) -> int:
        """Bytes of K/V in live slots (the sum over rows and heads of live lengths)."""
        return sum(layer.live_nbytes() for layer in self.layers)
