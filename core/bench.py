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
by a stopping criterion, integrated the same way.

``kvsieve bench prefill`` (FastKV vs SnapKV vs full, Llama-3.1-8B shapes): per context, the time to first token of
plain HF sdpa and of each compressor (eager prefill with the compressor, then the move into the static cache), then
``--new-tokens`` real fast-path decode steps; and HF's eager decode rate at that context.

Both write ``OUT/<which>.jsonl`` (one record per row), ``OUT/<which>.md`` and PNG plots when matplotlib is
importable (``kvsieve bench report OUT`` re-renders them elsewhere).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kvsieve.compressor import Compressor
from kvsieve.fastpath import StaticDecoder
from kvsieve.integration import apply

__all__ = [
    "PAPER_DECODE_TOKENS_PER_S",
    "DecodeProbe",
    "bench_decode",
    "bench_prefill",
    "copy_bandwidth",
    "decode_schedule",
    "hf_eager_step_seconds",
    "interpolate",
    "kv_bytes_per_token",
    "modelled_decode_seconds",
    "weight_bytes",
]

#: RPC paper, decode throughput in tokens/s (ALGORITHMS.md: synthetic 128-token prompt, greedy, fixed output length,
#: most likely batch 32; their GPU, not an H200). ``None``: out of memory in the paper.
PAPER_DECODE_TOKENS_PER_S = {
    ("r1-qwen-7b", "none"): {8192: 653.0, 16384: 504.5, 32768: 342.9},
    ("r1-qwen-7b", "rpc"): {8192: 709.0, 16384: 671.4, 32768: 575.2},
    ("qwq-32b", "none"): {8192: 174.0, 16384: 117.5, 32768: None},
    ("qwq-32b", "rpc"): {8192: 207.3, 16384: 188.0, 32768: 147.3},
}
#: RPC paper, peak memory of R1-7B at 32K (GB): full 75.7, RPC 36.2.
PAPER_PEAK_GB = {("r1-qwen-7b", "none", 32768): 75.7, ("r1-qwen-7b", "rpc", 32768): 36.2}
#: The issue's goals (docs/benchmarks.md).
GOAL_RPC_TOKENS_PER_S, GOAL_RPC_OVER_FULL = 3000.0, 2.0
GOAL_FASTKV_TTFT, GOAL_FASTKV_DECODE, GOAL_FLOOR = 1.82, 2.87, 1.3


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the bytes read and written (``2 * nbytes`` per copy)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)

    def copies():
        for _ in range(repeats):
            dst.copy_(src)

    seconds, _ = _timed(copies, device)
    return 2 * nbytes * repeats / seconds


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear ``y(x)`` through the points ``(xs, ys)`` (``xs`` increasing), constant beyond the ends."""
    if not xs:
        raise ValueError("interpolate needs at least one point")
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return ys[-1]


# ---------------------------------------------------------------------------------------------- schedule
def held_generated(compressor: Compressor, generated: int) -> int:
    """Generated entries a layer holds once ``generated`` tokens are cached (after a compression at that step)."""
    if "decode" not in compressor.phases:
        return generated
    if hasattr(compressor, "cache_length"):
        return compressor.cache_length(0, generated)
    raise ValueError(
        f"kvsieve bench models decode-time compressors through cache_length(prompt_len, generated); "
        f"{compressor.name!r} has none"
    )


def decode_schedule(compressor: Compressor, new_tokens: int) -> tuple[list[int], list[tuple[int, int]]]:
    """What the fast path's decode steps see when generating ``new_tokens`` tokens.

    Step ``t`` (``t = 0 .. new_tokens - 2``) appends generated token ``t + 1`` and attends over the prompt plus
    ``held(t) + 1`` generated entries; a compression runs after it when ``held(t + 1) < held(t) + 1``.

    Returns:
        ``(live, compressions)``: ``live[t] = held(t) + 1`` generated entries per step, and per compression
        ``(firing generated count g, generated entries just before it = held(g - 1) + 1)``.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    held = [held_generated(compressor, g) for g in range(new_tokens)]
    live = [h + 1 for h in held[:-1]]
    compressions = [(g, held[g - 1] + 1) for g in range(1, new_tokens) if held[g] < held[g - 1] + 1]
    return live, compressions


