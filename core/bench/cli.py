"""``kvsieve bench {decode,prefill,report}``: the argument parser and :func:`run`.

Compressors are given as specs (``--compressor none,rpc:interval=4096,ratio=0.25``, :mod:`kvsieve.params`), sizes as
whole numbers or with a K/M suffix (``--contexts 8K,32K``); :data:`DEFAULTS` holds every default.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from kvsieve.bench.decode import bench_decode
from kvsieve.bench.hf_static import HF_STATIC_VARIANTS
from kvsieve.bench.prefill import bench_prefill, prefill_ratios
from kvsieve.bench.report import environment, rerender, write_report
from kvsieve.cli_types import comma_list, compressor_specs, size, sizes
from kvsieve.evaluation.sharding import Shard, Share
from kvsieve.integration import resolve_compressor
from kvsieve.params import parse_compressor_specs

__all__ = ["register", "run"]


#: Per subcommand, every default of its arguments: the one place to change them. Compressors are specs
#: (``NAME[:key=value,...]``, kvsieve.params) in the compressors' own parameter vocabulary.
DEFAULTS: dict[str, dict[str, Any]] = {
    "decode": dict(
        model="r1-qwen-7b",
        compressors=["none", "rpc:interval=4096,window=32,ratio=0.25"],
        batches=[8, 16, 32],
        new_tokens=[8192, 16384, 32768],
        prompt_len=128,
        samples=6,
        steps=16,
        hf_static=["sdpa"],  # on CUDA; none on the CPU, where HF's generate does not compile
    ),
    "prefill": dict(
        model="llama-3.1-8b",
        compressors=["none", "snapkv:ratio=0.1,window=8,scoring.pooling=max", "fastkv:tsp_rate=0.2,ratio=0.1"],
        contexts=[8192, 32768, 131072],
        new_tokens=256,
    ),
}

_VALIDATE = "BATCH:TOKENS pairs such as 32:8K (8K = 8192)"
_HF_STATIC = f"HF static-cache settings ({', '.join(HF_STATIC_VARIANTS)})"


def _hf_static_variant(text: str) -> str:
    if text not in HF_STATIC_VARIANTS:
        raise ValueError(f"unknown HF static-cache setting {text!r}")
    return text


def _batch_and_tokens(text: str) -> tuple[int, int]:
    """``"32:8K"`` -> ``(32, 8192)``."""
    batch, sep, tokens = text.partition(":")
    if not sep:
        raise ValueError(f"expected BATCH:TOKENS, got {text!r}")
    return size(batch), size(tokens)


def _shown(values: list[Any]) -> str:
    return ",".join(map(str, values))


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``kvsieve bench {decode,prefill,report}`` to the CLI; every parser sets ``func=run``."""
    parser = subparsers.add_parser("bench", help="speed and memory benchmarks on random-weight paper-shaped models")
    sub = parser.add_subparsers(dest="bench", required=True)

    def common(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
        model = defaults["model"]
        p.add_argument("--model", default=model,
                       help=f"a paper shape (random weights on the GPU) or a kvsieve model name (default {model})")
        p.add_argument("--compressor", type=compressor_specs, action="extend", metavar="NAME[:KEY=VALUE,...]",
                       help="compressor specs, a comma list and repeatable: snapkv:ratio=0.1,window=8,fastkv runs "
                       f"snapkv with two parameters and fastkv (default {_shown(defaults['compressors'])})")
        p.add_argument("--backend", default="auto", help="kernel backend (default auto)")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda")
        p.add_argument("--no-hf", action="store_true", help="skip HF's eager baseline rows")
        p.add_argument("--no-graph", action="store_true", help="decode without CUDA graphs")
        p.add_argument("--out", type=Path, required=True, help="output directory")
        p.set_defaults(func=run)

    d = DEFAULTS["decode"]
    p = sub.add_parser("decode", help="decode tokens/s and peak memory: RPC vs full cache")
    common(p, d)
    p.add_argument("--batches", type=sizes, default=d["batches"], help=f"batch sizes (default {_shown(d['batches'])})")
    p.add_argument("--new-tokens", type=sizes, default=d["new_tokens"],
                   help=f"generated tokens per run, e.g. 8K,32K (default {_shown(d['new_tokens'])})")
    p.add_argument("--prompt-len", type=size, default=d["prompt_len"],
                   help=f"prompt tokens (default {d['prompt_len']})")
    p.add_argument("--samples", type=int, default=d["samples"],
                   help=f"cache lengths at which step time is measured (default {d['samples']})")
    p.add_argument("--steps", type=int, default=d["steps"], help=f"steps timed per cache length (default {d['steps']})")
    p.add_argument("--validate", type=comma_list(_batch_and_tokens, _VALIDATE), default=[],
                   help=f"configurations also run for real: {_VALIDATE}")
    p.add_argument("--no-fast", action="store_true", help="only HF's baseline rows")
    hf_static = p.add_mutually_exclusive_group()
    hf_static.add_argument("--hf-static", type=comma_list(_hf_static_variant, _HF_STATIC), metavar="SETTING,...",
                           help="also time HF's static cache (max_cache_len = the run's length) with these settings: "
                           + "; ".join(f"{v.name} = {v.help}" for v in HF_STATIC_VARIANTS.values())
                           + f" (default on CUDA: {_shown(d['hf_static'])}, unless --no-hf; none on the CPU)")
    hf_static.add_argument("--no-hf-static", action="store_true", help="skip HF's static-cache rows")
    d = DEFAULTS["prefill"]
    p = sub.add_parser("prefill", help="TTFT and decode after prefill: FastKV vs SnapKV vs full")
    common(p, d)
    p.add_argument("--contexts", type=sizes, default=d["contexts"],
                   help=f"prompt tokens, e.g. 8K,32K (default {_shown(d['contexts'])})")
    p.add_argument("--new-tokens", type=size, default=d["new_tokens"],
                   help=f"decode steps timed after the prefill (default {d['new_tokens']})")
    p = sub.add_parser("report", help="re-render OUT/<which>.md and plots from OUT/<which>.jsonl")
    p.add_argument("out", type=Path)
    p.set_defaults(func=run)
    return parser


def _compressors(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """``(name, params)`` per ``--compressor`` spec (the defaults when none is given), each built once so that an
    unknown name or parameter fails before a model is loaded."""
    specs = args.compressor or parse_compressor_specs(DEFAULTS[args.bench]["compressors"])
    for spec in specs:
        try:
            resolve_compressor(spec.name, spec.params)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--compressor {spec}: {exc}") from exc
    return [(spec.name, spec.params) for spec in specs]


def _hf_static_settings(args: argparse.Namespace, cuda: bool) -> list[str]:
    """The HF static-cache settings to time: ``--hf-static``'s, else the default on CUDA unless ``--no-hf`` or
    ``--no-hf-static`` (none on the CPU, where HF's generate does not compile)."""
    if args.hf_static is not None:
        return args.hf_static
    if args.no_hf_static or args.no_hf or not cuda:
        return []
    return list(DEFAULTS["decode"]["hf_static"])


def _load_model(name: str, device: str):
    from kvsieve import models

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # this process's GPU (a data-parallel run): graphs, clocks and peaks on it
    if name in models.PAPER_SHAPES:
        if not device.startswith("cuda"):
            raise ValueError(f"--model {name}: paper-shaped models are built on a CUDA GPU; none is available "
                             "(use a small model such as tiny-random-qwen2 on the CPU)")
        return models.random_paper_model(name, device=device)
    model, _ = models.load(name)
    return model.to(device).eval()


def run(args: argparse.Namespace) -> int:
    """Run the parsed ``kvsieve bench`` subcommand: write ``OUT/<which>.jsonl`` and the report, print the report."""
    if args.bench == "report":
        for path in rerender(args.out):
            print(path)
        return 0
    minimum = dict(samples=2, steps=4) if args.bench == "decode" else dict(new_tokens=8)
    for name, least in minimum.items():
        if getattr(args, name) < least:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be at least {least}")
    compressors = _compressors(args)
    shard = Shard.from_environment()  # under torchrun: this process's share of the rows (kvsieve.evaluation.sharding)
    share = Share(shard)
    device = shard.device(args.device)
    shared = shard.gpus_shared() if device.startswith("cuda") or device == "auto" else None
    if shared is not None and shard.rank == 0:
        warnings.warn(f"{shard.local_world or shard.world} processes share {shared} GPU(s): the timings of rows "
                      "measured at once on one GPU are not comparable (give each process its own GPU)", stacklevel=1)
    model = _load_model(args.model, device)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = environment() | dict(model=args.model, command=f"kvsieve bench {args.bench}")
    if shard.sharded:
        meta.update(processes=shard.world, gpus_shared=shared is not None)
    graph = False if args.no_graph else None
    name = f"{args.bench}.jsonl"
    part = share.start(args.out, name) if shard.sharded else None
    partial = shard.part(args.out, f"{args.bench}.partial.jsonl")  # rows as they come (a run cut short keeps them)
    partial.write_text(json.dumps(meta) + "\n")

    def log(line: str) -> None:
        print(line, flush=True)
        with partial.open("a") as f:
            f.write(line + "\n")

    if args.bench == "decode":
        hf_static = _hf_static_settings(args, cuda=next(model.parameters()).device.type == "cuda")
        rows = bench_decode(model, args.model, args.batches, args.new_tokens, compressors, backend=args.backend,
                            prompt_len=args.prompt_len, samples=args.samples, steps=args.steps,
                            hf_eager=not args.no_hf, hf_static=hf_static, fast=not args.no_fast, validate=args.validate,
                            use_cuda_graph=graph, log=log, share=share)
    else:
        rows = bench_prefill(model, args.model, args.contexts, compressors, backend=args.backend,
                             new_tokens=args.new_tokens, hf_eager=not args.no_hf, use_cuda_graph=graph, log=log,
                             share=share)
    if part is not None:
        part.write_text("".join(json.dumps(r) + "\n" for r in rows))
    partial.unlink()
    rows = share.finish(args.out, name, write=False)
    if rows is None:
        print(f"rank {shard.rank} of {shard.world}: done; rank 0 merges the rows into {args.out / name}")
        return 0
    if args.bench == "prefill" and shard.sharded:
        prefill_ratios(rows)  # against the full-cache and HF rows, which other processes may have measured
    (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in [meta, *rows]))
    print(write_report(args.out, args.bench, rows, meta).read_text())
    return 0
