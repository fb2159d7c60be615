"""The kernel backend interface.

A :class:`KVBackend` supplies the heavy primitives that caches, scoring policies and the HF attention function
need. The ``torch`` backend (``kvsieve.backends.torch_ref``) is the reference: it defines the semantics below,
and every other backend must match it within the tolerance of the dtype.

Layout conventions (shared by every primitive):

* ``B`` batch rows, ``H`` query heads, ``Hkv`` key/value heads, ``G = H // Hkv`` the GQA group, ``d`` head dim.
* The cache of one layer is ``keys``/``values`` of shape ``[B, Hkv, C, d]`` (``C`` the capacity, in slots).
  Query head ``h`` reads KV head ``h // G``. K/V are never repeated to ``H`` heads.
* The live slots of row ``b``, KV head ``j`` are ``[starts[b, j], ends[b, j])`` (``int64`` tensors ``[B, Hkv]``).
  Slots before ``starts`` hold left padding; slots from ``ends`` on are unused capacity. A backend must never
  read outside the live range as if it were data (poisoned memory there must not change any output).
"""

from __future__ import annotations

import abc
import functools
import inspect
from typing import ClassVar

import attrs
import torch

from kvsieve import contract_ops, layer_ops

__all__ = ["BackendCapabilities", "KVBackend"]


@attrs.frozen
class BackendCapabilities:
    """What a backend can run on.

    Attributes:
        devices: device types it supports, e.g. ``("cpu", "cuda")``.
        dtypes: floating dtypes it supports for queries/keys/values.
    """

    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


