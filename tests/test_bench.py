"""``kvsieve bench`` (kvsieve.bench): the schedule model, the probe's synthetic states, the CLI on a tiny model (CPU).

The figures the benchmark produces are measured on the GPU (docs/benchmarks.md); here the machinery is checked: the
schedule a run follows, that a probe put "just before the k-th compression" really compresses to the size RPC
promises, the integration of step times, the files and tables the CLI writes, and its refusals.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from kvsieve import models
from kvsieve.bench import DecodeProbe, decode_schedule, interpolate, modelled_decode_seconds
from kvsieve.bench import cli as bench_cli
from kvsieve.bench.cli import register
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

