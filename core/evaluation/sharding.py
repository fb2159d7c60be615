"""Data-parallel sweeps: ``kvsieve eval`` under ``torchrun`` (or ``accelerate launch``) splits its prompts over the
processes, one model per GPU, and merges what they measured into one run, identical to a single process's.

``torchrun --nproc_per_node 2 -m kvsieve.cli eval passkey --model smollm2 --out OUT`` starts two processes. Each
reads its place from the environment the launcher sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), runs the prompts
``i`` with ``i % WORLD_SIZE == RANK`` on ``cuda:LOCAL_RANK`` (``--device auto``), and writes
``OUT/results.rank<R>.jsonl`` and a ``.rank<R>.done`` marker. Rank 0 then waits for every marker, merges the parts
into ``OUT/results.jsonl`` in the order one process writes (prompt by prompt, each configuration in order), and
writes the report. No collective is needed: the files are the rendezvous, so the sweep works the same on CPUs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import attrs

from kvsieve.evaluation.outputs import read_jsonl

__all__ = ["Shard", "merge_parts"]


@attrs.frozen
class Shard:
    """This process's share of a sweep: the items ``i`` with ``i % world == rank``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Shard:
        """From the variables ``torchrun``/``accelerate launch`` set; one process (rank 0 of 1) without them."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def mine(self, index: int) -> bool:
        return index % self.world == self.rank

    def device(self, requested: str) -> str:
        """``auto`` on a sharded CUDA run is this process's GPU: ``cuda:LOCAL_RANK``, round-robin when a node runs
        more processes than it has GPUs (a small model's sweep is bound by the host, so several processes can
        share one GPU: ``torchrun --nproc_per_node 16`` on two GPUs puts eight on each)."""
        import torch

        if requested == "auto" and self.sharded and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def part(self, out: Path, name: str) -> Path:
        """``OUT/<stem>.rank<R><suffix>`` for a sharded run, else ``OUT/<name>``."""
        if not self.sharded:
            return out / name
        stem, dot, suffix = name.partition(".")
        return out / f"{stem}.rank{self.rank}{dot}{suffix}"

    def mark_done(self, out: Path) -> None:
        (out / f".rank{self.rank}.done").write_text("done\n")


def merge_parts(out: Path, name: str, shard: Shard, order: list[Any], key, timeout: float = 24 * 3600) -> list[dict]:
    """On rank 0: wait for every rank's marker, then merge the ranks' ``name`` parts into ``OUT/name`` sorted as
    ``order`` lists the ``key(record)`` values. Returns the merged records.

    Raises:
        TimeoutError: a rank did not finish within ``timeout`` seconds (the message names the missing ranks).
    """
    deadline = time.monotonic() + timeout
    while True:
        missing = [r for r in range(shard.world) if not (out / f".rank{r}.done").exists()]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks {missing} of the sweep in {out} did not finish within {timeout:.0f} s")
        time.sleep(0.5)
    records = []
    for rank in range(shard.world):
        records += read_jsonl(attrs.evolve(shard, rank=rank).part(out, name))
    position = {value: i for i, value in enumerate(order)}
    records.sort(key=lambda record: position[key(record)])
    with (out / name).open("w") as f:
        import json

        for record in records:
            f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
    return records
