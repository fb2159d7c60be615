"""Tensor parallelism's speed: TP=2 against TP=1 on random-weight paper-shaped models (docs/multi-gpu.md).

    python benchmarks/tp_speed.py prepare DIR [--layers 16]      # build both models on the GPU (bf16), save them
    python benchmarks/tp_speed.py single DIR OUT                 # TP=1: one process, one GPU
    torchrun --nproc_per_node 2 benchmarks/tp_speed.py tp DIR OUT  # TP=2: transformers' tp_plan="auto"
    python benchmarks/tp_speed.py compare OUT                    # OUT/tp_speed.json and OUT/tp_speed.md

(``benchmarks/gpu_check.sh OUT tp-speed`` runs the four.) Two measurements, each through ``kvsieve bench``'s own
functions, so that TP=1 and TP=2 are measured exactly as ``kvsieve bench`` measures one GPU:

* decode (:func:`kvsieve.bench.bench_decode`): QwQ-32B shapes (Qwen2: hidden 5120, 40 heads, 8 KV heads, head dim
  128, intermediate 27648, vocabulary 152064) but CUT to ``--layers`` of its 64 decoder layers (default 16: building,
  saving and loading the whole 65 GB model twice would not fit the time), fast path (CUDA graph), RPC
  (interval 4096, window 32, ratio 0.25) and the full cache, batch 16 and 32, 16K and 32K generated tokens after a
  128-token prompt. As ``kvsieve bench decode``: the step time is measured at 3 live cache lengths
  (:class:`~kvsieve.bench.DecodeProbe`) and each compression's cost, then integrated over the run's schedule
  (:func:`~kvsieve.bench.modelled_decode_seconds`), so no run generates 32K tokens. A decode step's time is per-layer
  cost times layers plus the embedding and the LM head; the per-layer cost is what scales with the layer count, so
  the cut model's TP ratio is close to (slightly below: the LM head and the host work weigh more) the whole
  model's. The report also gives what the whole 64-layer model would need per GPU (its weights plus the cut run's
  KV cache scaled to 64 layers).
* prefill (:func:`kvsieve.bench.bench_prefill`): Llama-3.1-8B shapes (all 32 layers), time to first token at 32K
  and 128K, batch 1, FastKV (TSP rate 0.2, ratio 0.1) and the full cache, each after a warm-up at a short length;
  the median of 2 runs.

Under TP each rank holds ``num_key_value_heads / 2`` KV heads (its cache, its scores); every rank runs every step
(the model's all-reduces), and every clock starts and stops with both ranks (the ``timed`` of kvsieve.bench given
the tensor-parallel group); the times reported are rank 0's, the peak memory is the larger of the two GPUs'. A
TP=1 configuration that does not fit one GPU is recorded as ``does not fit``/``OOM``.

Each process appends its rows as they come to ``OUT/tp_speed.tp<N>.rank<R>.jsonl`` (a run cut short keeps them).

CPU check (tiny shapes, gloo, no CUDA graph)::

    python benchmarks/tp_speed.py prepare DIR --tiny
    python benchmarks/tp_speed.py single DIR OUT
    torchrun --nproc_per_node 2 benchmarks/tp_speed.py tp DIR OUT
    python benchmarks/tp_speed.py compare OUT
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

RPC = ("rpc", {"interval": 4096, "window": 32, "ratio": 0.25})
FASTKV = ("fastkv", {"tsp_rate": 0.2, "ratio": 0.1})
#: The tiny models of ``--tiny``: the paper shapes' families with a few small layers (CPU, seconds).
TINY_DIMS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=512, max_position_embeddings=4096)
MODELS_FILE = "tp_speed_models.json"


@dataclass
class Plan:
    """What one run measures."""

    batches: list[int]
    new_tokens: list[int]
    decode_compressors: list[tuple[str, dict[str, Any]]]
    prompt_len: int
    samples: int  # cache lengths at which the decode step is timed
    steps: int  # steps timed at each
    contexts: list[int]
    prefill_compressors: list[tuple[str, dict[str, Any]]]
    prefill_new_tokens: int  # fast-path decode steps after the prefill (the first 4 are not timed)
    repeats: int  # prefill runs per context (the median is reported)


PLAN = Plan(batches=[16, 32], new_tokens=[16384, 32768], decode_compressors=[("none", {}), RPC], prompt_len=128,
            samples=3, steps=8, contexts=[32768, 131072], prefill_compressors=[("none", {}), FASTKV],
            prefill_new_tokens=8, repeats=2)
TINY_PLAN = Plan(batches=[2, 3], new_tokens=[96, 160],
                 decode_compressors=[("none", {}), ("rpc", {"interval": 32, "window": 8, "ratio": 0.25})],
                 prompt_len=16, samples=3, steps=4, contexts=[128, 256], prefill_compressors=[("none", {}), FASTKV],
                 prefill_new_tokens=8, repeats=2)


# ---------------------------------------------------------------------------------------------- prepare
def model_specs(layers: int, tiny: bool) -> dict[str, dict[str, Any]]:
    """Per phase: the paper shape, the model's layers, the directory name and the label of its rows."""
    full = {"decode": ("qwq-32b", 4 if tiny else 64), "prefill": ("llama-3.1-8b", 4 if tiny else 32)}
    cut = {"decode": min(layers, full["decode"][1]), "prefill": full["prefill"][1]}
    specs = {}
    for phase, (shape, full_layers) in full.items():
        n = cut[phase]
        label = ("tiny-" if tiny else "") + shape + ("" if n == full_layers else f"-{n}of{full_layers}L")
        specs[phase] = dict(shape=shape, layers=n, full_layers=full_layers, label=label, dir=label)
    return specs


