"""Composition (``kvsieve.composition``) and the hybrid preset ``fastkv+rpc`` (``kvsieve.policies.hybrid``).

* building: the preset's registration, ``part.param`` addressing, clear refusals of invalid compositions;
* the hybrid through ``model.generate`` on tiny random models (3 layers: FastKV's default TSP layer is 0):
  equal to FastKV before RPC's first compression, equal to RPC when FastKV keeps everything, per-layer lengths
  ``K_l + RPC.cache_length(0, g)``, and hypothesis properties of the composed selection;
* a composite with layer ranges, and the command line.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAMILIES, greedy, left_padded, random_prompt
from hypothesis import given, settings
from hypothesis import strategies as st

import kvsieve
from kvsieve import plugins
from kvsieve.cli import main
from kvsieve.composition import Composite, CompositionError, Part, Preset
from kvsieve.integration import apply, generate, resolve_compressor
from kvsieve.plugins import UnknownNameError, registry
from kvsieve.policies.fastkv import FastKV
from kvsieve.policies.hybrid import FASTKV_RPC
from kvsieve.policies.rpc import RPC
from kvsieve.policies.snapkv import SnapKV

HYBRID = "fastkv+rpc"


def run(model, ids, n, compressor, params=None, mask=None):
    """:func:`kvsieve.integration.generate`: exactly ``n`` greedy tokens on the torch backend."""
    mask = torch.ones_like(ids) if mask is None else mask
    return generate(model, ids, mask, compressor=compressor, backend="torch", params=params, **greedy(n))


def hybrid_params(fastkv: dict, rpc: dict) -> dict:
    """``{"fastkv.tsp_rate": ..., "rpc.interval": ...}`` from the parts' own parameters."""
    return {f"fastkv.{k}": v for k, v in fastkv.items()} | {f"rpc.{k}": v for k, v in rpc.items()}


def cached(model, ids, n, compressor, params=None, mask=None):
    """The SieveCache at the end of ``model.generate`` with exactly ``n`` greedy tokens."""
    mask = torch.ones_like(ids) if mask is None else mask
    with apply(model, compressor, "torch", params=params) as engine, torch.inference_mode():
        sequences = model.generate(input_ids=ids, attention_mask=mask, **greedy(n))
    return sequences, engine.last_cache


def live(layer, b: int, j: int) -> torch.Tensor:
    return layer.positions[b, j, int(layer.starts[b, j]) : int(layer.ends[b, j])]


class CompressionRecorder:
    """A ``kvsieve_layer_compressed`` observer."""

    def __init__(self):
        self.events = []

    @kvsieve.hookimpl
    def kvsieve_layer_compressed(self, layer_idx, phase, before, after, info):
        self.events.append((layer_idx, phase, info["generated"], before, after, info["compressor"]))


@pytest.fixture
def recorder():
    rec = CompressionRecorder()
    plugins.register(rec, name="test-composition-recorder")
    yield rec
    plugins.unregister("test-composition-recorder")


# ------------------------------------------------------------------------------------------ building
def test_preset_is_registered_through_its_entry_point():
    entry = registry().get("compressor", HYBRID)
    assert entry.obj is FASTKV_RPC
    assert entry.source.entry_point == "hybrid = kvsieve.policies.hybrid"
    assert FASTKV_RPC.phases == {"prefill", "decode"}
    hybrid = registry().compressor(HYBRID)
    assert isinstance(hybrid, Composite) and hybrid.name == HYBRID
    assert hybrid.part("fastkv") == FastKV() and hybrid.part("rpc") == RPC()  # the parts' defaults
    assert hybrid.phases == {"prefill", "decode"} and hybrid.propagates
    assert (hybrid.query_window, hybrid.reserve) == (32, 4096)  # max over the parts (8 and 32; 0 and 4096)
    config = hybrid.config()
    assert config["name"] == HYBRID and list(config["parts"]) == ["fastkv", "rpc"]
    assert config["parts"]["fastkv"] == {"phase": "prefill", "layers": None, "compressor": FastKV().config()}
    assert config["parts"]["rpc"] == {"phase": "decode", "layers": None, "compressor": RPC().config()}


