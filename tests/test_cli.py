"""The command line: plugins listing, generate --json, demo, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from kvsieve.cli import main
from kvsieve.params import parse_params


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plugins_json_lists_builtins_with_their_distribution(capsys):
    code, out, _ = run(capsys, "plugins", "--json")
    assert code == 0
    table = json.loads(out)
    names = {kind: {row["name"]: row for row in rows} for kind, rows in table.items()}
    assert {"none", "snapkv", "streamingllm"} <= set(names["compressor"])
    assert "window_attention" in names["scoring"] and "topk" in names["selection"]
    torch_row = names["backend"]["torch"]
    assert torch_row["available"] is True
    assert torch_row["distribution"].startswith("kvsieve ")
    assert torch_row["entry_point"] == "torch = kvsieve.backends.torch_ref"
    assert names["compressor"]["snapkv"]["phases"] == ["prefill"]


def test_plugins_text_output(capsys):
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    assert "Compressors:" in out and "snapkv" in out and "[available]" in out


def test_generate_json_reports_the_cache(capsys):
    code, out, _ = run(
        capsys, "generate", "--model", "tiny-random-llama", "--compressor", "snapkv", "--set", "budget=12",
        "--set", "window=4", "--prompt", "hello world, this is a prompt long enough to be compressed " * 2,
        "--max-new-tokens", "6", "--min-new-tokens", "6", "--backend", "torch", "--json",
    )
    assert code == 0
    record = json.loads(out)
    assert record["generated_tokens"] == 6
    assert record["prompt_tokens"] > 12
    assert record["kv_lengths"] == [12 + 6 - 1] * 3  # budget + generated - 1 (the last token is not cached)
    assert record["compressor"]["name"] == "snapkv" and record["compressor"]["budget"] == 12
    assert record["compressor"]["scoring"]["name"] == "window_attention"
    assert record["backend"] == "torch"
    assert 0 < record["kv_bytes"] <= record["kv_bytes_peak"]
    assert record["tokens_per_s"] > 0 and isinstance(record["text"], str)


def test_generate_takes_a_spec_merged_with_set(capsys):
    """--compressor NAME:k=v gives the parameters --set would; the two forms join."""
    common = ("generate", "--model", "tiny-random-llama", "--prompt", "a prompt long enough to be compressed " * 3,
              "--max-new-tokens", "2", "--backend", "torch", "--json")
    by_set = json.loads(run(capsys, *common, "--compressor", "snapkv", "--set", "budget=12", "--set", "window=4")[1])
    by_spec = json.loads(run(capsys, *common, "--compressor", "snapkv:budget=12,window=4")[1])
    mixed = json.loads(run(capsys, *common, "--compressor", "snapkv:budget=12", "--set", "window=4")[1])
    assert by_set["compressor"] == by_spec["compressor"] == mixed["compressor"]
    assert by_spec["compressor"]["budget"] == 12 and by_spec["kv_lengths"] == by_set["kv_lengths"]


def test_generate_full_vs_compressed_memory(capsys):
    prompt = "some words to fill the context " * 8
    common = ("generate", "--model", "tiny-random-qwen2", "--prompt", prompt, "--max-new-tokens", "4",
              "--min-new-tokens", "4", "--json")
    full = json.loads(run(capsys, *common, "--compressor", "none")[1])
    small = json.loads(run(capsys, *common, "--compressor", "streamingllm", "--set", "budget=32")[1])
    assert max(small["kv_lengths"]) == 32
    assert small["kv_bytes"] < full["kv_bytes"] / 2


def test_generate_fast_gives_the_eager_tokens(capsys):
    """--fast decodes through the static-capacity loop: same text and cache lengths as the eager loop."""
    common = ("generate", "--model", "tiny-random-llama", "--compressor", "rpc", "--set", "interval=8",
              "--set", "window=2", "--prompt", "a prompt for the fast path " * 3, "--max-new-tokens", "20",
              "--min-new-tokens", "20", "--backend", "torch", "--json")
    eager = json.loads(run(capsys, *common)[1])
    fast = json.loads(run(capsys, *common, "--fast")[1])
    assert fast["text"] == eager["text"] and fast["kv_lengths"] == eager["kv_lengths"]
    assert fast["generated_tokens"] == 20


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--compressor", "snapk"), "Did you mean 'snapkv'"),
        (("--backend", "troch"), "Did you mean 'torch'"),
        (("--compressor", "snapkv", "--set", "ratio=1.5"), "ratio must be the kept fraction, in (0, 1]"),
        (("--compressor", "snapkv", "--set", "budget=4", "--set", "window=8"), "budget=4 must exceed window=8"),
        (("--compressor", "snapkv", "--set", "window=-3"), "window must be a positive integer, got -3"),
        (("--compressor", "snapkv", "--set", "nonsense"), "--set expects key=value"),
        (("--compressor", "snapkv", "--set", "colour=red"), "colour"),
        (("--compressor", "snapkv:window=8", "--set", "window=4"),
         "window given both in --compressor snapkv:window=8 and with --set; give it once"),
        (("--compressor", "snapkv,rpc"), "--compressor takes one compressor here, got 2 in 'snapkv,rpc'"),
        (("--compressor", "window=8"), "--compressor: parameter 'window=8' comes before any compressor name"),
        (("--compressor", "snapkv:ratio=1.5"), "ratio must be the kept fraction, in (0, 1]"),
    ],
)
def test_generate_bad_input_is_one_clear_line(capsys, argv, message):
    code, _, err = run(capsys, "generate", "--model", "tiny-random-llama", "--prompt", "hi", *argv)
    assert code == 2
    assert err.startswith("kvsieve: error:")
    assert message in err


def test_prompt_longer_than_context_is_refused(capsys, tmp_path):
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("x" * 5000)  # byte-level tokenizer: > 4096 positions of the tiny model
    code, _, err = run(capsys, "generate", "--model", "tiny-random-llama", "--prompt-file", str(long_prompt),
                       "--max-new-tokens", "2")
    assert code == 2
    assert "exceeds the model's context (max_position_embeddings=4096)" in err


def test_parse_params_types():
    assert parse_params(["a=1", "b=0.5", "c=true", "d=none", "e=max"]) == dict(a=1, b=0.5, c=True, d=None, e="max")


@pytest.mark.parametrize("compressor", [("--compressor", "streamingllm", "--set", "budget=64"),
                                        ("--compressor", "streamingllm:budget=64")])
def test_demo_runs_side_by_side_on_a_tiny_model(capsys, compressor):
    code, out, _ = run(capsys, "demo", "--model", "tiny-random-llama", *compressor, "--prompt-tokens", "120",
                       "--max-new-tokens", "5", "--backend", "torch")
    assert code == 0
    assert "full cache" in out and "streamingllm {'budget': 64}" in out and "output agreement" in out
    assert "cached tokens/layer" in out and "--- streamingllm ---" in out


def test_demo_refuses_a_key_in_both_the_spec_and_set(capsys):
    code, _, err = run(capsys, "demo", "--model", "tiny-random-llama", "--compressor", "streamingllm:budget=64",
                       "--set", "budget=32")
    assert code == 2
    assert err == (
        "kvsieve: error: budget given both in --compressor streamingllm:budget=64 and with --set; give it once\n"
    )


@pytest.mark.parametrize("argv, message", [
    (("--device", "tpu"), "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (("--min-new-tokens", "-1"), "argument --min-new-tokens: expected a whole number >= 0, got '-1'"),
    (("--min-new-tokens", "80"), "--min-new-tokens 80 exceeds --max-new-tokens 64"),
    (("--temperature", "0"), "argument --temperature: expected a number > 0"),
    (("--top-p", "1.5"), "argument --top-p: expected a number in (0, 1]"),
    (("--compressor", "fastkv", "--set", "tsp_layer=9"), "tsp_layer=9 is out of range for a model with num_hidden"),
    (("--compressor", "snapkv", "--set", "selection=3"), "selection must be the name of a registered selection"),
    (("--compressor", "snapkv", "--set", "scoring=3"), "scoring must be the name of a registered scoring"),
    (("--compressor", "snapkv", "--set", "ratio=0.1", "--set", "ratio=0.2"), "'ratio' is given twice"),
    (("--max-new-tokens", "5000"), "exceeds the model's context (max_position_embeddings=4096)"),
])
def test_bad_generate_input_fails_before_the_weights_load(monkeypatch, capsys, argv, message):
    """One line, exit 2, and the model's weights are never loaded (the checks use its config and tokenizer)."""
    from kvsieve import models

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the arguments were checked")

    monkeypatch.setattr(models, "load", no_weights)
    try:
        code = main(["generate", "--model", "tiny-random-llama", "--prompt", "hello", *argv])
    except SystemExit as exc:  # argparse's own refusal of a malformed value
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err