def prepare(root: Path, layers: int, tiny: bool) -> None:
    """Build each model from its config directly on the GPU (the CPU with ``--tiny``) and save it under ``root``;
    a model already saved there is kept."""
    from kvsieve.models import random_paper_model

    root.mkdir(parents=True, exist_ok=True)
    specs = model_specs(layers, tiny)
    for spec in specs.values():
        path = root / spec["dir"]
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            print(f"{path}: kept", flush=True)
            continue
        overrides = dict(num_hidden_layers=spec["layers"]) | (TINY_DIMS if tiny else {})
        model = random_paper_model(spec["shape"], dtype=torch.float32 if tiny else torch.bfloat16,
                                   device="cpu" if tiny else "cuda", overrides=overrides)
        model.save_pretrained(path)
        print(f"{path}: {spec['layers']} of {spec['full_layers']} layers, "
              f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    (root / MODELS_FILE).write_text(json.dumps(dict(tiny=tiny, models=specs), indent=1))


# ---------------------------------------------------------------------------------------------- measure
class Run:
    """One process of a TP=1 or TP=N run: its device, its rank and its rows file."""

    def __init__(self, out: Path, tp: bool, device: str):
        self.world, self.rank = 1, 0
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        if tp:
            import torch.distributed as dist

            # a rank left waiting in a collective gives up after 3 minutes instead of holding the machine
            dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(minutes=3))
            self.world, self.rank = dist.get_world_size(), dist.get_rank()
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / f"tp_speed.tp{self.world}.rank{self.rank}.jsonl"
        self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(dict(tp=self.world, rank=self.rank) | record)
        with self.path.open("a") as f:
            f.write(line + "\n")
        if self.rank == 0:
            print(_summary(dict(tp=self.world) | record), flush=True)

    def load(self, path: Path, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        if self.world > 1:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, tp_plan="auto")
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(self.device))
        return model.eval()

    def finish(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)
            dist.destroy_process_group()


def _summary(record: dict[str, Any]) -> str:
    """One line of what a record says (the rows file has everything)."""
    if record.get("kind") != "row":
        return json.dumps(record)[:400]
    where = f"TP={record['tp']} {record['phase']} {record['model']} {record['compressor']}"
    if record["phase"] == "decode":
        where += f" batch {record['batch']} {_size(record['new_tokens'])} tokens"
        what = f"{record['tokens_per_s']} tokens/s" if "tokens_per_s" in record else record.get("error", "?")
    else:
        where += f" {_size(record['context'])} context (run {record['rep'] + 1})"
        what = f"TTFT {record['ttft_s']} s" if "ttft_s" in record else record.get("error", "?")
    return f"{where}: {what}, peak {record.get('peak_gib')} GiB, graph {record['graph']}"


