"""Where a real fast-path run's time goes: marks at the start of the run, after its prefill and at the start of every
decode step, split into prefill, warm-up (eager steps and the graph capture), plain steps, compressions and the
tail, and the plain steps' mean time per band of cache lengths, to set beside the modelled figure.

On CUDA the marks are events on the current stream (no host synchronisation, so the run is timed as it runs); a
mark-to-mark interval is the device's time from one step's start to the next one's, idle gaps included. Off CUDA
they are host clocks.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from kvsieve.fastpath import StaticDecoder

__all__ = ["StepClock", "step_clock"]


class StepClock:
    """Marks of one fast-path run (see the module docstring); filled by :func:`step_clock`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []  # run start, after prefill, each step's start, run end
        self.warmup_steps = 0  # the marked decoder's

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks (call after the run, with the device synchronised)."""
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]

    def breakdown(self, live: Sequence[int], compressions: Sequence[tuple[int, int]], band: int = 1024,
                  around: int = 8) -> dict[str, Any]:
        """The run's time split up.

        Args:
            live: generated entries per decode step (``decode_schedule``), step ``t`` at ``live[t]``.
            compressions: ``(firing generated count g, ...)`` per compression (``decode_schedule``); the compression
                after step ``g - 1`` runs inside that step's interval.
            band: width, in live entries, of the bands of ``step_ms_by_live``.
            around: steps on each side whose median is a firing step's plain-step time.

        Returns:
            ``prefill_s``, ``warmup_s`` (eager steps and the capture), ``steps_s`` (every other step, a firing one
            counted at its neighbours' median), ``compressions_s`` (firing steps beyond that median) with
            ``compression_ms`` per compression, ``tail_s`` (after the last step), ``total_s``, and
            ``step_ms_by_live``: ``[first live, last live, steps, mean ms]`` per band of the plain replayed steps.
        """
        intervals = self.seconds()
        if len(intervals) < 2:
            raise ValueError(f"a run has at least a prefill and an end mark, got {len(self.marks)} marks")
        prefill, steps, tail = intervals[0], intervals[1:-1], intervals[-1]
        if len(steps) > len(live):
            raise ValueError(f"{len(steps)} step intervals for a schedule of {len(live)} steps")
        warm = min(self.warmup_steps + 1, len(steps))  # eager steps, then the capture
        firing = {g - 1 for g, _ in compressions if 0 <= g - 1 < len(steps)}
        extra = {}
        for t in sorted(firing):
            near = [steps[u] for u in range(max(warm, t - around), min(len(steps), t + around + 1))
                    if u != t and u not in firing]
            base = statistics.median(near) if near else 0.0
            extra[t] = max(steps[t] - base, 0.0)
        bands: dict[int, list[float]] = {}
        for t in range(warm, len(steps)):
            if t not in firing:
                bands.setdefault(live[t] // band, []).append(steps[t])
        return dict(
            prefill_s=round(prefill, 4),
            warmup_s=round(sum(steps[:warm]), 4),
            steps_s=round(sum(steps[warm:]) - sum(extra.values()), 4),
            compressions_s=round(sum(extra.values()), 4),
            compression_ms=[round(extra[t] * 1e3, 2) for t in sorted(extra)],
            tail_s=round(tail, 4),
            total_s=round(sum(intervals), 4),
            step_ms_by_live=[[k * band, (k + 1) * band - 1, len(v), round(sum(v) / len(v) * 1e3, 4)]
                             for k, v in sorted(bands.items())],
        )


@contextmanager
def step_clock(device: torch.device) -> Iterator[StepClock]:
    """Mark every :class:`~kvsieve.fastpath.StaticDecoder` run inside the block (one run at a time): the clock's
    first mark at entry, one after the prefill, one at the start of each step, the last at exit. The class's
    methods are wrapped for the block and restored after it."""
    clock = StepClock(device)
    prefill, step = StaticDecoder.prefill, StaticDecoder.step

    def marked_prefill(self, *args, **kwargs):
        out = prefill(self, *args, **kwargs)
        clock.warmup_steps = self.warmup_steps if self.use_cuda_graph else -1
        clock.mark()
        return out

    def marked_step(self, *args, **kwargs):
        clock.mark()
        return step(self, *args, **kwargs)

    StaticDecoder.prefill, StaticDecoder.step = marked_prefill, marked_step
    clock.mark()
    try:
        yield clock
    finally:
        StaticDecoder.prefill, StaticDecoder.step = prefill, step
    clock.mark()
