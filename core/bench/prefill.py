"""``kvsieve bench prefill``'s rows: per context, the time to first token of plain HF sdpa and of each compressor,
then real fast-path decode steps after it, and HF's eager decode step at that context."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvsieve.bench.timing import (
    copy_bandwidth,
    hf_eager_step_seconds,
    kv_bytes_per_token,
    peak_gib,
    reset_peak,
    timed,
    weight_bytes,
)
from kvsieve.evaluation.sharding import Share
from kvsieve.fastpath import StaticDecoder
from kvsieve.integration import apply
from kvsieve.parallel import tensor_parallel_group

__all__ = ["bench_prefill", "prefill_ratios"]


def bench_prefill(
    model,
    model_name: str,
    contexts: Sequence[int],
    compressors: Sequence[tuple[str, dict[str, Any]]],
    *,
    backend: str = "auto",
    new_tokens: int = 256,
    hf_eager: bool = True,
    hf_sdpa: bool = True,
    use_cuda_graph: bool | None = None,
    log: Callable[[str], None] = print,
    share: Share | None = None,
) -> list[dict[str, Any]]:
    """Per context: TTFT of plain HF sdpa (unless ``hf_sdpa=False``) and of each compressor, then ``new_tokens``
    real fast-path decode steps (batch 1), and HF's eager decode step at that context (``hf_eager``, with
    ``hf_sdpa``). Under tensor parallelism every rank calls it alike; clocks start and stop with every rank. With
    ``share`` (a data-parallel run, :mod:`kvsieve.evaluation.sharding`), only that process's share of the rows runs
    (a row per context and run), without the speed-ups: :func:`prefill_ratios` adds them to the merged rows."""
    device = next(model.parameters()).device
    group = tensor_parallel_group(model)
    weights, per_token = weight_bytes(model), kv_bytes_per_token(model)
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    vocab = model.config.vocab_size
    warm = torch.randint(100, vocab, (1, min(1024, min(contexts))), device=device)
    with torch.inference_mode():
        model(input_ids=warm, use_cache=True, logits_to_keep=1)

    def rows_of(unit: tuple[int, tuple[str, dict[str, Any]] | None]) -> list[dict[str, Any]]:
        context, compressor = unit
        # the same prompt for every row of a context, in any process: a seeded generator on the CPU
        generator = torch.Generator().manual_seed(context)
        ids = torch.randint(100, vocab, (1, context), generator=generator).to(device)
        base = dict(model=model_name, context=context, new_tokens=new_tokens)
        if compressor is None:
            row = base | _hf_sdpa_row(model, ids, hf_eager, group)
        else:
            name, params = compressor
            reset_peak(device)
            try:
                row = base | _prefill_row(model, name, params, backend, ids, new_tokens, use_cuda_graph, weights,
                                          per_token, bandwidth)
            except torch.OutOfMemoryError as exc:
                reset_peak(device)
                row = base | dict(run=f"fast:{name}", compressor=name, error=f"OOM: {str(exc)[:120]}")
        log(json.dumps(row))
        return [row]

    share = share or Share()
    units: list[tuple] = []  # per context: HF sdpa (None), then each compressor
    for context in contexts:
        units += [(context, c) for c in ([None] if hf_sdpa else []) + list(compressors)]
    rows = share.run(units, rows_of)
    if not share.shard.sharded:
        prefill_ratios(rows)
    return rows


def _hf_sdpa_row(model, ids, hf_eager, group) -> dict[str, Any]:
    """Plain HF sdpa (no kvsieve): TTFT, and HF's eager decode step at that context."""
    device = ids.device
    reset_peak(device)
    try:
        with torch.inference_mode():
            seconds, _ = timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), device, group)
        row = dict(run="hf-sdpa", ttft_s=round(seconds, 4), peak_gib=peak_gib(device))
        if hf_eager:
            reset_peak(device)
            step = hf_eager_step_seconds(model, 1, ids.shape[1], steps=12)
            row.update(decode_step_ms=round(step * 1e3, 3), decode_tokens_per_s=round(1 / step, 1))
    except torch.OutOfMemoryError as exc:
        reset_peak(device)
        row = dict(run="hf-sdpa", error=f"OOM: {str(exc)[:120]}")
    return row


def _prefill_row(model, name, params, backend, ids, new_tokens, use_cuda_graph, weights, per_token, bandwidth):
    device = ids.device
    with torch.inference_mode(), apply(model, name, backend, params=params) as engine:
        # a short warm-up run of the compressor (kernels, Triton compilation), then the timed prefill
        StaticDecoder(model, engine, use_cuda_graph).prefill(ids[:, : min(2048, ids.shape[1])], None, 4)
        reset_peak(device)
        decoder = StaticDecoder(model, engine, use_cuda_graph)
        ttft, logits = timed(lambda d=decoder: d.prefill(ids, None, new_tokens), device, engine.heads.group)
        lengths = decoder.cache.kv_lengths()
        tokens = logits.argmax(-1)
        for _ in range(3):  # warm-up and capture
            tokens = decoder.step(tokens).argmax(-1)

        def decode():
            nonlocal tokens
            for _ in range(new_tokens - 4):
                tokens = decoder.step(tokens).argmax(-1)

        seconds, _ = timed(decode, device, engine.heads.group)
        step = seconds / (new_tokens - 4)
        row = dict(run=f"fast:{name}", compressor=name, params=params, backend=engine.backend.name,
                   ttft_s=round(ttft, 4), kv_len_min=min(lengths), kv_len_max=max(lengths),
                   kv_len_mean=round(sum(lengths) / len(lengths), 1), decode_step_ms=round(step * 1e3, 3),
                   decode_tokens_per_s=round(1 / step, 1), peak_gib=peak_gib(device))
        if bandwidth:
            mean_live = sum(lengths) / len(lengths) + new_tokens / 2
            floor = (weights + per_token * mean_live) / bandwidth
            row.update(floor_ms=round(floor * 1e3, 3), floor_ratio=round(step / floor, 2))
    return row


def prefill_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's TTFT and decode speed-ups against its context's full-cache and HF sdpa rows (in place)."""
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


