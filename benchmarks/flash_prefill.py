"""Prefill time-to-first-token of the ``flash`` backend vs the ``torch`` backend vs plain HF SDPA (GPU only).

Usage::

    python benchmarks/flash_prefill.py OUTDIR [--length 32768] [--iters 3] [--warmup 1]

A random-weight Llama-3.1-8B-shaped model (32 layers, 32 heads, 8 KV heads, head dim 128, hidden 4096,
intermediate 14336, vocab 128256; ``kvsieve.models.random_paper_model("llama-3.1-8b")``, bf16, built directly
on the GPU) runs one forward over a random prompt of ``--length`` tokens (batch 1, ``use_cache=True``,
``logits_to_keep=1`` so no ``L x vocab`` logits tensor is made), side by side in one process:

* ``HF sdpa``: the model as loaded (transformers' SDPA attention, DynamicCache);
* ``kvsieve flash``: ``kvsieve.integration.apply(model, "none", backend="flash")`` (SieveCache, full cache);
  a prompt without padding runs SDPA's dispatcher (cuDNN attention on Hopper) by default;
* ``kvsieve flash, FA2 dense``: the same with ``FlashBackend(dense_prefill="flash")``: FlashAttention-2 for
  every prefill;
* ``kvsieve torch``: the same with the torch reference backend. It materialises masks and runs softmax in
  fp32; one layer's attention is probed first and the forward is skipped (reported as such) when that OOMs
  or when 32 layers of it would take longer than ``--torch-budget`` seconds.

Times are CUDA-event times of the whole forward (warm-up runs first), median and min over ``--iters``; peak
memory is ``torch.cuda.max_memory_allocated`` during the timed runs. Writes ``OUTDIR/flash_prefill.md`` and
prints it. About 1-2 minutes on an H200 at 32K.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", type=Path, help="directory for flash_prefill.md (created)")
    p.add_argument("--length", type=int, default=32768, help="prompt tokens (default 32768)")
    p.add_argument("--iters", type=int, default=3, help="timed runs per variant (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first (default 1)")
    p.add_argument(
        "--torch-budget",
        type=float,
        default=60.0,
        help="skip the torch backend when its estimated forward takes longer (seconds, default 60)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "flash_prefill.py needs a CUDA GPU (FlashAttention kernels); none is available here.",
            file=sys.stderr,
        )
        return 2

    import kvsieve
    from kvsieve import integration, models
    from kvsieve.backends.flash import FlashBackend
    from kvsieve.backends.torch_ref import TorchBackend

    ok, flavour = FlashBackend().available()
    if not ok:
        print(f"the flash backend is not available here: {flavour}", file=sys.stderr)
        return 2

    args.outdir.mkdir(parents=True, exist_ok=True)
    L = args.length
    t0 = time.perf_counter()
    model = models.random_paper_model("llama-3.1-8b", dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    cfg = model.config
    print(f"model built in {build_s:.1f} s; flash flavour: {flavour}", flush=True)

    gen = torch.Generator(device="cuda").manual_seed(0)
    input_ids = torch.randint(10, cfg.vocab_size - 10, (1, L), device="cuda", generator=gen)
    fwd_kwargs = dict(use_cache=True)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        fwd_kwargs["logits_to_keep"] = 1

    def forward():
        return model(input_ids, **fwd_kwargs).logits[:, -1].float()

    def timed(label: str) -> dict:
        for _ in range(args.warmup):
            forward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times, logits = [], None
        for _ in range(args.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            logits = forward()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        row = dict(
            variant=label,
            median=statistics.median(times),
            min=min(times),
            peak=torch.cuda.max_memory_allocated() / 2**30,
            logits=logits,
            note="",
        )
        print(
            f"{label}: median {row['median']:.1f} ms, min {row['min']:.1f} ms, peak {row['peak']:.1f} GiB",
            flush=True,
        )
        return row

    rows = []
    with torch.inference_mode():
        rows.append(timed("HF sdpa"))
        with integration.apply(model, "none", backend="flash") as engine:
            assert engine.backend.name == "flash"
            rows.append(timed("kvsieve flash"))
        # FlashAttention-2 also for the dense prefill (default: SDPA's dispatcher, cuDNN on Hopper)
        with integration.apply(model, "none", backend=FlashBackend(dense_prefill="flash")):
            rows.append(timed("kvsieve flash, FA2 dense"))

        # the torch reference: probe one layer's attention first
        H, Hkv, d = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.hidden_size // cfg.num_attention_heads,
        )
        note, run_torch = "", True
        try:
            q = torch.randn(1, H, L, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, Hkv, L, d, device="cuda", dtype=torch.bfloat16)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            TorchBackend().prefill_attention(q, k, k, None, d**-0.5)
            torch.cuda.synchronize()
            layer_s = time.perf_counter() - t0
            estimate = layer_s * cfg.num_hidden_layers
            if estimate > args.torch_budget:
                run_torch = False
                note = f"skipped: one layer's attention took {layer_s:.1f} s (~{estimate:.0f} s per forward)"
        except torch.cuda.OutOfMemoryError as exc:
            run_torch = False
            note = f"OOM in one layer's attention at {L} tokens ({str(exc).splitlines()[0][:120]})"
        finally:
            q = k = None
            torch.cuda.empty_cache()
        if run_torch:
            try:
                with integration.apply(model, "none", backend="torch"):
                    saved = args.warmup
                    args.warmup = 0  # the other variants warmed the process up; this one is slow
                    rows.append(timed("kvsieve torch"))
                    args.warmup = saved
            except torch.cuda.OutOfMemoryError as exc:
                note = f"OOM in the forward at {L} tokens ({str(exc).splitlines()[0][:120]})"
                run_torch = False
            torch.cuda.empty_cache()
        if not run_torch:
            rows.append(
                dict(variant="kvsieve torch", median=None, min=None, peak=None, logits=None, note=note)
            )
            print(f"kvsieve torch: {note}", flush=True)

    base = rows[0]
    for row in rows[1:]:
        if row["logits"] is not None:
            diff = (row["logits"] - base["logits"]).abs().max().item()
            row["note"] = (
                row["note"] + "; " if row["note"] else ""
            ) + f"max |last logits - sdpa| = {diff:.3g}"

    gpu = torch.cuda.get_device_name()
    lines = [
        f"# Prefill TTFT at {L} tokens: flash backend vs torch backend vs HF SDPA",
        "",
        f"Random-weight Llama-3.1-8B shapes (32 layers, 32 heads / 8 KV heads, d=128), bf16, batch 1, "
        f"one forward with use_cache=True{', logits_to_keep=1' if 'logits_to_keep' in fwd_kwargs else ''}. "
        f"{gpu}; torch {torch.__version__}; transformers {__import__('transformers').__version__}; "
        f"kvsieve {getattr(kvsieve, '__version__', '?')}. Flash flavour: {flavour}. "
        f"CUDA-event time of the forward, {args.warmup} warm-up + {args.iters} timed runs "
        f"(the torch backend: no warm-up). Model built in {build_s:.1f} s.",
        "",
        "| variant | median ms | min ms | tokens/s | vs HF sdpa | peak GiB | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if row["median"] is None:
            lines.append(f"| {row['variant']} | - | - | - | - | - | {row['note']} |")
            continue
        speed = base["median"] / row["median"]
        lines.append(
            f"| {row['variant']} | {row['median']:.1f} | {row['min']:.1f} | {L / row['median'] * 1e3:,.0f} | "
            f"{speed:.2f}x | {row['peak']:.1f} | {row['note']} |"
        )
    text = "\n".join(lines) + "\n"
    (args.outdir / "flash_prefill.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
