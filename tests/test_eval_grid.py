"""``benchmarks/eval_grid.py``'s bookkeeping (no model runs): a run directory's records are its merged results and
the rank parts of a run stopped before merging, one per (prompt, configuration); ``consolidate`` prepares a stopped
run for ``--resume`` under several processes; the report counts each answer once and checks the goals. And
``benchmarks/kvpress_crosscheck.py``'s reading of kvsieve's answers (its variants apart, SnapKV's kernel found)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import eval_grid  # noqa: E402  (benchmarks/eval_grid.py, beside its intervals.py)
import kvpress_crosscheck  # noqa: E402  (never imports kvpress at import time)


def record(prompt: str, compressor: str, correct: bool, budget=None) -> dict:
    name = compressor.split("(")[0]
    return {"prompt_id": prompt, "compressor": compressor, "compressor_name": name, "correct": correct,
            "budget": budget, "params": {} if budget is None else {"ratio": budget}, "task": "passkey",
            "filler": "noise", "template": "chat", "length": 1024}


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def stopped_run(tmp_path: Path) -> Path:
    """A run resumed once and stopped again: its merged results, and rank parts that repeat kept records."""
    run = tmp_path / "grid" / "passkey-noise-chat"
    run.mkdir(parents=True)
    write(run / "results.jsonl", [record("p0", "none", True), record("p0", "snapkv(ratio=0.2)", False, 0.2)])
    write(run / "results.rank0.jsonl", [record("p0", "none", True), record("p1", "none", True)])
    write(run / "results.rank1.jsonl", [record("p1", "snapkv(ratio=0.2)", True, 0.2)])
    (run / ".rank0.done").write_text("{}\n")
    return run


def test_run_records_count_each_answer_once(tmp_path):
    run = stopped_run(tmp_path)
    keys = [(r["prompt_id"], r["compressor"]) for r in eval_grid.run_records(run)]
    assert sorted(keys) == [("p0", "none"), ("p0", "snapkv(ratio=0.2)"), ("p1", "none"), ("p1", "snapkv(ratio=0.2)")]


def test_consolidate_leaves_one_results_file_with_every_answer(tmp_path):
    run = stopped_run(tmp_path)
    before = eval_grid.run_records(run)
    eval_grid.consolidate(run)
    assert sorted(p.name for p in run.iterdir()) == ["results.jsonl"]
    assert eval_grid.run_records(run) == before


def test_report_pools_the_answers_and_checks_the_goal(tmp_path):
    stopped_run(tmp_path)
    text = eval_grid.report(tmp_path / "grid")
    assert "# Accuracy grid (4 answers, 2 prompts)" in text
    assert "| none | full | 2/2 100%" in text and "| snapkv | 0.2 | 1/2 50%" in text
    assert "| passkey noise 1K |" in text and "| NO |" in text  # 50% at 20% of the KV misses the 90% goal
    assert len((tmp_path / "grid" / "grid_results.jsonl").read_text().splitlines()) == 4


# ---------------------------------------------------------------------------------------------- kvpress cross-check


def kvsieve_record(prompt: str, name: str, params: dict, resolved: dict, correct: bool) -> dict:
    return {"prompt_id": prompt, "compressor_name": name, "params": params, "resolved": resolved, "correct": correct}


def test_the_cross_check_keeps_kvsieve_variants_apart_and_reads_snapkv_kernels_where_they_are(tmp_path):
    snapkv = {"window": 32, "scoring": {"kernel": 7, "pooling": "avg"}}  # the kernel under the scoring policy
    write(tmp_path / "results.jsonl", [
        kvsieve_record("p0", "fastkv", {"ratio": 0.2}, {}, False),
        kvsieve_record("p0", "fastkv", {"ratio": 0.2, "selection": "span"}, {}, True),
        kvsieve_record("p0", "snapkv", {"ratio": 0.2}, snapkv, True),
        kvsieve_record("p0", "snapkv", {"ratio": 0.2}, {"window": 32, "kernel": 5}, True) | {"prompt_id": "p1"},
        kvsieve_record("p0", "none", {}, {}, True),
    ])
    ours = kvpress_crosscheck.kvsieve_results(tmp_path, window=32, kernel=7)
    assert ours == {("p0", "fastkv", 0.2): False, ("p0", "fastkv(selection=span)", 0.2): True,
                    ("p0", "snapkv", 0.2): True, ("p0", "none", None): True}  # p1's snapkv used another kernel


def test_the_cross_check_splits_configurations_at_top_level_commas():
    assert kvpress_crosscheck.split_configs("none, fastkv(selection=span, tsp_rate=0.3),attended_spans") == [
        "none", "fastkv(selection=span, tsp_rate=0.3)", "attended_spans"]
