"""End-to-end backend agreement on the GPU: the same greedy generation through every available backend.

    python benchmarks/e2e_agreement.py OUTDIR [--fused SETTING=true|false|a,b ...]

A random-weight Qwen2 model (4 layers, 28 heads, 4 KV heads, d=128, bf16 on CUDA), a batch of 4 random prompts
(one left-padded) of ~600 tokens, 96 greedy tokens, for compressors none, snapkv (ratio 0.2, window 8),
rpc (P=32, R=8, c=4) and fastkv (TSP 20%, retain 10%). For each backend other than ``torch`` it reports the
fraction of generated tokens equal to the ``torch`` backend's and the first divergence; for every backend, the
fast path (``fast=True``: static cache, CUDA-graph replay, fused decoder layers) against the same backend's eager
run, and the fused fast path against the unfused one (``fuse_layers=False``). bf16 near-ties can
flip a token, after which sequences legitimately differ: agreement is reported, not asserted. A random-weight
model's next-token distribution is nearly flat, so such ties are frequent; the second table therefore feeds every
run the torch backend's tokens (teacher forcing) and compares the logits of each step: the top-1 agreement without
compounding, and at each disagreement how far apart the reference's own two candidates were. ``--fused`` sets a
``FusedDecoderLayers`` switch for every fused run (e.g. ``silu_in_gate_up=true``: the fused runs' gate/up with SiLU
in its GEMM's epilogue, compared with the unfused ones before the switch is turned on by default).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, Qwen2Config

from kvsieve.fastpath import StaticDecoder
from kvsieve.fused_layer import FusedDecoderLayers
from kvsieve.integration import apply, generate
from kvsieve.plugins import registry

NEW = 96


class ForceAndRecord(LogitsProcessor):
    """Records each step's logits, then forces the reference token (teacher forcing through ``model.generate``)."""

    def __init__(self, tokens: torch.Tensor, prompt_len: int):
        self.tokens, self.prompt_len, self.scores = tokens, prompt_len, []

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.prompt_len
        self.scores.append(scores.float().clone())
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, self.tokens[:, t : t + 1], 0.0)


MODES = {"eager": "", "fast": " fast path", "unfused": " fast path unfused"}  # run label suffixes


def run_kwargs(mode: str) -> dict:
    return {} if mode == "eager" else dict(fast=True, fuse_layers=mode == "fast")


def forced_logits(model, ids, mask, comp, params, backend, mode, tokens) -> torch.Tensor:
    """``float32 [B, NEW, V]``: the logits of every step when the run is fed ``tokens`` (teacher forcing)."""
    if mode == "eager":
        force = ForceAndRecord(tokens, ids.shape[1])
        generate(model, ids, mask, compressor=comp, params=params, backend=backend, max_new_tokens=NEW,
                 min_new_tokens=NEW, do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([force]))
        return torch.stack(force.scores, dim=1)
    with torch.inference_mode(), apply(model, comp, backend, params=params) as engine:
        decoder = StaticDecoder(model, engine, fuse_layers=mode == "fast")
        try:
            logits = [decoder.prefill(ids, mask, NEW)]
            logits += [decoder.step(tokens[:, t]) for t in range(NEW - 1)]
        finally:
            decoder.close()
    return torch.stack(logits, dim=1)


NEAR_TIE = 0.1  # logits: a gap of the reference's top two at most this is a bf16 near tie (3 ulps at 4-8)


def compare_logits(run: torch.Tensor, ref: torch.Tensor) -> dict:
    """Top-1 agreement of two teacher-forced runs, step by step (no compounding), and how close the reference's
    own top two were where they disagree (a bf16 near-tie has a tiny gap)."""
    finite = torch.isfinite(ref) & torch.isfinite(run)  # min_new_tokens masks EOS in the eager runs
    diff = (run - ref).abs().where(finite, torch.zeros_like(ref))
    ref_top, run_top = ref.argmax(-1), run.argmax(-1)
    agree = ref_top == run_top
    top2 = ref.where(finite, torch.full_like(ref, -1e30)).topk(2, dim=-1).values
    gap = ref.gather(-1, ref_top[..., None]) - ref.gather(-1, run_top[..., None])
    decided = (top2[..., 0] - top2[..., 1]) > NEAR_TIE  # the reference's top two are not a near tie
    return dict(top1_agreement=round(float(agree.float().mean()), 4), disagreements=int((~agree).sum()),
                top1_agreement_decided=round(float(agree[decided].float().mean()), 4) if decided.any() else 1.0,
                decided_share=round(float(decided.float().mean()), 4),
                max_gap_at_disagreement=round(float(gap[~agree].max()), 4) if (~agree).any() else 0.0,
                median_top2_gap=round(float((top2[..., 0] - top2[..., 1]).median()), 4),
                max_abs_logit_diff=round(float(diff.max()), 4))

RUNS = [
    ("none", {}),
    ("snapkv", dict(ratio=0.2, window=8)),
    ("rpc", dict(interval=32, window=8, ratio=0.25)),
    ("fastkv", dict(tsp_rate=0.2, ratio=0.1)),
]


