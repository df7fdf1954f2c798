"""Generator: a Ray actor owning one real vLLM engine.

It turns a `GenerateRequest` into `Completion`s carrying token ids, the sampler's per-token
log-probs, the finish reason and the policy versions that produced them, and swaps in new weights
while it runs.

One engine thread owns the vLLM engine and steps it; Ray calls (the actor is threaded) only hand it
work and wait (`generate`, `update_weights`, `fingerprint`). So:
- **continuous batching across calls**: a second request joins the engine's running batch at the next
  step instead of waiting for the first request's slowest sample (vLLM's `LLM.generate` would hold the
  actor until its whole batch is done);
- **weight updates land between two engine steps**, never inside one: no token is ever sampled by a
  half-loaded model. When they land is the caller's choice (rollout.inflight_updates):
  - not inflight (default): an update waits until the requests already running finish; requests that arrive
    meanwhile wait for it. Every sample comes from one version.
  - inflight (PipelineRL's in-flight updates): it lands at the next step boundary; running samples carry
    on with the new weights (their KV cache is kept). vLLM labels each token with the version that
    sampled it (`Completion.token_versions`); staleness counts from the first token.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from concurrent.futures import Future
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
    tempered_logprobs: bool = False
    """Report each sampled token's log-prob under the distribution it was sampled from, temperature, top-p and top-k
    applied (vLLM's logprobs_mode=processed_logprobs), instead of vLLM's default, the raw logits' (the same numbers
    at temperature 1 without truncation). The learner divides its logits by the same temperature (Learner's
    `temperature`), so with temperature alone the two stay the same numbers; with truncation the importance weights
    see it. On GPUs vLLM then samples without FlashInfer's kernel: the driver turns it on only when sampling is
    not plain (temperature other than 1, top_p < 1 or top_k > 0)."""


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
    if settings.tempered_logprobs:
        args["logprobs_mode"] = "processed_logprobs"
    if current_platform.is_cpu():
        args.update(enable_chunked_prefill=False, max_num_batched_tokens=max(CPU_STEP_TOKENS, settings.max_model_len))
    return args


# Ray threads per generator actor: concurrent generate calls (the rollout keeps
# rollout.max_inflight_per_generator outstanding), plus weight updates and info calls beside them
ACTOR_CONCURRENCY = 16


@dataclass
class _Call:
    """One generate call's vLLM requests, finished ones filled in by the engine thread."""

    ids: list[str]
    outputs: dict[str, object]
    future: Future


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
        self.llm.llm_engine.set_weight_version(str(version))
        self.startup_seconds = time.monotonic() - t0
        self.generated_tokens = 0
        self.updates_in_flight = 0  # updates that landed while requests were in the engine (inflight)
        self.env_failures = 0  # multi-turn environment steps that failed (actors/env.py)
        self._envs: dict = {}  # loaded environment functions, by import path
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._calls = itertools.count()  # next() is atomic: Ray runs generate calls in several threads
        self._failed: BaseException | None = None
        threading.Thread(target=self._engine_loop, name=f"{name}-engine", daemon=True).start()

    def info(self) -> dict:
        import ray

        return {"name": self.name, "version": self.version, "startup_seconds": self.startup_seconds,
                "generated_tokens": self.generated_tokens, "updates_in_flight": self.updates_in_flight,
                "env_failures": self.env_failures,
                "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    # ------------------------------------------------------------------ the engine thread
    def _submit(self, kind: str, payload) -> Future:
        fut: Future = Future()
        if self._failed is not None:
            fut.set_exception(RuntimeError(f"{self.name}: engine thread failed: {self._failed!r}"))
        else:
            self._inbox.put((kind, payload, fut))
        return fut

    def _engine_loop(self) -> None:
        """Owns the engine: takes new work and updates from the inbox, steps while anything runs. An
        update that must wait (not inflight, samples running) holds back every generate call
        that arrives after it, so the running ones drain and it lands before them."""
        engine = self.llm.llm_engine
        waiting: dict[str, _Call] = {}  # vLLM request id -> its call
        held: list[tuple[str, object, Future]] = []  # behind a waiting update, in arrival order
        try:
            while True:
                busy = engine.has_unfinished_requests()
                try:  # wait for work only when there is nothing to step and nothing held to take in
                    held.append(self._inbox.get(block=not busy and not held))
                    while True:
                        held.append(self._inbox.get_nowait())
                except queue.Empty:
                    pass
                while held:
                    kind, payload, fut = held[0]
                    if kind == "update" and busy and not payload[3]:
                        break  # lands once the running samples finish; later calls wait behind it
                    held.pop(0)
                    if kind == "generate":
                        ids, requests = payload
                        call = _Call(ids, {}, fut)
                        for rid, (prompt, params) in zip(ids, requests):
                            # prefix-cache blocks are shared only among requests started on the same version
                            prompt["cache_salt"] = f"v{self.version}"
                            engine.add_request(rid, prompt, params)
                            waiting[rid] = call
                        busy = busy or bool(ids)
                        if not ids:
                            fut.set_result({})
                    else:
                        try:
                            fut.set_result(self._apply(kind, payload, busy))
                        except Exception as e:  # a bad blob fails its caller, not the engine
                            fut.set_exception(e)
                if engine.has_unfinished_requests():
                    for out in engine.step():
                        if not out.finished:
                            continue
                        call = waiting.pop(out.request_id)
                        call.outputs[out.request_id] = out
                        self.generated_tokens += sum(len(o.token_ids) for o in out.outputs)
                        if len(call.outputs) == len(call.ids):
                            call.future.set_result({i: call.outputs[i] for i in call.ids})
        except BaseException as e:  # the engine is unusable: fail every waiting caller, and later ones
            self._failed = e
            for call in waiting.values():
                if not call.future.done():
                    call.future.set_exception(RuntimeError(f"{self.name}: engine failed: {e!r}"))
            for _, _, fut in held:
                fut.set_exception(RuntimeError(f"{self.name}: engine failed: {e!r}"))
            raise

    def _apply(self, kind: str, payload, busy: bool):
        if kind == "fingerprint":
            return self._fingerprint()
        blob, checksum, version, _, verify, lora = payload
        if lora is None:
            self.llm.collective_rpc("relayrl_load_weights", args=(blob, checksum))
        else:  # adapters alone: the worker merges them into its base (learner.lora_sync=adapter)
            self.llm.collective_rpc("relayrl_load_lora", args=(blob, checksum, lora.base_path, lora.scale))
        # vLLM's prefix cache holds KV computed with the old weights: drop it. With samples running (in-flight
        # update) their blocks cannot be freed and vLLM keeps the cache; requests are salted with the version
        # they start on (cache_salt), so no new request reuses blocks of an older version either way.
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.set_weight_version(str(version))
        self.version = version
        self.updates_in_flight += busy
        # fingerprinted in the same engine pause: no later update can land in between
        return version, (self._fingerprint() if verify else None)

    def _fingerprint(self) -> str:  # engine thread only
        return self.llm.collective_rpc("relayrl_fingerprint")[0]

    # ------------------------------------------------------------------ Ray calls
    def generate(self, req: GenerateRequest) -> list[Completion]:
        """The request's new prompts (n samples each, in prompt order), then its continuations, in order. With
        an environment (req.env) each is a whole multi-turn episode (`_episodes`)."""
        out = self.completions(req, self.submit_generate(req).result())
        return out if req.env is None else self._episodes(req, out)

    def _episodes(self, req: GenerateRequest, out: list[Completion]) -> list[Completion]:
        """Multi-turn: while a sample's turn ended on its own (finish_reason stop) with turns and tokens to spare,
        ask the environment (actors/env.py) for its reply, append the reply's tokens (loss_mask 0, log-prob 0.0)
        and continue the sample from there as a new vLLM request, seeded by its slot and length like a partial
        rollout's continuation. Each episode goes on as soon as its own reply is in: a slow environment step holds
        back its own episode only, and the engine batches whatever turns are running at the time. This runs in
        the Ray call's thread; the engine thread keeps serving other calls meanwhile."""
        from concurrent.futures import FIRST_COMPLETED, wait
        from dataclasses import replace

        from actors.env import chat_turn, load_env, start_step, step_outcome
        from core.messages import Continuation

        env = req.env
        fn = self._envs.get(env.function) or self._envs.setdefault(env.function, load_env(env))
        tok = self.llm.get_tokenizer()
        slot = [j for _ in req.prompts for j in range(req.n)] + [k.index for k in req.continuations]
        asked: dict[Future, tuple[int, float]] = {}  # environment step -> (sample, when it was asked)
        turns: dict[Future, tuple[int, GenerateRequest]] = {}  # the model's next turn -> (sample, its request)

        def ask(i: int) -> None:
            c = out[i]
            if c.finish_reason == "stop" and c.turns < env.max_turns and len(c.token_ids) < req.max_new_tokens:
                asked[start_step(fn, c)] = (i, time.monotonic())

        def answer(i: int, fut: Future) -> None:
            c = out[i]
            reply, failure = step_outcome(fut, env.step_timeout_s)
            if failure:
                self.env_failures += 1
                out[i] = replace(c, env_failure=failure)
                return
            if reply is None:  # the environment ended the episode
                return
            if env.role:  # a chat message of that role, then the prompt for the model's next turn
                reply = chat_turn(tok, env.role, reply, tok.decode(list(c.token_ids[-1:])))
            ids = tuple(tok(reply, add_special_tokens=False)["input_ids"])
            if len(c.token_ids) + len(ids) >= req.max_new_tokens:  # no room left for the model to answer
                out[i] = replace(c, finish_reason="length")
                return
            n = len(c.token_ids)
            k = Continuation(replace(
                c, token_ids=c.token_ids + ids, logprobs=c.logprobs + (0.0,) * len(ids),
                loss_mask=(c.loss_mask or (1,) * n) + (0,) * len(ids), turns=c.turns + 1,
                # reply tokens carry the version of the turn they answer: they sample nothing
                token_versions=(c.token_versions or (c.policy_version,) * n)
                + ((c.token_versions or (c.policy_version,))[-1],) * len(ids)), slot[i])
            nxt = GenerateRequest((), 1, req.temperature, req.max_new_tokens, seed=req.seed, continuations=(k,),
                                  top_p=req.top_p, top_k=req.top_k)
            turns[self.submit_generate(nxt)] = (i, nxt)

        for i in range(len(out)):
            ask(i)
        while asked or turns:
            due = min((t0 + env.step_timeout_s for _, t0 in asked.values()), default=None)
            done, _ = wait([*asked, *turns], return_when=FIRST_COMPLETED,
                           timeout=None if due is None else max(0.0, due - time.monotonic()))
            for fut in done:
                if fut in turns:
                    i, nxt = turns.pop(fut)
                    out[i] = self.completions(nxt, fut.result())[0]
                    ask(i)
                else:
                    answer(asked.pop(fut)[0], fut)
            now = time.monotonic()
            for fut, (i, t0) in list(asked.items()):  # given up on: its thread is abandoned (actors/env.py)
                if now - t0 >= env.step_timeout_s:
                    del asked[fut]
                    answer(i, fut)
        return out

    def submit_generate(self, req: GenerateRequest) -> Future:
        """Hand a request's vLLM requests to the engine thread; the future gives `completions` its outputs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        budget = req.chunk_tokens or req.max_new_tokens

        def params(n: int, max_tokens: int, seed: int | None) -> SamplingParams:
            return SamplingParams(n=n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                  max_tokens=max_tokens, logprobs=0, seed=seed,
                                  output_kind=RequestOutputKind.FINAL_ONLY)

        # one SamplingParams per prompt: each prompt's own random stream (core.messages.sample_seed)
        sp = [params(req.n, min(budget, req.max_new_tokens), None if req.seed is None else sample_seed(req.seed, p.uid))
              for p in req.prompts]
        inputs = [TokensPrompt(prompt_token_ids=list(p.token_ids)) for p in req.prompts]
        for k in req.continuations:
            done = k.sample.token_ids
            sp.append(params(1, min(budget, req.max_new_tokens - len(done)), None if req.seed is None else
                             continuation_seed(req.seed, k.sample.prompt.uid, k.index, len(done))))
            inputs.append(TokensPrompt(prompt_token_ids=[*k.sample.prompt.token_ids, *done]))
        call = next(self._calls)
        ids = [f"{call}-{i}" for i in range(len(inputs))]
        return self._submit("generate", (ids, list(zip(inputs, sp))))

    def completions(self, req: GenerateRequest, done: dict) -> list[Completion]:
        """`req`'s Completions from its finished vLLM outputs (by request id, in submission order)."""
        outputs = list(done.values())
        out: list[Completion] = []
        for prompt, ro in zip(req.prompts, outputs):
            for o in sorted(ro.outputs, key=lambda o: o.index):  # sample i: the stream seed + i
                ids_, lps, reason, versions = self._sampled(o)
                out.append(Completion(prompt=prompt, token_ids=ids_, logprobs=lps, text=o.text, finish_reason=reason,
                                      policy_version=versions[0] if versions else self.version, generator=self.name,
                                      token_versions=versions if req.chunk_tokens or len(set(versions)) > 1 else ()))
        for k, ro in zip(req.continuations, outputs[len(req.prompts):]):
            ids_, lps, reason, versions = self._sampled(ro.outputs[0])
            s = k.sample
            all_ids = s.token_ids + ids_
            out.append(Completion(
                prompt=s.prompt, token_ids=all_ids, logprobs=s.logprobs + lps,
                # the whole sample decoded at once: chunk texts may not join at a multi-byte character
                text=self.llm.get_tokenizer().decode(list(all_ids), skip_special_tokens=True),
                finish_reason=reason, policy_version=s.policy_version, generator=self.name,
                token_versions=(s.token_versions or (s.policy_version,) * len(s.token_ids)) + versions,
                loss_mask=s.loss_mask + (1,) * len(ids_) if s.loss_mask else (), turns=s.turns))
        return out

    def _sampled(self, o) -> tuple[tuple[int, ...], tuple[float, ...], str, tuple[int, ...]]:
        """Token ids, the sampler's log-prob of each, the finish reason and the version that sampled each token, of
        one vLLM CompletionOutput."""
        ids = tuple(o.token_ids)
        # logprobs=0 returns the sampled token's log-prob at each position
        lps = tuple(float(step[tok].logprob) for tok, step in zip(ids, o.logprobs))
        versions: list[int] = []
        for span in o.weight_versions or ():  # vLLM's record: tokens [start, end) came from weights `version`
            versions += [int(span.version)] * (span.end - span.start)
        if len(versions) != len(ids):  # no record (no tokens): the version serving now
            versions = [self.version] * len(ids)
        return ids, lps, (o.finish_reason if o.finish_reason in ("stop", "length") else "abort"), tuple(versions)

    def update_weights(self, handle: WeightsHandle, verify: bool = False, inflight: bool = False) -> tuple[int, str | None]:
        """Load a published version in place (no engine restart), between two engine steps: once the samples
        running now finish, or with `inflight` at the next step (see the module docstring). Returns (new
        version, fingerprint of the loaded weights when `verify`, else None)."""
        import ray

        blob = ray.get(handle.blob_ref[0])
        return self._submit("update", (blob, handle.checksum, handle.version, inflight, verify, handle.lora)).result()

    def fingerprint(self) -> str:
        return self._submit("fingerprint", None).result()
