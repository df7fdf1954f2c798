"""vLLM worker extension: mixed into every vLLM worker via `LLM(worker_extension_cls=...)`.

Weights arrive as safetensors bytes in a numpy array, the object store's zero-copy view (collective_rpc
serialises tensors as nested lists, bytes-likes pass through intact; in-process, as relayrl runs vLLM,
nothing is serialised), and are loaded with the worker's own `reload_weights`, which redoes vLLM's
post-processing (fused qkv / gate-up, packed CPU linears). Loading straight into
`model.load_weights` after start-up fails on the CPU backend, see shared/FACTS.md.
"""

from __future__ import annotations

import hashlib
import os

from core.weights import deserialize_state_dict, merge_adapters


class WeightReceiver:
    def relayrl_load_weights(self, blob, checksum: str) -> int:
        state = deserialize_state_dict(blob, checksum)
        self.reload_weights(weights_iterator=iter(state.items()))
        return len(state)

    def relayrl_load_lora(self, blob, checksum: str, base_path: str, scale: float) -> int:
        """An adapter-only version (learner.lora_sync=adapter): merge the adapters into the base model's weights
        and reload them all. The whole model is reloaded, not only the adapted layers: vLLM fuses q/k/v and
        gate/up into one parameter, and a reload that covers part of one leaves the rest of it unset."""
        adapters = deserialize_state_dict(blob, checksum)
        state = merge_adapters(self._relayrl_base(base_path), adapters, scale)
        self.reload_weights(weights_iterator=iter(state.items()))
        return len(adapters)

    def _relayrl_base(self, base_path: str) -> dict:
        """The base model's weights as stored in BASE_PATH's safetensors files, read once and kept (one copy of
        the model in host memory)."""
        cached = getattr(self, "_relayrl_base_cache", None)
        if cached is None or cached[0] != base_path:
            from safetensors.torch import load_file

            files = sorted(f for f in os.listdir(base_path) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{base_path}: no .safetensors file to merge LoRA adapters into")
            state = {}
            for f in files:
                state.update(load_file(os.path.join(base_path, f)))
            cached = self._relayrl_base_cache = (base_path, state)
        return cached[1]

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