def test_parameters_are_addressed_as_part_dot_param():
    hybrid = registry().create("compressor", HYBRID, **{"fastkv.tsp_rate": 0.3, "rpc.interval": 1024})
    assert hybrid.part("fastkv") == FastKV(tsp_rate=0.3) and hybrid.part("rpc") == RPC(interval=1024)
    assert hybrid.reserve == 1024
    from kvsieve.params import parse_params

    cli = resolve_compressor(HYBRID, parse_params(["fastkv.tsp_rate=0.3", "rpc.interval=1024"]))
    assert cli == hybrid


@pytest.mark.parametrize(
    "params, match",
    [
        ({"tsp_rate": 0.2}, r"no parameter 'tsp_rate'\. Did you mean fastkv\.tsp_rate\?.*parts: fastkv, rpc"),
        ({"window": 8}, r"Did you mean fastkv\.window or rpc\.window\?"),
        ({"fastk.tsp_rate": 0.2}, r"no parameter 'fastk\.tsp_rate'\. Did you mean fastkv\.tsp_rate\?"),
        ({"rpc.intervall": 8}, r"part 'rpc': compressor 'rpc' has no parameter 'intervall'\. Did you mean"),
        ({"rpc.window": 5000}, r"part 'rpc': window=5000 must be smaller than interval=4096"),
        ({"fastkv.tsp_rate": 2}, r"part 'fastkv': tsp_rate must be a ratio in \(0, 1\], got 2"),
    ],
)
def test_bad_parameters_name_the_part_and_the_allowed_ones(params, match):
    with pytest.raises(ValueError, match=match):
        registry().create("compressor", HYBRID, **params)


