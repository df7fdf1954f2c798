"""The weight transport format (core/weights.py): exact round trip, real safetensors, zero-copy views
of the blob, and a checksum that catches a flipped byte."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from core.weights import checksum, deserialize_state_dict, serialize_state_dict


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.weight": torch.randn(5, 3, generator=g),
        "lm_head.weight": torch.randn(7, generator=g).to(torch.bfloat16),
        "b.mask": torch.tensor([True, False, True]),  # 3 bytes: a narrow dtype with an odd size
        "a.step": torch.tensor(11, dtype=torch.int64),  # 0-d
        "rotary.inv_freq": torch.randn(4, generator=g, dtype=torch.float64),
        "empty": torch.zeros(0, 2),
        "strided": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
    }


def test_round_trip_is_exact_and_views_the_blob():
    state = _state()
    blob, crc = serialize_state_dict(state)
    assert isinstance(blob, np.ndarray) and blob.dtype == np.uint8
    got = deserialize_state_dict(blob, crc)
    assert list(got) != [] and set(got) == set(state)
    for k, t in state.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    # views, not copies: every non-empty tensor's data lies inside the blob, aligned to its element size
    lo, hi = blob.ctypes.data, blob.ctypes.data + blob.nbytes
    for k, t in got.items():
        if t.numel():
            assert lo <= t.data_ptr() < hi and t.data_ptr() % t.element_size() == 0, k


def test_a_buffer_of_the_right_size_is_reused():
    state = _state()
    first, crc = serialize_state_dict(state)
    state["model.layers.0.mlp.weight"] += 1.0
    again, crc2 = serialize_state_dict(state, out=first)
    assert again is first and crc2 != crc
    assert torch.equal(deserialize_state_dict(again, crc2)["model.layers.0.mlp.weight"], state["model.layers.0.mlp.weight"])
    state["extra"] = torch.ones(2)  # another size: a new buffer, the old one untouched
    other, _ = serialize_state_dict(state, out=first)
    assert other is not first and deserialize_state_dict(first, crc2).keys() == set(state) - {"extra"}


def test_blob_is_safetensors_both_ways():
    state = _state()
    blob, _ = serialize_state_dict(state)
    theirs = st_load(blob.tobytes())  # the reference reader accepts ours...
    for k, t in state.items():
        assert torch.equal(theirs[k], t), k
    ours = deserialize_state_dict(st_save({k: v.contiguous() for k, v in state.items()}))  # ...and we read theirs
    for k, t in state.items():
        assert torch.equal(ours[k], t), k


def test_checksum_catches_one_flipped_byte():
    blob, crc = serialize_state_dict(_state())
    assert crc == checksum(blob.tobytes()) and crc.startswith("crc32:")
    torn = blob.copy()
    torn[-5] ^= 0x01
    with pytest.raises(ValueError, match="checksum mismatch"):
        deserialize_state_dict(torn, crc)
    assert deserialize_state_dict(torn)["model.layers.0.mlp.weight"].shape == (5, 3)  # unchecked: still parses
