"""``kvsieve bench`` (kvsieve.bench): the schedule model, the probe's synthetic states, the CLI on a tiny model (CPU).

The figures the benchmark produces are measured on the GPU (docs/benchmarks.md); here the machinery is checked: the
schedule a run follows, that a probe put "just before the k-th compression" really compresses to the size RPC
promises, the integration of step times, the files and tables the CLI writes, and its refusals.
"""

from __future__ import annotations

import argparse
import itertools
import json

import pytest
import torch

from kvsieve import models
from kvsieve.bench import DecodeProbe, decode_schedule, interpolate, modelled_decode_seconds
from kvsieve.bench import cli as bench_cli
from kvsieve.bench.cli import register
from kvsieve.bench.hf_static import hf_static_step_seconds, random_static_cache, set_static_length
from kvsieve.bench.schedule import full_cache_decode_seconds
from kvsieve.bench.step_clock import StepClock
from kvsieve.bench.timing import cache_kwarg
from kvsieve.cli import main
from kvsieve.integration import apply
from kvsieve.params import parse_compressor_specs
from kvsieve.plugins import registry


def rpc(**params):
    return registry().get("compressor", "rpc").obj(**params)


def simulated_rpc(P: int, R: int, c: int, new_tokens: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Generated entries per decode step and the compressions, simulated token by token from RPC's schedule (the
    paper's compression factor ``c``: every P tokens after P + R, keep P // c per interval plus the last R)."""
    held, live, compressions = 0, [], []
    for g in range(1, new_tokens):  # step g-1 appends generated token g
        live.append(held + 1)
        held += 1
        if g >= P + R and (g - R) % P == 0:
            compressions.append((g, held))
            held = ((g - R) // P) * (P // c) + R
    return live, compressions


@pytest.mark.parametrize("P, R, c, n", [(16, 4, 4, 90), (64, 32, 4, 300), (40, 8, 2, 41), (8, 7, 8, 60)])
def test_decode_schedule_matches_a_token_by_token_simulation(P, R, c, n):
    assert decode_schedule(rpc(interval=P, window=R, ratio=1 / c), n) == simulated_rpc(P, R, c, n)


def test_decode_schedule_of_the_full_cache_grows_by_one():
    live, compressions = decode_schedule(registry().get("compressor", "none").obj(), 6)
    assert live == [1, 2, 3, 4, 5] and compressions == []


def test_decode_schedule_refuses_nothing_to_generate():
    with pytest.raises(ValueError, match="new_tokens must be >= 1, got 0"):
        decode_schedule(rpc(interval=16, window=4), 0)


def test_interpolate():
    xs, ys = [10, 20, 40], [1.0, 3.0, 4.0]
    assert interpolate(xs, ys, 5) == 1.0 and interpolate(xs, ys, 50) == 4.0
    assert interpolate(xs, ys, 15) == pytest.approx(2.0) and interpolate(xs, ys, 30) == pytest.approx(3.5)
    with pytest.raises(ValueError):
        interpolate([], [], 1)


def test_modelled_time_sums_steps_and_compressions():
    live, compressions = decode_schedule(rpc(interval=16, window=4, ratio=0.25), 90)
    total = modelled_decode_seconds(live, compressions, lambda n: 0.001 * n, lambda k: 0.5 * k)
    expected = sum(0.001 * n for n in live) + sum(0.5 * k for k in range(1, len(compressions) + 1))
    assert total == pytest.approx(expected) and len(compressions) == 5


def test_full_cache_decode_time_sums_one_step_per_generated_token_after_the_first():
    assert full_cache_decode_seconds(10, 4, lambda n: n) == 11 + 12 + 13
    assert full_cache_decode_seconds(10, 1, lambda n: n) == 0


@pytest.fixture(scope="module")
def qwen2():
    model, _ = models.load("tiny-random-qwen2")
    return model


def test_probe_state_before_a_firing_step_compresses_to_rpcs_size(qwen2):
    """The probe's synthetic state is faithful: put just before the k-th compression, one step compresses every
    layer to Lp + k * T + R entries; a plain step adds one entry and compresses nothing."""
    P, R, c, Lp, n = 16, 4, 4, 24, 100
    with torch.inference_mode(), apply(qwen2, "rpc", "torch", params=dict(interval=P, window=R, ratio=1 / c)) as s:
        probe = DecodeProbe(qwen2, s, batch=2, prompt_len=Lp, new_tokens=n)
        _, compressions = decode_schedule(s.compressor, n)
        for k, (g, before) in enumerate(compressions, start=1):
            assert probe.firing_step_seconds(g, before) > 0
            assert probe.decoder.cache.kv_lengths() == [Lp + k * (P // c) + R] * qwen2.config.num_hidden_layers
        assert probe.step_seconds(10, steps=4) > 0
        # live=10: the first timed step attends over 9 held + 1 appended entries; 4 steps leave 9 + 4 held
        assert probe.decoder.cache.kv_lengths() == [Lp + 9 + 4] * qwen2.config.num_hidden_layers
        with pytest.raises(ValueError, match="does not fit the probe's capacity"):
            probe.step_seconds(probe.capacity, steps=4)
        with pytest.raises(ValueError, match="do not fit the probe's capacity"):
            probe.set_state(generated=1, held=probe.capacity)


def test_probe_detects_a_state_where_nothing_fires(qwen2):
    with torch.inference_mode(), apply(qwen2, "rpc", "torch", params=dict(interval=16, window=4)) as s:
        probe = DecodeProbe(qwen2, s, batch=1, prompt_len=8, new_tokens=60)
        with pytest.raises(RuntimeError, match="no compaction ran at generated=21"):
            probe.firing_step_seconds(21, 20)


def test_cli_decode_writes_rows_tables_and_validation(tmp_path, capsys):
    out = tmp_path / "decode"
    rc = main(["bench", "decode", "--model", "tiny-random-qwen2", "--device", "cpu", "--batches", "2",
               "--new-tokens", "30", "--samples", "2", "--steps", "4", "--prompt-len", "16", "--validate", "2:30",
               "--compressor", "none", "--compressor", "rpc:interval=16,window=4,ratio=0.25", "--out", str(out)])
    assert rc == 0
    meta, *rows = [json.loads(x) for x in (out / "decode.jsonl").read_text().splitlines()]
    assert meta["model"] == "tiny-random-qwen2"
    assert [r["run"] for r in rows] == ["hf-eager:none", "fast:none", "fast:rpc"]
    fast_rpc = rows[2]
    assert fast_rpc["compressions"] == 1 and fast_rpc["live_max"] == 16 + 16 + 4  # P + R entries before firing
    assert fast_rpc["validated_tokens_per_s"] > 0 and fast_rpc["modelled_over_measured"] > 0
    parts = fast_rpc["validated_breakdown"]  # the real run's time, split up (eager on the CPU: no warm-up steps)
    assert parts["warmup_s"] == 0 and len(parts["compression_ms"]) == 1
    assert sum(b[2] for b in parts["step_ms_by_live"]) == 30 - 1 - 1  # 29 steps less the firing one
    split = sum(parts[k] for k in ("prefill_s", "warmup_s", "steps_s", "compressions_s", "tail_s"))
    assert split == pytest.approx(parts["total_s"], abs=1e-3)
    assert parts["total_s"] <= fast_rpc["validated_s"] + 0.05
    table = (out / "decode.md").read_text()
    assert "| tiny-random-qwen2 | 2 | 30 | fast:rpc |" in table
    assert main(["bench", "report", str(out)]) == 0


def test_cli_decode_hf_rows_only(tmp_path):
    out = tmp_path / "hf"
    assert main(["bench", "decode", "--model", "tiny-random-qwen2", "--device", "cpu", "--batches", "1",
                 "--new-tokens", "20", "--prompt-len", "8", "--no-fast", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "decode.jsonl").read_text().splitlines()][1:]
    assert [r["run"] for r in rows] == ["hf-eager:none"] and rows[0]["tokens_per_s"] > 0


def test_cli_prefill_writes_ttft_and_decode_rows(tmp_path):
    out = tmp_path / "prefill"
    rc = main(["bench", "prefill", "--model", "tiny-random-llama", "--device", "cpu", "--contexts", "64,96",
               "--new-tokens", "8", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "prefill.jsonl").read_text().splitlines()][1:]
    assert [(r["context"], r["run"]) for r in rows] == [
        (c, run) for c in (64, 96) for run in ("hf-sdpa", "fast:none", "fast:snapkv", "fast:fastkv")
    ]
    by = {(r["context"], r["run"]): r for r in rows}
    assert by[96, "fast:none"]["kv_len_max"] == 96
    assert by[96, "fast:snapkv"]["kv_len_max"] < 96 and by[96, "fast:fastkv"]["kv_len_max"] < 96
    assert by[96, "fast:fastkv"]["ttft_speedup_vs_full"] > 0 and by[96, "hf-sdpa"]["decode_step_ms"] > 0


def _bench_args(*argv: str):
    parser = argparse.ArgumentParser(prog="kvsieve")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv, "--out", "unused"])


def test_cli_sizes_take_k_suffixes():
    args = _bench_args("decode", "--batches", "1,32", "--new-tokens", "8K,1.5K", "--validate", "32:8K,1:300")
    assert args.batches == [1, 32] and args.new_tokens == [8192, 1536] and args.validate == [(32, 8192), (1, 300)]
    prefill = _bench_args("prefill", "--contexts", "8K, 128K", "--new-tokens", "1K")
    assert prefill.contexts == [8192, 131072] and prefill.new_tokens == 1024


def test_cli_compressor_specs_are_comma_lists_and_repeatable():
    args = _bench_args("decode", "--compressor", "none,rpc:interval=16,window=4", "--compressor", "rpc:ratio=0.125")
    assert bench_cli._compressors(args) == [
        ("none", {}), ("rpc", {"interval": 16, "window": 4}), ("rpc", {"ratio": 0.125})
    ]  # fmt: skip
    defaults = bench_cli._compressors(_bench_args("prefill"))
    assert [name for name, _ in defaults] == ["none", "snapkv", "fastkv"]
    specs = parse_compressor_specs(bench_cli.DEFAULTS["prefill"]["compressors"])
    assert defaults == [(spec.name, spec.params) for spec in specs]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batches", "8,x"], "argument --batches: expected a comma list of whole numbers >= 1 such as 512,8K"),
        (["--new-tokens", "0"], "argument --new-tokens: expected a comma list of whole numbers >= 1"),
        (["--validate", "8"], "argument --validate: expected a comma list of BATCH:TOKENS pairs such as 32:8K"),
        (["--validate", "8:x"], "got '8:x'"),
        (["--compressor", "window=8"], "argument --compressor: parameter 'window=8' comes before any compressor name"),
    ],
)
def test_cli_refuses_bad_sizes(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "decode", "--model", "tiny-random-qwen2", "--device", "cpu", "--out", str(tmp_path), *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "2"], "--steps=2: must be at least 4"),
        (["--compressor", "none,rpc:colour=red"], "--compressor rpc:colour=red: compressor 'rpc' has no parameter"),
        (["--compressor", "snapk"], "--compressor snapk: unknown compressor 'snapk'. Did you mean 'snapkv'?"),
    ],
)
def test_cli_refusals_before_loading_a_model(tmp_path, capsys, argv, message):
    """Checked before the model is loaded: the paper shape would need a GPU, and the error is about the argument."""
    assert main(["bench", "decode", "--model", "r1-qwen-7b", "--device", "cpu", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsieve: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cli_paper_shapes_need_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "decode", "--model", "r1-qwen-7b", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "paper-shaped models are built on a CUDA GPU" in capsys.readouterr().err



# ------------------------------------------------------------------------------------- HF static cache rows
def test_static_cache_at_a_length_decodes_as_a_dynamic_cache_of_its_entries(qwen2):
    """The HF static rows' synthetic state is a real one: a StaticCache of 40 random slots set to hold 17 entries gives
    the next token the logits a DynamicCache holding exactly those 17 entries gives (the 23 slots past them, random
    too, are masked out), and the step writes its K/V at slot 17."""
    from transformers import DynamicCache

    cfg = qwen2.config
    static = random_static_cache(qwen2, 2, 40, seed=3)
    set_static_length(static, 17)
    dynamic = DynamicCache()
    for i, layer in enumerate(static.layers):
        dynamic.update(layer.keys[:, :, :17].clone(), layer.values[:, :, :17].clone(), i)
    ids = torch.randint(100, cfg.vocab_size, (2, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = qwen2(input_ids=ids, **{cache_kwarg(qwen2): static}).logits
        want = qwen2(input_ids=ids, **{cache_kwarg(qwen2): dynamic}).logits
    torch.testing.assert_close(got, want)
    assert [int(layer.cumulative_length) for layer in static.layers] == [18] * cfg.num_hidden_layers
    torch.testing.assert_close(static.layers[0].keys[:, :, 17], dynamic.layers[0].keys[:, :, 17])
    with pytest.raises(ValueError, match="outside the static cache's 0..40"):
        set_static_length(static, 41)


def _compile_on_cpu():
    """generate's auto-compile on the CPU (HF compiles on CUDA only, unless told to): dynamo without inductor, so that
    it takes seconds."""
    from transformers import CompileConfig

    config = CompileConfig(backend="eager", mode=None)
    config._compile_all_devices = True
    return config


def test_hf_static_timing_says_whether_generate_compiled_its_forward(qwen2):
    points = [8, 30, 56]
    # HF's default setting on the CPU: generate's criteria refuse to compile (not a CUDA/XPU device)
    default = hf_static_step_seconds(qwen2, 2, 64, points, variant="sdpa", steps=6)
    assert (default.auto_compiled, default.compiled, default.compile_seconds, default.graphs) == (False, False, None, 0)
    assert default.points == points and len(default.step_seconds) == 3 and min(default.step_seconds) > 0
    # told to compile: one dynamo graph for the whole forward, reused at every length (no recompilation)
    compiled = hf_static_step_seconds(qwen2, 2, 64, points, variant="sdpa", steps=6, compile_config=_compile_on_cpu())
    assert compiled.auto_compiled and compiled.compiled
    assert (compiled.graphs, compiled.graph_breaks, compiled.graphs_while_timed) == (1, 0, 0)
    assert compiled.cuda_graphs is False and compiled.compile_seconds >= 0
    assert compiled.compile_config["backend"] == "eager"
    # disable_compile wins over a compile config
    control = hf_static_step_seconds(qwen2, 2, 64, points, variant="sdpa-uncompiled", steps=6,
                                     compile_config=_compile_on_cpu())
    assert (control.auto_compiled, control.compiled, control.graphs) == (False, False, 0)
    # the model is left as it was: no compiled forward kept, its attention implementation unchanged
    assert "_compiled_call" not in qwen2.__dict__ and qwen2.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=r"do not fit a static cache of 64 slots"):
        hf_static_step_seconds(qwen2, 2, 64, [60], steps=6)


def test_cli_decode_hf_static_rows(tmp_path):
    out = tmp_path / "static"
    assert main(["bench", "decode", "--model", "tiny-random-qwen2", "--device", "cpu", "--batches", "1",
                 "--new-tokens", "20", "--prompt-len", "8", "--samples", "3", "--steps", "4", "--no-fast", "--no-hf",
                 "--hf-static", "sdpa,sdpa-uncompiled", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "decode.jsonl").read_text().splitlines()][1:]
    assert [r["run"] for r in rows] == ["hf-static:sdpa", "hf-static:sdpa-uncompiled"]
    for row in rows:
        assert row["capacity"] == 28 and row["tokens_per_s"] > 0 and row["compiled"] is False  # CPU: HF does not
        assert row["step_points"] == [8, 16, 24] and len(row["step_ms"]) == 3
    table = (out / "decode.md").read_text()
    assert "| tiny-random-qwen2 | 1 | 20 | hf-static:sdpa | hf-sdpa |" in table and "| compiled |" in table


@pytest.mark.parametrize(
    "argv, cuda, settings",
    [
        ([], True, ["sdpa"]),
        ([], False, []),
        (["--no-hf"], True, []),
        (["--no-hf-static"], True, []),
        (["--no-hf", "--hf-static", "flex_attention,sdpa-uncompiled"], True, ["flex_attention", "sdpa-uncompiled"]),
        (["--hf-static", "sdpa"], False, ["sdpa"]),
    ],
)
def test_cli_hf_static_settings(argv, cuda, settings):
    assert bench_cli._hf_static_settings(_bench_args("decode", *argv), cuda=cuda) == settings


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hf-static", "sdpa,bogus"], "argument --hf-static: expected a comma list of HF static-cache settings"),
        (["--hf-static", "sdpa", "--no-hf-static"], "argument --no-hf-static: not allowed with argument --hf-static"),
    ],
)
def test_cli_refuses_bad_hf_static_settings(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["bench", "decode", "--model", "tiny-random-qwen2", "--device", "cpu", "--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["sdpa", "flex_attention"])
def test_hf_static_compiles_on_the_gpu(variant):
    """On CUDA, generate's auto-compile engages with HF's default CompileConfig (inductor, reduce-overhead), and the
    compiled forward is not recompiled across live lengths; with sdpa the whole forward is one graph replayed as a
    CUDA graph."""
    model, _ = models.load("tiny-random-qwen2")
    model = model.to("cuda")
    t = hf_static_step_seconds(model, 4, 256, [16, 200], variant=variant, steps=8)
    assert t.auto_compiled and t.compiled and t.graphs >= 1 and t.graphs_while_timed == 0
    assert t.compile_seconds > 0 and t.compile_config["mode"] == "reduce-overhead"
    assert min(t.step_seconds) > 0 and "_compiled_call" not in model.__dict__
    if variant == "sdpa":
        assert (t.graphs, t.graph_breaks, t.cuda_graphs) == (1, 0, True)


def test_step_clock_breakdown_splits_a_run():
    """Synthetic marks: prefill 1 s, 2 eager steps + the capture, plain steps of 10 ms growing 1 ms per band of 4
    live entries, one firing step 50 ms longer, 0.5 s of tail."""
    clock = StepClock(torch.device("cpu"))
    clock.warmup_steps = 2
    live = list(range(1, 21))
    compressions = [(12, 12)]  # fires after step 11
    steps = [0.3, 0.3, 0.4] + [0.010 + 0.001 * (live[t] // 4) + (0.05 if t == 11 else 0.0) for t in range(3, 20)]
    clock.marks = list(itertools.accumulate([0.0, 1.0, *steps, 0.5]))
    parts = clock.breakdown(live, compressions, band=4, around=2)
    assert parts["prefill_s"] == 1.0 and parts["warmup_s"] == pytest.approx(1.0) and parts["tail_s"] == 0.5
    assert parts["compression_ms"] == [pytest.approx(50.5)]  # 63 ms over the median of steps 9, 10, 12, 13
    assert [b[2] for b in parts["step_ms_by_live"]] == [4, 4, 3, 4, 1]  # steps 3.. by live // 4, step 11 left out
    assert parts["step_ms_by_live"][1:3] == [[8, 11, 4, 12.0], [12, 15, 3, 13.0]]
    assert parts["total_s"] == pytest.approx(1.0 + sum(steps) + 0.5)
    with pytest.raises(ValueError, match="step intervals for a schedule of 3 steps"):
        clock.breakdown(live[:3], [])
