"""The fast path's fused decoder layer: one decode step of a Llama-family layer in a handful of kernels.

HF's decoder layer runs a decode step as about forty small operators around its GEMMs and attention: RMSNorm
alone is six (cast, square, mean, rsqrt, two multiplies), the rotary embedding about ten, the cache append five,
the residual adds and SiLU*up four more. Replayed from a CUDA graph each still costs a kernel launch and a trip
through memory, about 2 ms per step at 28-32 layers (docs/benchmarks.md). :class:`FusedDecoderLayers` gives each
decoder layer a decode-step forward built from the backend's per-layer operators
(:meth:`KVBackend.rms_norm <kvsieve.backend.KVBackend.rms_norm>` with the residual add folded in,
:meth:`~kvsieve.backend.KVBackend.rope_append` -- RoPE of query and key fused with the static cache's append --
and :meth:`~kvsieve.backend.KVBackend.silu_mul`), around the layer's own projection modules (so their biases,
hooks and quantised weights stay as they are) and the engine's attention (so compressors see the same queries).
The Triton backend runs each operator as one kernel; the default (torch) ones are
:mod:`kvsieve.layer_ops`, which compute exactly what HF's layer computes. Where they are plain ``nn.Linear``
modules, q_proj/k_proj/v_proj run as one GEMM and gate_proj/up_proj as another (:class:`MergedProjections`), whose
output's two halves ``[B, 1, F]`` go to ``silu_mul`` as they are.

It replaces only decode steps of the fast path (one token per row, the static cache in use); any other call
(a prefill, a forward outside the fast path) runs the layer's own forward. It applies to the layer classes whose
forward it restates (Llama, Qwen2, Qwen3 with its per-head q/k norms, Mistral) with a SiLU-gated MLP and
``pretraining_tp == 1``; :func:`unfusable_reason` says why a model is left alone.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch

from kvsieve.backend import KVBackend
from kvsieve.engine import Engine, engine_of
from kvsieve.propagation import decoder_layers

__all__ = ["FUSED_LAYER_CLASSES", "FusedDecoderLayers", "MergedProjections", "unfusable_reason"]

#: decoder-layer classes whose decode step the fused forward restates (transformers 5.x)
FUSED_LAYER_CLASSES = frozenset({"LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                                 "MistralDecoderLayer"})
#: the projections FusedDecoderLayers.backend_projections may name
BACKEND_PROJECTIONS = ("o_proj", "down_proj")
_LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def unfusable_reason(model: torch.nn.Module, engine: Engine) -> str | None:
    """Why the decoder layers of ``model`` cannot run fused (``None``: they can)."""
    config = model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act={config.hidden_act!r} (the fused MLP is SiLU-gated)"
    if getattr(config, "pretraining_tp", 1) != 1:
        return f"pretraining_tp={config.pretraining_tp}"
    if engine.heads.group is not None:
        return "tensor parallelism (the fused layer is not verified under it yet)"
    for layer in decoder_layers(model):
        name = type(layer).__name__
        if name not in FUSED_LAYER_CLASSES:
            return f"decoder layer class {name} (fused: {', '.join(sorted(FUSED_LAYER_CLASSES))})"
        for part, linears in _LINEARS.items():
            for linear in linears:
                if not isinstance(getattr(getattr(layer, part, None), linear, None), torch.nn.Module):
                    return f"{name} has no {part}.{linear}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            module = getattr(layer, norm, None)
            if getattr(module, "weight", None) is None or not hasattr(module, "variance_epsilon"):
                return f"{name}.{norm} is not an RMSNorm with a weight"
        attn = layer.self_attn
        if not hasattr(attn, "head_dim") or not hasattr(attn, "scaling"):
            return f"{name}.self_attn has no head_dim/scaling"
    return None


class FusedDecoderLayers:
    """Decode-step forwards for the decoder layers of ``model`` (see the module docstring).

    :meth:`install` sets them (inside accelerate's hook where a layer has one, so device moves still happen) until
    :meth:`remove` or the engine's detach (the end of :func:`kvsieve.apply`) gives the layers their own forwards
    back, and the merged projections (q/k/v and gate/up, see :attr:`merge_qkv`, :attr:`merge_gate_up`) their own
    storages. A layer's fused forward runs only while its engine is the one attached to the model, and a second
    install takes the layers over from the first (no chain of wrappers).
    """

    #: let q_proj, k_proj and v_proj share one weight (and bias) storage while installed, so the step runs one
    #: GEMM for the three (plain ``nn.Linear`` projections without hooks only; memory stays the same)
    merge_qkv: bool = True
    #: the same for the MLP's gate_proj and up_proj: one GEMM ``[B, 1, D] -> [B, 1, 2F]`` for the two
    merge_gate_up: bool = True
    #: add down_proj's output to the residual stream inside its GEMM (``residual.addmm_``: the BLAS accumulates
    #: onto the residual and rounds once) instead of in a kernel of its own; plain bias-free ``nn.Linear`` only
    residual_in_down_proj: bool = True
    #: have the cache append (``rope_append``) also write the step's query into the layer's selector-query ring
    #: (RPC, SnapKV-style decode scoring) instead of a copy and a counter update of their own
    query_in_append: bool = True
    #: compute ``silu(gate) * up`` from the merged gate/up weights in one backend call
    #: (:meth:`KVBackend.gate_up_silu <kvsieve.backend.KVBackend.gate_up_silu>`; the triton backend's GEMM does it
    #: in its epilogue) instead of a BLAS GEMM and ``silu_mul``. Other backends compute what they computed before;
    #: the triton kernel's sums round differently from cuBLAS's, like any other GEMM's (docs/fast-path.md)
    silu_in_gate_up: bool = True
    #: the projections (of ``"o_proj"``, ``"down_proj"``) run by the backend's
    #: :meth:`KVBackend.linear <kvsieve.backend.KVBackend.linear>` (the triton backend: its skinny linear for a
    #: decode step's few rows) instead of the module's own call (cuBLAS); plain ``nn.Linear`` modules only.
    #: ``()`` keeps every projection on the module's own call
    backend_projections: tuple[str, ...] = ("o_proj", "down_proj")

    def __init__(self, model: torch.nn.Module, engine: Engine):
        self.engine = engine
        self.layers = list(decoder_layers(model))
        self.saved: list[tuple[str, Any]] | None = None
        self.merged: list[MergedProjections] = []

    def install(self) -> None:
        if self.saved is not None:
            return
        unknown = sorted(set(self.backend_projections) - set(BACKEND_PROJECTIONS))
        if unknown:
            raise ValueError(f"backend_projections names {unknown}: choose from {', '.join(BACKEND_PROJECTIONS)}")
        self.saved = []
        for layer in self.layers:
            # accelerate's hook keeps the wrapped forward in _old_forward and calls it after moving the inputs
            attr = "_old_forward" if hasattr(layer, "_hf_hook") and hasattr(layer, "_old_forward") else "forward"
            own = layer.__dict__.get(attr)
            if isinstance(own, _FusedForward):  # left installed by another decoder: take the layer over
                own = own.replaced
            self.saved.append((attr, own))
            call = own if own is not None else types.MethodType(type(layer).forward, layer)
            fused = _FusedForward(layer, self.engine, call, own)
            fused.query_in_append = self.query_in_append
            fused.silu_in_gate_up = self.silu_in_gate_up
            projections = [getattr(layer.self_attn, name) for name in ("q_proj", "k_proj", "v_proj")]
            if self.merge_qkv and MergedProjections.allowed(projections):
                fused.qkv = MergedProjections(projections)
                self.merged.append(fused.qkv)
            projections = [layer.mlp.gate_proj, layer.mlp.up_proj]
            if self.merge_gate_up and MergedProjections.allowed(projections):
                fused.gate_up = MergedProjections(projections)
                self.merged.append(fused.gate_up)
            down = layer.mlp.down_proj
            fused.o_proj_on_backend = ("o_proj" in self.backend_projections
                                       and MergedProjections.allowed([layer.self_attn.o_proj]))
            fused.down_on_backend = "down_proj" in self.backend_projections and MergedProjections.allowed([down])
            fused.residual_in_down = self.residual_in_down_proj and MergedProjections.allowed([down]) \
                and down.bias is None
            setattr(layer, attr, fused)
        self.engine.add_handle(self)

    def remove(self) -> None:
        if self.saved is None:
            return
        for layer, (attr, own) in zip(self.layers, self.saved, strict=True):
            if own is None:
                layer.__dict__.pop(attr, None)
            else:
                setattr(layer, attr, own)
        for merged in self.merged:
            merged.split()
        self.saved, self.merged = None, []


class MergedProjections:
    """Linear modules of one input (q_proj, k_proj, v_proj; gate_proj, up_proj) whose weights (and biases) are made
    views of one concatenated tensor, so one GEMM computes all their outputs; :meth:`split` gives each its own
    storage back.

    The concatenation is built one layer at a time and the old storages are freed as the views replace them, so
    the model's memory stays the same. Parameters keep their identity (only ``.data`` changes).
    """

    def __init__(self, modules: list[torch.nn.Linear]):
        self.modules = modules
        self.sizes = [m.out_features for m in modules]
        with torch.no_grad(), torch.inference_mode(False):  # ordinary tensors: the model may be trained later
            self.weight = torch.cat([m.weight for m in modules])
            has_bias = modules[0].bias is not None
            self.bias = torch.cat([m.bias for m in modules]) if has_bias else None
            for m, w in zip(modules, self.weight.split(self.sizes), strict=True):
                m.weight.data = w
            if has_bias:
                for m, b in zip(modules, self.bias.split(self.sizes), strict=True):
                    m.bias.data = b

    @staticmethod
    def allowed(modules: list[torch.nn.Module]) -> bool:
        """Plain ``nn.Linear`` modules (no subclass, no hooks) of one input size, dtype and device, with biases
        on all or none."""
        first = modules[0]
        return all(
            type(m) is torch.nn.Linear and not (m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"))
            and m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
            and m.weight.device == first.weight.device and (m.bias is None) == (first.bias is None)
            for m in modules
        )

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every module's output of ``x [..., in]``: views ``[..., out_i]`` of one GEMM's result."""
        return list(torch.nn.functional.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))

    def split(self) -> None:
        with torch.no_grad(), torch.inference_mode(False):
            for m in self.modules:
                m.weight.data = m.weight.data.clone()
                if m.bias is not None:
                    m.bias.data = m.bias.data.clone()
        self.weight = self.bias = None


