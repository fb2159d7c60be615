"""Compressors: the schedule that decides when, where and with what budget a layer's cache is compressed.

A compressor is built from a :class:`~kvsieve.policy.ScoringPolicy` and a
:class:`~kvsieve.policy.SelectionPolicy`. The kvsieve attention function calls
:meth:`Compressor.after_attention` once per layer and forward pass, after the layer's new K/V were appended and
its attention was computed; the compressor decides whether to compress and calls :func:`compress_layer`.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import torch

from kvsieve.policy import ScoringContext, ScoringPolicy, SelectionPolicy

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from kvsieve.backend import KVBackend
    from kvsieve.cache import SieveCache, SieveLayer

__all__ = ["Compressor", "LayerEvent", "compress_layer", "resolve_policy"]


@attrs.frozen
class LayerEvent:
    """One layer's state right after its attention ran.

    Attributes:
        phase: ``"prefill"`` (first forward into an empty cache) or ``"decode"``.
        layer: the layer's cache (``SieveLayer``).
        layer_idx: index of the decoder layer; ``num_layers`` the model's count.
        cache: the whole ``SieveCache``.
        backend: the kernel backend in use.
        scale: the attention softmax scale.
        generated: tokens appended after the prompt so far (0 during prefill).
        query_window: how many of the layer's recent queries this compressor scores with (0: all the layer
            keeps). A composition whose parts use different windows narrows it per part.
    """

    phase: str
    layer: SieveLayer
    layer_idx: int
    num_layers: int
    cache: SieveCache
    backend: KVBackend
    scale: float
    generated: int
    query_window: int = 0

    def window_queries(self) -> torch.Tensor:
        """``[B, H, W, d]`` the most recent ``query_window`` queries of the layer, oldest first."""
        queries = self.layer.window_queries()
        return queries[:, :, -self.query_window :] if self.query_window else queries


class Compressor(abc.ABC):
    """Base class of compressors. Subclasses are ``@attrs.frozen`` classes whose fields are their parameters.

    Class attributes:
        name: the registered name.
        phases: when it acts: a subset of ``{"prefill", "decode"}``.
        propagates: whether it changes which tokens later layers compute on (token-selective propagation).
    """

    name: ClassVar[str] = ""
    phases: ClassVar[frozenset[str]] = frozenset()
    propagates: ClassVar[bool] = False

    @property
    def query_window(self) -> int:
        """How many recent post-RoPE queries each layer must remember for this compressor's scoring."""
        return 0

    @property
    def reserve(self) -> int:
        """Slots of headroom a layer keeps allocated after a compaction (what will be appended before the next)."""
        return 0

    def check_model(self, config: PretrainedConfig) -> None:
        """Raise ``ValueError`` if this compressor cannot run on a model with ``config`` (before any work)."""
        return None

    def check_prompt(self, prompt_len: int) -> None:
        """Raise ``ValueError`` if this compressor cannot handle a prompt of ``prompt_len`` tokens."""
        return None

    def install(self, model: torch.nn.Module) -> list[Any]:
        """Attach model-level machinery (e.g. decoder-layer hooks for token propagation); return removable handles."""
        return []

    @abc.abstractmethod
    def after_attention(self, event: LayerEvent) -> None:
        """Compress ``event.layer`` if the schedule says so (usually through :func:`compress_layer`)."""

    def config(self) -> dict[str, Any]:
        """The full resolved configuration, JSON-friendly."""
        out: dict[str, Any] = {"name": self.name}
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            out[field.name] = value.name if isinstance(value, ScoringPolicy | SelectionPolicy) else value
        return out


def resolve_policy(value: str | ScoringPolicy | SelectionPolicy, kind: str):
    """Turn a registered policy name into an instance (an instance passes through).

    Args:
        value: a name from the registry or a policy instance.
        kind: ``"scoring"`` or ``"selection"``.
    """
    if not isinstance(value, str):
        return value
    from kvsieve.plugins import registry

    return registry().create(kind, value)


def compress_layer(
    event: LayerEvent,
    *,
    scoring: ScoringPolicy,
    selection: SelectionPolicy,
    cand_starts: torch.Tensor,
    budget: int,
    protect_head: int = 0,
    protect_tail: int = 0,
    region_starts: torch.Tensor | None = None,
    queries_are_last: bool = False,
) -> None:
    """Score the candidates ``[cand_starts, ends)`` of a layer, keep ``budget`` of them, compact the cache.

    Args:
        event: the layer event.
        scoring, selection: the policies.
        cand_starts: ``int64 [B, Hkv]`` first candidate slot; candidates run to the live end.
        budget: candidates kept per row and KV head (protected ones included).
        protect_head, protect_tail: the first / last candidates always kept. The protected tail is left out
            of scoring: the scoring context's candidates end ``protect_tail`` slots before the live end.
        region_starts: ``int64 [B, Hkv]`` where the compacted region begins (default ``cand_starts``); slots in
            ``[region_starts, cand_starts)`` must hold only padding, which is dropped.
        queries_are_last: the layer's window queries are those of the last live slots (prefill).
    """
    layer = event.layer
    if protect_head + protect_tail > budget:
        raise ValueError(
            f"budget={budget} is smaller than the protected tokens (head {protect_head} + tail {protect_tail})"
        )
    from kvsieve.plugins import has_layer_compressed_observers, notify_layer_compressed

    observed = has_layer_compressed_observers()
    before = layer.max_live if observed else 0
    ends = layer.ends
    counts = (ends - cand_starts).clamp(min=0)
    # one host read for both facts (each read waits for the GPU: prefill runs this in every layer)
    padding = (region_starts != cand_starts).any() if region_starts is not None else counts.new_zeros((), dtype=bool)
    N, padding_to_drop = torch.stack([counts.max(), padding.to(counts.dtype)]).tolist()
    if N <= budget and not padding_to_drop:
        return  # nothing to evict
    if budget <= protect_head + protect_tail:  # everything kept is protected: no scores needed
        scores = torch.zeros(*counts.shape, N, device=counts.device)
    else:
        # the protected tail is not scored: candidates for scoring end before it (RPC: softmax over [Lp, L-R))
        ctx = ScoringContext(
            queries=event.window_queries() if scoring.needs_queries else layer.keys.new_zeros(0),
            keys=layer.keys,
            values=layer.values,
            starts=layer.starts,
            ends=ends,
            cand_starts=cand_starts,
            cand_ends=torch.maximum(ends - protect_tail, cand_starts),
            positions=layer.positions,
            layer_idx=event.layer_idx,
            scale=event.scale,
            backend=event.backend,
            queries_are_last=queries_are_last,
            candidate_count=max(N - protect_tail, 0),  # exact: cand_ends = max(ends - protect_tail, cand_starts)
        )
        scores = scoring.score(ctx)
        scores = torch.nn.functional.pad(scores, (0, N - scores.shape[-1]))
    chosen = selection.select(scores, counts, budget, protect_head, protect_tail)
    keep_slots = torch.where(chosen.keep >= 0, chosen.keep + cand_starts[..., None], 0)
    dest = cand_starts if region_starts is None else region_starts
    layer.compact(event.backend, keep_slots, chosen.counts, dest, reserve=event.cache.reserve)
    if observed:
        notify_layer_compressed(event, before=before, after=layer.max_live)
