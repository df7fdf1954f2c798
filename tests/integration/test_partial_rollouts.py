"""Partial rollouts with real vLLM: a sample generated chunk by chunk, across generators and across a weight
sync, is the sample generated whole; every token records the version that sampled it; and a real async job
with partial rollouts trains with exact accounting."""

from __future__ import annotations

import json

import pytest
import ray

from core.messages import Continuation, GenerateRequest
from tests._jobs import Job, check_accounting, small_job
from tests._weights import checkpoint_handle as _handle

pytestmark = pytest.mark.integration

MAX_NEW, CHUNK = 8, 2


def _chunked(pool, prompts, temperature, seed, between=lambda rnd: None):
    """Generate PROMPTS (one sample each) CHUNK tokens per call, round r on generator r % 2; BETWEEN(r) runs
    after round r. Returns the finished completions in prompt order and the number of rounds."""
    names = sorted(pool.actors)
    req = GenerateRequest(tuple(prompts), 1, temperature, MAX_NEW, seed, chunk_tokens=CHUNK)
    by_uid = {c.prompt.uid: c for c in ray.get(pool.actors[names[0]].generate.remote(req), timeout=120)}
    rounds = 1
    while True:
        between(rounds - 1)
        todo = [Continuation(c, 0) for c in by_uid.values() if c.unfinished(MAX_NEW)]
        if not todo:
            return [by_uid[p.uid] for p in prompts], rounds
        req = GenerateRequest((), 1, temperature, MAX_NEW, seed, continuations=tuple(todo), chunk_tokens=CHUNK)
        for c in ray.get(pool.actors[names[rounds % 2]].generate.remote(req), timeout=120):
            by_uid[c.prompt.uid] = c
        rounds += 1


def test_a_sample_generated_in_chunks_across_generators_and_a_sync_is_the_whole_sample(
        generator_pool, heldout_prompts, world):
    pool, prompts = generator_pool, heldout_prompts[:12]
    v = pool.version + 1
    pool.sync(_handle(world.model_path, v))  # both generators on the checkpoint's weights, as version v
    whole = pool.generate(prompts, n=1, temperature=0.0, max_new_tokens=MAX_NEW, seed=0)
    assert all(c.token_versions == () and c.policy_version == v for c in whole)

    # the same weights again, as version v + 1, after the first chunk: the sample goes on from where it was
    again = _handle(world.model_path, v + 1)
    parts, rounds = _chunked(pool, prompts, 0.0, 0, between=lambda r: pool.sync(again) if r == 0 else None)
    assert rounds >= 3  # greedy answers here are 6 tokens (5 letters + EOS): 3 chunks of 2, 2 generators
    for w, c in zip(whole, parts, strict=True):
        assert c.token_ids == w.token_ids and c.text == w.text and c.finish_reason == w.finish_reason
        assert c.logprobs == pytest.approx(w.logprobs, abs=1e-4)
        n = len(c.token_ids)
        assert c.token_versions == (v,) * min(CHUNK, n) + (v + 1,) * (n - CHUNK)
        assert c.policy_version == v and c.versions_spanned == (2 if n > CHUNK else 1)

    # sampled (temperature 1): a continued sample draws from its own seeded stream, so it is the same whichever
    # generator serves each chunk; and the draws are not all the greedy answer
    first, _ = _chunked(pool, prompts, 1.0, 5)
    swapped, _ = _chunked(_Swapped(pool), prompts, 1.0, 5)
    assert [c.token_ids for c in first] == [c.token_ids for c in swapped]
    assert [c.token_ids for c in first] != [c.token_ids for c in whole]
    assert _chunked(pool, prompts, 1.0, 6)[0] != first


class _Swapped:
    """The pool with its generators' order reversed (round r runs on the other engine)."""

    def __init__(self, pool):
        names = sorted(pool.actors)
        self.actors = dict(zip(names, [pool.actors[n] for n in reversed(names)]))


def test_async_job_with_partial_rollouts_trains_with_exact_accounting(tmp_path, default_cfg, world, ray_session):
    job = Job(small_job(tmp_path, default_cfg, mode="async", max_staleness=1, partial_rollout_tokens=CHUNK))
    job.wait_status(lambda s: s["step"] >= 4, "step 4")
    s = job.stop()

    check_accounting(s)
    assert s["continuation_chunks"] > 0  # answers are longer than one chunk: every sample was continued
    rows = [r for x in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines() if "time/step_s" in (r := json.loads(x))]
    assert len(rows) == s["steps"]  # one row per training step (the step-0 evaluation row has no step timings)
    assert all(0 <= r["samples_multi_version"] <= 32 for r in rows)  # 8 prompts x 4 samples per step
    # staleness counts from a sample's first token: never more than max_staleness versions behind
    assert all(r["staleness/max"] <= 1 for r in rows)