def modelled_decode_seconds(
    live: Sequence[int], compressions: Sequence[tuple[int, int]], step_at: Callable[[int], float],
    compression_at: Callable[[int], float],
) -> float:
    """``sum_t step_at(live[t]) + sum_k compression_at(k)`` (``k`` = 1, 2, ... the compression's rank)."""
    return sum(step_at(n) for n in live) + sum(compression_at(k) for k in range(1, len(compressions) + 1))


# ---------------------------------------------------------------------------------------------- fast path probe
class DecodeProbe:
    """A :class:`StaticDecoder` after a random prompt, put into chosen states to time its steps.

    Args:
        model, session: inside :func:`kvsieve.apply`.
        batch, prompt_len: the random prompt (no padding).
        new_tokens: sizes the static cache as a run of that many tokens would.
        use_cuda_graph: as :class:`StaticDecoder` (default: on CUDA).
    """

    def __init__(self, model, session, batch: int, prompt_len: int, new_tokens: int,
                 use_cuda_graph: bool | None = None, seed: int = 0):
        self.device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(100, model.config.vocab_size, (batch, prompt_len), generator=gen).to(self.device)
        self.decoder = StaticDecoder(model, session, use_cuda_graph)
        self.prefill_seconds, logits = _timed(lambda: self.decoder.prefill(ids, None, new_tokens), self.device)
        self.tokens = logits.argmax(-1)
        cache = self.decoder.cache
        self.base_starts = [layer.starts.clone() for layer in cache.layers]
        self.base_ends = [layer.ends.clone() for layer in cache.layers]
        self.prompt_slots = max(int(e.max()) for e in self.base_ends)
        for layer in cache.layers:  # random K/V in the generated region (its contents do not change the cost)
            layer.keys[:, :, self.prompt_slots:].normal_()
            layer.values[:, :, self.prompt_slots:].normal_()
        self.capacity = min(layer.capacity for layer in cache.layers)
        self.step_seconds(1, steps=4)  # warm-up: eager steps, the graph capture, Triton compilation

    def set_state(self, generated: int, held: int) -> None:
        """Every layer holds its prefilled slots plus ``held`` generated entries; ``generated`` tokens were seen."""
        if held < 0 or self.prompt_slots + held + 1 > self.capacity:
            raise ValueError(f"held={held} generated entries do not fit the probe's capacity {self.capacity} "
                             f"after {self.prompt_slots} prompt slots")
        for layer, starts, ends in zip(self.decoder.cache.layers, self.base_starts, self.base_ends):
            layer.starts.copy_(starts)
            layer.ends.copy_(ends + held)
            layer.end_bound = int(ends.max()) + held
            layer.seen = layer.prompt_len + generated
            layer.device_seen.fill_(layer.seen)
            if layer.query_window:
                layer.num_queries = max(layer.num_queries, layer.query_window)
                layer.device_queries.fill_(layer.num_queries)

    def _steps(self, count: int) -> float:
        def run():
            tokens = self.tokens
            for _ in range(count):
                tokens = self.decoder.step(tokens).argmax(-1)

        return _timed(run, self.device)[0]

    def step_seconds(self, live: int, steps: int = 16) -> float:
        """Mean time of a decode step attending over the prompt plus ``live`` generated entries (no compression
        fires: the generated count is kept at 1)."""
        if live < 1 or self.prompt_slots + live + steps > self.capacity:
            raise ValueError(f"live={live} (+{steps} steps) does not fit the probe's capacity {self.capacity}")
        self.set_state(generated=1, held=live - 1)
        return self._steps(steps) / steps

    def firing_step_seconds(self, generated: int, live_before: int) -> float:
        """Time of the step that appends generated token ``generated`` (with ``live_before - 1`` generated entries
        held) and runs the compression that fires there. Raises if no compaction ran."""
        self.set_state(generated=generated - 1, held=live_before - 1)
        before = [layer.compactions for layer in self.decoder.cache.layers]
        seconds = self._steps(1)
        if any(layer.compactions == b for layer, b in zip(self.decoder.cache.layers, before)):
            raise RuntimeError(f"no compaction ran at generated={generated}: the schedule model is wrong")
        return seconds

    def kv_bytes(self) -> int:
        return self.decoder.cache.nbytes()


def _sample_points(lo: int, hi: int, count: int) -> list[int]:
    if hi <= lo or count <= 1:
        return [hi]
    return sorted({round(lo + (hi - lo) * i / (count - 1)) for i in range(count)})