class KVBackend(abc.ABC):
    """Kernels for attention, window scoring and compaction over a compacted KV cache.

    Subclasses set :attr:`name` and :attr:`capabilities` and implement the abstract methods. All methods are
    pure functions of their arguments except :meth:`compact`, which writes in place.
    """

    name: ClassVar[str] = ""
    #: ``backend="auto"`` picks the available backend with the highest priority that supports the device/dtype.
    auto_priority: ClassVar[int] = 0
    capabilities: ClassVar[BackendCapabilities] = BackendCapabilities(devices=("cpu", "cuda"))

    # ------------------------------------------------------------------ availability
    def available(self) -> tuple[bool, str]:
        """Whether this backend can run on this machine, and if not, why (a sentence for the user)."""
        return True, ""

    def supports(self, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        """Whether this backend can run tensors of ``dtype`` on ``device``; if not, why."""
        ok, why = self.available()
        if not ok:
            return False, why
        if device.type not in self.capabilities.devices:
            return False, f"backend {self.name!r} runs on {self.capabilities.devices}, not on {device.type!r}"
        if dtype not in self.capabilities.dtypes:
            return False, f"backend {self.name!r} supports dtypes {self.capabilities.dtypes}, not {dtype}"
        return True, ""

    # ------------------------------------------------------------------ attention
    @abc.abstractmethod
    def prefill_attention(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """Attention of a block of new queries over keys that end with those queries' own keys.

        Args:
            queries: ``[B, H, Q, d]``.
            keys, values: ``[B, Hkv, K, d]`` with ``K >= Q``; the last ``Q`` keys belong to the queries.
            attention_mask: ``None`` (plain causal, no padding: query ``i`` sees keys ``[0, K - Q + i]``) or a
                boolean ``[B, 1, Q, K]`` mask, True = may attend. A query row with no True entry outputs zeros.
            scale: softmax scale (usually ``d ** -0.5``).

        Returns:
            ``[B, H, Q, d]`` in the dtype of ``queries``.
        """

    @abc.abstractmethod
    def decode_attention(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        starts: torch.Tensor,
        ends: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Attention of ``Q`` new queries over a compacted cache whose last ``Q`` live slots are their own keys.

        Query ``i`` (0-based among the ``Q``) of row ``b``, head ``h`` (KV head ``j = h // G``) attends to slots
        ``[starts[b, j], ends[b, j] - Q + i]`` inclusive (causal among the new tokens). ``Q`` is 1 in plain
        decoding; larger when several tokens are fed at once into a compressed cache.

        Args:
            queries: ``[B, H, Q, d]``.
            keys, values: ``[B, Hkv, C, d]``.
            starts, ends: ``int64 [B, Hkv]``.
            scale: softmax scale.

        Returns:
            ``[B, H, Q, d]`` in the dtype of ``queries``; cost follows ``ends - starts``, not ``C``.
        """

    # ------------------------------------------------------------------ the decode step around attention
    # What the fast path's fused decoder layer (kvsieve.fused_layer) runs per layer. Not abstract: the defaults are
    # the torch references (kvsieve.layer_ops); a backend overrides them with fused kernels that match them.
    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm of ``residual + x`` (or of ``x``), as HF's Llama-family layers compute it.

        Args:
            x: ``[..., D]``; residual: ``None`` or ``[..., D]`` in ``x``'s dtype; weight: ``[D]``; eps: the norm's
                epsilon.

        Returns:
            ``(normed, total)``, ``[..., D]`` each: the normalised sum times ``weight``, and the sum itself in
            ``x``'s dtype (the residual stream); see :func:`kvsieve.layer_ops.rms_norm`.
        """
        return layer_ops.rms_norm(x, weight, eps, residual)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of the gated MLP (``[..., F]`` each, one dtype)."""
        return layer_ops.silu_mul(gate, up)

    def gate_up_silu(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The gated MLP's ``silu(x @ W_gate.T) * (x @ W_up.T)`` (the fused layer's opt-in
        ``FusedDecoderLayers.silu_in_gate_up``).

        Args:
            x: ``[..., D]``; weight: ``[2F, D]``, gate_proj's rows then up_proj's (the merged gate/up); bias:
                ``None`` or ``[2F]``.

        Returns:
            ``[..., F]`` in ``x``'s dtype. Default: one GEMM, then :meth:`silu_mul` of its two halves; a backend
            may compute both in one kernel (the triton backend's epilogue).
        """
        gate, up = torch.nn.functional.linear(x, weight, bias).split(weight.shape[0] // 2, dim=-1)
        return self.silu_mul(gate, up)

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A decode step's projection ``x @ weight.T (+ bias) (+ residual)`` (the fused layer's o_proj and
        down_proj where ``FusedDecoderLayers.backend_projections`` names them).

        Args:
            x: ``[..., K]``; weight: ``[N, K]``; bias: ``None`` or ``[N]``; residual: ``None`` or ``[..., N]``, the
                residual stream, owned by the caller: the result may be written into its storage. One dtype.

        Returns:
            ``[..., N]``. Default: cuBLAS through torch, ``F.linear``, or with a residual ``residual.addmm_``
            (accumulated onto the residual and rounded once); a backend may run its own kernel for a decode
            step's few rows (the triton backend's skinny linear).
        """
        if residual is None:
            return torch.nn.functional.linear(x, weight, bias)
        if not residual.is_contiguous():
            return residual + torch.nn.functional.linear(x, weight, bias)
        out = residual.view(-1, weight.shape[0]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
        if bias is not None:
            out += bias
        return out.view_as(residual)

    def rope_append(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        ends: torch.Tensor,
        seen: torch.Tensor,
        query_ring: torch.Tensor | None = None,
        ring_count: torch.Tensor | None = None,
    ) -> None:
        """One decode token's rotary embedding and cache append, in place (graph-capturable: no host reads).

        Rotates ``query [B, H, 1, d]`` in place with ``cos``/``sin [B, 1, d]``; rotates ``key [B, Hkv, 1, d]``
        and writes it and ``value [B, Hkv, 1, d]`` at slot ``ends[b, j]`` of ``keys``/``values [B, Hkv, C, d]``,
        sets ``positions[b, j, ends[b, j]] = seen[0]`` (``positions int64 [B, Hkv, C]``, ``seen int64 [1]``)
        and increments ``ends int64 [B, Hkv]``. With ``query_ring [B, H, R, d]`` (the layer's selector queries)
        and ``ring_count int64 [1]``, the rotated query is also written at ring slot ``ring_count[0] % R``
        (``ring_count`` is read, not changed). The caller guarantees ``ends < C``. See
        :func:`kvsieve.layer_ops.rope_append`.
        """
        layer_ops.rope_append(query, key, value, cos, sin, keys, values, positions, ends, seen, query_ring, ring_count)

    # ------------------------------------------------------------------ scoring
    @abc.abstractmethod
    def window_lse(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        starts: torch.Tensor,
        ends: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Log-sum-exp of the window queries over every live key they may causally see.

        The ``W`` window queries are the queries of the last ``W`` live slots: query ``w`` sits at slot
        ``ends - W + w`` and sees slots ``[starts, ends - W + w]``.

        Args:
            queries: ``[B, H, W, d]``.
            keys: ``[B, Hkv, C, d]``.
            starts, ends: ``int64 [B, Hkv]``.
            scale: softmax scale.

        Returns:
            ``float32 [B, H, W]``: ``logsumexp_k(scale * q_w . k)`` over the visible slots.
        """

    @abc.abstractmethod
    def window_scores(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        cand_starts: torch.Tensor,
        cand_ends: torch.Tensor,
        scale: float,
        lse: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention mass the window queries put on each candidate slot, summed over the window and the GQA group.

        For candidate ``n`` of row ``b``, KV head ``j`` (slot ``cand_starts[b, j] + n``)::

            out[b, j, n] = sum_{g < G} sum_{w < W} exp(scale * q[b, j*G + g, w] . k[b, j, slot] - lse[b, j*G + g, w])

        With ``lse=None`` the softmax is over the candidates only (``lse`` = log-sum-exp over
        ``[cand_starts, cand_ends)``, every window query seeing every candidate). A given ``lse`` (e.g. from
        :meth:`window_lse`) normalises over a wider range instead; candidates are then assumed to lie before the
        window, so no causal mask applies to them.

        Args:
            queries: ``[B, H, W, d]``.
            keys: ``[B, Hkv, C, d]``.
            cand_starts, cand_ends: ``int64 [B, Hkv]`` candidate slot range.
            scale: softmax scale.
            lse: optional ``float32 [B, H, W]``.

        A backend may also take a keyword ``num_candidates: int | None = None``: ``N`` when the caller already
        knows it on the host, so that the backend need not read it from the device (a read waits for the GPU).
        Callers go through :func:`call_window_scores`, which passes it only to backends that take it.

        Returns:
            ``float32 [B, Hkv, N]`` with ``N = max(cand_ends - cand_starts)`` (0 when empty); entries past a row's
            own candidate count are exactly 0.
        """

    # ------------------------------------------------------------------ contract checks
    # What kvsieve.contracts.ContractGuard runs on the device for every compression (checks on). Not abstract: the
    # defaults are the torch references (kvsieve.contract_ops); a backend overrides them with fused kernels that
    # detect the same faults. Each returns device tensors only (no host read: they run inside captured graphs); a
    # flag is a 0-dim bool or int32 tensor, nonzero when the fault is present.
    def cache_fingerprint(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        starts: torch.Tensor,
        ends: torch.Tensor,
    ) -> torch.Tensor:
        """An opaque, deterministic fingerprint of one layer's cache, taken before a scoring call and compared
        after it by :meth:`cache_changed` (of the same backend).

        Args:
            keys, values: ``[B, Hkv, C, d]``; positions: ``int64 [B, Hkv, C]``; starts, ends: ``int64 [B, Hkv]``.

        Only the live slots ``[starts, ends)`` are read as data; see :func:`kvsieve.contract_ops.cache_fingerprint`
        (``float64 [B, Hkv, 3 * ceil(C / 512) + 2]``: per-chunk sums of the live keys, values and positions, and
        the range).
        """
        return contract_ops.cache_fingerprint(keys, values, positions, starts, ends)

    def cache_changed(
        self,
        before: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        starts: torch.Tensor,
        ends: torch.Tensor,
    ) -> torch.Tensor:
        """0-dim flag: the cache's fingerprint now differs from ``before`` (a :meth:`cache_fingerprint` of this
        backend; a NaN sum equals a NaN sum). Arguments as :meth:`cache_fingerprint`'s; see
        :func:`kvsieve.contract_ops.cache_changed`."""
        return contract_ops.cache_changed(before, keys, values, positions, starts, ends)

    def nonfinite_scores(self, scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """0-dim flag: some candidate ``n < counts[b, j]`` has a non-finite score (``scores`` floating ``[B, Hkv,
        N]``, ``counts`` ``int64 [B, Hkv]``); see :func:`kvsieve.contract_ops.nonfinite_scores`."""
        return contract_ops.nonfinite_scores(scores, counts)

    def check_selection(
        self,
        keep: torch.Tensor,
        kept: torch.Tensor,
        counts: torch.Tensor,
        budget: int | torch.Tensor,
        protect_head: int,
        protect_tail: int | torch.Tensor,
        head_adaptive: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The device rules of the selection contract (:func:`kvsieve.contract_ops.check_selection`).

        Args:
            keep: ``int64 [B, Hkv, K]``; kept, counts: ``int64 [B, Hkv]``; budget, protect_tail: an int or ``int64
                [B, Hkv]``; protect_head: an int; head_adaptive: the policy shares a row's budget among its heads.

        Returns:
            ``(broken, keep_out, kept_out)``: a 0-dim flag, and ``int64 [B, Hkv, K]`` / ``int64 [B, Hkv]``: the
            selection's values, or, everywhere when ``broken`` is set, the stand-in (the first ``min(counts,
            budget, K)`` candidates, -1 beyond).
        """
        return contract_ops.check_selection(keep, kept, counts, budget, protect_head, protect_tail, head_adaptive)

    # ------------------------------------------------------------------ compaction
    @abc.abstractmethod
    def compact(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        keep: torch.Tensor,
        counts: torch.Tensor,
        dest_starts: torch.Tensor,
    ) -> None:
        """Gather kept slots to the front of a region, in place.

        For every row ``b``, KV head ``j`` and ``i < counts[b, j]``::

            keys[b, j, dest_starts[b, j] + i] = keys_before[b, j, keep[b, j, i]]   (same for values)

        ``keep`` is sorted ascending per ``(b, j)`` and ``keep[b, j, i] >= dest_starts[b, j] + i`` (a slot only
        moves towards the front), which makes an in-place ascending sweep safe. Slots outside the written range
        are left untouched. Entries of ``keep`` past ``counts`` are ignored (may hold any value, e.g. -1).

        Args:
            keys, values: ``[B, Hkv, C, d]`` (modified in place).
            keep: ``int64 [B, Hkv, K]``.
            counts: ``int64 [B, Hkv]``, ``counts <= K``.
            dest_starts: ``int64 [B, Hkv]``.
        """


@functools.cache
def _takes_num_candidates(backend_type: type) -> bool:
    return "num_candidates" in inspect.signature(backend_type.window_scores).parameters


def call_window_scores(
    backend: KVBackend,
    queries: torch.Tensor,
    keys: torch.Tensor,
    cand_starts: torch.Tensor,
    cand_ends: torch.Tensor,
    scale: float,
    lse: torch.Tensor | None = None,
    num_candidates: int | None = None,
) -> torch.Tensor:
    """``backend.window_scores(...)``, with the host-known ``num_candidates`` (``N``) passed to backends that take
    it (see :meth:`KVBackend.window_scores`); third-party backends without the keyword are called as before."""
    if num_candidates is not None and _takes_num_candidates(type(backend)):
        return backend.window_scores(queries, keys, cand_starts, cand_ends, scale, lse, num_candidates=num_candidates)
    return backend.window_scores(queries, keys, cand_starts, cand_ends, scale, lse)
