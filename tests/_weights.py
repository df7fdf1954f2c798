"""Weights for the integration tests."""

from __future__ import annotations

import ray

from core.messages import WeightsHandle


def checkpoint_handle(model_path: str, version: int) -> WeightsHandle:
    """The checkpoint's own weights published as VERSION (what a learner's publish() sends)."""
    import torch
    from transformers import AutoModelForCausalLM

    from core.weights import serialize_state_dict

    sd = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).state_dict()
    blob, crc = serialize_state_dict(sd)
    return WeightsHandle(version=version, blob_ref=[ray.put(blob)], num_bytes=blob.nbytes, checksum=crc)
