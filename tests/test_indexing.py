"""kvsieve.indexing.ints_to_device: int64 device tensors from host ints without a synchronisation (CPU: the values;
GPU: the values, no synchronising call, refused during a graph capture), and the per-row tensors made with it."""

from __future__ import annotations

import warnings

import pytest
import torch

from kvsieve.compressor import _row_tensor
from kvsieve.indexing import ints_to_device


def test_values_dtype_and_device_on_cpu():
    got = ints_to_device([3, -1, 2**40], "cpu")
    assert got.dtype == torch.long and got.device == torch.device("cpu")
    assert got.tolist() == [3, -1, 2**40]
    assert ints_to_device([], torch.device("cpu")).shape == (0,)


def test_row_tensors_hold_one_value_per_row():
    like = torch.zeros(3, 2, dtype=torch.long)
    got = _row_tensor([5, 7, 9], like)
    assert got.dtype == torch.long and got.shape == (3, 2)
    assert got.tolist() == [[5, 5], [7, 7], [9, 9]]


@pytest.mark.gpu
def test_a_cuda_copy_does_not_synchronise():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = ints_to_device([4, 0, 2**40], "cuda")
            rows = _row_tensor([1, 2], torch.zeros(2, 3, dtype=torch.long, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not [w for w in caught if "synchroniz" in str(w.message).lower()], [str(w.message) for w in caught]
    assert got.dtype == torch.long and got.is_cuda
    assert got.tolist() == [4, 0, 2**40]
    assert rows.tolist() == [[1, 1, 1], [2, 2, 2]]


@pytest.mark.gpu
def test_a_cuda_copy_is_refused_during_a_graph_capture():
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(torch.cuda.Stream()):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            with pytest.raises(RuntimeError, match="captures a CUDA graph"):
                ints_to_device([1, 2], "cuda")
        finally:
            graph.capture_end()
