"""The fast decode path: a static-capacity compressed cache whose decode step is replayed from a CUDA graph.

HF's eager decode loop is bound by Python overhead (about 60 ms a step at any batch size on an H200), which hides
what compression saves. Here the prompt is prefilled eagerly (the ordinary kvsieve path, so prefill compressors
such as SnapKV and FastKV run unchanged), the cache is moved into static layers
(:func:`kvsieve.static.make_static`), and every decode step is one forward with static inputs (token id and
position per row), captured in a CUDA graph after a few eager warm-up steps and replayed from then on. Between
steps the loop advances the cache's host counters and runs the compressor's decode schedule (RPC's compaction every
P tokens), which changes the data in the buffers, never their shapes, so the graph stays valid. Without CUDA (or
with ``use_cuda_graph=False``) the same steps run eagerly.

Token choice follows ``model.generate``: the generation config is resolved and the logits processors are built
by HF's own helpers (the model's generation config, greedy or sampling with temperature/top-k/top-p, ...); EOS
and padding work as in HF (finished rows emit the pad token; the output stops once every row finished); left-
padded batches get per-row positions as HF computes them from the attention mask. Use it through
``kvsieve.generate(..., fast=True)``; see docs/fast-path.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvsieve.cache import SieveCache
from kvsieve.engine import Engine
from kvsieve.fused_layer import FusedDecoderLayers, unfusable_reason
from kvsieve.propagation import decoder_layers
from kvsieve.static import advance_step_counters, make_static, share_step_counters, static_capacity

__all__ = ["SegmentGraphs", "StaticDecoder", "fast_generate"]

_STOP_CHECK_EVERY = 8  # steps between host reads of "has every row finished?" (the output is trimmed exactly)


class StaticDecoder:
    """Prefill once, then decode one token per :meth:`step` through a static cache (graph replay on CUDA).

    A model on one device replays its whole step from one graph. A model split over devices (accelerate's
    ``device_map``) replays each run of consecutive decoder layers on one device from a graph of its own
    (:class:`SegmentGraphs`), since one graph cannot span devices; the embedding, the final norm and the LM head
    around them run eagerly. Call :meth:`close` when done (:func:`fast_generate` does).

    Args:
        model: the model, inside :func:`kvsieve.apply` (``engine`` is what it yielded).
        engine: the :class:`~kvsieve.engine.Engine` attached to the model.
        use_cuda_graph: capture the decode step in CUDA graphs. Default: when the model is on CUDA devices.
        warmup_steps: eager steps before the capture (they warm up kernels, cuBLAS and Triton's compiler).
        graph_breaks: decoder-layer indices where a new segment begins besides the device changes (the segments
            path on one device, e.g. to test it; eagerly through the same static buffers without CUDA graphs).
        fuse_layers: run decode steps through the fused decoder layer (:mod:`kvsieve.fused_layer`). Default: when
            the model's layers allow it; ``True`` raises if they do not.
    """

    def __init__(self, model: torch.nn.Module, engine: Engine, use_cuda_graph: bool | None = None,
                 warmup_steps: int = 2, graph_breaks: Sequence[int] = (), fuse_layers: bool | None = None):
        devices = {p.device for p in model.parameters()}
        if use_cuda_graph is None:
            use_cuda_graph = all(d.type == "cuda" for d in devices)
        if use_cuda_graph and any(d.type != "cuda" for d in devices):
            raise ValueError(f"use_cuda_graph=True needs a model on CUDA devices, got {sorted(map(str, devices))}")
        self.model, self.engine, self.use_cuda_graph, self.warmup_steps = model, engine, use_cuda_graph, warmup_steps
        self.cache: SieveCache | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0
        split = len(devices) > 1 or bool(graph_breaks)
        self.segments = SegmentGraphs(model, graph_breaks, capture=use_cuda_graph) if split else None
        if fuse_layers not in (None, True, False):
            raise TypeError(f"fuse_layers must be True, False or None (when possible), got {fuse_layers!r}")
        why = unfusable_reason(model, engine) if fuse_layers is not False else "off"
        if fuse_layers and why is not None:
            raise ValueError(f"fuse_layers=True, but this model's decoder layers cannot run fused: {why}")
        self.fused = FusedDecoderLayers(model, engine) if why is None else None

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                capacity: int | None = None) -> torch.Tensor:
        """Run the prompt through the model (eagerly) and make the static cache.

        Args:
            input_ids: ``int64 [B, Lp]`` (left-padded); attention_mask: ``[B, Lp]`` or ``None``.
            max_new_tokens: sizes the cache (:func:`~kvsieve.static.static_capacity`, per layer).
            capacity: slots per layer instead (every layer).

        Returns:
            ``float32 [B, V]``: the logits of the last prompt token.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # as HF's generate
        mask = None if bool(attention_mask.all()) else attention_mask  # HF drops a mask without padding
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        prefilled = self.engine.last_cache
        Lp = input_ids.shape[1]
        used = [layer.max_end for layer in prefilled.layers]
        sized = {  # once per distinct prefilled length: a compressor's sizing may walk every token
            slots: capacity or static_capacity(self.engine.compressor, Lp, max_new_tokens, prompt_slots=slots)
            for slots in set(used)
        }
        capacities = [sized[slots] for slots in used]
        self.cache = make_static(prefilled, capacities)
        self.step_counters = share_step_counters(self.cache)  # advanced once per step, outside the graph
        self.engine.use_static(self.cache)
        self.input_ids = input_ids.new_zeros(input_ids.shape[0], 1)  # the static inputs of a step
        self.positions = positions[:, -1:].clone()
        return out.logits[:, -1].to(copy=True, dtype=torch.float32)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``int64 [B]`` tokens (one per row); return ``float32 [B, V]`` next-token logits.

        Runs (or replays) the forward, then the host side of the step: the cache's counters and the compressor's
        decode schedule (which may compact the cache in place).
        """
        for layer in self.cache.layers:
            layer.ensure_room()
        if self.fused is not None:
            self.fused.install()  # before the segments, which call the layers' forwards as installed
        self.input_ids.copy_(tokens[:, None])
        self.positions += 1
        logits = self._run().to(copy=True, dtype=torch.float32)
        advance_step_counters(self.step_counters)
        for layer in self.cache.layers:
            layer.advance()
        self.engine.run_decode_schedule(self.cache)
        return logits

    # ------------------------------------------------------------------ forward, eager or from the graph
    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.input_ids, position_ids=self.positions, use_cache=True, logits_to_keep=1,
                         **{self.engine.cache_kw: self.cache})
        return out.logits[:, -1]

    def close(self) -> None:
        """Give the decoder layers their own forwards back (after the segments path and the fused layers);
        idempotent."""
        if self.segments is not None:
            self.segments.remove()
        if self.fused is not None:
            self.fused.remove()

    def _run(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.graph_logits
        if self.use_cuda_graph and self.eager_steps < self.warmup_steps:
            self.eager_steps += 1
            side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph's documentation asks
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self._forward()
            torch.cuda.current_stream().wait_stream(side)
            return logits
        if self.segments is not None:
            self.segments.install()
            return self._forward()  # eager around the segments, each replayed (captured on its first call)
        if not self.use_cuda_graph:
            return self._forward()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # records the step without running it
                logits = self._forward()
        except RuntimeError as exc:
            raise RuntimeError(
                f"capturing the decode step in a CUDA graph failed (backend {self.engine.backend.name!r}): {exc}. "
                "Pass use_cuda_graph=False to decode without a graph."
            ) from exc
        self.graph, self.graph_logits = graph, logits
        graph.replay()
        return logits


# ---------------------------------------------------------------------------------------------- segments
class SegmentGraphs:
    """The decoder layers of a model cut into segments (consecutive layers on one device, also cut at
    ``graph_breaks``), each run from a CUDA graph of its own.

    :meth:`install` gives the first layer of each segment a forward that copies its inputs (the hidden states and
    every tensor argument the model passes its layers: position embeddings, position ids, mask) into static buffers
    on the segment's device, captures the segment's layers in a graph on its first call and replays it on every
    later one, and returns the graph's output; the segment's other layers pass the hidden states through. The
    model's own forward around them (embedding, rotary embedding, final norm, LM head, accelerate's device moves)
    runs eagerly. Without ``capture`` the segment's layers run eagerly on the same static buffers (the path's
    plumbing, on any device). :meth:`remove` restores the layers' forwards.
    """

    def __init__(self, model: torch.nn.Module, graph_breaks: Sequence[int] = (), capture: bool = True):
        layers = decoder_layers(model)
        devices = [_device_of(layer) for layer in layers]
        breaks = set(graph_breaks)
        bad = sorted(b for b in breaks if not 0 < b < len(layers))
        if bad:
            raise ValueError(f"graph_breaks={sorted(breaks)}: each must be a layer index in [1, {len(layers) - 1}]")
        starts = [i for i in range(len(layers)) if i == 0 or i in breaks or devices[i] != devices[i - 1]]
        ends = [*starts[1:], len(layers)]
        self.segments = [_Segment(list(layers[a:b]), devices[a], capture) for a, b in zip(starts, ends, strict=True)]
        self.installed = False

    def install(self) -> None:
        if not self.installed:
            for segment in self.segments:
                segment.install()
            self.installed = True

    def remove(self) -> None:
        if self.installed:
            for segment in self.segments:
                segment.remove()
            self.installed = False


class _Segment:
    """Consecutive decoder layers on one device, run from one CUDA graph (see :class:`SegmentGraphs`)."""

    def __init__(self, layers: list[torch.nn.Module], device: torch.device, capture: bool):
        self.layers, self.device, self.capture = layers, device, capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple | None = None  # the static (hidden_states, args, kwargs)
        self.output: torch.Tensor | None = None

    def install(self) -> None:
        self.own = [layer.__dict__.get("forward") for layer in self.layers]  # accelerate's hook wraps it there
        self.calls = [layer.forward for layer in self.layers]
        self.layers[0].forward = self.run
        for layer in self.layers[1:]:
            layer.forward = _pass_hidden_states

    def remove(self) -> None:
        for layer, own in zip(self.layers, self.own, strict=True):
            if own is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = own

    def run(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.inputs is None:
            self.inputs = _static_copy((hidden_states, args, kwargs), self.device)
            if self.capture:
                with torch.cuda.device(self.device):
                    self.graph = torch.cuda.CUDAGraph()
                    # a capture stream of this device: torch.cuda.graph's default one belongs to the device that
                    # made it first, and kernels of another device would then run uncaptured
                    with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(self.device)):
                        self.output = self._layers()  # records the segment without running it
        else:
            _copy_into(self.inputs, (hidden_states, args, kwargs))
        if self.graph is None:
            self.output = self._layers()
        else:
            self.graph.replay()
        return self.output

    def _layers(self) -> torch.Tensor:
        hidden_states, args, kwargs = self.inputs
        for call in self.calls:
            hidden_states = call(hidden_states, *args, **kwargs)
        return hidden_states


def _pass_hidden_states(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _static_copy(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (also inside tuples, lists and dicts) copied to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, copy=True)
    if isinstance(value, tuple | list):
        return type(value)(_static_copy(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _static_copy(v, device) for k, v in value.items()}
    return value


def _copy_into(static: Any, value: Any) -> None:
    """Copy every tensor of ``value`` into its static twin (same structure, same shapes: a decode step's)."""
    if isinstance(static, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.shape != static.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise RuntimeError(f"a graph segment's input changed from {tuple(static.shape)} to {got} between steps")
        static.copy_(value)
    elif isinstance(static, tuple | list):
        for s, v in zip(static, value, strict=True):
            _copy_into(s, v)
    elif isinstance(static, dict):
        for key, s in static.items():
            _copy_into(s, value[key])


# ---------------------------------------------------------------------------------------------- generate
def fast_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    engine: Engine,
    *,
    static_capacity: int | None = None,
    use_cuda_graph: bool | None = None,
    generator: torch.Generator | None = None,
    graph_breaks: Sequence[int] = (),
    fuse_layers: bool | None = None,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """``model.generate`` for greedy search and sampling, through :class:`StaticDecoder`.

    Args:
        model, engine: inside :func:`kvsieve.apply` (``engine`` is what it yielded).
        input_ids, attention_mask: the left-padded prompts.
        static_capacity: slots per layer (default: sized from the compressor, per layer).
        use_cuda_graph, graph_breaks, fuse_layers: see :class:`StaticDecoder`.
        generator: the random source of sampling (default: torch's global one, as ``model.generate``).
        generate_kwargs: generation options as ``model.generate`` takes them (``max_new_tokens``, ``do_sample``,
            ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``num_return_sequences``, ...). Beam search,
            stop strings, ``max_time`` and dict outputs are refused.

    Returns:
        ``int64 [B * num_return_sequences, Lp + new]``: prompts and generated tokens, as ``model.generate``.
    """
    config, processors = _generation_setup(model, input_ids, attention_mask, generate_kwargs)
    n = config.num_return_sequences or 1
    if n > 1:
        input_ids = input_ids.repeat_interleave(n, dim=0)
        attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(n, dim=0)
    B, Lp = input_ids.shape
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - Lp
    if max_new < 1:
        raise ValueError(f"nothing to generate: max_new_tokens={max_new}")
    decoder = StaticDecoder(model, engine, use_cuda_graph, graph_breaks=graph_breaks, fuse_layers=fuse_layers)
    try:
        return _decode(decoder, config, processors, input_ids, attention_mask, max_new, static_capacity, generator)
    finally:
        decoder.close()


def _decode(decoder: StaticDecoder, config, processors, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            max_new: int, static_capacity: int | None, generator: torch.Generator | None) -> torch.Tensor:
    B, Lp = input_ids.shape
    eos, pad = config._eos_token_tensor, config._pad_token_tensor
    logits = decoder.prefill(input_ids, attention_mask, max_new, static_capacity)
    sequences = torch.cat([input_ids, input_ids.new_zeros(B, max_new)], dim=1)
    unfinished = torch.ones(B, dtype=torch.long, device=input_ids.device)
    for t in range(max_new):
        scores = processors(sequences[:, : Lp + t], logits)
        if config.do_sample:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        if eos is not None:  # finished rows emit the pad token
            tokens = tokens * unfinished + pad * (1 - unfinished)
            unfinished = unfinished & ~torch.isin(tokens, eos)
        sequences[:, Lp + t] = tokens
        if t + 1 == max_new:
            break
        if eos is not None and t % _STOP_CHECK_EVERY == _STOP_CHECK_EVERY - 1 and not bool(unfinished.any()):
            break
        logits = decoder.step(tokens)
    return sequences[:, : Lp + _generated_length(sequences[:, Lp : Lp + t + 1], eos)]


def _generated_length(new_tokens: torch.Tensor, eos: torch.Tensor | None) -> int:
    """Tokens ``model.generate`` returns: it stops at the step where the last row produced EOS."""
    if eos is None:
        return new_tokens.shape[1]
    hit = torch.isin(new_tokens, eos)
    if not bool(hit.any(dim=1).all()):
        return new_tokens.shape[1]
    return int(hit.int().argmax(dim=1).max()) + 1


def _generation_setup(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict):
    """The resolved generation config and the logits processors ``model.generate`` would use.

    Built by HF's own helpers (private, the same in transformers 5.17 and 5.24), so defaults, the model's
    generation config and every logits processor match ``model.generate`` exactly.
    """
    config, model_kwargs = model._prepare_generation_config(None, **kwargs)
    if model_kwargs:
        raise TypeError(f"the fast path takes generation options only, got {sorted(model_kwargs)}")
    refused = {
        "num_beams > 1 (beam search)": (config.num_beams or 1) > 1,
        "stop_strings": config.stop_strings is not None,
        "max_time": config.max_time is not None,
        "return_dict_in_generate": bool(config.return_dict_in_generate),
    }
    if any(refused.values()):
        raise ValueError(f"the fast path does not support {', '.join(k for k, v in refused.items() if v)}; "
                         "use kvsieve.generate without fast=True")
    Lp = input_ids.shape[1]
    if config.max_new_tokens is not None:
        config.max_length = config.max_new_tokens + Lp
    model._prepare_special_tokens(config, attention_mask is not None, device=input_ids.device)
    processors = model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=Lp,
        encoder_input_ids=input_ids,
        device=input_ids.device,
        model_kwargs={"attention_mask": attention_mask},
    )
    return config, processors
