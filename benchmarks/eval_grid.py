"""The accuracy grid of docs/accuracy.md in one command: ``kvsieve eval`` over tasks x fillers x templates x lengths,
many processes at once, kvpress's presses on the same prompts, and one table with Wilson intervals and the goals.

``run`` starts one ``kvsieve eval TASK`` per (task, filler, template), each split over ``--procs`` processes the way
``torchrun`` would split it (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``: kvsieve.evaluation.sharding; the files are the
rendezvous), all at once; on a GPU machine the processes share the GPUs round-robin, which pays for a small model
whose evaluation the host bounds. It then (with ``--kvpress-python``) runs ``benchmarks/kvpress_crosscheck.py``
over the same prompts, split over ``--kvpress-procs`` processes (``--shard``), and merges its report. ``report``
rebuilds the tables from a finished ``--out``::

    python benchmarks/eval_grid.py run --out runs/grid --procs 4 --n 16 --seed 101 --lengths 1K,2K,4K \\
        --kvpress-python /tmp/kvpress-venv/bin/python --presses snapkv,tova,streamingllm,knorm,adakv
    python benchmarks/eval_grid.py report runs/grid

``benchmarks/gpu_check.sh OUT eval-grid`` runs it on a GPU machine (see the stage for its settings).

The report (``OUT/grid.md``, ``OUT/grid.json``, every answer in ``OUT/grid_results.jsonl``): every
configuration's exact match per (task, filler, length), pooled over templates, with Wilson 95% intervals; the
best compressor at each budget; and the issue's goals per (task, filler, length): at 20% of the KV at least 90%
(or within 5 points of the full cache where the full cache itself is below 95%), at 10% at least 75%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from intervals import wilson  # benchmarks/intervals.py, beside this script

HERE = Path(__file__).resolve().parent
GOALS = {0.2: 0.90, 0.1: 0.75}  # kept share -> exact match wanted in every (task, filler, length) cell
FULL_SLACK = 0.05  # where the full cache itself misses: within this of it
NEEDLE_DEPTHS = 5  # kvsieve eval needle's default depths: 0, 0.25, 0.5, 0.75, 1


def run_dirs(out: Path, args) -> list[tuple[str, str, str, Path]]:
    return [
        (task, filler, template, out / f"{task}-{filler}-{template}")
        for task in args.tasks.split(",")
        for filler in args.fillers.split(",")
        for template in args.templates.split(",")
    ]


def launch(commands: list[tuple[list[str], dict[str, str], Path]], deadline: float | None = None) -> bool:
    """Start every command at once and wait for all; past ``deadline`` (``time.monotonic()``) stop them and return
    False (what they wrote stays). On a failure print the log's end and exit."""
    procs = []
    for argv, env, log in commands:
        log.parent.mkdir(parents=True, exist_ok=True)
        procs.append((subprocess.Popen(argv, env={**os.environ, **env}, stdout=log.open("w"),
                                       stderr=subprocess.STDOUT), log))
    while any(p.poll() is None for p, _ in procs):
        if deadline is not None and time.monotonic() > deadline:
            for p, _ in procs:
                p.kill()
            print(f"deadline reached: stopped {sum(p.wait() != 0 for p, _ in procs)} processes", flush=True)
            return False
        time.sleep(1)
    failed = [(p.returncode, log) for p, log in procs if p.returncode != 0]
    for rc, log in failed:
        print(f"--- {log} (exit {rc}):\n" + "\n".join(log.read_text().splitlines()[-25:]), file=sys.stderr)
    if failed:
        raise SystemExit(f"{len(failed)} of {len(procs)} processes failed")
    return True