class _FusedForward:
    """One layer's decode-step forward (a callable set as the layer's ``forward``)."""

    def __init__(self, layer: torch.nn.Module, engine: Engine, own_forward, replaced):
        self.layer, self.engine, self.own_forward = layer, engine, own_forward
        self.replaced = replaced  # what the layer's __dict__ held under the name (None: nothing)
        self.qkv: MergedProjections | None = None  # q_proj, k_proj, v_proj as one GEMM
        self.gate_up: MergedProjections | None = None  # gate_proj, up_proj as one GEMM
        self.residual_in_down = False  # down_proj's GEMM adds its output onto the residual stream in place
        self.query_in_append = True  # the append records the query in the selector-query ring
        self.silu_in_gate_up = False  # silu(gate) * up from the merged gate/up weights in one backend call
        self.o_proj_on_backend = False  # o_proj through backend.linear
        self.down_on_backend = False  # down_proj through backend.linear
        attn = layer.self_attn
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``hidden_states [B, 1, D]`` -> ``[B, 1, D]``; other shapes and calls outside a static-cache decode
        step run the layer's own forward."""
        engine, layer = self.engine, self.layer
        attn, mlp = layer.self_attn, layer.mlp
        rotary = kwargs.get("position_embeddings")
        cache = engine.cache
        if (hidden_states.shape[1] != 1 or rotary is None or engine_of(attn) is not engine
                or engine.phase != "decode" or cache is None
                or not hasattr(cache.layers[attn.layer_idx], "append_rotated")
                or rotary[0].shape[-1] != attn.head_dim):
            return self.own_forward(hidden_states, *args, **kwargs)
        backend = engine.backend
        B, d = hidden_states.shape[0], attn.head_dim
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        x, residual = backend.rms_norm(hidden_states, norm1.weight, norm1.variance_epsilon)
        if self.qkv is not None:
            query, key, value = self.qkv(x)
        else:
            query, key, value = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        query, key = query.view(B, 1, -1, d), key.view(B, 1, -1, d)
        value = value.view(B, 1, -1, d).transpose(1, 2)
        if self.q_norm is not None:  # Qwen3: RMSNorm over each head's vector before RoPE
            query = backend.rms_norm(query, self.q_norm.weight, self.q_norm.variance_epsilon)[0]
            key = backend.rms_norm(key, self.k_norm.weight, self.k_norm.variance_epsilon)[0]
        query, key = query.transpose(1, 2), key.transpose(1, 2)  # [B, heads, 1, d]
        layer_cache = cache.layers[attn.layer_idx]
        cos, sin = rotary
        # rotates query in place (and records it in the layer's selector-query ring, if asked and it keeps one)
        recorded = layer_cache.append_rotated(backend, query, key, value, cos, sin, self.query_in_append)
        out = engine.attention(attn, query, layer_cache.keys, layer_cache.values, None, attn.scaling,
                               queries_recorded=recorded)
        out = out.transpose(1, 2).reshape(B, 1, -1)
        o_proj = attn.o_proj
        out = backend.linear(out, o_proj.weight, o_proj.bias) if self.o_proj_on_backend else o_proj(out)
        x, residual = backend.rms_norm(out, norm2.weight, norm2.variance_epsilon, residual)
        if self.gate_up is not None and self.silu_in_gate_up:
            hidden = backend.gate_up_silu(x, self.gate_up.weight, self.gate_up.bias)  # [B, 1, F]
        else:
            if self.gate_up is not None:
                gate, up = self.gate_up(x)  # [B, 1, F] each: the halves of one [B, 1, 2F] output
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            hidden = backend.silu_mul(gate, up)  # [B, 1, F]
        weight = mlp.down_proj.weight  # [D, F]
        if (self.residual_in_down and residual.dtype == weight.dtype and residual.is_contiguous()
                and residual.data_ptr() != hidden_states.data_ptr()):
            # residual is the post-attention norm's fresh sum: accumulate onto it (one GEMM, no add kernel); off
            # the backend, KVBackend's own linear (cuBLAS's residual.addmm_)
            linear = backend.linear if self.down_on_backend else functools.partial(KVBackend.linear, backend)
            return linear(hidden, weight, None, residual)
        if self.down_on_backend:
            return residual + backend.linear(hidden, weight, mlp.down_proj.bias)
        return residual + mlp.down_proj(hidden)
