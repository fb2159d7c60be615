"""The ``triton`` backend: Triton kernels for decode attention, window scoring, compaction and the decode
layer's operators around attention.

Each primitive lives in its own module (imported lazily, so this module imports -- and the plugin is listed --
without triton installed):

* :mod:`.window_scores` -- ``window_lse`` and ``window_scores`` without materialising ``[B, H, W, L]``;
* :mod:`.decode_attention` -- GQA-native split-K flash decoding over ``[starts, ends)``;
* :mod:`.compaction` -- in-place gather of kept K/V slots;
* :mod:`.linear` -- the gated MLP's gate/up GEMM with SiLU * up in its epilogue (the fused layer's opt-in
  ``silu_in_gate_up``), and a skinny linear layer for decode rows (``linear``: the fused layer's
  ``backend_projections``).
* :mod:`.layer_ops` -- the fused decode layer's RMSNorm (+ residual), SiLU * up and RoPE + cache append (one
  launch each, bit for bit HF's rounding);
* :mod:`.contract_checks` -- the run-time contract checks of a compression (cache fingerprint and its comparison,
  non-finite scores, the selection rules and stand-in) in seven launches instead of some 70 torch operators;
* :mod:`.prefill_attention` -- delegated to PyTorch SDPA (``enable_gqa=True``), no Triton kernel.

Runs on CUDA devices. With ``TRITON_INTERPRET=1`` set before ``triton`` is imported it also accepts CPU
tensors (Triton's interpreter, ~0.5 ms per program instance: for tests at tiny shapes only).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math

import torch

import kvsieve
from kvsieve.backend import BackendCapabilities, KVBackend

from ._common import interpret_mode

__all__ = ["TritonBackend"]


class _Capabilities:
    """``capabilities`` that follows ``TRITON_INTERPRET`` when read (on the class or on an instance)."""

    def __get__(self, obj, objtype=None) -> BackendCapabilities:
        devices = ("cuda", "cpu") if interpret_mode() else ("cuda",)
        return BackendCapabilities(devices=devices)


class _AutoPriority:
    """``auto_priority``: 30 (above ``flash`` (20) and ``torch``), but -10 under ``TRITON_INTERPRET=1`` so
    that ``backend="auto"`` never picks the interpreter (a test tool, ~0.5 ms per program) over the torch
    reference.

    Above ``flash`` because it measured faster end to end on the H200 (docs/benchmarks.md, ``kvsieve bench
    prefill``): the same prefill time (both run prefill through PyTorch's SDPA kernels) and a decode step 1.8x to
    11x faster (split-K decode vs the FlashAttention-2 varlen kernel, which puts one program on each (row, KV
    head) and so leaves the GPU idle at batch 1 and long contexts)."""

    def __get__(self, obj, objtype=None) -> int:
        return -10 if interpret_mode() else 30


def _launching_on(*tensors: torch.Tensor) -> contextlib.AbstractContextManager:
    """Check the tensors can run here, and make their GPU the current device while kernels launch: Triton launches
    on the current device and its stream, so a layer on another GPU than the current one (a ``device_map`` split)
    would otherwise run on the wrong GPU, unordered with that layer's own stream."""
    for t in tensors:
        if t.device.type != "cuda" and not interpret_mode():
            raise RuntimeError(
                f"the triton backend runs on CUDA tensors, got a {t.device.type} tensor "
                "(set TRITON_INTERPRET=1 before importing triton to run it on CPU through Triton's "
                "interpreter, slowly)"
            )
    device = tensors[0].device
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class TritonBackend(KVBackend):
    """Triton kernels; match :class:`kvsieve.backends.torch_ref.TorchBackend` within the dtype's tolerance."""

    name = "triton"
    capabilities = _Capabilities()  # type: ignore[assignment]
    auto_priority = _AutoPriority()  # type: ignore[assignment]

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (pip install 'kvsieve[triton]')"
        if not torch.cuda.is_available() and not interpret_mode():
            return False, (
                "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the kernels "
                "on CPU through Triton's interpreter, slowly)"
            )
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # a broken install must not crash plugin listing
            return False, f"triton cannot be imported: {exc}"
        return True, ""

    # ------------------------------------------------------------------ attention
    def prefill_attention(self, queries, keys, values, attention_mask, scale):
        from .prefill_attention import prefill_attention

        return prefill_attention(queries, keys, values, attention_mask, scale)

    def decode_attention(self, queries, keys, values, starts, ends, scale):
        from .decode_attention import decode_attention

        with _launching_on(queries, keys, values):
            return decode_attention(queries, keys, values, starts, ends, scale)

    # ------------------------------------------------------------------ per-layer operators (fused decode layer)
    def rms_norm(self, x, weight, eps, residual=None):
        from .layer_ops import rms_norm

        with _launching_on(x, weight):
            return rms_norm(x, weight, eps, residual)

    def silu_mul(self, gate, up):
        from .layer_ops import silu_mul

        with _launching_on(gate, up):
            return silu_mul(gate, up)

    def gate_up_silu(self, x, weight, bias=None):
        from .linear import MAX_ROWS, gate_up_silu

        if math.prod(x.shape[:-1]) > MAX_ROWS:  # more rows than a decode step's: a GEMM library's kernels
            return super().gate_up_silu(x, weight, bias)
        with _launching_on(x, weight):
            return gate_up_silu(x, weight, bias)

    def linear(self, x, weight, bias=None, residual=None):
        from .linear import MAX_ROWS, decode_config, skinny_linear

        if math.prod(x.shape[:-1]) > MAX_ROWS:  # more rows than a decode step's: a GEMM library's kernels
            return super().linear(x, weight, bias, residual)
        with _launching_on(x, weight):
            return skinny_linear(x, weight, bias, residual, decode_config(x, weight))

    def rope_append(self, query, key, value, cos, sin, keys, values, positions, ends, seen, query_ring=None,
                    ring_count=None):
        from .layer_ops import rope_append

        with _launching_on(query, key, value, keys, values):
            rope_append(query, key, value, cos, sin, keys, values, positions, ends, seen, query_ring, ring_count)

    # ------------------------------------------------------------------ scoring
    def window_lse(self, queries, keys, starts, ends, scale):
        from .window_scores import window_lse

        with _launching_on(queries, keys):
            return window_lse(queries, keys, starts, ends, scale)

    def window_scores(self, queries, keys, cand_starts, cand_ends, scale, lse=None, num_candidates=None):
        from .window_scores import window_scores

        with _launching_on(queries, keys):
            return window_scores(queries, keys, cand_starts, cand_ends, scale, lse, num_candidates=num_candidates)

    # ------------------------------------------------------------------ contract checks
    def cache_fingerprint(self, keys, values, positions, starts, ends):
        from .contract_checks import cache_fingerprint

        with _launching_on(keys, values, positions):
            return cache_fingerprint(keys, values, positions, starts, ends)

    def cache_changed(self, before, keys, values, positions, starts, ends):
        from .contract_checks import cache_changed

        with _launching_on(keys, values, positions):
            return cache_changed(before, keys, values, positions, starts, ends)

    def nonfinite_scores(self, scores, counts):
        from .contract_checks import nonfinite_scores

        with _launching_on(scores, counts):
            return nonfinite_scores(scores, counts)

    def check_selection(self, keep, kept, counts, budget, protect_head, protect_tail, head_adaptive):
        from .contract_checks import check_selection

        with _launching_on(keep, kept, counts):
            return check_selection(keep, kept, counts, budget, protect_head, protect_tail, head_adaptive)

    # ------------------------------------------------------------------ compaction
    def compact(self, keys, values, keep, counts, dest_starts):
        from .compaction import compact

        with _launching_on(keys, values):
            compact(keys, values, keep, counts, dest_starts)


@kvsieve.hookimpl
def kvsieve_backends():
    return {"triton": TritonBackend}