def run(args) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    deadline = time.monotonic() + args.deadline if args.deadline else None  # counts the model's conversion too
    if args.model == "smollm2":  # convert the GGUF once, before the processes race to
        subprocess.run([sys.executable, "-c", "from kvsieve.models import preview; preview('smollm2')"],
                       check=True)
    commands, slot = [], 0
    for task, filler, template, run_dir in run_dirs(out, args):
        if args.resume and run_dir.is_dir():
            consolidate(run_dir)
        for rank in range(args.procs):
            # needle: n prompts at each of its 5 default depths, so ceil(n / 5) per depth makes n or more a cell
            samples = -(-args.n // NEEDLE_DEPTHS) if task == "needle" else args.n
            argv = [sys.executable, "-m", "kvsieve.cli", "eval", task, "--model", args.model, "--lengths",
                    args.lengths, "--samples", str(samples), "--seed", str(args.seed), "--filler", filler,
                    "--template", template, "--budgets", args.budgets, "--threads", "1", "--no-progress",
                    "--device", args.device, "--dtype", args.dtype, "--out", str(run_dir)]
            for spec in args.compressor:
                argv += ["--compressor", spec]
            if args.resume:
                argv.append("--resume")
            if args.fast:
                argv.append("--fast")
            env = {"RANK": str(rank), "WORLD_SIZE": str(args.procs), "LOCAL_RANK": str(slot)}
            commands.append((argv, env, out / "logs" / f"{run_dir.name}.rank{rank}.log"))
            slot += 1  # LOCAL_RANK spreads every process over the GPUs (cuda:slot % GPUs)
    print(f"kvsieve eval: {len(commands)} processes", flush=True)
    eval_deadline = deadline
    if deadline is not None and args.kvpress_python:  # leave kvpress its share of the time
        eval_deadline = time.monotonic() + (deadline - time.monotonic()) * args.eval_share
    finished = launch(commands, eval_deadline)
    print(f"kvsieve eval {'done' if finished else 'stopped'} in {time.perf_counter() - started:.0f} s", flush=True)
    left = deadline - time.monotonic() if deadline is not None else None
    if args.kvpress_python and (left is None or left > 30):
        runs = [str(d) for *_, d in run_dirs(out, args)]
        base = [args.kvpress_python, str(HERE / "kvpress_crosscheck.py"), *runs, "--presses", args.presses,
                "--ratios", args.kvpress_ratios, "--threads", "1", "--out", str(out / "kvpress")]
        if args.resume:  # each shard keeps its part's answers (the same --kvpress-procs as the run resumed)
            base.append("--resume")
        env = {"PYTHONPATH": args.kvpress_path} if args.kvpress_path else {}
        device = ["--device", "cuda"] if args.device != "cpu" and args.kvpress_cuda else []
        budget = ["--time-budget", str(int(left - 25))] if left is not None else []  # then no new runs start
        shards = [(base + device + budget + ["--shard", f"{i}/{args.kvpress_procs}"], env,
                   out / "logs" / f"kvpress.part{i}.log") for i in range(args.kvpress_procs)]
        t0 = time.perf_counter()
        launch(shards)
        launch([(base + ["--report-only"], env, out / "logs" / "kvpress.report.log")])
        print(f"kvpress done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(report(out))


def size(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def method_of(record: dict) -> str:
    """The configuration without its budget: ``fastkv`` with ``{"selection": "span", "ratio": 0.2}`` is
    ``fastkv(selection=span)``."""
    params = {k: v for k, v in record.get("params", {}).items() if k not in ("ratio", "budget")}
    inner = ", ".join(f"{k}={v}" for k, v in params.items())
    return record["compressor_name"] + (f"({inner})" if inner else "")


def run_records(run_dir: Path) -> list[dict]:
    """A run's records: its merged ``results.jsonl`` and the rank parts of a run that stopped before merging
    (a resumed run's parts repeat the records it kept), one record per (prompt, configuration)."""
    paths = [run_dir / "results.jsonl"] if (run_dir / "results.jsonl").is_file() else []
    records, seen = [], set()
    for path in paths + sorted(run_dir.glob("results.rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line) if line.strip() else None
            if record is not None and (record["prompt_id"], record["compressor"]) not in seen:
                seen.add((record["prompt_id"], record["compressor"]))
                records.append(record)
    return records


def consolidate(run_dir: Path) -> None:
    """Before a resumed run under several processes (which reads ``results.jsonl`` only): every record the run
    directory holds goes into ``results.jsonl``; the parts and done markers are removed."""
    records = run_records(run_dir)
    if records:
        (run_dir / "results.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    for path in [*run_dir.glob("results.rank*.jsonl"), *run_dir.glob(".rank*.done")]:
        path.unlink()


def report(out: Path) -> str:
    records = []
    for run_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        records += run_records(run_dir)
    (out / "grid_results.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    if not records:
        raise SystemExit(f"no results under {out}/*/results*.jsonl")
    cells: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        for key in ((r["task"], r["filler"], r["length"]), ("all", "all", r["length"]), ("all", "all", 0)):
            c = cells[(method_of(r), r["budget"]) + key]
            c[0] += bool(r["correct"])
            c[1] += 1
    configs = sorted({k[:2] for k in cells}, key=lambda k: (k[1] is not None, k[1] or 0, k[0]))
    places = sorted({k[2:] for k in cells if k[2] != "all"}) + sorted({k[2:] for k in cells if k[2] == "all"},
                                                                         key=lambda k: -k[2] if k[2] else 0)
    full = {k[2:]: v for k, v in cells.items() if k[0] == "none"}

    def shown(k: int, n: int) -> str:
        lo, hi = wilson(k, n)
        return f"{k}/{n} {k / n:.0%} [{lo:.0%}-{hi:.0%}]"

    prompts = len({(r["prompt_id"], r["template"]) for r in records})
    lines = [f"# Accuracy grid ({len(records)} answers, {prompts} prompts)", "",
             "Exact match per (task, filler, length), pooled over templates; Wilson 95% intervals.", ""]
    place_names = ["all lengths" if p[2] == 0 else ("all" if p[0] == "all" else f"{p[0]} {p[1]}") +
                   (f" {size(p[2])}" if p[2] else "") for p in places]
    lines += ["| config | budget | " + " | ".join(place_names) + " |", "|---|---|" + "---|" * len(places)]
    for method, budget in configs:
        row = [shown(*cells[(method, budget) + p]) if cells[(method, budget) + p][1] else "" for p in places]
        lines.append(f"| {method} | {budget if budget is not None else 'full'} | " + " | ".join(row) + " |")
    verdict: dict = {}
    for budget, goal in GOALS.items():
        ranked = sorted(((cells[(m, b, "all", "all", 0)][0], m) for m, b in configs if b == budget), reverse=True)
        if not ranked:
            continue
        best = ranked[0][1]
        overall = shown(*cells[(best, budget, "all", "all", 0)])
        lines += ["", f"## Goal at {budget:.0%} of the KV: best is {best} ({overall})",
                  "", "| cell | full cache | " + best + " | wanted | met |", "|---|---|---|---|---|"]
        checks = []
        for p in places:
            if p[0] == "all":
                continue
            k, n = cells[(best, budget) + p]
            fk, fn = full.get(p, (0, 0))
            wanted = goal if not fn or fk / fn >= 0.95 else max(0.0, min(goal, fk / fn - FULL_SLACK))
            met = n > 0 and k / n >= wanted - 1e-9
            checks.append(met)
            lines.append(f"| {p[0]} {p[1]} {size(p[2])} | {shown(fk, fn) if fn else '-'} | {shown(k, n)} | "
                         f"{wanted:.0%} | {'yes' if met else 'NO'} |")
        verdict[str(budget)] = {"best": best, "cells_met": sum(checks), "cells": len(checks)}
        lines.append(f"\n{sum(checks)} of {len(checks)} cells meet the goal.")
    kvpress_table = out / "kvpress" / "kvpress_table.md"
    if kvpress_table.is_file():
        lines += ["", f"kvpress on the same prompts: {kvpress_table.relative_to(out)}"]
    text = "\n".join(lines)
    (out / "grid.md").write_text(text + "\n")
    summary = {f"{m}|{b}|{'/'.join(map(str, p))}": cells[(m, b) + p] for m, b in configs for p in places}
    (out / "grid.json").write_text(json.dumps({"cells": summary, "goals": verdict}, indent=1) + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the grid (and kvpress), then report")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tasks", default="passkey,needle")
    p.add_argument("--fillers", default="essays,noise")
    p.add_argument("--templates", default="chat,plain")
    p.add_argument("--lengths", default="1K,2K,4K")
    p.add_argument("--n", type=int, default=16, help="prompts per (task, filler, template, length), at least")
    p.add_argument("--seed", type=int, default=101)
    p.add_argument("--compressor", action="append", default=[], help="as kvsieve eval's (default: its default)")
    p.add_argument("--budgets", default="0.1,0.2,0.5")
    p.add_argument("--procs", type=int, default=2, help="processes per (task, filler, template)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kvpress-python", default=None, help="a python that imports kvpress (else no kvpress)")
    p.add_argument("--kvpress-path", default=None, help="PYTHONPATH for it (where kvpress and its transformers are)")
    p.add_argument("--kvpress-cuda", action="store_true", help="run kvpress on the GPUs too")
    p.add_argument("--kvpress-procs", type=int, default=2)
    p.add_argument("--presses", default="snapkv,tova,streamingllm,knorm,expected_attention,adakv")
    p.add_argument("--kvpress-ratios", default="0.1,0.2,0.5")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds for the whole run: the eval stops then, kvpress gets what is left; the report counts "
                   "what finished")
    p.add_argument("--fast", action="store_true", help="kvsieve eval --fast: answers through the fast path")
    p.add_argument("--resume", action="store_true",
                   help="keep the answers --out already holds (e.g. a run stopped by its deadline) and run the rest "
                   "(kvpress too, with the same --kvpress-procs)")
    p.add_argument("--eval-share", type=float, default=0.6,
                   help="with --deadline and kvpress: the share of the deadline kvsieve's eval may use")
    p = sub.add_parser("report", help="rebuild OUT/grid.md from OUT/*/results.jsonl")
    p.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        print(report(args.out))


if __name__ == "__main__":
    main()
