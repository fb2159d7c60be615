"""benchmarks/tp_speed.py's bookkeeping, on the CPU in well under a second: the whole-model memory it reports for
the cut QwQ-32B shapes, and how it merges the ranks' rows of TP=1 and TP=2 into the table (rank 0's time, the
larger peak, the median TTFT, OOM). The measurement itself runs on GPUs (gpu_check.sh tp-speed) or, with --tiny,
on the CPU under torchrun (docs/multi-gpu.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from kvsieve.bench import kv_bytes_per_token
from kvsieve.models import random_paper_model


@pytest.fixture(scope="module")
def tp_speed():
    path = Path(__file__).parents[1] / "benchmarks" / "tp_speed.py"
    spec = importlib.util.spec_from_file_location("benchmarks_tp_speed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_whole_qwq_model_from_a_cut_one(tp_speed):
    model = random_paper_model("qwq-32b", device="meta", overrides=dict(num_hidden_layers=2))
    layer, rest = tp_speed.layer_bytes(model)
    # QwQ-32B: 32.8 B parameters in bf16 (61.0 GiB), K and V of 8 heads of 128 per layer (4 KiB a token)
    assert (rest + 64 * layer) / 2**30 == pytest.approx(61.03, abs=0.01)
    assert kv_bytes_per_token(model) // 2 == 2 * 8 * 128 * 2


def test_model_specs_name_the_cut(tp_speed):
    specs = tp_speed.model_specs(16, tiny=False)
    assert specs["decode"] == dict(shape="qwq-32b", layers=16, full_layers=64, label="qwq-32b-16of64L",
                                   dir="qwq-32b-16of64L")
    assert specs["prefill"]["layers"] == specs["prefill"]["full_layers"] == 32
    assert tp_speed.model_specs(64, tiny=False)["decode"]["label"] == "qwq-32b"


def _records():
    meta = dict(kind="meta", plan=dict(prompt_len=128, batches=[16], new_tokens=[16384]), backend="triton",
                graph=True, gpu_bytes=140 * 2**30, torch="x", transformers="y", date="d", gpu="H200")
    records = []
    for tp, ranks in ((1, [0]), (2, [0, 1])):
        for rank in ranks:
            records.append(dict(tp=tp, rank=rank) | meta)
            records.append(dict(tp=tp, rank=rank, kind="model", phase="decode", label="q", layers=16, full_layers=64,
                                layer_bytes=2**30 // tp, rest_bytes=2**30, kv_bytes_token_layer=4096 // tp))
    row = dict(kind="row", phase="decode", rep=0, graph=True, model="q", compressor="rpc", batch=16, new_tokens=16384,
               step_ms_first=1, step_ms_last=2, compressions=3, live_max=5000)
    records.append(dict(tp=1, rank=0, tokens_per_s=100.0, peak_gib=40.0, kv_gib=4.0) | row)
    records.append(dict(tp=2, rank=0, tokens_per_s=180.0, peak_gib=21.0, kv_gib=2.0) | row)
    records.append(dict(tp=2, rank=1, tokens_per_s=179.0, peak_gib=22.0, kv_gib=2.0) | row)
    ttft = dict(kind="row", phase="prefill", graph=True, model="l", compressor="fastkv", context=131072,
                kv_len_mean=13107.0, decode_step_ms=9.0)
    records.append(dict(tp=1, rank=0, rep=0, error="OOM: out of memory") | ttft)
    for rep, seconds in enumerate([4.0, 3.0]):
        for rank in (0, 1):
            records.append(dict(tp=2, rank=rank, rep=rep, ttft_s=seconds + rank, peak_gib=30.0) | ttft)
    return records


def test_merge_takes_rank0_time_larger_peak_median_ttft(tp_speed):
    merged = tp_speed.merge(_records())
    decode = merged["decode|q|rpc|16|16384"]
    assert decode["tp2"]["tokens_per_s"] == 180.0 and decode["tp2"]["speedup"] == 1.8
    assert decode["tp1"]["peak_gib_per_gpu"] == 40.0 and decode["tp2"]["peak_gib_per_gpu"] == 22.0
    # weights of 64 layers plus the KV cache scaled from 16 to 64 layers
    assert decode["tp1"]["full_model_gib_per_gpu"] == pytest.approx(1 + 64 + 16, abs=0.1)
    assert decode["tp2"]["full_model_gib_per_gpu"] == pytest.approx(1 + 32 + 8, abs=0.1)
    prefill = merged["prefill|l|fastkv|1|131072"]
    assert prefill["tp2"]["ttft_s"] == 3.5 and prefill["tp2"]["ttft_runs"] == [4.0, 3.0]
    assert "error" in prefill["tp1"] and "speedup" not in prefill["tp2"]
    text = tp_speed.report(merged, _records())
    assert "| q | rpc | 16 | 16K | tokens/s | 100.0 | 180.0 | 1.8 |" in text
    assert "| l | fastkv | 1 | 128K | TTFT s | OOM | 3.5 |" in text
    assert "batch 16 x 16K: 64 GiB" in text  # 16 * (128 + 16384) tokens * 64 layers * 4 KiB, TP=1
