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