def test_cuda_without_a_gpu_is_refused_at_once(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "tiny-random-llama", "--prompt", "hi", "--device", "cuda"])
    assert exit_info.value.code == 2 and "no CUDA device is available" in capsys.readouterr().err


def test_demo_refuses_a_non_positive_prompt_length(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--model", "tiny-random-llama", "--prompt-tokens", "0"])
    assert exit_info.value.code == 2 and "--prompt-tokens: expected a whole number >= 1" in capsys.readouterr().err


def test_a_corrupt_model_config_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": "three"}')
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "cannot read the model config" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, selection",
    [
        (("--compressor", "snapkv:selection=adaptive", "--set", "selection.alpha=0.3"),
         {"name": "adaptive", "alpha": 0.3, "max_share": 2.0}),
        (("--compressor", "pyramidkv", "--set", "beta=10"), {"name": "topk"}),
    ],
)
def test_generate_takes_head_adaptive_selection_and_pyramidkv(capsys, argv, selection):
    code, out, _ = run(
        capsys, "generate", "--model", "tiny-random-llama", *argv, "--set", "budget=12", "--set", "window=4",
        "--prompt", "hello world, this is a prompt long enough to be compressed " * 2, "--max-new-tokens", "4",
        "--backend", "torch", "--json",
    )
    assert code == 0
    record = json.loads(out)
    assert record["compressor"]["selection"] == selection
    assert max(record["kv_lengths"]) < record["prompt_tokens"]


def test_eval_expands_adaptive_and_pyramidkv_specs():
    from kvsieve.evaluation.configs import expand_configs

    configs = expand_configs(["snapkv:selection=adaptive,pyramidkv"], sets=parse_params(["selection.alpha=0.3"]),
                             budgets=[0.1, 0.2])
    resolved = [(c.name, c.build().config()["ratio"], c.build().config()["selection"]) for c in configs]
    assert resolved == [
        ("snapkv", 0.1, {"name": "adaptive", "alpha": 0.3, "max_share": 2.0}),
        ("snapkv", 0.2, {"name": "adaptive", "alpha": 0.3, "max_share": 2.0}),
        ("pyramidkv", 0.1, {"name": "topk"}),
        ("pyramidkv", 0.2, {"name": "topk"}),
    ]


def test_a_bad_alpha_is_one_clear_line(capsys):
    code, _, err = run(capsys, "generate", "--model", "tiny-random-llama", "--prompt", "hi", "--compressor",
                       "snapkv:selection=adaptive", "--set", "selection.alpha=2")
    assert code == 2 and "alpha must be a number in [0, 1], got 2" in err
