"""The benchmarks' outputs: ``OUT/<which>.md`` (the environment, a table of the rows, the goals) and PNG plots."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from kvsieve.bench.paper import decode_goals, prefill_goals

__all__ = ["environment", "rerender", "write_report"]

_DECODE_COLUMNS = ["model", "batch", "new_tokens", "run", "backend", "tokens_per_s", "paper_tokens_per_s",
                   "vs_fast_full", "seconds", "compressions", "compression_s", "step_ms_first", "step_ms_last",
                   "floor_ratio_last", "live_max", "peak_gib", "formula_gib", "paper_peak_gb", "validated_tokens_per_s",
                   "modelled_over_measured", "capacity", "compiled", "cuda_graphs", "compile_s", "graph_breaks",
                   "error"]
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


def rerender(out: Path) -> list[Path]:
    """Re-render ``OUT/<which>.md`` and the plots from each ``OUT/<which>.jsonl`` there (``which`` = decode,
    prefill; the first line is the run's metadata). Returns the markdown files written."""
    written = []
    for which in ("decode", "prefill"):
        path = out / f"{which}.jsonl"
        if path.exists():
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            meta, rows = lines[0], lines[1:]
            written.append(write_report(out, which, rows, meta))
    return written


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


