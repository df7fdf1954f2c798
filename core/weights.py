"""Weight transport: the format in which a policy version travels from learner to generators.

A version is a safetensors blob (tensors are contiguous, zero-copy on load, and need no pickle)
plus its sha256. The learner puts the blob into the Ray object store once; every generator pulls
it from there (shared memory on the same node, Ray's object transfer across nodes) and checks the
checksum before loading, so a torn or mixed-up transfer fails loudly instead of being served.
"""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def serialize_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[bytes, str]:
    """Serialise to safetensors bytes; returns (blob, sha256 hex digest)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    blob = st_save(tensors)
    return blob, hashlib.sha256(blob).hexdigest()


def deserialize_state_dict(blob: bytes, checksum: str | None = None) -> dict[str, torch.Tensor]:
    """Inverse of serialize_state_dict; raises ValueError when the checksum does not match."""
    if checksum is not None:
        got = hashlib.sha256(blob).hexdigest()
        if got != checksum:
            raise ValueError(f"weight blob checksum mismatch: expected {checksum[:12]}, got {got[:12]}")
    return st_load(bytes(blob))
