"""Generator: a Ray actor owning one real vLLM engine.

It turns a `GenerateRequest` into `Completion`s carrying token ids, the sampler's per-token
log-probs, the finish reason and the policy version that produced them, and swaps in new weights
between requests. The actor runs one call at a time, so a version switch can never interleave
with a generation: no request is ever served by a half-loaded model.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from core.messages import Completion, GenerateRequest, WeightsHandle, continuation_seed, sample_seed


@dataclass(frozen=True)
class EngineSettings:
    model_path: str
    max_model_len: int
    kv_cache_gib: int = 1
    gpu_memory_utilization: float = 0.3
    enforce_eager: bool = True
    seed: int = 0
    dtype: str = "float32"


def engine_env(settings: EngineSettings) -> dict[str, str]:
    """Environment the vLLM engine must see before it is imported (set via Ray's runtime_env)."""
    return {
        # keep the engine core in the actor's own process: faster start, one process to supervise
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib),
        "TOKENIZERS_PARALLELISM": "false",
    }


# vLLM's CPU scheduler takes at most this many tokens per step (its LLM-class default on CPU)
CPU_STEP_TOKENS = 4096


def engine_args(settings: EngineSettings) -> dict:
    """The `vllm.LLM` arguments of a generator; the benchmarks' bare-vLLM baselines use the same.

    On CPU, chunked prefill is off. vLLM 0.32 splits a prefill that does not fit one scheduler step
    (4096 tokens on CPU: a few dozen long prompts, or partial rollouts' continuations) across steps,
    and then rewinds the request's seeded torch generator, which a CPU generator cannot do: the
    request fails with "CPU Generator does not use offset", and every relayrl request is seeded. Without
    chunking a prompt waits for the next step instead (tests/integration/test_sampling.py). GPUs keep
    vLLM's default: CUDA generators rewind."""
    from vllm.platforms import current_platform

    args = dict(model=settings.model_path, dtype=settings.dtype, seed=settings.seed,
                enforce_eager=settings.enforce_eager, gpu_memory_utilization=settings.gpu_memory_utilization,
                max_model_len=settings.max_model_len, worker_extension_cls="actors.vllm_ext.WeightReceiver")
    if current_platform.is_cpu():
        args.update(enable_chunked_prefill=False, max_num_batched_tokens=max(CPU_STEP_TOKENS, settings.max_model_len))
    return args


class Generator:
    """Plain class; `actors.pool` wraps it with `ray.remote` and names each actor by role."""

    def __init__(self, name: str, settings: EngineSettings, version: int = 0):
        for k, v in engine_env(settings).items():
            os.environ.setdefault(k, v)
        from vllm import LLM

        t0 = time.monotonic()
        self.name = name
        self.version = version
        self.llm = LLM(**engine_args(settings))
        self.startup_seconds = time.monotonic() - t0
        self.generated_tokens = 0

    def info(self) -> dict:
        import ray

        return {"name": self.name, "version": self.version, "startup_seconds": self.startup_seconds,
                "generated_tokens": self.generated_tokens, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def generate(self, req: GenerateRequest) -> list[Completion]:
        """The request's new prompts (n samples each, in prompt order), then its continuations, in order."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        budget = req.chunk_tokens or req.max_new_tokens

        def params(n: int, max_tokens: int, seed: int | None) -> SamplingParams:
            return SamplingParams(n=n, temperature=req.temperature, max_tokens=max_tokens, logprobs=0, seed=seed)

        # one SamplingParams per prompt: each prompt's own random stream (core.messages.sample_seed)
        sp = [params(req.n, min(budget, req.max_new_tokens), None if req.seed is None else sample_seed(req.seed, p.uid))
              for p in req.prompts]
        inputs = [TokensPrompt(prompt_token_ids=list(p.token_ids)) for p in req.prompts]
        for k in req.continuations:
            done = k.sample.token_ids
            sp.append(params(1, min(budget, req.max_new_tokens - len(done)), None if req.seed is None else
                             continuation_seed(req.seed, k.sample.prompt.uid, k.index, len(done))))
            inputs.append(TokensPrompt(prompt_token_ids=[*k.sample.prompt.token_ids, *done]))
        outputs = self.llm.generate(inputs, sp, use_tqdm=False) if inputs else []
        out: list[Completion] = []
        for prompt, ro in zip(req.prompts, outputs):
            for o in sorted(ro.outputs, key=lambda o: o.index):  # sample i: the stream seed + i
                ids, lps, reason = self._sampled(o)
                out.append(Completion(prompt=prompt, token_ids=ids, logprobs=lps, text=o.text, finish_reason=reason,
                                      policy_version=self.version, generator=self.name,
                                      token_versions=(self.version,) * len(ids) if req.chunk_tokens else ()))
        for k, ro in zip(req.continuations, outputs[len(req.prompts):]):
            ids, lps, reason = self._sampled(ro.outputs[0])
            s = k.sample
            all_ids = s.token_ids + ids
            out.append(Completion(
                prompt=s.prompt, token_ids=all_ids, logprobs=s.logprobs + lps,
                # the whole sample decoded at once: chunk texts may not join at a multi-byte character
                text=self.llm.get_tokenizer().decode(list(all_ids), skip_special_tokens=True),
                finish_reason=reason, policy_version=s.policy_version, generator=self.name,
                token_versions=(s.token_versions or (s.policy_version,) * len(s.token_ids)) + (self.version,) * len(ids)))
        return out

    def _sampled(self, o) -> tuple[tuple[int, ...], tuple[float, ...], str]:
        """Token ids, the sampler's log-prob of each, and the finish reason of one vLLM CompletionOutput (its tokens
        are added to the generator's `generated_tokens`)."""
        ids = tuple(o.token_ids)
        # logprobs=0 returns the sampled token's log-prob at each position
        lps = tuple(float(step[tok].logprob) for tok, step in zip(ids, o.logprobs))
        self.generated_tokens += len(ids)
        return ids, lps, (o.finish_reason if o.finish_reason in ("stop", "length") else "abort")

    def update_weights(self, handle: WeightsHandle, verify: bool = False) -> tuple[int, str | None]:
        """Load a published version in place (no engine restart); returns (new version, fingerprint of the
        loaded weights when `verify`, else None)."""
        import ray

        blob = ray.get(handle.blob_ref[0])
        self.llm.collective_rpc("relayrl_load_weights", args=(blob, handle.checksum))
        # vLLM's prefix cache holds KV computed with the old weights; drop it
        self.llm.reset_prefix_cache()
        self.version = handle.version
        return self.version, (self.fingerprint() if verify else None)

    def fingerprint(self) -> str:
        return self.llm.collective_rpc("relayrl_fingerprint")[0]
