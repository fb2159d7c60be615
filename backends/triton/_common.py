"""Helpers shared by the Triton kernel modules (no triton import here: this module is safe to import
anywhere).

* :func:`interpret_mode` -- whether ``TRITON_INTERPRET=1`` (kernels then run on CPU tensors through Triton's
  interpreter; the variable must be set before ``triton`` is imported).
* :func:`next_pow2`, :func:`prev_pow2`, :func:`cdiv` -- tile arithmetic.
* :func:`dot_precision` -- the ``tl.dot`` input precision for a dtype: ``"ieee"`` for fp32 (no TF32: fp32
  inputs must match the torch reference to ~1e-5), the default ``"tf32"`` otherwise (ignored for fp16/bf16
  inputs).
* :func:`num_sms`, :func:`target_programs` -- the SM count, and how many programs a launch should have to fill
  the device (a few per SM).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = [
    "cdiv",
    "compute_dtype",
    "dot_precision",
    "interpret_mode",
    "next_pow2",
    "num_sms",
    "prev_pow2",
    "target_programs",
]


def interpret_mode() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    """Smallest power of two ``>= max(x, 1)``."""
    x = max(int(x), 1)
    return 1 << (x - 1).bit_length()


def prev_pow2(x: int) -> int:
    """Largest power of two ``<= max(x, 1)``."""
    return 1 << (max(int(x), 1).bit_length() - 1)


def compute_dtype(q_dtype: torch.dtype, k_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``tl.dot`` runs in: the common dtype when queries and keys agree, else fp32 (both upcast)."""
    return q_dtype if q_dtype == k_dtype else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` ``input_precision`` for ``dtype`` operands: exact fp32 products for fp32, else default."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """The device's SM count; 2 off CUDA and in the interpreter, where every program instance costs ~0.5 ms of
    CPU time (so launches sized from it stay small there)."""
    if device.type != "cuda" or interpret_mode():
        return 2
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _num_sms(index)


def target_programs(device: torch.device) -> int:
    """Programs one launch should have to keep every SM busy: 4 per SM (8 in the interpreter)."""
    return 4 * num_sms(device)