@pytest.mark.parametrize(
    "build, match",
    [
        (  # two prefill parts that both propagate tokens
            lambda: Preset("two-fastkv", [Part("fastkv", "prefill", key="a"),
                                          Part("fastkv", "prefill", key="b")])(),
            r"two-fastkv: parts 'a', 'b' both propagate tokens; a composition may hold at most one",
        ),
        (  # a decode policy in the prefill slot
            lambda: resolve_compressor("rpc+fastkv"),
            r"part 'rpc' is in the prefill slot, but compressor 'rpc' acts only in decode",
        ),
        (  # a prefill policy in the decode slot
            lambda: resolve_compressor("snapkv+fastkv"),
            r"part 'fastkv' is in the decode slot, but compressor 'fastkv' acts only in prefill",
        ),
        (
            lambda: Composite("x", [Part(FastKV(), "prefill", layers=(0, 2))]),
            r"part 'fastkv' propagates tokens, which affects every later layer; it cannot be limited",
        ),
        (
            lambda: Composite("x", [Part(SnapKV(), "prefill", layers=(0, 2)),
                                    Part(SnapKV(), "prefill", layers=(1, 3), key="late")]),
            r"parts 'snapkv' and 'late' both act in prefill on the same layers",
        ),
        (
            lambda: Composite("x", [Part(SnapKV(), "prefill"), Part("snapkv", "prefill")]),
            r"snapkv appears more than once",
        ),
        (lambda: Composite("x", []), r"at least one part"),
        (lambda: Part(SnapKV(), "prefill", layers=(2, 2)), r"layers must be \(start, stop\) with 0 <= start"),
        (lambda: Part(SnapKV(), "generate"), r"phase"),
        (lambda: resolve_compressor("snapkv+rpc+rpc"), r"an ad-hoc composition is 'PREFILL\+DECODE'"),
    ],
)
def test_invalid_compositions_are_refused_when_built(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_unknown_part_is_refused_with_did_you_mean():
    match = r"fastkv\+rcp: part 'rcp': unknown compressor 'rcp'\. Did you mean 'rpc'"
    with pytest.raises(UnknownNameError, match=match):
        resolve_compressor("fastkv+rcp")


def test_ad_hoc_composition_of_registered_parts(llama):
    model, _ = llama
    params = {"snapkv.budget": 20, "snapkv.window": 4, "rpc.interval": 8, "rpc.window": 4, "rpc.ratio": 0.5}
    adhoc = resolve_compressor("snapkv+rpc", params)
    assert adhoc.name == "snapkv+rpc" and adhoc.part("snapkv") == SnapKV(budget=20, window=4)
    assert [(p.key, p.phase) for p in adhoc.parts] == [("snapkv", "prefill"), ("rpc", "decode")]
    result = run(model, random_prompt(50), 30, "snapkv+rpc", params)
    assert result.kv_lengths == [20 + RPC(interval=8, window=4, ratio=0.5).cache_length(0, 29)] * 3


# ------------------------------------------------------------------------------------------ the hybrid
def test_equals_fastkv_before_the_first_rpc_compression(tiny_models, recorder):
    """Fewer than P + R generated tokens: RPC never fires, so the hybrid is FastKV (token for token, and the
    same prompt KV in every layer, although RPC's window (12) is larger than FastKV's (8))."""
    model, tok = tiny_models["llama"]
    ids, mask, _ = left_padded(tok, [80, 57], seed=4)
    P, R = 16, 12
    fastkv = dict(tsp_rate=0.25, ratio=0.15)
    params = hybrid_params(fastkv, dict(interval=P, window=R, ratio=0.25))
    n = P + R  # the last token is not fed back: P + R - 1 generated tokens are cached
    hybrid, hybrid_cache = cached(model, ids, n, HYBRID, params, mask)
    assert {(phase, name) for _, phase, *_, name in recorder.events} == {("prefill", HYBRID)}
    alone, alone_cache = cached(model, ids, n, "fastkv", fastkv, mask)
    assert torch.equal(hybrid, alone)
    for layer, reference in zip(hybrid_cache.layers, alone_cache.layers, strict=True):
        assert torch.equal(layer.starts, reference.starts) and torch.equal(layer.ends, reference.ends)
        for b in range(2):
            for j in range(2):
                assert torch.equal(live(layer, b, j), live(reference, b, j))
    # one more token: the first compression fires in every layer, and only in decode
    recorder.events.clear()
    run(model, ids, n + 1, HYBRID, params, mask)
    decode = [e for e in recorder.events if e[1] == "decode"]
    assert [(e[0], e[2]) for e in decode] == [(layer_idx, P + R) for layer_idx in range(3)]


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_rpc_when_fastkv_keeps_everything(tiny_models, family):
    """FastKV's rates at 1 keep every prompt token in every layer: the hybrid is RPC (whose window, 4, is
    smaller than FastKV's, 8: each part sees its own queries)."""
    model, _ = tiny_models[family]
    ids = random_prompt(30, batch=2, seed=1)
    rpc = dict(interval=8, window=4, ratio=0.5)
    n = 40
    hybrid = run(model, ids, n, HYBRID, hybrid_params(dict(tsp_rate=1.0, ratio=1.0), rpc))
    alone = run(model, ids, n, "rpc", rpc)
    assert torch.equal(hybrid.sequences, alone.sequences)
    assert hybrid.kv_lengths == alone.kv_lengths == [30 + RPC(**rpc).cache_length(0, n - 1)] * 3
    assert hybrid.kv_lengths[0] < 30 + n - 1, "RPC compressed"


@pytest.mark.parametrize(
    "fastkv, rpc, n",
    [
        (dict(tsp_rate=0.2, ratio=0.1), dict(interval=8, window=4, ratio=0.5), 45),
        # ratio >= tsp_rate: the TSP layer keeps 0.5 * Lp, the later ones all 0.2 * Lp they receive
        (dict(tsp_rate=0.2, ratio=0.5), dict(interval=12, window=3, ratio=1 / 3), 50),
        (dict(tsp_len=30, budget=20), dict(interval=10, window=4, ratio=0.4), 33),  # FastKV's constant mode
    ],
)
def test_per_layer_lengths_follow_the_combined_formula(llama, recorder, fastkv, rpc, n):
    """Layer l, row b holds K[l, b] + RPC.cache_length(0, g): the prompt KV FastKV kept in it, then RPC's
    schedule over the generated tokens; RPC compresses at g = P + R, then every P, in every layer."""
    model, tok = llama
    lengths = [100, 23]  # the short row has fewer real tokens than some budgets: it keeps fewer of them
    ids, mask, _ = left_padded(tok, lengths, seed=2)
    Lp, g = ids.shape[1], n - 1
    _, prefilled = cached(model, ids, 1, "fastkv", fastkv, mask)  # FastKV's prompt KV (no decode step)
    kept = [(layer.ends - layer.starts) for layer in prefilled.layers]  # K[l]: int64 [B, Hkv]
    recorder.events.clear()
    _, cache = cached(model, ids, n, HYBRID, hybrid_params(fastkv, rpc), mask)
    schedule = RPC(**rpc)
    fk = FastKV(**fastkv)
    tsp_len = fk.propagated_length(Lp)
    budgets = [fk.kv_budget(Lp, after_tsp=False)] + [
        min(tsp_len, fk.kv_budget(tsp_len, after_tsp=True) or tsp_len)
    ] * 2
    for layer_idx, layer in enumerate(cache.layers):
        assert layer.seen == Lp + g and layer.prompt_len == Lp, "the logical length stays true"
        assert torch.equal(layer.ends - layer.starts, kept[layer_idx] + schedule.cache_length(0, g))
        assert bool((kept[layer_idx][0] == min(budgets[layer_idx], Lp)).all())
        assert bool((kept[layer_idx][1] <= lengths[1]).all())
    if fastkv.get("ratio") == 0.5:
        assert len({int(k.max()) for k in kept}) == 2, "the layers hold prompt regions of different lengths"
    steps = list(range(schedule.interval + schedule.window, g + 1, schedule.interval))
    decode = [e for e in recorder.events if e[1] == "decode"]
    assert [(e[0], e[2]) for e in decode] == [(layer_idx, s) for s in steps for layer_idx in range(3)]
    for layer_idx, _, generated, before, after, _ in decode:
        base = int(kept[layer_idx].max())
        assert before == base + schedule.cache_length(0, generated - 1) + 1
        assert after == base + schedule.cache_length(0, generated)


@settings(max_examples=25, deadline=None)
@given(
    real=st.lists(st.integers(12, 70), min_size=1, max_size=2),
    tsp_rate=st.floats(0.1, 1.0),
    ratio=st.floats(0.1, 1.0),
    P=st.integers(3, 12),
    R_frac=st.floats(0, 0.99),
    rpc_ratio=st.one_of(st.integers(1, 6).map(lambda c: 1 / c), st.floats(1 / 6, 1)),  # 1 / c for c in [1, 6]
    n=st.integers(1, 45),
    seed=st.integers(0, 2**16),
)
def test_composed_selection_properties(llama, real, tsp_rate, ratio, P, R_frac, rpc_ratio, n, seed):
    """Whatever the rates, schedule and padding, in every layer, row and KV head: positions increase; the
    prompt entries are exactly those FastKV kept in that layer (RPC never touches them); the generated entries
    are true positions, as many as RPC's schedule says, the last R among them, one set shared by the KV
    heads."""
    R = 1 + int(R_frac * (P - 1))
    if math.floor(round(rpc_ratio * P, 9)) < 1:  # T = floor(ratio * P) = 0: refused (test_rpc.py)
        return
    model, tok = llama
    ids, mask, _ = left_padded(tok, real, seed=seed)
    Lp, g = ids.shape[1], n - 1
    fastkv = dict(tsp_rate=tsp_rate, ratio=ratio)
    rpc = dict(interval=P, window=R, ratio=rpc_ratio)
    _, prefilled = cached(model, ids, 1, "fastkv", fastkv, mask)
    _, cache = cached(model, ids, n, HYBRID, hybrid_params(fastkv, rpc), mask)
    generated_kept = RPC(**rpc).cache_length(0, g)
    for layer, reference in zip(cache.layers, prefilled.layers, strict=True):
        assert layer.seen == Lp + g
        for b in range(len(real)):
            shared = None
            for j in range(2):
                pos = live(layer, b, j)
                assert bool((pos[1:] > pos[:-1]).all())
                prompt, new = pos[pos < Lp], pos[pos >= Lp]
                assert torch.equal(prompt, live(reference, b, j))
                assert len(new) == generated_kept and bool((new < Lp + g).all())
                tail = min(g, R)
                assert torch.equal(new[len(new) - tail :], torch.arange(Lp + g - tail, Lp + g))
                assert shared is None or torch.equal(new, shared), "'all' aggregation: one set per layer"
                shared = new


# ------------------------------------------------------------------------------------------ layer ranges
def test_parts_act_only_on_their_layer_ranges(llama):
    model, _ = llama
    rpc = RPC(interval=8, window=4, ratio=0.5)
    composite = Composite("early-snapkv+late-rpc", [
        Part(SnapKV(budget=16, window=4), "prefill", layers=(0, 2)),
        Part(rpc, "decode", layers=(1, 3)),
    ])
    assert composite.config()["parts"]["snapkv"]["layers"] == [0, 2]
    ids, n = random_prompt(40), 30
    result = run(model, ids, n, composite)
    g = n - 1
    assert result.kv_lengths == [16 + g, 16 + rpc.cache_length(0, g), 40 + rpc.cache_length(0, g)]
    assert result.compressor["name"] == "early-snapkv+late-rpc"


def test_layer_range_beyond_the_model_is_refused(llama):
    model, _ = llama
    composite = Composite("x", [Part(SnapKV(), "prefill", layers=(1, 5))])
    with pytest.raises(CompositionError, match=r"layers 1\.\.4, but the model has num_hidden_layers=3"):
        with apply(model, composite, "torch"):
            pass


# ------------------------------------------------------------------------------------------ command line
def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plugins_lists_the_preset_with_its_parts(capsys):
    code, out, _ = cli(capsys, "plugins", "--json")
    row = {r["name"]: r for r in json.loads(out)["compressor"]}[HYBRID]
    assert code == 0 and row["parts"] == ["fastkv (prefill)", "rpc (decode)"]
    assert row["phases"] == ["decode", "prefill"]
    code, out, _ = cli(capsys, "plugins")
    line = next(line for line in out.splitlines() if line.strip().startswith(HYBRID))
    assert code == 0 and line.endswith("= fastkv (prefill) + rpc (decode)")


def test_generate_with_the_hybrid(capsys):
    code, out, _ = cli(
        capsys, "generate", "--model", "tiny-random-llama", "--compressor", HYBRID,
        "--set", "fastkv.tsp_rate=0.2", "--set", "rpc.interval=8", "--set", "rpc.window=4",
        "--prompt", "a prompt long enough to be compressed by the prefill part " * 4,
        "--max-new-tokens", "30", "--min-new-tokens", "30", "--backend", "torch", "--json",
    )
    assert code == 0
    record = json.loads(out)
    parts = record["compressor"]["parts"]
    assert record["compressor"]["name"] == HYBRID
    assert parts["fastkv"]["compressor"]["tsp_rate"] == 0.2 and parts["rpc"]["compressor"]["interval"] == 8
    fk, g = FastKV(tsp_rate=0.2), 29
    Lp = record["prompt_tokens"]
    propagated = fk.propagated_length(Lp)
    K0 = min(Lp, fk.kv_budget(Lp, after_tsp=False))
    K1 = min(propagated, fk.kv_budget(propagated, after_tsp=True))
    assert record["kv_lengths"] == [K + RPC(interval=8, window=4).cache_length(0, g) for K in (K0, K1, K1)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--compressor", "rpc+fastkv"], "part 'rpc' is in the prefill slot"),
        (["--compressor", HYBRID, "--set", "interval=8"], "Did you mean rpc.interval?"),
        (["--compressor", "fastkv+rcp"], "Did you mean 'rpc'?"),
    ],
)
def test_bad_compositions_are_one_clear_line(capsys, argv, message):
    code, out, err = cli(capsys, "generate", "--model", "tiny-random-llama", "--prompt", "hi", *argv)
    assert code == 2 and out == ""
    assert err.startswith("kvsieve: error: ") and message in err and len(err.strip().splitlines()) == 1
