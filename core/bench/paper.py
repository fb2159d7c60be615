"""The papers' reference numbers and the goals the benchmarks are checked against (docs/benchmarks.md)."""

from __future__ import annotations

from typing import Any

__all__ = [
    "GOAL_FASTKV_DECODE",
    "GOAL_FASTKV_TTFT",
    "GOAL_FLOOR",
    "GOAL_RPC_OVER_FULL",
    "GOAL_RPC_TOKENS_PER_S",
    "PAPER_DECODE_TOKENS_PER_S",
    "PAPER_PEAK_GB",
    "decode_goals",
    "paper_columns",
    "prefill_goals",
]

#: RPC paper, decode throughput in tokens/s (the paper's setting: synthetic 128-token prompt, greedy, fixed output
#: length, most likely batch 32; their GPU, not an H200). ``None``: out of memory in the paper.
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


def paper_columns(model_name: str, name: str, n: int) -> dict[str, Any]:
    """The paper's tokens/s (``"OOM"`` where it ran out of memory) and peak GB for a decode row, where it has them."""
    paper = PAPER_DECODE_TOKENS_PER_S.get((model_name, name), {})
    out: dict[str, Any] = {}
    if n in paper:
        out["paper_tokens_per_s"] = paper[n] if paper[n] is not None else "OOM"
    if (model_name, name, n) in PAPER_PEAK_GB:
        out["paper_peak_gb"] = PAPER_PEAK_GB[model_name, name, n]
    return out


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


