"""Real vLLM: where a weight update lands in a generator that is sampling, with and without in-flight updates;
and a real async job with in-flight updates.

The generator is a real Ray actor as the pool starts it. The scenarios run inside it (`__ray_call__`), so they
can count its engine's steps and hand it an update exactly between two of them; everything else is the
production path: the engine thread, vLLM's own per-token version record, the weight loader. (Not in this
process: vLLM's CPU worker binds threads and replaces `torch.set_num_threads` process-wide, which would
change every later in-process test's numbers.) Greedy decoding makes every run repeatable, and the "noisy"
weights are the warm-started ones with noise large enough to change greedy answers, so which weights sampled
a token shows in the tokens as well as in the labels.
"""

from __future__ import annotations

import json
import sys

import pytest
import ray
import torch

from actors.generator import ACTOR_CONCURRENCY, EngineSettings, Generator, engine_env
from core.messages import GenerateRequest
from core.weights import serialize_state_dict
from tests._jobs import Job, check_accounting, small_job

pytestmark = pytest.mark.integration

K = 2  # the update is handed over while step K + 1 runs, so it lands after K + 1 tokens

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the scenarios below run inside the actor


@pytest.fixture(scope="module")
def gen(ray_session, world):
    settings = EngineSettings(model_path=world.model_path, max_model_len=64)
    actor = ray.remote(Generator).options(num_cpus=1, max_concurrency=ACTOR_CONCURRENCY,
                                          runtime_env={"env_vars": engine_env(settings)}).remote("inflight-test", settings)
    ray.get(actor.info.remote(), timeout=300)
    yield actor
    ray.kill(actor)


@pytest.fixture(scope="module")
def blobs(world):
    """The warm-started weights and a noisy copy, as (blob, checksum)."""
    from transformers import AutoModelForCausalLM

    sd = AutoModelForCausalLM.from_pretrained(world.model_path).state_dict()
    torch.manual_seed(0)
    noisy = {k: v + 0.5 * v.std() * torch.randn_like(v) if v.dim() == 2 else v for k, v in sd.items()}
    return {"original": serialize_state_dict(sd), "noisy": serialize_state_dict(noisy)}


def _in_actor(actor, fn, *args):
    return ray.get(actor.__ray_call__.remote(fn, *args), timeout=300)


# ---------------------------------------------------------------- run inside the generator actor (g: Generator)
def _load(g, blob, version, inflight=False):
    return g._submit("update", (*blob, version, inflight, False, None))


def _run(g, req):
    return g.completions(req, g.submit_generate(req).result(timeout=120))


def _fresh(g, blob):
    """Back on the original weights, at a version above any used so far."""
    v = g.version + 1
    assert _load(g, blob, v).result(timeout=60) == (v, None)
    return v


def _on_step(g, k, action):
    """Run ACTION in the engine thread just before its (k+1)-th step from now; returns a restore function."""
    engine = g.llm.llm_engine
    real, count = engine.step, [0]

    def step():
        if count[0] == k:
            action()
        count[0] += 1
        return real()

    engine.step = step
    return lambda: setattr(engine, "step", real)


def _inflight_scenario(g, original, noisy, req):
    v0 = _fresh(g, original)
    before = _run(g, req)  # the original weights throughout
    landed = []
    restore = _on_step(g, K, lambda: landed.append(_load(g, noisy, v0 + 1, inflight=True)))
    try:
        mixed = _run(g, req)
    finally:
        restore()
    result = landed[0].result(timeout=60)
    after = _run(g, req)  # the noisy weights throughout
    return v0, result, before, mixed, after


def _waiting_scenario(g, original, noisy, req_a, req_b):
    v0 = _fresh(g, original)
    a_before, b_before = _run(g, req_a), _run(g, req_b)
    handed = {}

    def hand_over():  # the update, then a second request behind it, while A is sampling
        handed["update"] = _load(g, noisy, v0 + 1, inflight=False)
        handed["b"] = g.submit_generate(req_b)

    in_flight = g.updates_in_flight
    restore = _on_step(g, K, hand_over)
    try:
        a = _run(g, req_a)
    finally:
        restore()
    result = handed["update"].result(timeout=60)
    b = g.completions(req_b, handed["b"].result(timeout=120))
    b_after = _run(g, req_b)
    return v0, result, a_before, b_before, a, b, b_after, g.updates_in_flight - in_flight