def _fits(device: torch.device, nbytes: int, margin: float = 0.92) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < margin * free


def kv_bytes_per_token(model) -> int:
    """K and V bytes of one token across every layer."""
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * d * next(model.parameters()).element_size()


def weight_bytes(model) -> int:
    """Bytes of the model's parameters (what a decode step reads once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _peak_reset(device: torch.device) -> None:
    gc.collect()  # a finished probe's CUDA graph and static buffers
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------- HF eager
class _Timestamps:
    """A stopping criterion that never stops and records when each generated token was done (host clock)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def hf_eager_step_seconds(model, batch: int, cached: int, steps: int = 12, seed: int = 0) -> float:
    """Median time of one step of HF's ``model.generate`` (no kvsieve) over a DynamicCache holding ``cached``
    random entries per layer. HF's loop synchronises every step (its stopping check), so host timestamps time it."""
    from transformers import DynamicCache, StoppingCriteriaList

    device = next(model.parameters()).device
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    cache = DynamicCache()
    gen = torch.Generator(device).manual_seed(seed)
    for layer in range(cfg.num_hidden_layers):
        shape = (batch, cfg.num_key_value_heads, cached, d)
        k = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        cache.update(k, torch.randn(shape, generator=gen, device=device, dtype=dtype), layer)
    ids = torch.randint(100, cfg.vocab_size, (batch, cached + 1), device=device)
    stamps = _Timestamps()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                       max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([stamps]))
    del cache
    diffs = sorted(b - a for a, b in zip(stamps.times[2:], stamps.times[3:]))
    if not diffs:
        raise ValueError(f"steps={steps} is too few to time HF's loop (at least 4)")
    return diffs[len(diffs) // 2]


# ---------------------------------------------------------------------------------------------- decode bench
def bench_decode(
    model,
    model_name: str,
    batches: Sequence[int],
    new_tokens: Sequence[int],
    compressors: Sequence[tuple[str, dict[str, Any]]],
    *,
    backend: str = "auto",
    prompt_len: int = 128,
    samples: int = 6,
    steps: int = 16,
    compression_samples: int = 4,
    hf_eager: bool = True,
    fast: bool = True,
    validate: Sequence[tuple[int, int]] = (),
    use_cuda_graph: bool | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Modelled decode throughput and measured peak memory per (batch, output length, compressor); see the module
    docstring. Returns one record per row (``run`` = ``hf-eager:none`` or ``fast:<compressor>``)."""
    device = next(model.parameters()).device
    weights, per_token = weight_bytes(model), kv_bytes_per_token(model)
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    rows: list[dict[str, Any]] = []
    for batch in batches:
        if hf_eager:
            rows += _hf_decode_rows(model, model_name, batch, new_tokens, prompt_len, weights, per_token, log)
        for name, params in compressors if fast else ():
            for n in new_tokens:
                base = dict(model=model_name, batch=batch, new_tokens=n, prompt_len=prompt_len, run=f"fast:{name}",
                            compressor=name, params=params)
                try:
                    rows.append(base | _fast_decode_row(model, name, params, backend, batch, n, prompt_len, samples,
                                                        steps, compression_samples, weights, per_token, bandwidth,
                                                        use_cuda_graph, (batch, n) in validate))
                except (torch.OutOfMemoryError, _DoesNotFit) as exc:
                    _peak_reset(device)
                    rows.append(base | dict(error=f"does not fit: {str(exc)[:160]}"))
                rows[-1].update(_paper_columns(model_name, name, n))
                log(json.dumps(rows[-1]))
    return rows


class _DoesNotFit(Exception):
    pass


def _paper_columns(model_name: str, name: str, n: int) -> dict[str, Any]:
    paper = PAPER_DECODE_TOKENS_PER_S.get((model_name, name), {})
    out: dict[str, Any] = {}
    if n in paper:
        out["paper_tokens_per_s"] = paper[n] if paper[n] is not None else "OOM"
    if (model_name, name, n) in PAPER_PEAK_GB:
        out["paper_peak_gb"] = PAPER_PEAK_GB[model_name, name, n]
    return out


def _fast_decode_row(model, name, params, backend, batch, n, prompt_len, samples, steps, compression_samples,
                     weights, per_token, bandwidth, use_cuda_graph, validate) -> dict[str, Any]:
    device = next(model.parameters()).device
    _peak_reset(device)
    with torch.inference_mode(), apply(model, name, backend, params=params) as session:
        live, compressions = decode_schedule(session.compressor, n)
        from kvsieve.static import static_capacity

        needed = weights + batch * per_token * static_capacity(session.compressor, prompt_len, n)
        if not _fits(device, needed - weights):
            raise _DoesNotFit(f"the static cache needs {needed / 2**30:.1f} GiB with the weights")
        probe = DecodeProbe(model, session, batch, prompt_len, n, use_cuda_graph)
        hi = min(max(live), probe.capacity - probe.prompt_slots - steps)
        points = _sample_points(min(live), hi, samples)
        step_times = [probe.step_seconds(p, steps) for p in points]

        def step_at(x: int) -> float:
            return interpolate(points, step_times, x)

        ranks = _sample_points(1, len(compressions), compression_samples) if compressions else []
        costs = []
        for k in ranks:
            g, before = compressions[k - 1]
            costs.append(max(probe.firing_step_seconds(g, before) - step_at(before), 0.0))

        def compression_at(k: int) -> float:
            return interpolate(ranks, costs, k)

        decode = modelled_decode_seconds(live, compressions, step_at, compression_at)
        total = probe.prefill_seconds + decode
        row = dict(
            backend=session.backend.name,
            tokens_per_s=round(batch * n / total, 1),
            seconds=round(total, 3),
            prefill_s=round(probe.prefill_seconds, 3),
            compressions=len(compressions),
            compression_s=round(sum(compression_at(k) for k in range(1, len(compressions) + 1)), 3),
            step_ms_first=round(step_times[0] * 1e3, 3),
            step_ms_last=round(step_times[-1] * 1e3, 3),
            live_max=prompt_len + max(live),
            kv_gib=round(probe.kv_bytes() / 2**30, 3),
            peak_gib=_peak_gib(device),
            formula_gib=round((weights + batch * per_token * (prompt_len + max(live))) / 2**30, 2),
            step_points=points,
            step_ms=[round(s * 1e3, 3) for s in step_times],
            compression_ranks=ranks,
            compression_ms=[round(c * 1e3, 2) for c in costs],
        )
        if bandwidth:
            floor = (weights + batch * per_token * (prompt_len + points[-1])) / bandwidth
            row["floor_ratio_last"] = round(step_times[-1] / floor, 2)
        del probe
        session.last_cache = None
        if validate:
            _peak_reset(device)
            row.update(_validate(model, session, batch, n, prompt_len, use_cuda_graph, total))
    return row


def _validate(model, session, batch, n, prompt_len, use_cuda_graph, modelled: float) -> dict[str, Any]:
    """One real run of the configuration (the fast path's generate loop) against the modelled time."""
    from kvsieve.fastpath import fast_generate

    device = next(model.parameters()).device
    ids = torch.randint(100, model.config.vocab_size, (batch, prompt_len), device=device)
    seconds, out = _timed(lambda: fast_generate(model, ids, None, session, use_cuda_graph=use_cuda_graph,
                                                max_new_tokens=n, min_new_tokens=n, do_sample=False), device)
    if out.shape[1] != prompt_len + n:
        raise RuntimeError(f"the validation run generated {out.shape[1] - prompt_len} tokens instead of {n}")
    return dict(validated_s=round(seconds, 3), validated_tokens_per_s=round(batch * n / seconds, 1),
                modelled_over_measured=round(modelled / seconds, 3))


def _hf_decode_rows(model, model_name, batch, new_tokens, prompt_len, weights, per_token, log) -> list[dict]:
    """HF's eager loop with the full cache: step times at the prompt length and at each run's end (as long as the
    cache fits), integrated linearly over each run."""
    device = next(model.parameters()).device
    rows = []
    hf_eager_step_seconds(model, batch, 16, steps=4)  # warm-up
    points, times = [], []
    for cached in [prompt_len] + [prompt_len + n for n in sorted(new_tokens)]:  # up to the longest that fits
        layers = model.config.num_hidden_layers  # DynamicCache's cat holds a second copy of one layer
        if not _fits(device, batch * per_token * cached * (layers + 1) // layers):
            break
        _peak_reset(device)
        try:
            times.append(hf_eager_step_seconds(model, batch, cached))
            points.append(cached)
        except torch.OutOfMemoryError:
            _peak_reset(device)
            break
    for n in new_tokens:
        row = dict(model=model_name, batch=batch, new_tokens=n, prompt_len=prompt_len, run="hf-eager:none",
                   compressor="none", params={}, backend="hf-sdpa")
        if not points or points[-1] < prompt_len + n:
            row["error"] = "does not fit: a DynamicCache of this length does not fit next to the weights"
        else:
            total = sum(interpolate(points, times, prompt_len + t + 1) for t in range(n - 1))
            row.update(tokens_per_s=round(batch * n / total, 1), seconds=round(total, 3),
                       step_ms_first=round(times[0] * 1e3, 3), step_ms_last=round(times[-1] * 1e3, 3),
                       step_points=points, step_ms=[round(s * 1e3, 3) for s in times],
                       formula_gib=round((weights + batch * per_token * (prompt_len + n)) / 2**30, 2))
        row.update(_paper_columns(model_name, "none", n))
        rows.append(row)
        log(json.dumps(row))
    return rows


# ---------------------------------------------------------------------------------------------- prefill bench
def bench_prefill(
    model,
    model_name: str,
    contexts: Sequence[int],
    compressors: Sequence[tuple[str, dict[str, Any]]],
    *,
    backend: str = "auto",
    new_tokens: int = 256,
    hf_eager: bool = True,
    use_cuda_graph: bool | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Per context: TTFT of plain HF sdpa and of each compressor, then ``new_tokens`` real fast-path decode steps
    (batch 1), and HF's eager decode step at that context."""
    device = next(model.parameters()).device
    weights, per_token = weight_bytes(model), kv_bytes_per_token(model)
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    vocab = model.config.vocab_size
    rows: list[dict[str, Any]] = []
    warm = torch.randint(100, vocab, (1, min(1024, min(contexts))), device=device)
    with torch.inference_mode():
        model(input_ids=warm, use_cache=True, logits_to_keep=1)
    for context in contexts:
        ids = torch.randint(100, vocab, (1, context), device=device)
        base = dict(model=model_name, context=context, new_tokens=new_tokens)
        _peak_reset(device)
        try:
            with torch.inference_mode():
                seconds, _ = _timed(lambda ids=ids: model(input_ids=ids, use_cache=True, logits_to_keep=1), device)
            row = base | dict(run="hf-sdpa", ttft_s=round(seconds, 4), peak_gib=_peak_gib(device))
            if hf_eager:
                _peak_reset(device)
                step = hf_eager_step_seconds(model, 1, context, steps=12)
                row.update(decode_step_ms=round(step * 1e3, 3), decode_tokens_per_s=round(1 / step, 1))
        except torch.OutOfMemoryError as exc:
            _peak_reset(device)
            row = base | dict(run="hf-sdpa", error=f"OOM: {str(exc)[:120]}")
        rows.append(row)
        log(json.dumps(row))
        for name, params in compressors:
            _peak_reset(device)
            try:
                row = base | _prefill_row(model, name, params, backend, ids, new_tokens, use_cuda_graph, weights,
                                          per_token, bandwidth)
            except torch.OutOfMemoryError as exc:
                _peak_reset(device)
                row = base | dict(run=f"fast:{name}", compressor=name, error=f"OOM: {str(exc)[:120]}")
            rows.append(row)
            log(json.dumps(row))
    _prefill_ratios(rows)
    return rows


def _prefill_row(model, name, params, backend, ids, new_tokens, use_cuda_graph, weights, per_token, bandwidth):
    device = ids.device
    with torch.inference_mode(), apply(model, name, backend, params=params) as session:
        # a short warm-up run of the compressor (kernels, Triton compilation), then the timed prefill
        StaticDecoder(model, session, use_cuda_graph).prefill(ids[:, : min(2048, ids.shape[1])], None, 4)
        _peak_reset(device)
        decoder = StaticDecoder(model, session, use_cuda_graph)
        ttft, logits = _timed(lambda d=decoder: d.prefill(ids, None, new_tokens), device)
        lengths = decoder.cache.kv_lengths()
        tokens = logits.argmax(-1)
        for _ in range(3):  # warm-up and capture
            tokens = decoder.step(tokens).argmax(-1)

        def decode():
            nonlocal tokens
            for _ in range(new_tokens - 4):
                tokens = decoder.step(tokens).argmax(-1)

        seconds, _ = _timed(decode, device)
        step = seconds / (new_tokens - 4)
        row = dict(run=f"fast:{name}", compressor=name, params=params, backend=session.backend.name,
                   ttft_s=round(ttft, 4), kv_len_min=min(lengths), kv_len_max=max(lengths),
                   kv_len_mean=round(sum(lengths) / len(lengths), 1), decode_step_ms=round(step * 1e3, 3),
                   decode_tokens_per_s=round(1 / step, 1), peak_gib=_peak_gib(device))
        if bandwidth:
            mean_live = sum(lengths) / len(lengths) + new_tokens / 2
            floor = (weights + per_token * mean_live) / bandwidth
            row.update(floor_ms=round(floor * 1e3, 3), floor_ratio=round(step / floor, 2))
    return row


def _prefill_ratios(rows: list[dict[str, Any]]) -> None:
    by = {(r["context"], r["run"]): r for r in rows}
    for row in rows:
        full = by.get((row["context"], "fast:none"), {})
        hf = by.get((row["context"], "hf-sdpa"), {})
        if "ttft_s" in row and "ttft_s" in full:
            row["ttft_speedup_vs_full"] = round(full["ttft_s"] / row["ttft_s"], 2)
        if "ttft_s" in row and "ttft_s" in hf:
            row["ttft_speedup_vs_hf"] = round(hf["ttft_s"] / row["ttft_s"], 2)
        if "decode_step_ms" in row and "decode_step_ms" in hf:
            row["decode_speedup_vs_hf_eager"] = round(hf["decode_step_ms"] / row["decode_step_ms"], 2)


# ---------------------------------------------------------------------------------------------- report
_DECODE_COLUMNS = ["model", "batch", "new_tokens", "run", "backend", "tokens_per_s", "paper_tokens_per_s",
                   "vs_fast_full", "seconds", "compressions", "compression_s", "step_ms_first", "step_ms_last",
                   "floor_ratio_last", "live_max", "peak_gib", "formula_gib", "paper_peak_gb", "validated_tokens_per_s",
                   "modelled_over_measured", "error"]
_PREFILL_COLUMNS = ["model", "context", "run", "backend", "ttft_s", "ttft_speedup_vs_full", "ttft_speedup_vs_hf",
                    "kv_len_mean", "decode_step_ms", "decode_tokens_per_s", "decode_speedup_vs_hf_eager", "floor_ms",
                    "floor_ratio", "peak_gib", "error"]


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cols = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _decode_ratios(rows: list[dict[str, Any]]) -> None:
    full = {(r["model"], r["batch"], r["new_tokens"]): r for r in rows if r["run"] == "fast:none"}
    for row in rows:
        ref = full.get((row["model"], row["batch"], row["new_tokens"]))
        if ref and "tokens_per_s" in row and "tokens_per_s" in ref and row is not ref:
            row["vs_fast_full"] = round(row["tokens_per_s"] / ref["tokens_per_s"], 2)


def decode_goals(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's decode goals, checked against the rows (R1-7B, batch 32, 32K outputs)."""
    out = []
    for row in rows:
        if (row["model"], row["batch"], row["new_tokens"], row["run"]) != ("r1-qwen-7b", 32, 32768, "fast:rpc"):
            continue
        if "tokens_per_s" in row:
            tps = row["tokens_per_s"]
            out.append(f"RPC tokens/s at R1-7B, batch 32, 32K: {tps} (goal >= {GOAL_RPC_TOKENS_PER_S:.0f}): "
                       f"{'met' if tps >= GOAL_RPC_TOKENS_PER_S else 'missed'}")
        if "vs_fast_full" in row:
            out.append(f"RPC over the fast-path full cache: {row['vs_fast_full']}x (goal >= {GOAL_RPC_OVER_FULL}x): "
                       f"{'met' if row['vs_fast_full'] >= GOAL_RPC_OVER_FULL else 'missed'}")
        if row.get("peak_gib") and row.get("formula_gib"):
            excess = row["peak_gib"] / row["formula_gib"] - 1
            out.append(f"RPC peak memory {row['peak_gib']} GiB vs weights + (Lp + held + 1) x KV/token "
                       f"{row['formula_gib']} GiB: {excess:+.1%} (goal within 10%): "
                       f"{'met' if abs(excess) <= 0.10 else 'missed'}")
    return out


def prefill_goals(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for row in rows:
        if row["run"] != "fast:fastkv" or "ttft_s" not in row:
            continue
        c = row["context"]
        if "ttft_speedup_vs_full" in row:
            out.append(f"FastKV TTFT at {c}: {row['ttft_speedup_vs_full']}x the kvsieve full prefill, "
                       f"{row.get('ttft_speedup_vs_hf', '-')}x HF sdpa (goal >= {GOAL_FASTKV_TTFT}x)")
        if "decode_speedup_vs_hf_eager" in row:
            out.append(f"FastKV decode at {c}: {row['decode_speedup_vs_hf_eager']}x HF's eager full-cache loop "
                       f"(goal >= {GOAL_FASTKV_DECODE}x)")
        if "floor_ratio" in row:
            out.append(f"FastKV decode step at {c}: {row['floor_ratio']}x its bandwidth floor (goal <= {GOAL_FLOOR}x)")
    return out


def write_report(out: Path, which: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """``OUT/<which>.md`` (tables, goals) and PNG plots when matplotlib is importable."""
    if which == "decode":
        _decode_ratios(rows)
        body, goals = _table(rows, _DECODE_COLUMNS), decode_goals(rows)
    else:
        body, goals = _table(rows, _PREFILL_COLUMNS), prefill_goals(rows)
    text = [f"### kvsieve bench {which}", "", "```", json.dumps(meta, indent=1), "```", "", body]
    if goals:
        text += ["Goals:", ""] + [f"- {g}" for g in goals] + [""]
    plots = _plots(out, which, rows)
    text += [f"![{p.stem}]({p.name})" for p in plots]
    path = out / f"{which}.md"
    path.write_text("\n".join(text) + "\n")
    return path


def _plots(out: Path, which: str, rows: list[dict[str, Any]]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    if which == "decode":
        for model in dict.fromkeys(r["model"] for r in rows):
            batches = sorted({r["batch"] for r in rows if r["model"] == model})
            fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6), squeeze=False)
            for ax, batch in zip(axes[0], batches):
                for run in dict.fromkeys(r["run"] for r in rows):
                    pts = [(r["new_tokens"], r["tokens_per_s"]) for r in rows
                           if (r["model"], r["batch"], r["run"]) == (model, batch, run) and "tokens_per_s" in r]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=run)
                ax.set(title=f"{model}, batch {batch}", xlabel="generated tokens", ylabel="tokens/s", xscale="log")
                ax.legend(fontsize=7)
            fig.tight_layout()
            paths.append(out / f"decode_{model}.png")
            fig.savefig(paths[-1], dpi=110)
            plt.close(fig)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for run in dict.fromkeys(r["run"] for r in rows):
            pts = [(r["context"], r["ttft_s"], r.get("decode_tokens_per_s")) for r in rows
                   if r["run"] == run and "ttft_s" in r]
            if pts:
                axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=run)
                dec = [(p[0], p[2]) for p in pts if p[2]]
                if dec:
                    axes[1].plot(*zip(*dec), marker="o", label=run)
        axes[0].set(xlabel="context", ylabel="TTFT (s)", xscale="log", yscale="log", title="time to first token")
        axes[1].set(xlabel="context", ylabel="decode tokens/s (batch 1)", xscale="log", title="decode")
        for ax in axes:
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "prefill.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def environment() -> dict[str, Any]:
    import transformers

    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version())
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
    else:
        meta["cpu"] = platform.processor() or platform.machine()
    return meta


# ---------------------------------------------------------------------------------------------- CLI
def _ints(text: str) -> list[int]:
    out = []
    for item in text.split(","):
        item = item.strip().upper()
        try:
            out.append(int(float(item[:-1]) * 1024) if item.endswith("K") else int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of positive integers (8K = 8192), got {text!r}"
            ) from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return out


def _validations(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in filter(None, text.split(",")):
        batch, sep, n = item.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"--validate expects BATCH:TOKENS items, got {item!r}")
        pairs.append((_ints(batch)[0], _ints(n)[0]))
    return pairs


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``kvsieve bench {decode,prefill,report}`` to the CLI."""
    from kvsieve.params import parse_params

    parser = subparsers.add_parser("bench", help="speed and memory benchmarks on random-weight paper-shaped models")
    sub = parser.add_subparsers(dest="bench", required=True)

    def common(p, model: str, compressors: str):
        p.add_argument("--model", default=model,
                       help=f"a paper shape (random weights on the GPU) or a kvsieve model name (default {model})")
        p.add_argument("--compressor", action="append", metavar="NAME[:k=v,...]",
                       help=f"compressor and parameters, repeatable (default {compressors})")
        p.add_argument("--backend", default="auto", help="kernel backend (default auto)")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda")
        p.add_argument("--no-hf", action="store_true", help="skip HF's eager baseline rows")
        p.add_argument("--no-graph", action="store_true", help="decode without CUDA graphs")
        p.add_argument("--out", type=Path, required=True, help="output directory")
        p.set_defaults(func=run, parse_params=parse_params, default_compressors=compressors)

    p = sub.add_parser("decode", help="decode tokens/s and peak memory: RPC vs full cache")
    common(p, "r1-qwen-7b", "none;rpc:interval=4096,window=32,ratio=4")
    p.add_argument("--batches", type=_ints, default=[8, 16, 32])
    p.add_argument("--new-tokens", type=_ints, default=[8192, 16384, 32768])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--samples", type=int, default=6, help="cache lengths at which step time is measured")
    p.add_argument("--steps", type=int, default=16, help="steps timed per cache length")
    p.add_argument("--validate", type=_validations, default=[], help="BATCH:TOKENS configurations run for real")
    p.add_argument("--no-fast", action="store_true", help="only HF's eager baseline rows")
    p = sub.add_parser("prefill", help="TTFT and decode after prefill: FastKV vs SnapKV vs full")
    common(p, "llama-3.1-8b", "none;snapkv:ratio=0.1,window=8,pooling=max;fastkv:tsp_rate=0.2,retain_rate=0.1")
    p.add_argument("--contexts", type=_ints, default=[8192, 32768, 131072])
    p.add_argument("--new-tokens", type=int, default=256)
    p = sub.add_parser("report", help="re-render OUT/<which>.md and plots from OUT/<which>.jsonl")
    p.add_argument("out", type=Path)
    p.set_defaults(func=run)
    return parser


def _compressor_specs(args) -> list[tuple[str, dict[str, Any]]]:
    specs = args.compressor or args.default_compressors.split(";")
    out = []
    for spec in specs:
        name, _, params = spec.partition(":")
        out.append((name.strip(), args.parse_params([p for p in params.split(",") if p])))
    return out


def _load_model(name: str, device: str):
    from kvsieve import models

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if name in models.PAPER_SHAPES:
        if device != "cuda":
            raise ValueError(f"--model {name}: paper-shaped models are built on a CUDA GPU; none is available "
                             "(use a small model such as tiny-random-qwen2 on the CPU)")
        return models.random_paper_model(name)
    model, _ = models.load(name)
    return model.to(device).eval()


def run(args: argparse.Namespace) -> int:
    if args.bench == "report":
        for which in ("decode", "prefill"):
            path = args.out / f"{which}.jsonl"
            if path.exists():
                lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
                meta, rows = lines[0], lines[1:]
                print(write_report(args.out, which, rows, meta))
        return 0
    minimum = dict(samples=2, steps=4) if args.bench == "decode" else dict(new_tokens=8)
    for name, least in minimum.items():
        if getattr(args, name) < least:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be at least {least}")
    model = _load_model(args.model, args.device)
    compressors = _compressor_specs(args)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = environment() | dict(model=args.model, command=f"kvsieve bench {args.bench}")
    graph = False if args.no_graph else None
    partial = args.out / f"{args.bench}.partial.jsonl"  # rows as they come (a run cut short keeps them)
    partial.write_text(json.dumps(meta) + "\n")

    def log(line: str) -> None:
        print(line, flush=True)
        with partial.open("a") as f:
            f.write(line + "\n")

    if args.bench == "decode":
        rows = bench_decode(model, args.model, args.batches, args.new_tokens, compressors, backend=args.backend,
                            prompt_len=args.prompt_len, samples=args.samples, steps=args.steps,
                            hf_eager=not args.no_hf, fast=not args.no_fast, validate=args.validate,
                            use_cuda_graph=graph, log=log)
    else:
        rows = bench_prefill(model, args.model, args.contexts, compressors, backend=args.backend,
                             new_tokens=args.new_tokens, hf_eager=not args.no_hf, use_cuda_graph=graph, log=log)
    partial.unlink()
    path = args.out / f"{args.bench}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [meta, *rows]))
    print(write_report(args.out, args.bench, rows, meta).read_text())
    return 0
