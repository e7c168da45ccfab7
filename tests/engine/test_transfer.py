"""Host-to-device copies: many small arrays packed into one copy come back whole, typed and aligned."""

from __future__ import annotations

import numpy as np
import torch

from engine.transfer import arrays_to_device


def test_packed_arrays_keep_their_values_dtypes_shapes_and_alignment() -> None:
    arrays = [
        np.arange(5, dtype=np.int64),
        np.zeros(0, np.int64),  # a step with no pending token
        np.arange(12, dtype=np.int32).reshape(4, 3).T,  # not contiguous
        np.array([True, False, True]),
        np.array([0.5, -1.5, 3.0], np.float32),
        np.array([7], np.int64),  # one element after 3 floats: misaligned if offsets were only rounded to 8 bytes
        np.zeros((0, 4), np.int32),
    ]
    moved = arrays_to_device(arrays, torch.device("cpu"))
    assert len(moved) == len(arrays)
    for array, tensor in zip(arrays, moved):
        assert tensor.dtype == torch.from_numpy(np.empty(0, array.dtype)).dtype
        assert tuple(tensor.shape) == array.shape
        assert np.array_equal(tensor.numpy(), array)
        assert tensor.data_ptr() % 16 == 0, "a Triton kernel may take each array as 16-byte aligned"


def test_nothing_to_move() -> None:
    assert arrays_to_device([], torch.device("cpu")) == []
    (empty,) = arrays_to_device([np.zeros(0, np.int32)], torch.device("cpu"))
    assert empty.shape == (0,) and empty.dtype == torch.int32