def fused_setting(text: str) -> tuple[str, object]:
    """``NAME=true|false`` for a boolean ``FusedDecoderLayers`` switch, ``NAME=a,b`` (or ``NAME=``) for a tuple one
    (``backend_projections=o_proj,down_proj``)."""
    name, _, value = text.partition("=")
    current = getattr(FusedDecoderLayers, name, None)
    if isinstance(current, bool) and value in ("true", "false"):
        return name, value == "true"
    if isinstance(current, tuple):
        return name, tuple(v for v in value.split(",") if v)
    switches = sorted(k for k, v in vars(FusedDecoderLayers).items() if isinstance(v, bool | tuple))
    raise argparse.ArgumentTypeError(f"expected SETTING=true|false (or a comma-separated list for a tuple setting) "
                                     f"with SETTING one of {switches}, got {text!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--fused", type=fused_setting, action="append", default=[],
                        help="a FusedDecoderLayers switch for the fused runs, e.g. silu_in_gate_up=true or "
                             "backend_projections=o_proj,down_proj")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("e2e_agreement.py needs a CUDA GPU", file=sys.stderr)
        return 2
    for name, value in args.fused:
        setattr(FusedDecoderLayers, name, value)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    config = Qwen2Config(hidden_size=3584, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=8192,
                         use_sliding_window=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(100, 32000, (4, 600), device="cuda")
    mask = torch.ones_like(ids)
    ids[1, :57], mask[1, :57] = 0, 0
    backends = [e.name for e in registry().entries("backend")
                if e.obj().supports(torch.device("cuda"), torch.bfloat16)[0]]
    rows, forced_rows = [], []
    for comp, params in RUNS:
        sequences = {}
        for backend in backends:
            for mode in MODES:
                try:
                    result = generate(model, ids, mask, compressor=comp, params=params, backend=backend,
                                      max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                      **run_kwargs(mode))
                except Exception as exc:  # reported as a row, the other runs go on
                    rows.append(dict(compressor=comp, run=f"{backend}{MODES[mode]}",
                                     error=f"{type(exc).__name__}: {str(exc)[:300]}"))
                    print(rows[-1], flush=True)
                    continue
                sequences[backend, mode] = (result.sequences[:, ids.shape[1]:], result.kv_lengths)
        # each backend's eager run against the torch backend's; each fast-path run against its own backend's eager;
        # the fused fast path against the unfused one
        pairs = [((b, "eager"), ("torch", "eager")) for b in backends if b != "torch"]
        pairs += [((b, m), (b, "eager")) for b in backends for m in ("fast", "unfused")]
        pairs += [((b, "fast"), (b, "unfused")) for b in backends]
        if ("torch", "eager") in sequences:  # teacher-forced: every run fed the torch backend's eager tokens
            tokens = sequences["torch", "eager"][0]
            ref_logits = forced_logits(model, ids, mask, comp, params, "torch", "eager", tokens)
            for backend in backends:
                fused = unfused = None
                for mode in MODES:
                    if (backend, mode) == ("torch", "eager"):
                        continue
                    try:
                        logits = forced_logits(model, ids, mask, comp, params, backend, mode, tokens)
                    except Exception as exc:
                        forced_rows.append(dict(compressor=comp, run=f"{backend}{MODES[mode]}",
                                                error=f"{type(exc).__name__}: {str(exc)[:200]}"))
                        continue
                    forced_rows.append(dict(compressor=comp, run=f"{backend}{MODES[mode]}", reference="torch",
                                            **compare_logits(logits, ref_logits)))
                    print(forced_rows[-1], flush=True)
                    if mode == "unfused":
                        unfused = logits
                    elif mode == "fast":
                        fused = logits
                if fused is not None and unfused is not None:
                    forced_rows.append(dict(compressor=comp, run=f"{backend}{MODES['fast']}",
                                            reference=f"{backend}{MODES['unfused']}",
                                            **compare_logits(fused, unfused)))
                    print(forced_rows[-1], flush=True)
        for (backend, mode), reference in pairs:
            if (backend, mode) not in sequences or reference not in sequences:
                continue
            (seq, lengths), (ref, ref_lengths) = sequences[backend, mode], sequences[reference]
            same = seq == ref
            diverged = (~same).any(dim=1)
            first = [int((~row).nonzero()[0]) if d else None for row, d in zip(same, diverged)]
            rows.append(dict(compressor=comp, run=f"{backend}{MODES[mode]}",
                             reference=f"{reference[0]}{MODES[reference[1]]}",
                             agreement=round(float(same.float().mean()), 4),
                             first_divergence_per_row=first, kv_lengths_equal=lengths == ref_lengths))
            print(rows[-1], flush=True)
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), backends=backends,
               fused_settings=dict(args.fused))
    (out / "e2e_agreement.json").write_text(json.dumps(dict(env=env, rows=rows, teacher_forced=forced_rows), indent=2))
    lines = ["### End-to-end token agreement (greedy, bf16, 96 tokens, batch 4)", "", str(env), "",
             "| compressor | run | reference | token agreement | first divergence per row | kv lengths equal |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['compressor']} | {r['run']} | {r['reference']} | {r['agreement']:.2%} | "
              f"{r['first_divergence_per_row']} | {r['kv_lengths_equal']} |" if "error" not in r else
              f"| {r['compressor']} | {r['run']} | - | failed: {r['error']} | - | - |" for r in rows]
    lines += ["", "### Teacher-forced: every run fed the torch backend's eager tokens, logits compared step by step "
              "(against the torch eager run, and the fused fast path against the unfused one)",
              "", "| compressor | run | reference | top-1 agreement | top-1 agreement where the reference's top two "
              f"differ by more than {NEAR_TIE} (of the steps) | disagreements | max gap of the reference's "
              "top two at a disagreement | median top-two gap | max abs logit diff |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['compressor']} | {r['run']} | {r.get('reference', 'torch')} | {r['top1_agreement']:.2%} | "
              f"{r['top1_agreement_decided']:.2%} of {r['decided_share']:.0%} | {r['disagreements']} | "
              f"{r['max_gap_at_disagreement']} | {r['median_top2_gap']} | {r['max_abs_logit_diff']} |"
              if "error" not in r else f"| {r['compressor']} | {r['run']} | | failed: {r['error']} | | | | | |"
              for r in forced_rows]
    (out / "e2e_agreement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
