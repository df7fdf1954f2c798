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
        generators mean they serve identical weights."""
        h = hashlib.sha256()
        for name, p in sorted(self.model_runner.model.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
