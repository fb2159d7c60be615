"""The reports of retrieval sweeps: markdown tables, accuracy-vs-budget plots and depth heat maps, written as
``summary.md`` and PNGs, and redrawn from the ``results.jsonl`` of earlier runs."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvsieve.evaluation.outputs import read_jsonl
from kvsieve.evaluation.scoring import key_prefix

__all__ = [
    "plot_accuracy_vs_budget",
    "plot_depth_heatmap",
    "pyplot",
    "report",
    "retrieval_tables",
    "write_retrieval_report",
]


def _fmt_acc(values: list[bool]) -> str:
    return f"{100 * sum(values) / len(values):.0f}% ({sum(values)}/{len(values)})" if values else "-"


def retrieval_tables(records: list[dict[str, Any]], by_depth: bool = False) -> str:
    """Markdown: accuracy per configuration x length; with ``by_depth``, also per depth x length."""
    if not records:
        return "(no results)\n"
    lengths = sorted({r["length"] for r in records})
    labels = list(dict.fromkeys(r["compressor"] for r in records))
    cells: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        cells[r["compressor"], r["length"]].append(r)
    task = records[0]["task"]
    lines = [
        f"Accuracy ({task}, exact match) and the mean share of the prompt's KV kept per layer at the end:",
        "",
        "| compressor | " + " | ".join(f"{n} tok" for n in lengths) + " | KV kept | s/prompt |",
        "|---|" + "---|" * len(lengths) + "---|---|",
    ]
    for label in labels:
        row = [_fmt_acc([r["correct"] for r in cells[label, n]]) for n in lengths]
        rs = [r for n in lengths for r in cells[label, n]]
        kept = statistics.mean(r["kv_fraction"] for r in rs)
        secs = statistics.mean(r["seconds"] for r in rs)
        lines.append(f"| {label} | " + " | ".join(row) + f" | {100 * kept:.0f}% | {secs:.2f} |")
    lines += [
        "",
        "Partial credit: mean share of the key reproduced before the first wrong digit or word:",
        "",
        "| compressor | " + " | ".join(f"{n} tok" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for label in labels:
        row = [
            f"{100 * statistics.mean(key_prefix(r['task'], r['answer'], r['key']) for r in cells[label, n]):.0f}%"
            if cells[label, n]
            else "-"
            for n in lengths
        ]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    depths = sorted({r["depth"] for r in records})
    if by_depth and len(depths) > 1:
        lines += ["", "Accuracy per depth (rows) and length (columns):", ""]
        for label in labels:
            lines += [
                f"`{label}`",
                "",
                "| depth | " + " | ".join(f"{n}" for n in lengths) + " |",
                "|---|" + "---|" * len(lengths),
            ]
            for depth in depths:
                row = [_fmt_acc([r["correct"] for r in cells[label, n] if r["depth"] == depth]) for n in lengths]
                lines.append(f"| {depth:g} | " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_budget(records: list[dict[str, Any]], path: Path, budget_param: str) -> Path | None:
    """One panel per context length: accuracy against the budget, a line per compressor; configurations without a
    budget (the full cache) as dashed horizontal lines."""
    if not records:
        return None
    plt = pyplot()
    lengths = sorted({r["length"] for r in records})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.4), squeeze=False, sharey=True)
    for ax, length in zip(axes[0], lengths):
        rows = [r for r in records if r["length"] == length]
        by_line: dict[str, dict[Any, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            line = r["compressor_name"] if r["budget"] is not None else r["compressor"]
            by_line[line][r["budget"]].append(r["correct"])
        for line, points in by_line.items():
            if None in points:
                acc = sum(points[None]) / len(points[None])
                ax.axhline(acc, linestyle="--", color="gray", label=f"{line} ({100 * acc:.0f}%)")
                continue
            xs = sorted(points)
            ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], marker="o", label=line)
        ax.set_title(f"{rows[0]['task']}, {length} tokens")
        ax.set_xlabel(budget_param)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_depth_heatmap(records: list[dict[str, Any]], path: Path) -> Path | None:
    """A depth x length heat map of accuracy per configuration (the needle-in-a-haystack picture)."""
    depths = sorted({r["depth"] for r in records})
    lengths = sorted({r["length"] for r in records})
    if len(depths) < 2:
        return None
    plt = pyplot()
    labels = list(dict.fromkeys(r["compressor"] for r in records))
    fig, axes = plt.subplots(
        1,
        len(labels),
        figsize=(1.2 + 1.1 * len(lengths) * len(labels) + 0.8 * len(labels), 0.45 * len(depths) + 1.6),
        squeeze=False,
    )
    image = None
    for ax, label in zip(axes[0], labels):
        grid = []
        for depth in depths:
            row = []
            for length in lengths:
                hits = [
                    r["correct"]
                    for r in records
                    if r["compressor"] == label and r["depth"] == depth and r["length"] == length
                ]
                row.append(sum(hits) / len(hits) if hits else float("nan"))
            grid.append(row)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        ax.set_xlabel("prompt tokens")
        ax.set_title(label, fontsize=8)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy", shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_retrieval_report(out: Path, records: list[dict[str, Any]], budget_param: str, meta: dict[str, Any]) -> None:
    """``summary.md`` and the plots of a retrieval sweep (from records, e.g. re-read from results.jsonl)."""
    by_depth = meta.get("depths") is not None  # explicit depths: a depth x length picture
    plots = [
        p
        for p in (
            plot_accuracy_vs_budget(records, out / "accuracy_vs_budget.png", budget_param),
            plot_depth_heatmap(records, out / "depth_heatmap.png") if by_depth else None,
        )
        if p is not None
    ]
    header = (
        f"# {meta.get('task')} on {meta.get('model')}\n\n"
        f"`{meta.get('command')}`\n\n"
        f"{meta.get('started')}, {meta.get('machine')}, {meta.get('torch_threads')} torch threads, "
        f"{meta.get('seconds')} s; filler {meta.get('filler')}, template {meta.get('template')}, "
        f"seed {meta.get('seed')}, n={meta.get('n')} per cell.\n\n"
    )
    figures = "".join(f"![{p.stem}]({p.name})\n" for p in plots)
    (out / "summary.md").write_text(header + retrieval_tables(records, by_depth) + "\n" + figures)


def report(runs: Sequence[Path], out: Path) -> Path:
    """Redraw the tables and plots of one or more retrieval runs (their ``results.jsonl``) into ``out``, e.g. to
    put the 1K and 2K sweeps of one task side by side. Returns the ``summary.md`` written."""
    records = [r for run in runs for r in read_jsonl(run / "results.jsonl")]
    metas = [json.loads((run / "meta.json").read_text()) for run in runs if (run / "meta.json").is_file()]
    if not records:
        raise ValueError(f"no results in {', '.join(map(str, runs))}")
    tasks = {r["task"] for r in records}
    if len(tasks) > 1:
        raise ValueError(f"runs of different tasks cannot share a report: {', '.join(sorted(tasks))}")
    meta = dict(metas[0]) if metas else {}
    if len(metas) > 1:
        meta["command"] = "` + `".join(m["command"] for m in metas)
        meta["seconds"] = f"{sum(m.get('seconds', 0) for m in metas):.1f} (the sum over {len(metas)} runs)"
    meta["task"] = records[0]["task"]
    out.mkdir(parents=True, exist_ok=True)
    write_retrieval_report(out, records, meta.get("budget_param", "ratio"), meta)
    return out / "summary.md"
