"""Chunk selection against top-k on the passkey task: tables with Wilson intervals and paired sign tests, and the
CPU time of one ``select()`` call (docs/policies/chunk.md).

    python benchmarks/chunk_passkey.py report RUN [RUN ...]     # RUN: a `kvsieve eval passkey --out` directory,
                                                                #      or a results .jsonl file
    python benchmarks/chunk_passkey.py timing                   # topk vs chunk select(), 1 CPU thread

``report`` prints, per (selection, scoring.aggregation, ratio), the exact-match count of each run (filler, seed,
length), the pooled count with its Wilson 95% interval and the pooled partial credit; then paired comparisons on
the same prompts (how many only one of two selections retrieves, and an exact two-sided sign test on those).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from kvsieve.evaluation.scoring import key_prefix


def _load_intervals():
    # shared with kvpress_crosscheck.py, which runs without kvsieve installed: loaded by path
    spec = importlib.util.spec_from_file_location("kvsieve_bench_intervals", Path(__file__).with_name("intervals.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wilson = _load_intervals().wilson


def sign_test(a: int, b: int) -> float:
    """Exact two-sided sign test of ``a`` against ``b`` discordant pairs."""
    n = a + b
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2**n) if n else 1.0


def selection_of(record: dict) -> tuple[str, str, str]:
    """``(selection, scoring.aggregation, ratio)`` of a record: ``("chunk16/max", "group", "0.2")``."""
    if record["compressor_name"] == "none":
        return "none", "-", "-"
    params = record["params"]
    name = params.get("selection", "topk")
    if name == "chunk":
        size = params["selection.size"] if "selection.size" in params else record["resolved"]["selection"]["size"]
        name = f"chunk{size}" + ("/max" if params.get("selection.aggregation") == "max" else "")
    return name, params.get("scoring.aggregation", "group"), str(params.get("ratio"))


def _order(selection: str) -> tuple:
    """topk first, then chunk selections by size, sum before max."""
    if not selection.startswith("chunk"):
        return (0, 0, selection)
    size, _, aggregation = selection[len("chunk") :].partition("/")
    return (1, int(size), aggregation)


def load(paths: list[str]) -> list[dict]:
    records = []
    for path in map(Path, paths):
        with open(path / "results.jsonl" if path.is_dir() else path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def report(records: list[dict]) -> str:
    cells, runs = defaultdict(list), []
    for r in records:
        run = f"{r['filler']} s{r['seed']} {r['length']}"
        runs += [run] if run not in runs else []
        cells[selection_of(r), run].append(r)
    labels = sorted({label for label, _ in cells}, key=lambda x: (x[0] != "none", x[2], x[1], _order(x[0])))
    lines = [
        "| selection | scoring.aggregation | ratio | " + " | ".join(runs) + " | pooled | Wilson 95% | partial credit |",
        "|---|---|---|" + "---|" * (len(runs) + 3),
    ]
    for label in labels:
        row, k_all, n_all, partial = [], 0, 0, []
        for run in runs:
            rs = cells.get((label, run), [])
            k = sum(r["correct"] for r in rs)
            k_all, n_all = k_all + k, n_all + len(rs)
            partial += [key_prefix("passkey", r["answer"], r["key"]) for r in rs]
            row.append(f"{k}/{len(rs)}" if rs else "")
        lo, hi = wilson(k_all, n_all)
        lines.append(
            f"| {' | '.join(label)} | "
            + " | ".join(row)
            + f" | **{k_all}/{n_all}** | {lo:.0%}-{hi:.0%} | {statistics.mean(partial):.0%} |"
        )
    lines += [
        "",
        "| A | B | scoring.aggregation | paired prompts | only A right | only B right | sign test p |",
        "|---|---|---|---|---|---|---|",
    ]
    correct = {(r["prompt_id"], *selection_of(r)[1:], selection_of(r)[0]): r["correct"] for r in records}
    names = sorted({key[-1] for key in correct} - {"none", "topk"}, key=_order)
    pairs = [(a, "topk") for a in names]  # every chunk selection against top-k
    pairs += [(a, b) for a in names for b in names if _order(a) > _order(b) and "/" not in a + b]  # sizes, sum
    pairs += [(a, a.split("/")[0]) for a in names if "/" in a]  # max against sum, same size
    for a, b in pairs:
        for scoring in ("group", "all", "both"):
            keys = [k[:-1] for k in correct if k[-1] == a and scoring in ("both", k[1]) and (*k[:-1], b) in correct]
            only_a = sum(correct[(*k, a)] and not correct[(*k, b)] for k in keys)
            only_b = sum(correct[(*k, b)] and not correct[(*k, a)] for k in keys)
            if keys:
                lines.append(
                    f"| {a} | {b} | {scoring} | {len(keys)} | {only_a} | {only_b} | {sign_test(only_a, only_b):.3f} |"
                )
    return "\n".join(lines)


def timing() -> str:
    import torch

    from kvsieve.policies.chunk import ChunkSelection
    from kvsieve.policies.topk import TopKSelection

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    policies = {"topk": TopKSelection(), "chunk sum": ChunkSelection(), "chunk max": ChunkSelection(aggregation="max")}
    lines = [
        "| B, Hkv, N | budget | " + " | ".join(f"{name} ms" for name in policies) + " | chunk sum / topk |",
        "|---|---|" + "---|" * (len(policies) + 1),
    ]
    for B, H, N in [(1, 3, 1024), (1, 3, 2048), (4, 8, 8192), (1, 8, 32768)]:
        scores, counts, budget = torch.rand(B, H, N, generator=gen), torch.full((B, H), N), N // 5
        ms = {}
        for name, policy in policies.items():
            policy.select(scores, counts, budget, 0, 32)  # warm-up
            reps = []
            for _ in range(15):
                start = time.perf_counter()
                policy.select(scores, counts, budget, 0, 32)
                reps.append(time.perf_counter() - start)
            ms[name] = statistics.median(reps) * 1e3
        lines.append(
            f"| {B}, {H}, {N} | {budget} | "
            + " | ".join(f"{v:.2f}" for v in ms.values())
            + f" | {ms['chunk sum'] / ms['topk']:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("report").add_argument("runs", nargs="+")
    sub.add_parser("timing")
    args = parser.parse_args(argv)
    print(report(load(args.runs)) if args.command == "report" else timing())


if __name__ == "__main__":
    main(sys.argv[1:])
