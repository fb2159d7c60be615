"""kvsieve.propagation: the general token-propagation mechanism, driven by a toy compressor.

The toy compressor propagates a fixed subset of tokens at chosen layers. The model's forward with it must
equal a straightforward re-implementation that runs the decoder layers by hand (all tokens up to the
propagation layer, then the gathered hidden states, position embeddings and mask), and the cache must hold the
kept tokens at their original positions.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import ClassVar

import attrs
import pytest
import torch
from conftest import left_padded, tiny_llama

import kvsieve.engine as engine_module
from kvsieve.backends.torch_ref import TorchBackend
from kvsieve.cache import SieveCache
from kvsieve.compressor import Compressor, LayerEvent
from kvsieve.contracts import PluginContractError
from kvsieve.engine import Engine
from kvsieve.integration import apply, generate
from kvsieve.propagation import (
    PropagationState,
    TokenPropagation,
    _gather_mask,
    _gather_tokens,
    decoder_layers,
    propagate,
)

PAD0 = SimpleNamespace(pad_token_id=0)  # the tokenizer facts left_padded needs


@pytest.fixture(scope="module")
def model4():
    """A tiny random Llama with 4 layers (so propagation can happen in the middle)."""
    return tiny_llama(4)


def keep_every_other(n: int, batch: int) -> torch.Tensor:
    """Tokens 0, 2, 4, ... plus the last: ``int64 [batch, K]``."""
    keep = torch.arange(0, n, 2)
    if keep[-1] != n - 1:
        keep = torch.cat([keep, torch.tensor([n - 1])])
    return keep.expand(batch, -1).contiguous()


@attrs.frozen
class Thinning(Compressor):
    """Toy propagating compressor: at each layer of ``layers`` keep every other token (plus the last)."""

    name: ClassVar[str] = "test-thinning"
    phases: ClassVar[frozenset[str]] = frozenset({"prefill"})
    propagates: ClassVar[bool] = True
    layers: tuple = (1,)

    def install(self, engine):
        return TokenPropagation.install(engine)

    def after_attention(self, event: LayerEvent) -> None:
        if event.phase == "prefill" and event.layer_idx in self.layers:
            n = event.layer.max_end
            propagate(event, keep_every_other(n, event.layer.ends.shape[0]))


def broken(keep: torch.Tensor, fault: str, n: int) -> torch.Tensor:
    """``keep`` (``int64 [B, K]`` among ``n`` tokens) broken in one way (``fault``), in every row or, for a fault
    ending in ``_row1``, in row 1 only."""
    keep = keep.clone()
    rows = slice(1, 2) if fault.endswith("_row1") else slice(None)
    fault = fault.removesuffix("_row1")
    if fault == "unsorted":
        keep[rows, :2] = keep[rows, :2].flip(-1)
    elif fault == "duplicate":
        keep[rows, 1] = keep[rows, 0]
    elif fault == "negative":
        keep[rows, 0] = -1
    elif fault == "out_of_range":
        keep[rows, -1] = n + 3
    elif fault == "no_last_token":
        keep = keep[:, :-1]
    else:
        raise AssertionError(fault)
    return keep


# each malformed keep, and what the error says
KEEP_FAULTS = [
    ("unsorted", "sorted, unique"),
    ("duplicate", "sorted, unique"),
    ("negative", r"inside \[0, 30\)"),
    ("out_of_range", r"inside \[0, 30\)"),
    ("no_last_token", r"last token \(index 29\)"),
    ("unsorted_row1", "sorted, unique"),
]


@attrs.frozen
class Mispropagating(Thinning):
    """Thinning whose propagation at layer 1 is broken in one way (``fault``, see :func:`broken`)."""

    name: ClassVar[str] = "test-mispropagating"
    fault: str = "unsorted"

    def after_attention(self, event: LayerEvent) -> None:
        if event.phase == "prefill" and event.layer_idx in self.layers:
            n = event.layer.max_end
            propagate(event, broken(keep_every_other(n, event.layer.ends.shape[0]), self.fault, n))


def by_hand(model, ids, mask, layers):
    """Logits of the kept tokens, computing every decoder layer by hand on plain SDPA (no cache), with plain
    indexing: layers up to a propagation layer see every token, later ones the kept rows of everything."""
    base = model.model
    B, L = ids.shape
    hidden = base.embed_tokens(ids)
    full_cos, full_sin = base.rotary_emb(hidden, torch.arange(L)[None])  # a direct forward's positions
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    # padding queries see themselves (so SDPA stays finite); real queries never see padding
    full_mask = causal[None, None] & (mask.bool()[:, None, None, :] | torch.eye(L, dtype=torch.bool))
    index = torch.arange(L).expand(B, L)
    for i, layer in enumerate(base.layers):
        hidden = layer(
            hidden,
            attention_mask=torch.stack([full_mask[b, :, index[b]][:, :, index[b]] for b in range(B)]),
            position_embeddings=(full_cos[0][index], full_sin[0][index]),
            position_ids=index,
        )
        if i in layers:
            keep = keep_every_other(hidden.shape[1], B)
            hidden = torch.stack([hidden[b, keep[b]] for b in range(B)])
            index = torch.stack([index[b, keep[b]] for b in range(B)])
    return model.lm_head(base.norm(hidden)), index


@pytest.mark.parametrize("layers", [(1,), (0, 2), (3,)])
@pytest.mark.parametrize("padded", [False, True])
def test_forward_equals_a_by_hand_propagation(model4, layers, padded):
    lengths = [30, 21] if padded else [30, 30]
    ids, mask, _ = left_padded(PAD0, lengths, seed=1)
    with torch.inference_mode():
        want, index = by_hand(model4, ids, mask, layers)
        with apply(model4, Thinning(layers), "torch") as engine:
            got = model4(ids, attention_mask=mask).logits
            cache, propagation = engine.last_cache, engine.propagation
    assert got.shape == want.shape
    # padding queries attend to nothing: their outputs are meaningless on both sides
    real = mask.gather(1, index).bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(propagation.index, index)
    # every layer: logical length = the prompt; kept tokens stored at their original positions
    L = ids.shape[1]
    live = torch.arange(L).expand(2, L)
    for i, layer in enumerate(cache.layers):
        assert layer.seen == layer.prompt_len == L
        pos = layer.positions[:, 0, : layer.max_end]
        assert torch.equal(pos, live), f"layer {i}"
        if i in layers:
            live = live.gather(1, keep_every_other(live.shape[1], 2))


@pytest.mark.parametrize("fault, match", KEEP_FAULTS)
def test_a_malformed_keep_is_reported_at_the_end_of_the_forward_and_the_cache_stays_consistent(model4, fault, match):
    """The values of ``keep`` are checked on the device (no host read mid-prefill): the error comes at the forward's
    end, naming the compressor and the rule; meanwhile the faulty rows propagate the last ``K`` tokens, so no gather
    reads out of range and every later layer holds them at their original positions."""
    ids, mask, _ = left_padded(PAD0, [30, 21], seed=1)
    B, L = ids.shape
    with torch.inference_mode(), apply(model4, Mispropagating(fault=fault), "torch") as engine:
        with pytest.raises(PluginContractError, match=f"compressor 'test-mispropagating'.*{match}"):
            model4(ids, attention_mask=mask)
        cache, propagation = engine.last_cache, engine.propagation
    keep = keep_every_other(L, B)
    K = broken(keep, fault, L).shape[1]
    faulty = [1] if fault.endswith("_row1") else range(B)
    want = torch.stack([torch.arange(L - K, L) if b in faulty else keep[b] for b in range(B)])
    assert torch.equal(propagation.index, want)
    for i, layer in enumerate(cache.layers):
        assert layer.seen == layer.prompt_len == L, f"layer {i}"
        pos = layer.positions[:, 0, : layer.max_end]
        assert torch.equal(pos, torch.arange(L).expand(B, L) if i <= 1 else want), f"layer {i}"


@attrs.frozen
class Declaring(Thinning):
    """Thinning that declares the padding it keeps (``propagate(..., padding=)``), off by ``error`` per row."""

    name: ClassVar[str] = "test-declaring"
    pads: tuple = ()  # each row's left padding (the test's prompt)
    error: int = 0

    def after_attention(self, event: LayerEvent) -> None:
        if event.phase == "prefill" and event.layer_idx in self.layers:
            n, B = event.layer.max_end, event.layer.ends.shape[0]
            keep = keep_every_other(n, B)
            kept_padding = [int((keep[b] < self.pads[b]).sum()) + self.error for b in range(B)]
            propagate(event, keep, padding=kept_padding)


def test_declared_padding_spares_the_read_and_gives_the_same_forward(model4, monkeypatch):
    """A compressor that declares the padding it keeps: the layers after it find their gathered mask's padding
    without a host read, and the forward and cache are those of the undeclared run."""
    ids, mask, _ = left_padded(PAD0, [30, 21], seed=1)
    pads = tuple(int(p) for p in (mask == 0).sum(dim=1))
    calls, own = [], engine_module.padding_starts

    def counting(*args, **kwargs):  # padding_starts reads the mask's padding on the host
        calls.append(1)
        return own(*args, **kwargs)

    monkeypatch.setattr(engine_module, "padding_starts", counting)
    reads = {}
    with torch.inference_mode():
        for name, compressor in (("told", Declaring((1,), pads=pads)), ("read", Thinning((1,)))):
            calls.clear()
            with apply(model4, compressor, "torch") as engine:
                logits = model4(ids, attention_mask=mask).logits
                reads[name] = (len(calls), logits, [layer.starts.clone() for layer in engine.last_cache.layers])
    assert reads["told"][0] == 1 and reads["read"][0] == 2  # the prompt's mask only, vs the gathered one too
    torch.testing.assert_close(reads["told"][1], reads["read"][1], rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(reads["told"][2], reads["read"][2], strict=True))


def test_a_wrong_declared_padding_is_reported(model4):
    ids, mask, _ = left_padded(PAD0, [30, 21], seed=1)
    pads = tuple(int(p) for p in (mask == 0).sum(dim=1))
    with torch.inference_mode(), apply(model4, Declaring((1,), pads=pads, error=1), "torch"):
        with pytest.raises(PluginContractError, match="test-declaring.*does not count the padding tokens it keeps"):
            model4(ids, attention_mask=mask)


@pytest.mark.parametrize("padding", [[1], [0, 40], [-1, 0]], ids=["length", "too-many", "negative"])
def test_a_declared_padding_of_the_wrong_shape_is_refused(model4, padding):
    ids, mask, _ = left_padded(PAD0, [30, 21], seed=1)

    @attrs.frozen
    class BadDeclaration(Thinning):
        name: ClassVar[str] = "test-bad-declaration"

        def after_attention(self, event: LayerEvent) -> None:
            if event.phase == "prefill" and event.layer_idx in self.layers:
                propagate(event, keep_every_other(event.layer.max_end, 2), padding=padding)

    with torch.inference_mode(), apply(model4, BadDeclaration((1,)), "torch"):
        with pytest.raises(ValueError, match=r"padding must hold 2 ints in \[0, 16\)"):
            model4(ids, attention_mask=mask)


@pytest.mark.parametrize("checks", [True, False])
def test_a_well_formed_keep_gives_the_same_forward_with_the_checks_on_or_off(model4, checks):
    ids, mask, _ = left_padded(PAD0, [30, 21], seed=1)
    with torch.inference_mode():
        want, index = by_hand(model4, ids, mask, (1,))
        with apply(model4, Thinning((1,)), "torch", checks=checks) as engine:
            assert engine.guard.enabled is checks
            got = model4(ids, attention_mask=mask).logits
            propagation = engine.propagation
    real = mask.gather(1, index).bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(propagation.index, index)


def test_last_layer_propagation_gives_the_full_logits_of_kept_tokens(model4):
    """Propagating after the last layer only thins the final norm and LM head (position-wise)."""
    ids = torch.randint(3, 300, (1, 25), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model4(ids).logits
        with apply(model4, Thinning((3,)), "torch"):
            thinned = model4(ids).logits
    torch.testing.assert_close(thinned, full[:, keep_every_other(25, 1)[0]], atol=1e-5, rtol=1e-5)


def test_decoding_after_propagation_continues_at_the_original_positions(model4):
    ids, mask, _ = left_padded(PAD0, [20, 17], seed=2)
    new = 6
    with apply(model4, Thinning((1,)), "torch") as engine, torch.inference_mode():
        out = model4.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False
        )
        cache, propagation = engine.last_cache, engine.propagation
    assert out.shape == (2, 20 + new)
    assert propagation.num_tokens == 1 and propagation.index is None  # a decode step: all tokens
    for layer in cache.layers:
        assert layer.seen == 20 + new - 1
        for b in range(2):
            pos = layer.positions[b, 0, : int(layer.ends[b, 0])]
            assert torch.equal(pos[-(new - 1) :], torch.arange(20, 20 + new - 1))


def test_hooks_are_removed_and_plain_forwards_are_untouched(model4):
    layers = decoder_layers(model4)
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model4(ids).logits
        with apply(model4, Thinning((1,)), "torch"):
            assert all(len(layer._forward_pre_hooks) == 1 for layer in layers)
            no_cache = model4(ids, use_cache=False).logits  # no SieveCache: nothing propagates
        after = model4(ids).logits
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)
    torch.testing.assert_close(no_cache, before)
    assert torch.equal(before, after)


def test_generate_with_propagation_and_sampling(model4):
    ids = torch.randint(3, 300, (2, 18), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    result = generate(
        model4,
        ids,
        torch.ones_like(ids),
        compressor=Thinning((1,)),
        backend="torch",
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=True,
        num_return_sequences=3,
    )
    assert result.sequences.shape == (6, 23)
    # layers 0-1 hold the prompt, layers 2-3 the propagated tokens (0, 2, ..., 16, 17); all the 4 decoded ones
    assert result.kv_lengths == [18 + 4, 18 + 4, 10 + 4, 10 + 4]


# ------------------------------------------------------------------------------------------ units
def test_gather_mask_rows_columns_and_past():
    B, past, Q = 2, 3, 5
    mask = torch.rand(1, 1, Q, past + Q) > 0.5
    index = torch.tensor([[0, 2, 4], [1, 3, 4]])
    got = _gather_mask(mask, index, Q)
    for b in range(B):
        cols = torch.cat([torch.arange(past), index[b] + past])
        assert torch.equal(got[b, 0], mask[0, 0][index[b]][:, cols])
    with pytest.raises(TypeError, match="4D attention mask"):
        _gather_mask(mask[0], index, Q)


def test_gather_tokens_broadcasts_a_shared_batch():
    cos = torch.randn(1, 6, 4)
    index = torch.tensor([[0, 5], [2, 5]])
    got = _gather_tokens(cos, index)
    assert torch.equal(got, torch.stack([cos[0, [0, 5]], cos[0, [2, 5]]]))


def test_propagate_refuses_bad_selections(model4):
    """The shape at once (``ValueError``); the values through the engine's contract guard, at its next read
    (``PluginContractError``), with the faulty rows' stand-in (the last ``K`` tokens) propagated meanwhile; at once
    for an engine without a guard."""
    backend = TorchBackend()
    engine = Engine(model4, Thinning(), backend)  # not attached: no propagation hooks, no state
    layer = SieveCache(num_layers=1).layers[0]

    def event(engine):
        return LayerEvent("prefill", layer, 1, engine.num_layers if engine else 4, engine, backend, 1.0, 0)

    with pytest.raises(RuntimeError, match="TokenPropagation.install"):
        propagate(event(engine), torch.tensor([[0, 3]]))
    with pytest.raises(RuntimeError, match="TokenPropagation.install"):
        propagate(event(None), torch.tensor([[0, 3]]))  # an event without an engine (a unit test's)
    engine.propagation = PropagationState(num_tokens=4)
    for keep, match in [
        (torch.tensor([0, 3]), "int64 \\[B, K\\]"),
        (torch.tensor([[0.0, 3.0]]), "int64"),
        (torch.zeros(1, 0, dtype=torch.long), "non-empty"),
        (torch.tensor([[0, 1, 2, 3, 3]]), "at most 4 token indices per row .* K=5"),
    ]:
        with pytest.raises(ValueError, match=match):
            propagate(event(engine), keep)
    value_faults = [
        (torch.tensor([[2, 1, 3]]), "sorted, unique"),
        (torch.tensor([[1, 1, 3]]), "sorted, unique"),
        (torch.tensor([[-1, 1, 3]]), r"inside \[0, 4\)"),
        (torch.tensor([[0, 2, 4]]), r"inside \[0, 4\)"),
        (torch.tensor([[0, 2]]), r"last token \(index 3\)"),
    ]
    for keep, match in value_faults:
        propagate(event(engine), keep)  # no host read: recorded, a valid stand-in propagated meanwhile
        assert torch.equal(engine.propagation.pending, torch.arange(4 - keep.shape[1], 4)[None])
        with pytest.raises(PluginContractError, match=f"compressor 'test-thinning'.*{match}"):
            engine.guard.flush()
    propagate(event(engine), torch.tensor([[0, 3], [3, 2]]))  # only the faulty row is replaced
    assert torch.equal(engine.propagation.pending, torch.tensor([[0, 3], [2, 3]]))
    with pytest.raises(PluginContractError, match="sorted, unique"):
        engine.guard.flush()
    propagate(event(engine), torch.tensor([[0, 3]]))
    engine.guard.flush()
    assert torch.equal(engine.propagation.pending, torch.tensor([[0, 3]]))

    stand_in = SimpleNamespace(num_layers=4, propagation=PropagationState(num_tokens=4))  # an engine without a guard
    for keep, match in value_faults:
        with pytest.raises(PluginContractError, match=f"a compressor propagated an invalid keep.*{match}"):
            propagate(event(stand_in), keep)
    propagate(event(stand_in), torch.tensor([[0, 3]]))
    assert torch.equal(stand_in.propagation.pending, torch.tensor([[0, 3]]))
