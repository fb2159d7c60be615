"""``kvsieve bench decode``'s rows: modelled decode throughput and measured peak memory per (batch, output length,
compressor) on the fast path, and HF's full-cache loops as the baselines: eager over a DynamicCache, and its static
cache with generate's compiled forward (:mod:`kvsieve.bench.hf_static`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from kvsieve.bench.hf_static import HF_STATIC_VARIANTS, hf_static_step_seconds
from kvsieve.bench.paper import paper_columns
from kvsieve.bench.probe import DecodeProbe
from kvsieve.bench.schedule import (
    decode_schedule,
    full_cache_decode_seconds,
    interpolate,
    modelled_decode_seconds,
    sample_points,
)
from kvsieve.bench.step_clock import step_clock
from kvsieve.bench.timing import (
    copy_bandwidth,
    fits,
    hf_eager_step_seconds,
    kv_bytes_per_token,
    peak_gib,
    reset_peak,
    timed,
    weight_bytes,
)
from kvsieve.evaluation.sharding import Share
from kvsieve.integration import apply

__all__ = ["bench_decode", "decode_units"]


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
    hf_static: Sequence[str] = (),
    fast: bool = True,
    validate: Sequence[tuple[int, int]] = (),
    use_cuda_graph: bool | None = None,
    log: Callable[[str], None] = print,
    share: Share | None = None,
) -> list[dict[str, Any]]:
    """Modelled decode throughput and measured peak memory per (batch, output length, compressor); see the module
    docstring. ``hf_static`` names the HF static-cache settings to time (:data:`HF_STATIC_VARIANTS`; rows
    ``hf-static:<setting>``, after the fast rows of each batch). Returns one record per row (``run`` =
    ``hf-eager:none``, ``fast:<compressor>`` or ``hf-static:<setting>``). With ``share``, only that process's share of
    the units (:func:`decode_units`) runs; the ratios against the full cache are the report's, from all rows."""
    device = next(model.parameters()).device
    weights, per_token = weight_bytes(model), kv_bytes_per_token(model)
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None

    def rows_of(unit: tuple) -> list[dict[str, Any]]:
        kind, batch, what, n = unit
        if kind == "hf-eager":
            return _hf_decode_rows(model, model_name, batch, new_tokens, prompt_len, weights, per_token, log)
        if kind == "hf-static":
            return _hf_static_rows(model, model_name, batch, [n], prompt_len, samples, steps, what, weights,
                                   per_token, log)
        name, params = what
        base = dict(model=model_name, batch=batch, new_tokens=n, prompt_len=prompt_len, run=f"fast:{name}",
                    compressor=name, params=params)
        try:
            row = base | _fast_decode_row(model, name, params, backend, batch, n, prompt_len, samples, steps,
                                          compression_samples, weights, per_token, bandwidth, use_cuda_graph,
                                          (batch, n) in validate)
        except (torch.OutOfMemoryError, _DoesNotFit) as exc:
            reset_peak(device)
            row = base | dict(error=f"does not fit: {str(exc)[:160]}")
        row.update(paper_columns(model_name, name, n))
        log(json.dumps(row))
        return [row]

    units = decode_units(batches, new_tokens, compressors, hf_eager=hf_eager, hf_static=hf_static, fast=fast)
    return (share or Share()).run(units, rows_of)


def decode_units(batches: Sequence[int], new_tokens: Sequence[int], compressors: Sequence[tuple[str, dict[str, Any]]],
                 *, hf_eager: bool = True, hf_static: Sequence[str] = (), fast: bool = True) -> list[tuple]:
    """The independent measurements of :func:`bench_decode`, in its order: ``(kind, batch, what, new_tokens)``.
    Per batch: HF's eager rows (one unit: its step times at every length serve every ``new_tokens``), then a unit per
    (compressor, ``new_tokens``) on the fast path, then per (HF static setting, ``new_tokens``). A data-parallel
    run (:mod:`kvsieve.evaluation.sharding`) splits these over the processes."""
    units: list[tuple] = []
    for batch in batches:
        if hf_eager:
            units.append(("hf-eager", batch, None, None))
        for compressor in compressors if fast else ():
            units += [("fast", batch, compressor, n) for n in new_tokens]
        units += [("hf-static", batch, variant, n) for variant in hf_static for n in new_tokens]
    return units


