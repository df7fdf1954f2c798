"""vLLM worker extension: mixed into every vLLM worker via `LLM(worker_extension_cls=...)`.

Weights arrive as safetensors bytes in a numpy array, the object store's zero-copy view (collective_rpc
serialises tensors as nested lists, bytes-likes pass through intact; in-process, as relayrl runs vLLM,
nothing is serialised), and are loaded with the worker's own `reload_weights`, which redoes vLLM's
post-processing (fused qkv / gate-up, packed CPU linears). Loading straight into
`model.load_weights` after start-up fails on the CPU backend, see shared/FACTS.md.
"""

from __future__ import annotations

import hashlib

from core.weights import deserialize_state_dict


class WeightReceiver:
    def relayrl_load_weights(self, blob, checksum: str) -> int:
        state = deserialize_state_dict(blob, checksum)
        self.reload_weights(weights_iterator=iter(state.items()))
        return len(state)

    def relayrl_fingerprint(self) -> str:
        """sha256 over vLLM's own parameters (after its fusing): equal fingerprints across
        generators mean they serve identical weights.

        On CPU vLLM packs every linear layer's weight for its GEMM kernel (oneDNN or sgl-kernel) and leaves an
        empty `weight` parameter behind; the packed copy is out of reach (an opaque handle inside
        `layer.cpu_linear`). Such a layer is fingerprinted by what it computes: its output on a fixed probe input,
        which any change of its weights or bias changes."""
        import torch

        h = hashlib.sha256()
        model = self.model_runner.model
        for name, p in sorted(model.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        gen = torch.Generator().manual_seed(0)
        for name, m in sorted(model.named_modules(), key=lambda nm: nm[0]):
            weight = getattr(m, "weight", None)
            if not callable(getattr(m, "cpu_linear", None)) or weight is None or weight.numel():
                continue  # not a packed CPU linear: its parameters are hashed above
            width = getattr(m, "input_size_per_partition", None) or m.input_size
            probe = torch.randn(2, width, generator=gen).to(weight.dtype)
            with torch.no_grad():
                out = m.cpu_linear(probe, weight, getattr(m, "bias", None))
            h.update(f"{name}:probe".encode())
            h.update(out.float().contiguous().numpy().tobytes())
        return h.hexdigest()
