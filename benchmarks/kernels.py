"""Micro-benchmarks of the ``triton`` backend's kernels against the torch reference / PyTorch SDPA (GPU only).

Usage::

    python benchmarks/kernels.py OUTDIR [--sections scores,decode,compact,layer_ops,decode_small] [--quick] [--sweep]

Prints markdown tables and writes them to ``OUTDIR/kernels.md`` (plus the raw rows as
``OUTDIR/kernels.json``). Everything runs side by side in one process; times are medians of
``triton.testing.do_bench`` (warm-up, L2 flushed between runs), in milliseconds.

Sections:

* ``copy``: a 4 GiB device-to-device copy -> the copy bandwidth (read + write bytes / time) that the other
  sections are compared with.
* ``scores``: ``window_scores`` at B=8, Hkv=8, G in {4, 7}, d=128, W in {8, 32}, L = 8K..128K candidates,
  bf16. Triton with ``lse=None`` (two passes over K: log-sum-exp, then scores) and with a given ``lse`` (one
  pass), vs the torch reference (which may run out of memory at large L: reported as OOM). GB/s counts reading
  K once.
* ``decode``: ``decode_attention`` at B=32, Hkv=8, G=4, d=128, Q=1, bf16, valid length L = 1K..32K in a cache
  of fixed capacity 32K+128, vs SDPA (flash backend, ``enable_gqa=True``) over exactly the first L slots. GB/s
  counts reading K and V once.
* ``compact``: in-place compaction of K and V (bf16, d=128) keeping 25% (RPC-like, B=8, Hkv=8, C=32K) and 10%
  (FastKV-like, B=1, Hkv=8, C=128K); GB/s counts reading and writing the moved rows; vs the torch reference.
* ``layer_ops``: the fused decode layer's operators at Llama-3.1-8B decode shapes (B in {1, 32}, D=4096,
  F=14336, H=32, Hkv=8, d=128, bf16, cache capacity C=16K): ``rms_norm`` with a residual, ``silu_mul`` of the
  two halves of one gate/up projection, ``rope_append`` (one launch) vs the torch references of
  :mod:`kvsieve.layer_ops` (several kernels each). Per call, in microseconds: eager (200 back-to-back calls:
  includes the host's launch cost, which is what an eager step pays) and inside one CUDA graph of 200 calls
  (device time only, as the fast path's captured step pays); plus the share of bitwise-equal output elements.
  About 5 s.
* ``decode_small`` (not in the default set: ``--sections decode_small``): ``decode_attention`` at small batch,
  B in {1, 4}, Hkv=8, G=4, d=128, Q=1, bf16, L in {8K, 32K, 128K} live slots in a cache of capacity L+128, with
  the default config and a grid of candidates -- programs per SM in {2, 4, 8, 16} (``DecodeConfig.programs``,
  ``min_split_slots = block_n``), num_warps in {4, 8}, block_n in {32, 64, 128}, num_stages in {2, 3, 4} --
  each in microseconds beside the bandwidth floor (K and V bytes of the live slots / the measured copy
  bandwidth), with its split count and its error vs SDPA. Prints only a summary (per cell: the default, the
  old rule, the best; then the candidates ranked by their geometric-mean slowdown over the best of each cell);
  every row goes to the files. Short timings (``do_bench`` warm-up 5 ms, 20 ms of runs): estimated at about a
  minute on an H200, mostly compilation (not measured yet; the section prints its own time). ``--quick``: B=1,
  L=32K, three candidates.

* ``decode_b32`` (not in the default set): the same sweep at R1-Distill-Qwen-7B's heads (Hkv=4, G=7) for B in
  {24, 28, 32} (96-128 rows on the SMs) at 5.6K, 16K and 32K live slots, and at Hkv=8, G=4, B=16, with forced split
  counts 1-4 (``S=...``) over 64- and 128-slot blocks, 4 or 8 warps, 3 or 4 stages: where the split rule's one-wave
  case (``choose_num_splits``) was measured. About 30 s on an H200.

* ``linear`` (not in the default set): the decode step's projections at batch 32 (R1-Distill-Qwen-7B: q/k/v with
  its bias, o_proj, gate/up, down_proj with the residual) and batch 1 (Llama-3.1-8B), bf16: cuBLAS (``F.linear``;
  ``residual.addmm_`` for down_proj, as the fused layer runs them) against ``kvsieve.backends.triton.linear`` over
  a grid of tiles, with and without a split of K. Each op is timed as 28 calls on 28 different weight tensors in
  one CUDA graph (the layers of a step: no call finds its weights in L2), per call in microseconds, beside the
  floor (weight bytes / the copy bandwidth) and the error against cuBLAS.
* ``linear_gated`` (not in the default set): the gate/up projection with SiLU * up in its epilogue
  (``gate_up_silu``, R1-7B at batch 32 and Llama-3.1-8B at batch 1, 8 tile configurations, 2 with ``--quick``)
  against cuBLAS's gate/up GEMM followed by the Triton ``silu_mul``, timed as ``linear`` times its ops.

``--sweep`` adds a small tile sweep of the scoring and decode kernels at one shape (to retune the defaults).
Whole run: about 2-3 minutes on an H200.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

SECTIONS = ("scores", "decode", "compact", "layer_ops", "decode_small", "decode_b32", "linear", "linear_gated")
DEFAULT_SECTIONS = ("scores", "decode", "compact", "layer_ops")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("outdir", type=Path, help="directory for kernels.md and kernels.json (created)")
    p.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: {','.join(DEFAULT_SECTIONS)})",
    )
    p.add_argument("--quick", action="store_true", help="fewer shapes (smoke run)")
    p.add_argument("--sweep", action="store_true", help="also sweep kernel tile configs at one shape")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {list(SECTIONS)}")
    args.sections = sections
    return args


# --------------------------------------------------------------------------------------------- helpers
class Report:
    def __init__(self):
        self.lines: list[str] = []
        self.rows: dict[str, list[dict]] = {}

    def line(self, text: str = "", echo: bool = True) -> None:
        if echo:
            print(text, flush=True)
        self.lines.append(text)

    def table(self, name: str, rows: list[dict], echo: bool = True) -> None:
        """A markdown table of ``rows`` (kept as ``name`` in the json); ``echo=False``: files only."""
        self.rows[name] = rows
        if not rows:
            return
        cols = list(rows[0])
        self.line("| " + " | ".join(cols) + " |", echo)
        self.line("|" + "|".join("---" for _ in cols) + "|", echo)
        for r in rows:
            self.line("| " + " | ".join(_fmt(r[c]) for c in cols) + " |", echo)
        self.line("", echo)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def bench(fn, *args, **kwargs) -> float | str:
    """Median ms of ``fn(*args, **kwargs)`` (``"OOM"`` when it runs out of device memory)."""
    return timed(lambda: fn(*args, **kwargs))


def timed(thunk, warmup: int = 25, rep: int = 100) -> float | str:
    """Median ms of ``thunk()`` by ``triton.testing.do_bench`` (``warmup``/``rep`` in ms of runs, L2 flushed
    between runs); ``"OOM"`` when it runs out of device memory."""
    import torch
    import triton

    try:
        return float(triton.testing.do_bench(thunk, warmup=warmup, rep=rep, return_mode="median"))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def ratio(a, b):
    return b / a if isinstance(a, float) and isinstance(b, float) else "-"


def gbps(nbytes: int, ms) -> float | str:
    return nbytes / (ms * 1e-3) / 1e9 if isinstance(ms, float) else "-"


def _kib(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# -------------------------------------------------------------------------------------------- sections
def copy_bandwidth(rep: Report) -> float:
    import torch

    n = 4 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench(y.copy_, x)
    bw = 2 * n / (ms * 1e-3) / 1e9
    rep.line(f"Copy bandwidth (4 GiB device copy, read + write): **{bw:.0f} GB/s** ({ms:.3f} ms)")
    rep.line()
    del x, y
    torch.cuda.empty_cache()
    return bw


def scores_section(rep: Report, copy_bw: float, quick: bool) -> None:
    import torch

    from kvsieve.backends.torch_ref import TorchBackend
    from kvsieve.backends.triton import window_scores as tw

    ref = TorchBackend()
    B, Hkv, d, dtype = 8, 8, 128, torch.bfloat16
    lengths = [8192, 32768] if quick else [8192, 16384, 32768, 65536, 131072]
    rep.line(f"## window_scores (B={B}, Hkv={Hkv}, d={d}, bf16; candidates = all L slots)")
    rep.line()
    rep.line(
        "`triton` = the backend call: lse over the candidates computed in a first pass (two passes over K), "
        "N read on the host; `triton+lse` = lse given (one pass over K) and `num_candidates` given (no host "
        "sync). GB/s = bytes of K read once / time; `% copy` = that over the copy bandwidth. `torch` = the "
        "reference backend (lse=None)."
    )
    rep.line()
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for G in (4, 7):
        for W in (8, 32):
            for L in lengths:
                H = Hkv * G
                keys = torch.randn(B, Hkv, L, d, device="cuda", dtype=dtype, generator=gen)
                q = torch.randn(B, H, W, d, device="cuda", dtype=dtype, generator=gen)
                lo = torch.zeros(B, Hkv, dtype=torch.int64, device="cuda")
                hi = torch.full((B, Hkv), L, dtype=torch.int64, device="cuda")
                scale = d**-0.5
                lse = tw.candidate_lse(q, keys, lo, hi, scale)
                t_tri = bench(tw.window_scores, q, keys, lo, hi, scale)
                t_tri_lse = bench(tw.window_scores, q, keys, lo, hi, scale, lse, num_candidates=L)
                t_ref = bench(ref.window_scores, q, keys, lo, hi, scale)
                err = "-"
                if L == lengths[0]:
                    want = ref.window_scores(q, keys, lo, hi, scale)
                    err = f"{rel_err(tw.window_scores(q, keys, lo, hi, scale), want):.1e}"
                    del want
                nbytes = keys.numel() * keys.element_size()
                rows.append(
                    {
                        "G": G,
                        "W": W,
                        "L": _kib(L),
                        "triton ms": t_tri,
                        "triton+lse ms": t_tri_lse,
                        "torch ms": t_ref,
                        "speedup": ratio(t_tri, t_ref),
                        "GB/s (K once)": gbps(nbytes, t_tri),
                        "% copy": _pct(gbps(nbytes, t_tri), copy_bw),
                        "GB/s +lse": gbps(nbytes, t_tri_lse),
                        "% copy +lse": _pct(gbps(nbytes, t_tri_lse), copy_bw),
                        "max rel err": err,
                    }
                )
                del keys, q, lse
                torch.cuda.empty_cache()
    rep.table("scores", rows)


def _pct(bw, copy_bw) -> float | str:
    return 100.0 * bw / copy_bw if isinstance(bw, float) else "-"


def _sdpa_flash(q, k, v, scale):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


def decode_section(rep: Report, copy_bw: float, quick: bool) -> None:
    import torch

    from kvsieve.backends.triton import decode_attention as td

    B, Hkv, G, d, dtype = 32, 8, 4, 128, torch.bfloat16
    H = Hkv * G
    cap = 32768 + 128
    lengths = [1024, 8192, 32768] if quick else [1024, 2048, 4096, 8192, 16384, 32768]
    rep.line(f"## decode_attention (B={B}, Hkv={Hkv}, G={G}, d={d}, Q=1, bf16, capacity {cap})")
    rep.line()
    rep.line(
        "`sdpa` = `F.scaled_dot_product_attention(enable_gqa=True)` on the flash backend over exactly the "
        "first L slots (a view of the cache). GB/s = bytes of K and V read once / triton time."
    )
    rep.line()
    gen = torch.Generator(device="cuda").manual_seed(1)
    keys = torch.randn(B, Hkv, cap, d, device="cuda", dtype=dtype, generator=gen)
    values = torch.randn(B, Hkv, cap, d, device="cuda", dtype=dtype, generator=gen)
    q = torch.randn(B, H, 1, d, device="cuda", dtype=dtype, generator=gen)
    scale = d**-0.5
    rows = []
    for L in lengths:
        starts = torch.zeros(B, Hkv, dtype=torch.int64, device="cuda")
        ends = torch.full((B, Hkv), L, dtype=torch.int64, device="cuda")
        k, v = keys[:, :, :L], values[:, :, :L]
        try:
            want = _sdpa_flash(q, k, v, scale)
            t_sdpa = bench(_sdpa_flash, q, k, v, scale)
        except RuntimeError as exc:  # flash not available for this layout
            want, t_sdpa = None, f"n/a ({str(exc)[:40]})"
        t_tri = bench(td.decode_attention, q, keys, values, starts, ends, scale)
        got = td.decode_attention(q, keys, values, starts, ends, scale)
        nbytes = 2 * B * Hkv * L * d * keys.element_size()
        rows.append(
            {
                "L": _kib(L),
                "triton ms": t_tri,
                "sdpa ms": t_sdpa,
                "sdpa / triton": ratio(t_tri, t_sdpa),
                "GB/s": gbps(nbytes, t_tri),
                "% copy": _pct(gbps(nbytes, t_tri), copy_bw),
                "max rel err": f"{rel_err(got, want):.1e}" if want is not None else "-",
            }
        )
    # ragged rows: lengths uniform in [L/2, L] per (row, KV head), same cost model
    L = lengths[-1]
    ends = torch.randint(L // 2, L + 1, (B, Hkv), device="cuda", generator=gen)
    starts = torch.zeros_like(ends)
    t_tri = bench(td.decode_attention, q, keys, values, starts, ends, scale)
    nbytes = 2 * int(ends.sum()) * d * keys.element_size()
    rows.append(
        {
            "L": f"ragged {_kib(L // 2)}..{_kib(L)}",
            "triton ms": t_tri,
            "sdpa ms": "-",
            "sdpa / triton": "-",
            "GB/s": gbps(nbytes, t_tri),
            "% copy": _pct(gbps(nbytes, t_tri), copy_bw),
            "max rel err": "-",
        }
    )
    rep.table("decode", rows)
    del keys, values
    torch.cuda.empty_cache()


def decode_small_section(
    rep: Report, copy_bw: float, quick: bool, batches=(1, 4), lengths=(8192, 32768, 131072), Hkv: int = 8,
    G: int = 4, section: str = "decode_small", splits_grid: tuple[int, ...] = (),
) -> None:
    """``decode_attention`` at ``batches`` rows (``lengths`` live slots, ``Hkv`` KV heads of group ``G``): the
    default config and a grid of candidates, beside the bandwidth floor (see the module docstring); tables named
    ``section``. ``splits_grid``: split counts forced (``DecodeConfig.num_splits``) instead of programs per SM, over
    a smaller grid of tiles."""
    import functools
    import itertools
    import math

    import torch

    from kvsieve.backends.triton import decode_attention as td
    from kvsieve.backends.triton._common import cdiv, next_pow2, num_sms

    t0 = time.time()
    d, Q, dtype = 128, 1, torch.bfloat16
    H, M, scale = Hkv * G, G * Q, d**-0.5
    dev = torch.device("cuda")
    sms = num_sms(dev)
    if quick:
        batches, lengths = batches[:1], lengths[1:2] or lengths
    grid = {
        "pps": (2, 8) if quick else (2, 4, 8, 16),
        "warps": (4,) if quick else (4, 8),
        "block_n": (64,) if quick else (32, 64, 128),
        "stages": (3,) if quick else (2, 3, 4),
    }
    if splits_grid and not quick:
        grid = {"pps": tuple(-s for s in splits_grid), "warps": (4, 8), "block_n": (64, 128), "stages": (3, 4)}
    default = td.default_config(d, dev)

    def candidate(pps, nw, bn, ns):
        if pps < 0:  # a forced split count
            cfg = td.DecodeConfig(block_n=bn, max_block_m=64, num_warps=nw, num_stages=ns, num_splits=-pps)
            return f"S={-pps} w={nw} n={bn} s={ns}", cfg
        cfg = td.DecodeConfig(
            block_n=bn, max_block_m=64, num_warps=nw, num_stages=ns, programs=pps * sms, min_split_slots=bn
        )
        return f"pps={pps} w={nw} n={bn} s={ns}", cfg

    candidates = [("default", None)] + [candidate(*c) for c in itertools.product(*grid.values())]
    # the split rule before the small-batch change (2 programs per SM, one block per split at least; new reduce)
    old_rule, old_cfg = candidate(2, default.num_warps, default.block_n, default.num_stages)
    if old_rule not in dict(candidates):
        candidates.append((old_rule, old_cfg))
    rep.line(f"## {section}: decode_attention at B in {batches} (Hkv={Hkv}, G={G}, d={d}, Q={Q}, bf16, capacity L+128, "
             f"{sms} SMs)")
    rep.line()
    rep.line(
        "Candidates: programs per SM (`pps`: `DecodeConfig.programs = pps x SMs`, `min_split_slots = block_n`), "
        "num_warps `w`, block_n `n`, num_stages `s`; `default` = the shipped heuristic "
        f"({default!r}); `{old_rule}` = the split rule before the small-batch change. floor = K and V bytes of "
        "the live slots / copy bandwidth; `floor %` = floor / time. err = max relative error vs SDPA (flash) over "
        "the first L slots."
    )
    rep.line()
    gen = torch.Generator(device="cuda").manual_seed(4)
    rows, summary = [], []
    times: dict[tuple[int, int], dict[str, float]] = {}
    for B in batches:
        cap_max = max(lengths) + 128
        keys = torch.randn(B, Hkv, cap_max, d, device="cuda", dtype=dtype, generator=gen)
        values = torch.randn_like(keys)
        q = torch.randn(B, H, Q, d, device="cuda", dtype=dtype, generator=gen)
        for L in lengths:
            cap = L + 128
            k, v = keys[:, :, :cap], values[:, :, :cap]  # a cache of capacity L+128 (a strided view)
            starts = torch.zeros(B, Hkv, dtype=torch.int64, device="cuda")
            ends = torch.full((B, Hkv), L, dtype=torch.int64, device="cuda")
            want = _sdpa_flash(q, keys[:, :, :L], values[:, :, :L], scale)
            floor_us = 2 * B * Hkv * L * d * keys.element_size() / (copy_bw * 1e9) * 1e6
            cell = times.setdefault((B, L), {})
            for name, cfg in candidates:
                c = cfg or default
                mc = cdiv(M, min(next_pow2(max(M, 16)), next_pow2(c.max_block_m)))
                splits = td.choose_num_splits(B * Hkv, mc, cap, sms, c.block_n, c, 4 * M * (d + 2))
                run = functools.partial(td.decode_attention, q, k, v, starts, ends, scale, config=cfg)
                try:
                    err = f"{rel_err(run(), want):.1e}"
                    ms = timed(run, warmup=5, rep=20)
                except Exception as exc:  # e.g. out of shared memory for a large tile
                    err, ms = "-", f"fail ({type(exc).__name__})"
                us = ms * 1e3 if isinstance(ms, float) else ms
                if isinstance(us, float):
                    cell[name] = us
                rows.append(
                    {
                        "B": B,
                        "L": _kib(L),
                        "config": name,
                        "splits": splits,
                        "us": us,
                        "floor us": floor_us,
                        "floor %": 100.0 * floor_us / us if isinstance(us, float) else "-",
                        "err": err,
                    }
                )
            best = min(cell, key=cell.get)
            for label, name in (("default", "default"), ("old rule", old_rule), ("best", best)):
                r = next(r for r in rows if (r["B"], r["L"], r["config"]) == (B, _kib(L), name))
                summary.append({"B": B, "L": _kib(L), "which": label, **{col: r[col] for col in list(r)[2:]}})
            del want
        del keys, values
        torch.cuda.empty_cache()
    rep.table(f"{section}_summary", summary)
    # each candidate over every cell: geometric mean of time / the cell's best (1.00 = best everywhere)
    ranked = []
    for name, _ in candidates:
        ratios = [cell[name] / min(cell.values()) for cell in times.values() if name in cell]
        if len(ratios) == len(times):
            ranked.append({"config": name, "geomean / best": math.exp(sum(map(math.log, ratios)) / len(ratios))})
    ranked.sort(key=lambda r: r["geomean / best"])
    top = ranked[:10] + [r for r in ranked[10:] if r["config"] in ("default", old_rule)]
    rep.line("Candidates ranked over all cells (top 10, plus the default and the old rule):")
    rep.line()
    rep.table(f"{section}_ranked", top)
    rep.line(f"Every candidate in every cell: table `{section}` of kernels.md / kernels.json.")
    rep.line()
    rep.table(section, rows, echo=False)
    rep.table("decode_small_ranked_all", ranked, echo=False)
    rep.line(f"decode_small: {time.time() - t0:.0f} s")
    rep.line()


def compact_section(rep: Report, copy_bw: float, quick: bool) -> None:
    import torch

    from kvsieve.backends.torch_ref import TorchBackend
    from kvsieve.backends.triton import compaction as tc

    ref = TorchBackend()
    rep.line("## compact (in place, K and V, bf16, d=128)")
    rep.line()
    rep.line("GB/s = bytes moved (read + write of the kept K and V rows) / time.")
    rep.line()
    rows = []
    shapes = [(8, 8, 32768, 0.25), (1, 8, 131072, 0.10)] + ([] if quick else [(32, 8, 8192, 0.25)])
    gen = torch.Generator(device="cuda").manual_seed(2)
    for B, Hkv, C, frac in shapes:
        d = 128
        keys = torch.randn(B, Hkv, C, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        values = torch.randn_like(keys)
        K = int(C * frac)
        keep = torch.rand(B, Hkv, C, device="cuda", generator=gen).topk(K, dim=-1).indices.sort(-1).values
        counts = torch.full((B, Hkv), K, dtype=torch.int64, device="cuda")
        dest = torch.zeros(B, Hkv, dtype=torch.int64, device="cuda")
        # correctness spot check on copies
        k1, v1, k2, v2 = keys.clone(), values.clone(), keys.clone(), values.clone()
        tc.compact(k1, v1, keep, counts, dest)
        ref.compact(k2, v2, keep, counts, dest)
        exact = bool(torch.equal(k1, k2) and torch.equal(v1, v2))
        del k1, v1, k2, v2
        t_tri = bench(tc.compact, keys, values, keep, counts, dest)
        t_ref = bench(ref.compact, keys, values, keep, counts, dest)
        nbytes = 2 * 2 * B * Hkv * K * d * keys.element_size()
        rows.append(
            {
                "B": B,
                "Hkv": Hkv,
                "C": _kib(C),
                "kept": f"{frac:.0%}",
                "triton ms": t_tri,
                "torch ms": t_ref,
                "speedup": ratio(t_tri, t_ref),
                "GB/s": gbps(nbytes, t_tri),
                "% copy": _pct(gbps(nbytes, t_tri), copy_bw),
                "exact": exact,
            }
        )
        del keys, values, keep
        torch.cuda.empty_cache()
    rep.table("compact", rows)


def _per_call_us(fn, calls: int = 200, graph: bool = False, reps: int = 5) -> float | str:
    """Median over ``reps`` of the time of ``calls`` back-to-back calls of ``fn`` / ``calls``, in microseconds;
    ``graph``: the calls captured in one CUDA graph and replayed (device time, no launch cost)."""
    return _calls_us([fn] * calls, graph, reps, warmup=[fn] * 3)


def _calls_us(thunks, graph: bool = False, reps: int = 5, warmup=None) -> float | str:
    """Median over ``reps`` of the time of running every thunk once, / the thunk count, in microseconds (after one
    warm-up pass over ``warmup``, default ``thunks``, on a side stream); ``graph``: the pass captured in one CUDA
    graph and replayed. ``"OOM"`` when the device runs out of memory."""
    import statistics

    import torch

    def run_all():
        for thunk in thunks:
            thunk()

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for thunk in thunks if warmup is None else warmup:
                thunk()
        torch.cuda.current_stream().wait_stream(stream)
        run = run_all
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run_all()
            run = g.replay
        run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / len(thunks))
        return statistics.median(times)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def _equal_share(got, want) -> str:
    """Share of bitwise-equal elements over the (tensor) pairs, as a percentage string."""
    import torch

    same = total = 0
    for g, w in zip(got, want):
        if g.is_floating_point():  # compare the bits: -0.0 is not 0.0, NaN is NaN
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[g.element_size()]
            g, w = g.view(bits), w.view(bits)
        same += int((g == w).sum())
        total += g.numel()
    return "100%" if same == total else f"{100.0 * same / max(total, 1):.4f}%"


def layer_ops_section(rep: Report, copy_bw: float, quick: bool) -> None:
    import torch

    D, F, H, Hkv, d, C = 4096, 14336, 32, 8, 128, 16384
    rep.line(f"## layer_ops (Llama-3.1-8B decode: D={D}, F={F}, H={H}, Hkv={Hkv}, d={d}, bf16, C={_kib(C)})")
    rep.line()
    rep.line(
        "Per call, us. `eager` = 200 back-to-back calls (host launch cost included: the torch references launch "
        "several kernels each); `graph` = the 200 calls in one CUDA graph (device time). GB/s = bytes read and "
        "written once / triton graph time. `bitwise` = share of output elements equal bit for bit to the "
        "reference's (rms_norm: normed and total; rope_append: query, caches, positions, ends)."
    )
    rep.line()
    gen = torch.Generator(device="cuda").manual_seed(4)
    rows = []
    for B in (1, 32):
        rows += _layer_ops_rows(gen, B, D, F, H, Hkv, d, C)
        torch.cuda.empty_cache()
    rep.table("layer_ops", rows)


def _layer_ops_rows(gen, B, D, F, H, Hkv, d, C) -> list[dict]:
    """The three ops at batch ``B`` (bf16), triton vs the torch reference."""
    import functools

    import torch

    from kvsieve import layer_ops as ref
    from kvsieve.backends.triton import layer_ops as tlo

    dtype, rows = torch.bfloat16, []
    x = torch.randn(B, 1, D, device="cuda", dtype=dtype, generator=gen) * 3
    res = torch.randn(B, 1, D, device="cuda", dtype=dtype, generator=gen) * 3
    w = (1 + 0.5 * torch.randn(D, device="cuda", generator=gen)).to(dtype)
    tri, tor = functools.partial(tlo.rms_norm, x, w, 1e-5, res), functools.partial(ref.rms_norm, x, w, 1e-5, res)
    share = _equal_share(tri(), tor())
    rows.append(_layer_row("rms_norm + residual", B, tri, tor, (4 * B * D + D) * x.element_size(), share))

    gu = torch.randn(B, 1, 2 * F, device="cuda", dtype=dtype, generator=gen) * 4
    tri, tor = functools.partial(tlo.silu_mul, gu[..., :F], gu[..., F:]), functools.partial(
        ref.silu_mul, gu[..., :F], gu[..., F:]
    )
    share = _equal_share([tri()], [tor()])
    rows.append(_layer_row("silu_mul", B, tri, tor, 3 * B * F * gu.element_size(), share))

    qkv = torch.randn(B, 1, (H + 2 * Hkv) * d, device="cuda", dtype=dtype, generator=gen)
    query, key, value = (
        t.view(B, 1, -1, d).transpose(1, 2) for t in qkv.split([H * d, Hkv * d, Hkv * d], dim=-1)
    )
    ang = torch.rand(B, 1, d // 2, device="cuda", generator=gen) * 100
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    keys = torch.zeros(B, Hkv, C, d, device="cuda", dtype=dtype)
    values = torch.zeros_like(keys)
    positions = torch.full((B, Hkv, C), -1, device="cuda", dtype=torch.int64)
    ends0 = torch.randint(C // 4, C // 2, (B, Hkv), device="cuda", generator=gen)
    ends = ends0.clone()
    seen = torch.tensor([C], device="cuda", dtype=torch.int64)
    outs = []
    for fn in (tlo.rope_append, ref.rope_append):  # one call each from the same state
        q2, k2, v2, p2, e2 = query.clone(), keys.clone(), values.clone(), positions.clone(), ends0.clone()
        fn(q2, key, value, cos, sin, k2, v2, p2, e2, seen)
        outs.append([q2, k2, v2, p2, e2])
    share = _equal_share(*outs)
    del outs, q2, k2, v2, p2, e2
    args = (query, key, value, cos, sin, keys, values, positions, ends, seen)
    nbytes = B * (2 * H + 3 * Hkv) * d * qkv.element_size() + 3 * B * Hkv * 8
    # each call appends one slot: ends restarts in [C/4, C/2) before each timing (~1.2K calls each)
    rows.append(
        _layer_row(
            "rope_append",
            B,
            functools.partial(tlo.rope_append, *args),
            functools.partial(ref.rope_append, *args),
            nbytes,
            share,
            reset=functools.partial(ends.copy_, ends0),
        )
    )
    return rows


def _layer_row(op, B, tri, ref_fn, nbytes, share, reset=None) -> dict:
    times = {}
    for name, fn in (("triton", tri), ("torch", ref_fn)):
        for graph in (False, True):
            if reset is not None:
                reset()
            times[name, graph] = _per_call_us(fn, graph=graph)
    t_graph = times["triton", True]
    return {
        "op": op,
        "B": B,
        "triton eager us": times["triton", False],
        "torch eager us": times["torch", False],
        "eager speedup": ratio(times["triton", False], times["torch", False]),
        "triton graph us": t_graph,
        "torch graph us": times["torch", True],
        "graph speedup": ratio(t_graph, times["torch", True]),
        "GB/s (graph)": gbps(nbytes, t_graph * 1e-3) if isinstance(t_graph, float) else "-",
        "bitwise": share,
    }


# (model, op, M, N, K, bias, residual): the fused decode step's projections
LINEAR_SHAPES = [
    ("r1-qwen-7b", "qkv", 32, 4608, 3584, True, False),
    ("r1-qwen-7b", "o_proj", 32, 3584, 3584, False, False),
    ("r1-qwen-7b", "gate_up", 32, 37888, 3584, False, False),
    ("r1-qwen-7b", "down", 32, 3584, 18944, False, True),
    ("llama-3.1-8b", "qkv", 1, 6144, 4096, False, False),
    ("llama-3.1-8b", "o_proj", 1, 4096, 4096, False, False),
    ("llama-3.1-8b", "gate_up", 1, 28672, 4096, False, False),
    ("llama-3.1-8b", "down", 1, 4096, 14336, False, True),
]
LINEAR_LAYERS = 28


def linear_section(rep: Report, copy_bw: float, quick: bool) -> None:
    import torch

    from kvsieve.backends.triton.linear import LinearConfig

    rep.line("## linear: the decode step's projections, cuBLAS vs the Triton skinny linear (bf16)")
    rep.line()
    rep.line(f"Per call, us: {LINEAR_LAYERS} calls on {LINEAR_LAYERS} weight copies in one CUDA graph. floor = weight "
             "bytes / copy bandwidth. `best` = the fastest Triton config; err = max |triton - cuBLAS| / max |cuBLAS|.")
    rep.line()
    configs = [LinearConfig(bn, bk, 4, st) for bn in (16, 32, 64) for bk in (128, 256) for st in (3, 5)]
    configs += [LinearConfig(32, 512, 8, 3), LinearConfig(64, 128, 8, 4), LinearConfig(128, 128, 8, 3),
                LinearConfig(16, 512, 4, 4), LinearConfig(32, 256, 4, 7), LinearConfig(32, 512, 4, 4)]
    # K split over more programs (an fp32 workspace and a reduce launch): for the narrow, long down_proj and the
    # short q/k/v and o_proj, where one program per column tile leaves SMs idle
    configs += [LinearConfig(bn, bk, w, st, split) for bn, bk, w, st in ((32, 256, 4, 5), (64, 256, 4, 4),
                                                                       (128, 128, 8, 3), (64, 128, 4, 5))
                for split in (2, 4)]
    shapes = LINEAR_SHAPES[:2] if quick else LINEAR_SHAPES
    configs = configs[:3] if quick else configs
    gen = torch.Generator(device="cuda").manual_seed(11)
    summary, every = [], []
    for shape in shapes:
        row, rows = _linear_rows(gen, shape, configs, copy_bw)
        summary.append(row)
        every += rows
        print(row, flush=True)
        torch.cuda.empty_cache()
    rep.table("linear", summary)
    rep.line("Every config (files only):", echo=False)
    rep.table("linear_all", every, echo=False)


def linear_gated_section(rep: Report, copy_bw: float, quick: bool) -> None:
    import torch

    from kvsieve.backends.triton.linear import LinearConfig

    rep.line("## linear_gated: gate/up with SiLU * up in the epilogue (`gate_up_silu`, the fused layer's opt-in "
             "`silu_in_gate_up`) against the fused layer's default: cuBLAS's gate/up GEMM, then the Triton "
             "`silu_mul` of its halves (bf16)")
    rep.line()
    rep.line(f"Per call, us, {LINEAR_LAYERS} calls on {LINEAR_LAYERS} weight copies in one CUDA graph; floor = the "
             "gate/up weight bytes / copy bandwidth; err = max |gate_up_silu - default| / max |default|.")
    rep.line()
    gen = torch.Generator(device="cuda").manual_seed(12)
    # block_n counts output columns: each program's weight tile is 2 * block_n rows (gate and up)
    gated = [LinearConfig(bn, bk, w, st) for bn, bk, w, st in ((16, 256, 4, 3), (16, 256, 4, 4), (32, 256, 4, 3),
                                                                (16, 128, 4, 5), (32, 128, 4, 4), (16, 512, 4, 2),
                                                                (64, 64, 4, 5), (16, 256, 8, 3))]
    rows = [_gated_row(gen, shape, gated[:2] if quick else gated, copy_bw) for shape in GATED_SHAPES]
    rep.table("linear_gated", rows)


# (model, M, F, K): the gated MLP's gate/up of a decode step, F columns per half
GATED_SHAPES = [("r1-qwen-7b", 32, 18944, 3584), ("llama-3.1-8b", 1, 14336, 4096)]


def _gated_row(gen, shape, configs, copy_bw) -> dict:
    """One gate/up shape: cuBLAS + ``silu_mul`` as the fused layer runs it, then ``gate_up_silu`` per config."""
    import torch
    import torch.nn.functional as F

    from kvsieve.backends.triton.layer_ops import silu_mul
    from kvsieve.backends.triton.linear import LinearConfig, gate_up_silu, skinny_linear

    model, M, width, K = shape
    weights = [torch.randn(2 * width, K, device="cuda", dtype=torch.bfloat16, generator=gen) / K**0.5
               for _ in range(LINEAR_LAYERS)]
    x = torch.randn(M, 1, K, device="cuda", dtype=torch.bfloat16, generator=gen)

    def default(w):
        return silu_mul(*F.linear(x, w).split(width, dim=-1))

    want = default(weights[0]).float()
    base = _calls_us([lambda w=w: default(w) for w in weights], graph=True)
    # the plain skinny GEMM of the same 32-row weight tiles, without the epilogue (what the SiLU product adds)
    plain = _calls_us([lambda w=w: skinny_linear(x, w, None, None, LinearConfig(32, 256, 4, 3)) for w in weights],
                      graph=True)
    floor = 2 * width * K * 2 / (copy_bw * 1e9) * 1e6
    timed = []
    for config in configs:
        err = float((gate_up_silu(x, weights[0], None, config).float() - want).abs().max() / want.abs().max())
        timed.append((_calls_us([lambda w=w, c=config: gate_up_silu(x, w, None, c) for w in weights], graph=True),
                      repr(config), err))
    us, config, err = min(timed, key=lambda t: t[0] if isinstance(t[0], float) else float("inf"))
    return {"model": model, "M": M, "F": width, "K": K, "floor us": floor, "cuBLAS + silu_mul us": base,
            "default / floor": base / floor, "skinny gate/up GEMM alone us": plain, "best gate_up_silu us": us,
            "gate_up_silu / floor": us / floor,
            "default / gate_up_silu": base / us, "best config": config, "err": err,
            "every config us": ", ".join(f"{t[0]:.2f}" if isinstance(t[0], float) else str(t[0]) for t in timed)}


def _linear_rows(gen, shape, configs, copy_bw) -> tuple[dict, list[dict]]:
    """One projection shape: cuBLAS as the fused layer calls it, then every Triton config."""
    import torch
    import torch.nn.functional as F

    from kvsieve.backends.triton.linear import skinny_linear

    model, op, M, N, K, has_bias, has_residual = shape
    dtype = torch.bfloat16
    weights = [torch.randn(N, K, device="cuda", dtype=dtype, generator=gen) / K**0.5 for _ in range(LINEAR_LAYERS)]
    bias = torch.randn(N, device="cuda", dtype=dtype, generator=gen) if has_bias else None
    x = torch.randn(M, 1, K, device="cuda", dtype=dtype, generator=gen)
    residual = torch.randn(M, 1, N, device="cuda", dtype=dtype, generator=gen) if has_residual else None
    if residual is not None:  # as the fused layer: accumulate onto the residual stream in place
        want = residual.clone().view(M, N).addmm_(x.view(M, K), weights[0].t())
        accumulated = residual.clone()
        base = _calls_us([lambda w=w: accumulated.view(M, N).addmm_(x.view(M, K), w.t()) for w in weights], graph=True)
    else:
        want = F.linear(x, weights[0], bias).view(M, N)
        base = _calls_us([lambda w=w: F.linear(x, w, bias) for w in weights], graph=True)
    floor = N * K * 2 / (copy_bw * 1e9) * 1e6  # copy_bw in GB/s
    best, every = None, []
    for config in configs:
        got = skinny_linear(x, weights[0], bias, residual, config).view(M, N)
        err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
        us = _calls_us([lambda w=w, c=config: skinny_linear(x, w, bias, residual, c) for w in weights], graph=True)
        every.append({"model": model, "op": op, "M": M, "config": repr(config), "us": us, "err": err})
        if best is None or us < best[0]:
            best = (us, config, err)
    row = {"model": model, "op": op, "M": M, "N": N, "K": K, "floor us": floor, "cuBLAS us": base,
           "cuBLAS / floor": base / floor, "best triton us": best[0], "triton / floor": best[0] / floor,
           "cuBLAS / triton": base / best[0], "best config": repr(best[1]), "err": best[2]}
    return row, every


def sweep_section(rep: Report) -> None:
    import torch

    from kvsieve.backends.triton import decode_attention as td
    from kvsieve.backends.triton import window_scores as tw

    rep.line("## tile sweep (bf16, d=128)")
    rep.line()
    gen = torch.Generator(device="cuda").manual_seed(3)
    B, Hkv, d, L = 8, 8, 128, 32768
    keys = torch.randn(B, Hkv, L, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    lo = torch.zeros(B, Hkv, dtype=torch.int64, device="cuda")
    hi = torch.full((B, Hkv), L, dtype=torch.int64, device="cuda")
    rows = []
    for G, W in ((4, 8), (7, 32)):
        q = torch.randn(B, Hkv * G, W, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        lse = tw.candidate_lse(q, keys, lo, hi, d**-0.5)
        for bn in (32, 64, 128):
            for mm in (64, 128, 256):
                for nw in (4, 8):
                    for ns in (2, 3):
                        cfg = tw.ScoreConfig(block_n=bn, max_block_m=mm, num_warps=nw, num_stages=ns)
                        t = _try_bench(
                            tw.window_scores, q, keys, lo, hi, d**-0.5, lse, num_candidates=L, config=cfg
                        )
                        t_lse = _try_bench(tw.candidate_lse, q, keys, lo, hi, d**-0.5, config=cfg)
                        rows.append(
                            {
                                "shape": f"B={B} Hkv={Hkv} G={G} W={W} L=32K",
                                "config": repr(cfg),
                                "scores+lse ms": t,
                                "lse pass ms": t_lse,
                            }
                        )
    rep.table("sweep_scores", rows)
    del keys
    rows = []
    Bd, Hd, Gd, cap = 32, 8, 4, 32768
    kk = torch.randn(Bd, Hd, cap, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    vv = torch.randn_like(kk)
    q = torch.randn(Bd, Hd * Gd, 1, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    for L in (2048, 32768):
        starts = torch.zeros(Bd, Hd, dtype=torch.int64, device="cuda")
        ends = torch.full((Bd, Hd), L, dtype=torch.int64, device="cuda")
        for bn in (32, 64, 128):
            for splits in (None, 1, 2, 4, 8, 16):
                for ns in (2, 3, 4):
                    cfg = td.DecodeConfig(
                        block_n=bn, max_block_m=64, num_warps=4, num_stages=ns, num_splits=splits
                    )
                    t = _try_bench(td.decode_attention, q, kk, vv, starts, ends, d**-0.5, config=cfg)
                    rows.append(
                        {"shape": f"B={Bd} Hkv={Hd} G={Gd} L={_kib(L)}", "config": repr(cfg), "ms": t}
                    )
    rep.table("sweep_decode", rows)


def _try_bench(fn, *args, **kwargs):
    try:
        return bench(fn, *args, **kwargs)
    except Exception as exc:  # e.g. out of shared memory for a large tile
        return f"fail ({type(exc).__name__})"


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "benchmarks/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run.",
            file=sys.stderr,
        )
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "unset TRITON_INTERPRET: the benchmark times compiled kernels, not the interpreter.",
            file=sys.stderr,
        )
        return 2
    import triton

    args.outdir.mkdir(parents=True, exist_ok=True)
    rep = Report()
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    rep.line("# kvsieve triton kernels")
    rep.line()
    rep.line(
        f"GPU: {props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB); "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}); triton {triton.__version__}; "
        f"python {platform.python_version()}"
    )
    rep.line()
    copy_bw = copy_bandwidth(rep)
    if "scores" in args.sections:
        scores_section(rep, copy_bw, args.quick)
    if "decode" in args.sections:
        decode_section(rep, copy_bw, args.quick)
    if "compact" in args.sections:
        compact_section(rep, copy_bw, args.quick)
    if "layer_ops" in args.sections:
        layer_ops_section(rep, copy_bw, args.quick)
    if "decode_small" in args.sections:
        decode_small_section(rep, copy_bw, args.quick)
    if "decode_b32" in args.sections:  # R1-Distill-Qwen-7B's heads (4 KV heads of 7): 96-128 rows on the SMs
        decode_small_section(rep, copy_bw, args.quick, batches=(24, 28, 32), lengths=(5632, 16384, 32768), Hkv=4,
                             G=7, section="decode_b32", splits_grid=(1, 2, 3, 4))
        decode_small_section(rep, copy_bw, args.quick, batches=(16,), lengths=(5632, 16384), Hkv=8, G=4,
                             section="decode_b16_hkv8", splits_grid=(1, 2, 3, 4))
    if "linear" in args.sections:
        linear_section(rep, copy_bw, args.quick)
    if "linear_gated" in args.sections:
        linear_gated_section(rep, copy_bw, args.quick)
    if args.sweep:
        sweep_section(rep)
    rep.line(f"Total benchmark time: {time.time() - t0:.0f} s")
    (args.outdir / "kernels.md").write_text("\n".join(rep.lines) + "\n")
    (args.outdir / "kernels.json").write_text(
        json.dumps(
            {
                "gpu": props.name,
                "torch": torch.__version__,
                "triton": triton.__version__,
                "copy_gbps": copy_bw,
                "tables": rep.rows,
            },
            indent=1,
            default=str,
        )
    )
    print(f"wrote {args.outdir / 'kernels.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
