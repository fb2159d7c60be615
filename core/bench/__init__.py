"""``kvsieve bench``: speed and memory of compressed decoding and prefill on random-weight models with the papers'
shapes (docs/benchmarks.md).

``kvsieve bench decode`` (RPC vs full cache, R1-Distill-Qwen-7B / QwQ-32B shapes). A run that generates 32K tokens
at batch 32 takes minutes per configuration, so the benchmark measures the two things a run's time is made of and
adds them up over the run's schedule:

* the fast path's step time as a function of the live cache length, ``step(live)``: the real
  :class:`~kvsieve.fastpath.StaticDecoder` (static cache sized for the run, CUDA-graph replay, the host work of
  each step) is put in the state a run would be in at that length (live ranges and counters; the K/V contents are
  random) and stepped ``--steps`` times;
* the cost of each compression (RPC's k-th compaction): the decoder is put just before the k-th firing step and
  stepped into it; the cost is that step's time minus ``step(live)``.

Then ``time(N) = prefill + sum_{t=0}^{N-2} step(Lp + held(t) + 1) + sum_k cost(k)``, where ``held(t)`` is what the
compressor keeps of ``t`` generated tokens (``cache_length``; the full cache keeps ``t``), and
``tokens/s = B * N / time(N)``. Step times between the measured lengths are interpolated linearly; compression costs
between measured ``k`` likewise. ``--validate B:N`` also runs one configuration for real
(``kvsieve.generate(fast=True)``) and reports measured vs modelled. HF rows: ``model.generate`` without kvsieve
(HF's eager loop over a DynamicCache pre-filled with random K/V to the length), step times from timestamps taken
by a stopping criterion, integrated the same way. HF static rows (``--hf-static``, on by default on CUDA): the same
``model.generate`` over HF's ``StaticCache`` sized for the run (``max_cache_len`` = prompt + new tokens) with
random K/V in every slot and its length set to each measured point, through generate's auto-compiled forward
(or a setting from :data:`~kvsieve.bench.hf_static.HF_STATIC_VARIANTS`), compiled afresh per row after a warm-up
whose extra time is reported as the compile time; each row says whether the compile engaged.

``kvsieve bench prefill`` (FastKV vs SnapKV vs full, Llama-3.1-8B shapes): per context, the time to first token of
plain HF sdpa and of each compressor (eager prefill with the compressor, then the move into the static cache), then
``--new-tokens`` real fast-path decode steps; and HF's eager decode rate at that context.

Both write ``OUT/<which>.jsonl`` (one record per row), ``OUT/<which>.md`` and PNG plots when matplotlib is
importable (``kvsieve bench report OUT`` re-renders them elsewhere).

Modules: :mod:`~kvsieve.bench.timing` (clocks, bandwidth, memory, HF's eager step),
:mod:`~kvsieve.bench.hf_static` (HF's static cache and compiled forward), :mod:`~kvsieve.bench.schedule` (the
schedule model), :mod:`~kvsieve.bench.probe` (:class:`DecodeProbe`), :mod:`~kvsieve.bench.decode` and
:mod:`~kvsieve.bench.prefill` (the rows), :mod:`~kvsieve.bench.paper` (the papers' numbers, the goals),
:mod:`~kvsieve.bench.report` (markdown, plots) and :mod:`~kvsieve.bench.cli` (the subcommand).
"""

from kvsieve.bench.decode import bench_decode
from kvsieve.bench.hf_static import HF_STATIC_VARIANTS, hf_static_step_seconds
from kvsieve.bench.paper import PAPER_DECODE_TOKENS_PER_S
from kvsieve.bench.prefill import bench_prefill
from kvsieve.bench.probe import DecodeProbe
from kvsieve.bench.schedule import decode_schedule, full_cache_decode_seconds, interpolate, modelled_decode_seconds
from kvsieve.bench.timing import copy_bandwidth, hf_eager_step_seconds, kv_bytes_per_token, weight_bytes

__all__ = [
    "HF_STATIC_VARIANTS",
    "PAPER_DECODE_TOKENS_PER_S",
    "DecodeProbe",
    "bench_decode",
    "bench_prefill",
    "copy_bandwidth",
    "decode_schedule",
    "full_cache_decode_seconds",
    "hf_eager_step_seconds",
    "hf_static_step_seconds",
    "interpolate",
    "kv_bytes_per_token",
    "modelled_decode_seconds",
    "weight_bytes",
]