class _DoesNotFit(Exception):
    pass


def _fast_decode_row(model, name, params, backend, batch, n, prompt_len, samples, steps, compression_samples,
                     weights, per_token, bandwidth, use_cuda_graph, validate) -> dict[str, Any]:
    device = next(model.parameters()).device
    reset_peak(device)
    with torch.inference_mode(), apply(model, name, backend, params=params) as engine:
        live, compressions = decode_schedule(engine.compressor, n)
        from kvsieve.static import static_capacity

        needed = weights + batch * per_token * static_capacity(engine.compressor, prompt_len, n)
        if not fits(device, needed - weights):
            raise _DoesNotFit(f"the static cache needs {needed / 2**30:.1f} GiB with the weights")
        probe = DecodeProbe(model, engine, batch, prompt_len, n, use_cuda_graph)
        hi = min(max(live), probe.capacity - probe.prompt_slots - steps)
        points = sample_points(min(live), hi, samples)
        step_times = [probe.step_seconds(p, steps) for p in points]

        def step_at(x: int) -> float:
            return interpolate(points, step_times, x)

        ranks = sample_points(1, len(compressions), compression_samples) if compressions else []
        costs = []
        for k in ranks:
            g, before = compressions[k - 1]
            costs.append(max(probe.firing_step_seconds(g, before) - step_at(before), 0.0))

        def compression_at(k: int) -> float:
            return interpolate(ranks, costs, k)

        decode = modelled_decode_seconds(live, compressions, step_at, compression_at)
        total = probe.prefill_seconds + decode
        row = dict(
            backend=engine.backend.name,
            tokens_per_s=round(batch * n / total, 1),
            seconds=round(total, 3),
            prefill_s=round(probe.prefill_seconds, 3),
            compressions=len(compressions),
            compression_s=round(sum(compression_at(k) for k in range(1, len(compressions) + 1)), 3),
            step_ms_first=round(step_times[0] * 1e3, 3),
            step_ms_last=round(step_times[-1] * 1e3, 3),
            live_max=prompt_len + max(live),
            kv_gib=round(probe.kv_bytes() / 2**30, 3),
            peak_gib=peak_gib(device),
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
        engine.last_cache = None
        if validate:
            reset_peak(device)
            row.update(_validate(model, engine, batch, n, prompt_len, use_cuda_graph, total, live, compressions))
            row["modelled_steps_s"] = round(decode - row["compression_s"], 3)
    return row


def _validate(model, engine, batch, n, prompt_len, use_cuda_graph, modelled: float, live: list[int],
              compressions: list[tuple[int, int]]) -> dict[str, Any]:
    """One real run of the configuration (the fast path's generate loop) against the modelled time, and where its
    time went (:mod:`kvsieve.bench.step_clock`; ``live`` and ``compressions`` are its ``decode_schedule``)."""
    from kvsieve.fastpath import fast_generate

    device = next(model.parameters()).device
    ids = torch.randint(100, model.config.vocab_size, (batch, prompt_len), device=device)
    with step_clock(device) as clock:
        seconds, out = timed(lambda: fast_generate(model, ids, None, engine, use_cuda_graph=use_cuda_graph,
                                                    max_new_tokens=n, min_new_tokens=n, do_sample=False), device)
    if out.shape[1] != prompt_len + n:
        raise RuntimeError(f"the validation run generated {out.shape[1] - prompt_len} tokens instead of {n}")
    return dict(validated_s=round(seconds, 3), validated_tokens_per_s=round(batch * n / seconds, 1),
                modelled_over_measured=round(modelled / seconds, 3),
                validated_breakdown=clock.breakdown(live, compressions))


def _hf_decode_rows(model, model_name, batch, new_tokens, prompt_len, weights, per_token, log) -> list[dict]:
    """HF's eager loop with the full cache: step times at the prompt length and at each run's end (as long as the
    cache fits), integrated linearly over each run."""
    device = next(model.parameters()).device
    rows = []
    hf_eager_step_seconds(model, batch, 16, steps=4)  # warm-up
    points, times = [], []
    for cached in [prompt_len] + [prompt_len + n for n in sorted(new_tokens)]:  # up to the longest that fits
        layers = model.config.num_hidden_layers  # DynamicCache's cat holds a second copy of one layer
        if not fits(device, batch * per_token * cached * (layers + 1) // layers):
            break
        reset_peak(device)
        try:
            times.append(hf_eager_step_seconds(model, batch, cached))
            points.append(cached)
        except torch.OutOfMemoryError:
            reset_peak(device)
            break
    for n in new_tokens:
        row = dict(model=model_name, batch=batch, new_tokens=n, prompt_len=prompt_len, run="hf-eager:none",
                   compressor="none", params={}, backend="hf-sdpa")
        if not points or points[-1] < prompt_len + n:
            row["error"] = "does not fit: a DynamicCache of this length does not fit next to the weights"
        else:
            total = full_cache_decode_seconds(prompt_len, n, lambda x: interpolate(points, times, x))
            row.update(tokens_per_s=round(batch * n / total, 1), seconds=round(total, 3),
                       step_ms_first=round(times[0] * 1e3, 3), step_ms_last=round(times[-1] * 1e3, 3),
                       step_points=points, step_ms=[round(s * 1e3, 3) for s in times],
                       formula_gib=round((weights + batch * per_token * (prompt_len + n)) / 2**30, 2))
        row.update(paper_columns(model_name, "none", n))
        rows.append(row)
        log(json.dumps(row))
    return rows




def _hf_static_rows(model, model_name, batch, new_tokens, prompt_len, samples, steps, variant, weights, per_token,
                    log) -> list[dict]:
    """HF's static cache sized for each run (``max_cache_len = prompt + new tokens``, as generate sizes it) with the
    ``variant``'s setting: step times at up to 3 live lengths over the run (a step's cost is set by the capacity,
    which it reads whole, more than by the live length), integrated like the eager rows; compiled afresh per row."""
    device = next(model.parameters()).device
    setting = HF_STATIC_VARIANTS[variant]
    cfg = model.config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    rows = []
    for n in new_tokens:
        capacity = prompt_len + n
        row = dict(model=model_name, batch=batch, new_tokens=n, prompt_len=prompt_len, run=f"hf-static:{variant}",
                   compressor="none", params={}, backend=f"hf-{setting.attn_implementation}", setting=setting.help,
                   capacity=capacity)
        # the static K/V, plus one layer's K/V repeated to every query head (sdpa with a mask repeats them)
        needed = batch * per_token * capacity * (cfg.num_hidden_layers + groups) // cfg.num_hidden_layers
        reset_peak(device)
        if capacity - steps < prompt_len:
            row["error"] = f"--new-tokens {n} is shorter than --steps {steps}"
        elif not fits(device, needed):
            row["error"] = (f"does not fit: a static cache of {capacity} slots needs about {needed / 2**30:.1f} GiB "
                            "with the repeated K/V of one layer")
        else:
            points = sample_points(prompt_len, capacity - steps, min(samples, 3))
            try:
                t = hf_static_step_seconds(model, batch, capacity, points, variant=variant, steps=steps)
            except torch.OutOfMemoryError as exc:
                row["error"] = f"does not fit: {str(exc)[:160]}"
            except Exception as exc:  # noqa: BLE001 - one setting failing (a compile error) must not end the run
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            else:
                total = full_cache_decode_seconds(prompt_len, n, partial(interpolate, t.points, t.step_seconds))
                row.update(tokens_per_s=round(batch * n / total, 1), seconds=round(total, 3),
                           step_ms_first=round(t.step_seconds[0] * 1e3, 3),
                           step_ms_last=round(t.step_seconds[-1] * 1e3, 3),
                           step_points=t.points, step_ms=[round(s * 1e3, 3) for s in t.step_seconds],
                           compiled=t.compiled, auto_compiled=t.auto_compiled, cuda_graphs=t.cuda_graphs,
                           compile_s=None if t.compile_seconds is None else round(t.compile_seconds, 1),
                           dynamo_graphs=t.graphs, graph_breaks=t.graph_breaks,
                           recompiles_timed=t.graphs_while_timed, compile_config=t.compile_config,
                           peak_gib=peak_gib(device),
                           formula_gib=round((weights + batch * per_token * capacity) / 2**30, 2))
            reset_peak(device)
        row.update(paper_columns(model_name, "none", n))
        rows.append(row)
        log(json.dumps(row))
    return rows