def layer_bytes(model) -> tuple[int, int]:
    """``(bytes of one decoder layer, bytes of the rest)`` of this rank's weights: the model with ``n`` layers
    takes ``rest + n * layer``."""
    from kvsieve.bench import weight_bytes

    layer = weight_bytes(model.model.layers[0])
    return layer, weight_bytes(model) - len(model.model.layers) * layer


def with_graph_fallback(run: Run, phase: str, measure, graph: bool) -> None:
    """``measure(graph)``; if capturing the decode step in a CUDA graph fails (a collective the graph cannot hold),
    says so and measures again without a graph (every rank fails alike: the capture is the same on each)."""
    try:
        measure(graph)
    except RuntimeError as exc:
        if not graph or "CUDA graph" not in str(exc):
            raise
        run.write(dict(kind="note", phase=phase, note=f"CUDA graph capture failed, measured without: {exc}"[:600]))
        gc.collect()
        torch.cuda.empty_cache()
        measure(False)


def decode_phase(run: Run, model, spec: dict[str, Any], plan: Plan, backend: str, graph: bool) -> None:
    """``kvsieve bench decode``'s fast-path rows (no HF rows), each written as it comes."""
    from kvsieve.bench import bench_decode

    torch.manual_seed(0)
    bench_decode(model, spec["label"], plan.batches, plan.new_tokens, plan.decode_compressors, backend=backend,
                 prompt_len=plan.prompt_len, samples=plan.samples, steps=plan.steps, hf_eager=False,
                 use_cuda_graph=graph,
                 log=lambda line: run.write(dict(kind="row", phase="decode", rep=0, graph=graph) | json.loads(line)))


def prefill_phase(run: Run, model, spec: dict[str, Any], plan: Plan, backend: str, graph: bool) -> None:
    """``kvsieve bench prefill``'s compressor rows (no HF rows), ``plan.repeats`` times."""
    from kvsieve.bench import bench_prefill

    for rep in range(plan.repeats):
        torch.manual_seed(rep)  # the same prompt on every rank

        def log(line: str, rep=rep) -> None:
            run.write(dict(kind="row", phase="prefill", rep=rep, graph=graph) | json.loads(line))

        bench_prefill(model, spec["label"], plan.contexts, plan.prefill_compressors, backend=backend,
                      new_tokens=plan.prefill_new_tokens, hf_eager=False, hf_sdpa=False, use_cuda_graph=graph, log=log)


PHASES = {"decode": decode_phase, "prefill": prefill_phase}


