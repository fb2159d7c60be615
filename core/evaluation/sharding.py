"""Data-parallel sweeps: ``kvsieve eval`` and ``kvsieve bench`` under ``torchrun`` (or ``accelerate launch``) split
their units of work over the processes, one model per GPU, and merge what they measured into one run, identical to
a single process's.

``torchrun --nproc_per_node 2 -m kvsieve.cli eval passkey --model smollm2 --out OUT`` starts two processes. Each
reads its place from the environment the launcher sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), runs the units
``i`` with ``i % WORLD_SIZE == RANK`` (a sweep's list of units, in the order one process runs them: passkey's
prompts, fidelity's streams, a benchmark's rows) on ``cuda:LOCAL_RANK`` (``--device auto``), and writes
``OUT/<name>.rank<R>.jsonl`` and a ``.rank<R>.done`` marker that lists how many records each of its units wrote.
Rank 0 then waits for every marker, merges the parts into ``OUT/<name>.jsonl`` in the order one process writes
(unit by unit, each unit's records in the order they were written), and writes the report. No collective is
needed: the files are the rendezvous, so the sweep works the same on CPUs.

A sweep runs through a :class:`Share`::

    share = Share.from_environment()
    path = share.start(out, "results.jsonl")          # this process's part (OUT/results.jsonl in one process)
    records = share.run(units, work)                  # work(unit) -> that unit's records (also written to path)
    records = share.finish(out, "results.jsonl")      # rank 0: the merged run; other ranks: None
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs

from kvsieve.evaluation.outputs import read_jsonl

__all__ = ["Shard", "Share", "merge_parts"]

T = TypeVar("T")


@attrs.frozen
class Shard:
    """This process's place in a sweep: it runs the units ``i`` with ``i % world == rank``. ``local_world`` is the
    number of processes on this node (None: ``world``)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int | None = None

    @classmethod
    def from_environment(cls) -> Shard:
        """From the variables ``torchrun``/``accelerate launch`` set; one process (rank 0 of 1) without them."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
        local_world = os.environ.get("LOCAL_WORLD_SIZE")
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", "0")), int(local_world) if local_world else None)

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def mine(self, index: int) -> bool:
        return index % self.world == self.rank

    def share(self, units: Sequence[T]) -> list[T]:
        """This process's units of ``units`` (every one in a single process), in order."""
        return [unit for i, unit in enumerate(units) if self.mine(i)]

    def device(self, requested: str) -> str:
        """``auto`` (or ``cuda``) on a sharded CUDA run is this process's GPU: ``cuda:LOCAL_RANK``, round-robin when
        a node runs more processes than it has GPUs (a small model's sweep is bound by the host, so several
        processes can share one GPU: ``torchrun --nproc_per_node 16`` on two GPUs puts eight on each)."""
        import torch

        if requested in ("auto", "cuda") and self.sharded and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def gpus_shared(self) -> int | None:
        """On a sharded CUDA run with more processes on this node than GPUs: the number of GPUs they share (their
        timings are then not comparable); else None."""
        import torch

        if not self.sharded or not torch.cuda.is_available():
            return None
        gpus = torch.cuda.device_count()
        return gpus if (self.local_world or self.world) > gpus else None

    def part(self, out: Path, name: str) -> Path:
        """``OUT/<stem>.rank<R><suffix>`` for a sharded run, else ``OUT/<name>``."""
        if not self.sharded:
            return out / name
        stem, dot, suffix = name.partition(".")
        return out / f"{stem}.rank{self.rank}{dot}{suffix}"

    def marker(self, out: Path) -> Path:
        return out / f".rank{self.rank}.done"

    def mark_done(self, out: Path, counts: Sequence[int]) -> None:
        """Say this rank is done; ``counts``: the records each of its units wrote, in order (what the merge reads)."""
        self.marker(out).write_text(json.dumps({"records_per_unit": list(counts)}) + "\n")


@attrs.define
class Share:
    """One process's run of a sweep's units: :meth:`run` runs its units and keeps their records and how many each
    wrote; :meth:`finish` merges every process's part on rank 0."""

    shard: Shard = attrs.field(factory=Shard)
    records: list[dict[str, Any]] = attrs.field(factory=list)
    counts: list[int] = attrs.field(factory=list)

    @classmethod
    def from_environment(cls) -> Share:
        return cls(Shard.from_environment())

    def start(self, out: Path, name: str) -> Path:
        """This process's part of ``OUT/name`` (``OUT/name`` itself in one process), emptied, ``out`` created; an
        earlier run's done marker of this rank is removed (rank 0 must not take it for this run's)."""
        out.mkdir(parents=True, exist_ok=True)
        if self.shard.sharded:
            self.shard.marker(out).unlink(missing_ok=True)
        path = self.shard.part(out, name)
        path.write_text("")
        return path

    def run(self, units: Sequence[T], work: Callable[[T], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """``work(unit)`` for each of this process's units; returns (and keeps) their records in order."""
        records = []
        for unit in self.shard.share(units):
            done = work(unit)
            records += done
            self.counts.append(len(done))
        self.records += records
        return records

    def finish(self, out: Path | None, name: str, *, write: bool = True,
               timeout: float = 24 * 3600) -> list[dict[str, Any]] | None:
        """The whole run's records: in one process, those :meth:`run` kept; on rank 0 of a sharded run, every
        rank's part of ``OUT/name`` merged (and written to ``OUT/name`` with ``write``); None on the other ranks."""
        if not self.shard.sharded:
            return self.records
        if out is None:
            raise ValueError("a sweep split over processes (torchrun) needs an output directory to merge into")
        self.shard.mark_done(out, self.counts)
        if self.shard.rank != 0:
            return None
        return merge_parts(out, name, self.shard, write=write, timeout=timeout)


def merge_parts(out: Path, name: str, shard: Shard, *, write: bool = True,
                timeout: float = 24 * 3600) -> list[dict[str, Any]]:
    """On rank 0: wait for every rank's marker, then merge the ranks' ``name`` parts in the order one process runs
    the units (unit ``i`` is rank ``i % world``'s ``i // world``-th), each unit's records as its marker counts
    them; written to ``OUT/name`` with ``write``. Returns the merged records.

    Raises:
        TimeoutError: a rank did not finish within ``timeout`` seconds (the message names the missing ranks).
        ValueError: a part does not hold the records its marker counts.
    """
    deadline = time.monotonic() + timeout
    while True:
        missing = [r for r in range(shard.world) if not attrs.evolve(shard, rank=r).marker(out).exists()]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks {missing} of the sweep in {out} did not finish within {timeout:.0f} s")
        time.sleep(0.5)
    counts, parts = [], []
    for rank in range(shard.world):
        other = attrs.evolve(shard, rank=rank)
        counts.append(json.loads(other.marker(out).read_text())["records_per_unit"])
        parts.append(read_jsonl(other.part(out, name)))
        if len(parts[-1]) != sum(counts[-1]):
            raise ValueError(f"{other.part(out, name)} holds {len(parts[-1])} records; rank {rank} wrote "
                             f"{sum(counts[-1])}")
    records, taken = [], [0] * shard.world
    for i in range(sum(len(c) for c in counts)):
        rank, unit = i % shard.world, i // shard.world
        if unit >= len(counts[rank]):
            raise ValueError(f"rank {rank} ran {len(counts[rank])} units; unit {i} of the sweep should be its")
        records += parts[rank][taken[rank] : taken[rank] + counts[rank][unit]]
        taken[rank] += counts[rank][unit]
    if write:
        with (out / name).open("w") as f:
            for record in records:
                f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
    return records
