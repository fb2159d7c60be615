"""Token propagation: a compressor lets later decoder layers compute on a subset of the tokens.

FastKV's Token-Selective Propagation (docs/policies/fastkv.md) is the first user; the mechanism is general. A
compressor sets it up in :meth:`Compressor.install <kvsieve.compressor.Compressor.install>`::

    def install(self, engine):
        return TokenPropagation.install(engine)

and, while some layer's attention runs (in ``after_attention``), calls :func:`propagate` with the tokens to
keep. What happens then, without patching any model class:

1. At the start of every forward that runs with a :class:`~kvsieve.cache.SieveCache`, the first decoder layer's
   forward pre-hook puts a fresh :class:`PropagationState` on the :class:`~kvsieve.engine.Engine`
   (``engine.propagation``): all tokens live.
2. :func:`propagate` records the selection (``int64 [B, K]``, sorted, indices into the tokens that layer
   computed on: a per-row set of a common size ``K``), its values checked on the device by the engine's
   :class:`~kvsieve.contracts.ContractGuard` (a fault is raised at the next host read, a valid stand-in
   propagated meanwhile).
3. That layer's forward hook gathers its output hidden states to the ``K`` tokens, so every later layer (and
   the model's final norm and LM head) computes on them only.
4. Every later layer's forward pre-hook gathers the per-token inputs the model computed once for the whole
   forward: the position embeddings ``(cos, sin)`` (so RoPE uses the ORIGINAL positions of the kept tokens),
   ``position_ids``, and the 4D attention mask (rows and columns: causality and padding of the kept tokens).
   It also tells the layer's cache to store the tokens at their original positions and to count the full
   forward in its logical length (:meth:`kvsieve.cache.DynamicSieveLayer.propagated_append`), so the tokens
   generated next continue from the original prompt length.

A later layer may propagate again; selections compose (indices are always relative to the tokens the calling
layer saw). The state lives for one forward: a decode step (a new forward) runs every layer on its new token.

Consequences a caller should know: the model's output covers the kept tokens only, so logits are produced for
kept positions only (``model.generate`` reads just the last token's, which a propagation must keep:
:func:`propagate` checks it), and hidden states returned for layers after a propagation have the shorter
length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

from kvsieve.contracts import ContractGuard, checks_enabled
from kvsieve.indexing import ints_to_device

if TYPE_CHECKING:
    from kvsieve.compressor import LayerEvent
    from kvsieve.engine import Engine

__all__ = ["PropagationState", "TokenPropagation", "decoder_layers", "propagate"]


@attrs.define
class PropagationState:
    """Which tokens of the current forward the next decoder layers compute on.

    Attributes:
        num_tokens: tokens the forward started with (``Q``: the prompt length in a prefill).
        index: ``int64 [B, K]`` sorted indices, among the forward's ``num_tokens`` tokens, of the tokens still
            computed on; ``None`` while every token is.
        pending: a selection made by the running layer, applied by its forward hook (relative to the tokens
            that layer computed on); ``None`` when there is none.
        pending_padding, padding: the kept padding tokens per row of ``pending`` and of ``index``, when the
            propagating compressor declared them (host ints); ``None`` otherwise.
    """

    num_tokens: int
    index: torch.Tensor | None = None
    pending: torch.Tensor | None = None
    pending_padding: list[int] | None = None
    padding: list[int] | None = None
    _gathered: dict[int, tuple[Any, Any]] = attrs.field(factory=dict, repr=False)

    @property
    def num_live(self) -> int:
        """Tokens the next layer computes on."""
        return self.num_tokens if self.index is None else self.index.shape[1]

    def gathered(self, source: Any, gather) -> Any:
        """``gather(source)``, computed once per source object while the kept set stays the same."""
        key = id(source)
        hit = self._gathered.get(key)
        if hit is None or hit[0] is not source:
            hit = (source, gather(source))
            self._gathered[key] = hit
        return hit[1]


def propagate(event: LayerEvent, keep: torch.Tensor, padding: Sequence[int] | None = None) -> None:
    """Keep only the tokens ``keep`` for every layer after the calling one (call it during a layer's forward).

    The shape is checked at once; the values (a device read would stall the GPU mid-prefill) through the engine's
    :class:`~kvsieve.contracts.ContractGuard` (:meth:`~kvsieve.contracts.ContractGuard.check_propagation`): a fault
    is raised at the next host read the run makes (the end of the forward at the latest), and meanwhile the rows
    that break a rule propagate the last ``K`` tokens instead, so the forward and the cache stay consistent. An
    engine without a guard (a unit test's stand-in) has the values checked at once.

    Args:
        event: the layer event of ``Compressor.after_attention``.
        keep: ``int64 [B, K]``: per row, the sorted, unique indices (among the ``n`` tokens the calling layer
            computed on, so ``0 < K <= n``) of the tokens later layers compute on. Every row keeps the same number
            ``K``; the last token ``n - 1`` must be kept (generation reads its logits).
        padding: per row, how many of the kept tokens are the row's left padding (they come first), when the
            caller knows it on the host (FastKV does: the padding it fills short rows with). Given, the layers after
            find the padding of their gathered mask without reading the device; it is checked on the device like
            ``keep``. Default: read once from the gathered mask.

    Raises:
        RuntimeError: no :class:`TokenPropagation` is installed on the model (``Compressor.install``).
        ValueError: ``keep`` is not a non-empty ``int64 [B, K]`` tensor with ``K <= n``, or ``padding`` is not ``B``
            ints in ``[0, K)``.
        kvsieve.contracts.PluginContractError: ``keep`` holds indices that are unsorted, repeated, outside
            ``[0, n)``, or miss the last token, or ``padding`` does not count the padding among them (at the next
            host read; at once without an engine guard).
    """
    engine = event.engine
    state = None if engine is None else engine.propagation
    if state is None:
        raise RuntimeError(
            "propagate() needs token propagation hooks on the model: return TokenPropagation.install(engine) "
            "from the compressor's install(engine)"
        )
    n = state.num_live
    if keep.dim() != 2 or keep.dtype != torch.long or keep.shape[1] == 0:
        raise ValueError(
            f"keep must be a non-empty int64 [B, K] tensor, got {keep.dtype} {tuple(keep.shape)}"
        )
    if keep.shape[1] > n:
        raise ValueError(
            f"keep must hold at most {n} token indices per row (the tokens the calling layer computed on), "
            f"got K={keep.shape[1]}"
        )
    guard = getattr(engine, "guard", None)
    if guard is None:  # an engine stand-in (a unit test's): check at once
        guard = ContractGuard(checks_enabled(), immediate=True)
    compressor = getattr(engine, "compressor", None)
    who = "a compressor" if compressor is None else guard.describe(compressor, "compressor")
    if padding is not None:
        padding = [int(p) for p in padding]
        B, K = keep.shape
        if len(padding) != B or any(not 0 <= p < K for p in padding):
            raise ValueError(f"padding must hold {B} ints in [0, {K}) (the kept padding tokens per row), got {padding}")
    state.pending = guard.check_propagation(keep, n, who)
    state.pending_padding = padding
    before = getattr(engine, "current_padding", None)
    if padding is not None and before is not None and guard.enabled:
        kept_padding = (state.pending < before[:, None]).sum(dim=1)  # [B]: kept tokens that were padding
        guard.defer((kept_padding != ints_to_device(padding, keep.device)).any(),
                    f"{who} propagated keep with padding={padding}, which does not count the padding tokens it keeps")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a HuggingFace causal LM (``model.model.layers`` for the Llama family)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"token propagation cannot find the decoder layers of {type(model).__name__}")
    return layers


def _expand_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.expand(batch, *x.shape[1:]) if x.shape[0] == 1 and batch != 1 else x


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` along dim 1 for ``x`` of shape ``[1 or B, Q, ...]``."""
    x = _expand_batch(x, index.shape[0])
    index = index.to(x.device)  # a model split over devices computes position embeddings on its first device
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


def _gather_mask(mask: torch.Tensor, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Rows and columns of a ``[1 or B, 1 or H, Q, past + Q]`` mask for the kept tokens; past columns stay."""
    if mask.dim() != 4:
        raise TypeError(
            f"token propagation needs a 4D attention mask (or None), got shape {tuple(mask.shape)}"
        )
    B, K = index.shape
    index = index.to(mask.device)
    mask = _expand_batch(mask, B)
    heads, cols = mask.shape[1], mask.shape[3]
    rows = mask.gather(2, index[:, None, :, None].expand(B, heads, K, cols))
    past = cols - num_tokens
    col_index = torch.cat([torch.arange(past, device=index.device).expand(B, past), index + past], dim=1)
    return rows.gather(3, col_index[:, None, None, :].expand(B, heads, K, past + K))


class TokenPropagation:
    """The decoder-layer hooks of token propagation (see the module docstring).

    Args:
        engine: the engine running the model: the hooks act in forwards that run with its cache.
        layers: the model's decoder layers, in order.
    """

    def __init__(self, engine: Engine, layers: torch.nn.ModuleList):
        self.engine, self.layers = engine, layers

    @classmethod
    def install(cls, engine: Engine) -> list[Any]:
        """Register the hooks on the decoder layers of ``engine.model``; return their removable handles. Install
        it once per model (one propagating compressor at a time)."""
        return cls(engine, decoder_layers(engine.model)).register()

    def register(self) -> list[Any]:
        handles = []
        for position, layer in enumerate(self.layers):
            layer_idx = getattr(getattr(layer, "self_attn", None), "layer_idx", position)
            handles.append(
                layer.register_forward_pre_hook(self._pre_hook(position == 0, layer_idx), with_kwargs=True)
            )
            last = position == len(self.layers) - 1
            handles.append(layer.register_forward_hook(self._post_hook(last), with_kwargs=True))
        return handles

    def _pre_hook(self, first: bool, layer_idx: int):
        engine = self.engine

        def hook(module, args, kwargs):
            cache = engine.cache
            if cache is None:  # a forward without kvsieve's cache (use_cache=False): nothing to propagate
                engine.propagation = None
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if first:  # a new forward: every token is live
                engine.propagation = PropagationState(num_tokens=hidden.shape[1])
                return None
            state: PropagationState | None = engine.propagation
            if state is None or state.index is None:
                return None
            if hidden.shape[1] != state.num_live:
                raise RuntimeError(
                    f"decoder layer {layer_idx} got {hidden.shape[1]} tokens, expected the {state.num_live} "
                    "propagated ones: another hook changed the hidden states"
                )
            index, num_tokens = state.index, state.num_tokens
            mask = kwargs.get("attention_mask")
            if mask is not None:
                kwargs["attention_mask"] = state.gathered(mask, lambda m: _gather_mask(m, index, num_tokens))
                if state.padding is not None and hasattr(engine, "known_padding"):
                    engine.known_padding(kwargs["attention_mask"], state.padding)  # no read to find it
            embeddings = kwargs.get("position_embeddings")
            if embeddings is not None:  # (cos, sin) at the original positions of the kept tokens
                kwargs["position_embeddings"] = state.gathered(
                    embeddings, lambda e: tuple(_gather_tokens(t, index) for t in e)
                )
            position_ids = kwargs.get("position_ids")
            if position_ids is not None:
                kwargs["position_ids"] = state.gathered(position_ids, lambda p: _gather_tokens(p, index))
            if layer_idx < len(cache.layers):
                cache.layers[layer_idx].propagated_append(index, num_tokens)
            return args, kwargs

        return hook

    def _post_hook(self, last: bool):
        engine = self.engine

        def hook(module, args, kwargs, output):
            state: PropagationState | None = engine.propagation
            if state is None:
                return None
            if last:  # the forward's decoder layers are done: free the gathered inputs
                state._gathered.clear()
            if state.pending is None:
                return None
            keep, state.pending = state.pending, None
            state.padding, state.pending_padding = state.pending_padding, None
            state.index = keep if state.index is None else state.index.gather(1, keep)
            state._gathered.clear()
            if isinstance(output, tuple):  # older decoder layers return (hidden_states, ...)
                return (_gather_tokens(output[0], keep), *output[1:])
            return _gather_tokens(output, keep)

        return hook