def measure(root: Path, out: Path, tp: bool, device: str, graph: bool, only: list[str], backend: str) -> None:
    from kvsieve.bench import kv_bytes_per_token
    from kvsieve.bench.report import environment

    models = json.loads((root / MODELS_FILE).read_text())
    tiny = models["tiny"]
    plan = TINY_PLAN if tiny else PLAN
    run = Run(out, tp, device)
    graph = graph and run.device.type == "cuda"
    total = torch.cuda.get_device_properties(run.device).total_memory if run.device.type == "cuda" else None
    run.write(dict(kind="meta", plan=asdict(plan), backend=backend, graph=graph, device=str(run.device),
                   gpu_bytes=total) | environment())
    dtype = torch.float32 if tiny else torch.bfloat16
    for phase in ("decode", "prefill"):
        if phase not in only:
            continue
        spec = models["models"][phase]
        model = run.load(root / spec["dir"], dtype)
        layer, rest = layer_bytes(model)
        run.write(dict(kind="model", phase=phase, label=spec["label"], layers=spec["layers"],
                       full_layers=spec["full_layers"], layer_bytes=layer, rest_bytes=rest,
                       kv_bytes_token_layer=kv_bytes_per_token(model) // spec["layers"]))

        try:
            with_graph_fallback(run, phase,
                                lambda g, m=model, sp=spec, f=PHASES[phase]: f(run, m, sp, plan, backend, g), graph)
        except Exception as exc:
            run.write(dict(kind="note", phase=phase, note=f"failed: {type(exc).__name__}: {exc}"[:600]))
            if run.world > 1:
                raise  # the other ranks may be inside a collective: end them all (torchrun stops the rest)
        del model
        gc.collect()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    run.finish()


# ---------------------------------------------------------------------------------------------- compare
def row_key(row: dict[str, Any]) -> tuple:
    if row["phase"] == "decode":
        return ("decode", row["model"], row["compressor"], row["batch"], row["new_tokens"])
    return ("prefill", row["model"], row["compressor"], 1, row["context"])


def merge(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows of every rank of every run, per TP size and configuration: rank 0's time (prefill: the median over
    the repeats), the largest peak memory of the ranks, and per rank what the whole-layer model would need."""
    models = {(r["tp"], r["rank"], r["phase"]): r for r in records if r.get("kind") == "model"}
    by: dict[tuple, dict[int, dict[int, list[dict[str, Any]]]]] = {}
    for r in records:
        if r.get("kind") == "row":
            by.setdefault(row_key(r), {}).setdefault(r["tp"], {}).setdefault(r["rank"], []).append(r)
    merged: dict[str, Any] = {}
    for key, sizes in sorted(by.items(), key=lambda kv: kv[0]):
        entry: dict[str, Any] = {}
        for tp, ranks in sorted(sizes.items()):
            rows0 = _last_attempt(ranks.get(0, []))
            if not rows0:
                continue
            cell: dict[str, Any] = dict(graph=rows0[-1]["graph"], backend=rows0[-1].get("backend"))
            errors = [r["error"] for r in rows0 if "error" in r]
            if errors:
                cell["error"] = errors[-1]
            if key[0] == "decode" and "tokens_per_s" in rows0[-1]:
                r = rows0[-1]
                cell.update(tokens_per_s=r["tokens_per_s"], step_ms_first=r["step_ms_first"],
                            step_ms_last=r["step_ms_last"], compressions=r["compressions"], live_max=r["live_max"])
            elif key[0] == "prefill" and any("ttft_s" in r for r in rows0):
                ttfts = [r["ttft_s"] for r in rows0 if "ttft_s" in r]
                cell.update(ttft_s=round(statistics.median(ttfts), 4), ttft_runs=ttfts,
                            kv_len_mean=rows0[-1].get("kv_len_mean"), decode_step_ms=rows0[-1].get("decode_step_ms"))
            peaks, full = [], []
            for rank, rows in ranks.items():
                rows = _last_attempt(rows)
                peaks += [r["peak_gib"] for r in rows if r.get("peak_gib") is not None]
                model = models.get((tp, rank, key[0]))
                kv = rows[-1].get("kv_gib") if rows else None
                if model and kv is not None:  # weights of every layer plus the KV cache scaled to every layer
                    weights = model["rest_bytes"] + model["full_layers"] * model["layer_bytes"]
                    full.append(weights / 2**30 + kv * model["full_layers"] / model["layers"])
            if peaks:
                cell["peak_gib_per_gpu"] = max(peaks)
            if full:
                cell["full_model_gib_per_gpu"] = round(max(full), 1)
            entry[f"tp{tp}"] = cell
        one, many = entry.get("tp1", {}), {k: v for k, v in entry.items() if k != "tp1"}
        for cell in many.values():
            if "tokens_per_s" in cell and "tokens_per_s" in one:
                cell["speedup"] = round(cell["tokens_per_s"] / one["tokens_per_s"], 2)
            if "ttft_s" in cell and "ttft_s" in one:
                cell["speedup"] = round(one["ttft_s"] / cell["ttft_s"], 2)
        merged["|".join(map(str, key))] = dict(phase=key[0], model=key[1], compressor=key[2], batch=key[3],
                                               length=key[4]) | entry
    return merged


def _last_attempt(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the last attempt (a run measured again without a CUDA graph drops the failed attempt's)."""
    if any(not r["graph"] for r in rows):
        rows = [r for r in rows if not r["graph"]]
    return rows


def _size(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def report(merged: dict[str, Any], records: list[dict[str, Any]]) -> str:
    sizes = sorted({r["tp"] for r in records if "tp" in r})
    many = [s for s in sizes if s > 1]
    metas = {r["tp"]: r for r in records if r.get("kind") == "meta" and r["rank"] == 0}
    models = {r["phase"]: r for r in records if r.get("kind") == "model" and r["rank"] == 0}
    notes = [r for r in records if r.get("kind") == "note"]
    lines = ["### Tensor parallelism's speed: TP=" + " vs TP=".join(map(str, sizes)), ""]
    for tp, meta in sorted(metas.items()):
        lines.append(f"- TP={tp}: {meta.get('gpu', meta.get('cpu'))}, torch {meta['torch']}, transformers "
                     f"{meta['transformers']}, backend {meta['backend']}, CUDA graph {meta['graph']}, {meta['date']}")
    for phase, model in models.items():
        if model["layers"] != model["full_layers"]:
            lines.append(f"- {phase}: `{model['label']}` is CUT to {model['layers']} of the model's "
                         f"{model['full_layers']} decoder layers (random weights). A step's time is the per-layer "
                         "cost times the layers plus the embedding and LM head: the per-layer cost is what scales, so "
                         "tokens/s of the whole model is about this times "
                         f"{model['layers']}/{model['full_layers']} (a little more), and the TP ratio is about the "
                         "same (the LM head and the host work weigh less in the whole model: its ratio is if "
                         "anything higher). `full GiB/GPU` is what the whole model would need per GPU: its weights "
                         "(per rank) plus this run's KV cache scaled to every layer.")
    lines += whole_model_lines(records)
    for note in notes:
        lines.append(f"- TP={note['tp']} {note['phase']}: {note['note']}")
    lines.append("")
    gpu = min((m["gpu_bytes"] for m in metas.values() if m.get("gpu_bytes")), default=None)
    lines.append("Decode: modelled tokens/s (kvsieve bench decode's schedule model), fast path; prefill: time to first "
                 "token in seconds (median of the runs); `speedup`: TP=N over TP=1 (tokens/s ratio, or TTFT TP=1 "
                 "over TTFT TP=N); peak and full GiB are per GPU (the larger of the ranks)"
                 + (f"; `!` marks more than a GPU's {gpu / 2**30:.0f} GiB." if gpu else "."))
    lines.append("")
    head = ["shape", "compressor", "batch", "length", "metric", "TP=1"] + [f"TP={n}" for n in many]
    head += [f"speedup TP={n}" for n in many] + ["peak GiB/GPU TP=1"] + [f"peak GiB/GPU TP={n}" for n in many]
    head += ["full GiB/GPU TP=1"] + [f"full GiB/GPU TP={n}" for n in many] + ["details"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in merged.values():
        decode = entry["phase"] == "decode"
        value = "tokens_per_s" if decode else "ttft_s"

        def cell(tp: int, name: str, entry=entry, value=value) -> str:
            c = entry.get(f"tp{tp}")
            if c is None:
                return "-"
            if name == value and name not in c:
                return "OOM" if "error" in c else "-"
            text = str(c.get(name, "-"))
            if name == "full_model_gib_per_gpu" and gpu and c.get(name, 0) > gpu / 2**30:
                text += " !"
            return text

        def details(entry=entry, decode=decode) -> str:
            parts = []
            for tp in sizes:
                c = entry.get(f"tp{tp}", {})
                if decode and "step_ms_first" in c:
                    parts.append(f"TP={tp}: step {c['step_ms_first']}->{c['step_ms_last']} ms, "
                                 f"{c['compressions']} compressions")
                elif not decode and "ttft_runs" in c:
                    parts.append(f"TP={tp}: runs {c['ttft_runs']} s, KV {c['kv_len_mean']}")
                if c and not c.get("graph"):
                    parts.append(f"TP={tp} without CUDA graph")
            return "; ".join(parts)

        row = [entry["model"], entry["compressor"], str(entry["batch"]), _size(entry["length"]),
               "tokens/s" if decode else "TTFT s", cell(1, value)]
        row += [cell(n, value) for n in many] + [cell(n, "speedup") for n in many]
        row += [cell(1, "peak_gib_per_gpu")] + [cell(n, "peak_gib_per_gpu") for n in many]
        row += [cell(1, "full_model_gib_per_gpu")] + [cell(n, "full_model_gib_per_gpu") for n in many]
        lines.append("| " + " | ".join(row + [details()]) + " |")
    errors = [(e["model"], e["compressor"], e["batch"], e["length"], tp, c["error"])
              for e in merged.values() for tp, c in e.items() if isinstance(c, dict) and "error" in c]
    if errors:
        lines += ["", "Did not run:", ""] + [f"- {m} {c} batch {b} length {_size(n)} {tp}: {err}"
                                              for m, c, b, n, tp, err in errors]
    return "\n".join(lines) + "\n"


def whole_model_lines(records: list[dict[str, Any]]) -> list[str]:
    """What the whole (uncut) decode model needs per GPU, from its shapes: weights plus the KV cache per token and
    layer, for the full cache at each batch and length (RPC's is in the table's `full GiB/GPU`)."""
    models = {r["tp"]: r for r in records if r.get("kind") == "model" and r["phase"] == "decode" and r["rank"] == 0}
    metas = {r["tp"]: r for r in records if r.get("kind") == "meta" and r["rank"] == 0}
    lines = []
    for tp, m in sorted(models.items()):
        plan = metas.get(tp, {}).get("plan")
        if not plan:
            continue
        weights = (m["rest_bytes"] + m["full_layers"] * m["layer_bytes"]) / 2**30
        per_token = m["kv_bytes_token_layer"] * m["full_layers"]
        caches = ", ".join(f"batch {b} x {_size(n)}: {b * (plan['prompt_len'] + n) * per_token / 2**30:.0f} GiB"
                           for b in plan["batches"] for n in plan["new_tokens"])
        lines.append(f"- whole decode model ({m['full_layers']} layers), TP={tp}, per GPU: weights {weights:.1f} GiB; "
                     f"KV {m['kv_bytes_token_layer'] / 1024:g} KiB per token and layer, {per_token / 2**20:g} MiB per "
                     f"token; full cache (prompt {plan['prompt_len']} + generated) {caches}")
    return lines


def compare(out: Path) -> None:
    records = []
    for path in sorted(out.glob("tp_speed.tp*.rank*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    merged = merge(records)
    (out / "tp_speed.json").write_text(json.dumps(merged, indent=1))
    text = report(merged, records)
    (out / "tp_speed.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("prepare", help="build and save the random-weight models")
    p.add_argument("dir", type=Path)
    p.add_argument("--layers", type=int, default=16, help="decoder layers of the QwQ-32B-shaped model (of 64)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a check of the script)")
    for what in ("single", "tp"):
        p = sub.add_parser(what, help="TP=1 (one process)" if what == "single" else "TP=N (under torchrun)")
        p.add_argument("dir", type=Path)
        p.add_argument("out", type=Path)
        p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
        p.add_argument("--backend", default="auto", help="kvsieve kernel backend (default auto: triton on a GPU)")
        p.add_argument("--no-graph", action="store_true", help="decode without CUDA graphs")
        p.add_argument("--only", default="decode,prefill", help="decode, prefill or both (default)")
    p = sub.add_parser("compare", help="merge the runs' rows: OUT/tp_speed.json and OUT/tp_speed.md")
    p.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.what == "prepare":
        prepare(args.dir, args.layers, args.tiny)
    elif args.what in ("single", "tp"):
        measure(args.dir, args.out, args.what == "tp", args.device, not args.no_graph, args.only.split(","),
                args.backend)
    else:
        compare(args.out)


if __name__ == "__main__":
    main()