def _greedy(prompts):
    return GenerateRequest(tuple(prompts), 1, 0.0, 8, seed=0)


def _tokens(cs):
    return [c.token_ids for c in cs]


# ---------------------------------------------------------------- tests
def test_inflight_update_lands_between_steps_and_labels_every_token(gen, blobs, heldout_prompts):
    v0, result, before, mixed, after = _in_actor(gen, _inflight_scenario, blobs["original"], blobs["noisy"],
                                                 _greedy(heldout_prompts[:8]))
    assert result == (v0 + 1, None)
    changed = 0
    for b, m, a in zip(before, mixed, after, strict=True):
        n = len(m.token_ids)
        assert n > K + 1  # every sample was still running when the update landed
        # the first K + 1 tokens came from v0, the rest from v0 + 1, and the labels say so
        assert m.token_ids[:K + 1] == b.token_ids[:K + 1]
        assert m.token_versions == (v0,) * (K + 1) + (v0 + 1,) * (n - K - 1)
        assert m.policy_version == v0 and m.versions_spanned == 2
        assert len(m.logprobs) == n
        changed += m.token_ids != b.token_ids
        assert a.token_versions == () and a.policy_version == v0 + 1
    # the noisy weights really sampled the rest: greedy answers changed
    assert changed > 0
    assert _tokens(after) != _tokens(before)


def test_update_waits_for_running_samples_and_holds_later_requests(gen, blobs, heldout_prompts):
    v0, result, a_before, b_before, a, b, b_after, landed_in_flight = _in_actor(
        gen, _waiting_scenario, blobs["original"], blobs["noisy"], _greedy(heldout_prompts[:8]),
        _greedy(heldout_prompts[8:16]))
    assert result == (v0 + 1, None)
    # A finished on the weights it started with: same tokens, one version
    assert _tokens(a) == _tokens(a_before)
    assert all(c.token_versions == () and c.policy_version == v0 for c in a)
    # B, sent after the update, waited for it: every token from v0 + 1, as on a generator already there
    assert _tokens(b) == _tokens(b_after) != _tokens(b_before)
    assert all(c.token_versions == () and c.policy_version == v0 + 1 for c in b)
    assert landed_in_flight == 0  # it landed on an idle engine


def test_concurrent_calls_share_the_engine_and_match_separate_calls(gen, blobs, heldout_prompts):
    """Two generate calls in flight at once (the threaded actor runs both) get exactly what each gets alone."""
    v = _in_actor(gen, _fresh, blobs["original"])
    reqs = [GenerateRequest(tuple(heldout_prompts[i:i + 8]), 4, 1.0, 8, seed=7) for i in (0, 8)]
    alone = [ray.get(gen.generate.remote(r), timeout=120) for r in reqs]
    together = ray.get([gen.generate.remote(r) for r in reqs], timeout=120)
    for got, want in zip(together, alone, strict=True):
        assert [(c.prompt.uid, c.token_ids) for c in got] == [(c.prompt.uid, c.token_ids) for c in want]
        assert all(c.policy_version == v for c in got)


def test_async_job_with_inflight_updates_trains_with_exact_accounting(tmp_path, default_cfg, world, ray_session):
    job = Job(small_job(tmp_path, default_cfg, mode="async", max_staleness=1, inflight_updates=True))
    job.wait_status(lambda s: s["step"] >= 4, "step 4")
    s = job.stop()

    check_accounting(s)  # syncs verified too: the fingerprint is taken in the same engine pause as the load
    rows = [r for x in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines() if "time/step_s" in (r := json.loads(x))]
    assert len(rows) == s["steps"]
    assert all(0 <= r["samples_multi_version"] <= 32 for r in rows)  # 8 prompts x 4 samples per step
    assert all(r["staleness/max"] <= 1 for r in rows)  # counted from a sample's first token
