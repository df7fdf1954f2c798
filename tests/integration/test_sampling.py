"""Real vLLM: what a prompt samples depends on the run's seed and the prompt, not on the request, the
generator or the other prompts it was sent with (core.messages.sample_seed)."""

from __future__ import annotations

import dataclasses

import pytest

pytestmark = pytest.mark.integration

N, MAX_NEW = 4, 8


def _samples(pool, prompts, seed):
    comps = pool.generate(prompts, n=N, temperature=1.0, max_new_tokens=MAX_NEW, seed=seed)
    out: dict[int, list[tuple[int, ...]]] = {}
    for c in comps:
        out.setdefault(c.prompt.uid, []).append(c.token_ids)
    return out


def test_a_prompts_samples_do_not_depend_on_its_request(generator_pool, heldout_prompts):
    prompts = list(heldout_prompts[:6])
    twin = dataclasses.replace(prompts[0], uid=10_000)  # the same text as prompts[0], another draw of it
    together = _samples(generator_pool, [*prompts, twin], seed=7)  # split over the 2 generators: 0,2,4,twin / 1,3,5
    alone = _samples(generator_pool, [prompts[3]], seed=7)  # its own request, on the first generator
    reordered = _samples(generator_pool, prompts[::-1], seed=7)  # other chunks, other generators
    assert alone[prompts[3].uid] == together[prompts[3].uid]
    assert reordered == {uid: s for uid, s in together.items() if uid != twin.uid}

    # the twin shared a request with prompts[0]: with one seed per request their samples were identical
    assert together[twin.uid] != together[prompts[0].uid]
    # samples are draws, not the greedy answer N times, so the equalities above are not vacuous
    assert sum(len(set(s)) for s in together.values()) > len(together)
    assert _samples(generator_pool, prompts, seed=8) != {uid: s for uid, s in reordered.items()}


def test_a_request_bigger_than_one_scheduler_step_samples_as_small_ones_do(generator_pool, heldout_prompts, tokenizer):
    """200 prompts of 50 tokens, one sample each: 5000 prompt tokens per generator, more than vLLM's CPU scheduler
    takes in one step (max_num_batched_tokens 4096), the shape of partial rollouts' continuations and of long dataset prompts.
    vLLM 0.32 splits such a prefill across steps and then rewinds the request's seeded torch generator, which
    CPU generators cannot do ("CPU Generator does not use offset"): the generator must not let it happen, and
    every prompt must sample what it samples in a small request."""
    from core.messages import Prompt

    base = heldout_prompts[0]
    long = [Prompt(20_000 + i, "x", (base.token_ids[0],) + tuple(tokenizer.convert_tokens_to_ids(
        list(("abcdefgh" * 7)[i % 8: i % 8 + 49]))), base.answer) for i in range(200)]
    assert sum(len(p.token_ids) for p in long) == 10_000
    comps = generator_pool.generate(long, n=1, temperature=1.0, max_new_tokens=MAX_NEW, seed=3)
    assert len(comps) == 200 and all(c.token_ids for c in comps)
    small = generator_pool.generate([long[5], long[77]], n=1, temperature=1.0, max_new_tokens=MAX_NEW, seed=3)
    by_uid = {c.prompt.uid: c.token_ids for c in comps}
    assert [c.token_ids for c in small] == [by_uid[long[5].uid], by_uid[long[77].uid]]


def test_top_k_and_top_p_reach_vllm_and_its_logprobs_are_the_truncated_distributions(generator_pool, heldout_prompts,
                                                                                      world):
    """generator.top_k / top_p: top_k=1 samples the greedy answer, each token with log-prob 0 (a one-token
    distribution); under top_p=0.8 every sampled token's reported log-prob is at least its full-distribution one
    (renormalised over the kept tokens) and above it wherever the nucleus cut anything."""
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from core.messages import GenerateRequest
    from tests._weights import checkpoint_handle

    pool = generator_pool
    pool.sync(checkpoint_handle(world.model_path, pool.version + 1))  # weights the transformers model below holds
    actor = pool.actors[sorted(pool.actors)[0]]
    prompts = tuple(heldout_prompts[:16])
    greedy = pool.generate(list(prompts), n=1, temperature=0.0, max_new_tokens=MAX_NEW, seed=0)
    top1 = ray.get(actor.generate.remote(GenerateRequest(prompts, 1, 1.0, MAX_NEW, seed=5, top_k=1)), timeout=120)
    assert [c.token_ids for c in top1] == [c.token_ids for c in greedy]
    assert all(lp == 0.0 for c in top1 for lp in c.logprobs)

    nucleus = ray.get(actor.generate.remote(GenerateRequest(prompts, N, 1.0, MAX_NEW, seed=5, top_p=0.8)), timeout=120)
    model = AutoModelForCausalLM.from_pretrained(world.model_path, torch_dtype=torch.float32).eval()
    raised = 0
    for c in nucleus:
        ids = torch.tensor([list(c.prompt.token_ids) + list(c.token_ids)])
        with torch.no_grad():
            full = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        P = len(c.prompt.token_ids)
        for j, (t, lp) in enumerate(zip(c.token_ids, c.logprobs)):
            ref = float(full[P - 1 + j, t])
            assert lp >= ref - 1e-5
            raised += lp > ref + 1e-3
    assert raised > 0
