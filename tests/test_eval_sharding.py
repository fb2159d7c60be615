"""Data-parallel sweeps: ``kvsieve eval passkey`` under ``torchrun --nproc_per_node 2`` (CPU, two processes) splits
the prompts and merges one run whose records equal a single process's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from kvsieve.evaluation.sharding import Shard

ARGS = ["eval", "passkey", "--model", "tiny-random-llama", "--compressor", "none,snapkv", "--budgets", "0.5",
        "--lengths", "300,360", "--samples", "3", "--filler", "noise", "--max-new-tokens", "3", "--no-progress",
        "--device", "cpu"]
TIMING = {"seconds"}


def records(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_two_processes_give_the_records_of_one(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    single = subprocess.run([sys.executable, "-m", "kvsieve.cli", *ARGS, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    split = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29531", "-m", "kvsieve.cli", *ARGS,
                            "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert split.returncode == 0, split.stderr[-3000:]
    one, two = records(tmp_path / "one" / "results.jsonl"), records(tmp_path / "two" / "results.jsonl")
    assert len(one) == 2 * 3 * 2 and one == two  # 2 lengths x 3 prompts x (none, snapkv at ratio 0.5)
    parts = [records(tmp_path / "two" / f"results.rank{r}.jsonl") for r in range(2)]
    assert sorted(len(p) for p in parts) == [len(one) // 2] * 2, "each process ran half of the prompts"
    assert (tmp_path / "two" / "summary.md").read_text().split("\n")[0] == \
        (tmp_path / "one" / "summary.md").read_text().split("\n")[0]


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
    assert Shard(3, 5, 3).device("cpu") == "cpu" and Shard(0, 1, 0).device("auto") == "auto"
