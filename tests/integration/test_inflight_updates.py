"""Real vLLM: where a weight update lands in a generator that is sampling, with and without in-flight updates;
and a real async job with in-flight updates.

The generator runs in this process (not as a Ray actor) so the test can count its engine's steps and hand it an
update exactly between two of them; everything else is the production path: the engine thread, vLLM's own
per-token version record, the weight loader. Greedy decoding makes every run repeatable, and version 1 is the
warm-started weights with noise large enough to change greedy answers, so "which weights sampled this token"
shows in the tokens as well as in the labels.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

from actors.generator import EngineSettings, Generator
from core.messages import GenerateRequest
from core.weights import serialize_state_dict
from tests._jobs import Job, check_accounting, small_job

pytestmark = pytest.mark.integration

K = 2  # the update is handed over while step K + 1 runs, so it lands after K + 1 tokens


@pytest.fixture(scope="module")
def gen(world):
    g = Generator("inproc-generator", EngineSettings(model_path=world.model_path, max_model_len=64))
    yield g
    g.llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def blobs(world):
    """(original, noisy) weights as blobs, keyed by role."""
    from transformers import AutoModelForCausalLM

    sd = AutoModelForCausalLM.from_pretrained(world.model_path).state_dict()
    torch.manual_seed(0)
    noisy = {k: v + 0.5 * v.std() * torch.randn_like(v) if v.dim() == 2 else v for k, v in sd.items()}
    return {"original": serialize_state_dict(sd), "noisy": serialize_state_dict(noisy)}


def _load(gen, blob, version, inflight=False):
    return gen._submit("update", (*blob, version, inflight, False))


def _on_step(gen, k, action):
    """Run ACTION in the engine thread just before its (k+1)-th step from now; returns a restore function."""
    engine = gen.llm.llm_engine
    real, count = engine.step, [0]

    def step():
        if count[0] == k:
            action()
        count[0] += 1
        return real()

    engine.step = step
    return lambda: setattr(engine, "step", real)


def _greedy(prompts):
    return GenerateRequest(tuple(prompts), 1, 0.0, 8, seed=0)


def _run(gen, req):
    return gen.completions(req, gen.submit_generate(req).result(timeout=120))


@pytest.fixture
def fresh(gen, blobs):
    """The generator on the original weights, at a version above any used so far."""
    v = gen.version + 1
    assert _load(gen, blobs["original"], v).result(timeout=60) == (v, None)
    return v


def test_inflight_update_lands_between_steps_and_labels_every_token(gen, blobs, fresh, heldout_prompts):
    v0 = fresh
    req = _greedy(heldout_prompts[:8])
    before = _run(gen, req)  # the original weights throughout
    landed = []
    restore = _on_step(gen, K, lambda: landed.append(_load(gen, blobs["noisy"], v0 + 1, inflight=True)))
    try:
        mixed = _run(gen, req)
    finally:
        restore()
    assert landed[0].result(timeout=60) == (v0 + 1, None) and gen.version == v0 + 1
    after = _run(gen, req)  # the noisy weights throughout

    spanning = 0
    for b, m, a in zip(before, mixed, after, strict=True):
        n = len(m.token_ids)
        assert n > K + 1  # every sample was still running when the update landed
        # the first K + 1 tokens came from v0, the rest from v0 + 1, and the labels say so
        assert m.token_ids[:K + 1] == b.token_ids[:K + 1]
        assert m.token_versions == (v0,) * (K + 1) + (v0 + 1,) * (n - K - 1)
        assert m.policy_version == v0 and m.versions_spanned == 2
        assert len(m.logprobs) == n
        spanning += m.token_ids != b.token_ids
        assert a.token_versions == () and a.policy_version == v0 + 1
    # the noisy weights really sampled the rest: greedy answers changed
    assert spanning > 0
    assert sum(a.token_ids != b.token_ids for a, b in zip(after, before)) > 0


def test_update_waits_for_running_samples_and_holds_later_requests(gen, blobs, fresh, heldout_prompts):
    v0 = fresh
    req_a, req_b = _greedy(heldout_prompts[:8]), _greedy(heldout_prompts[8:16])
    a_before, b_before = _run(gen, req_a), _run(gen, req_b)
    handed: dict = {}

    def hand_over():  # the update, then a second request behind it, while A is sampling
        handed["update"] = _load(gen, blobs["noisy"], v0 + 1, inflight=False)
        handed["b"] = gen.submit_generate(req_b)

    in_flight = gen.updates_in_flight
    restore = _on_step(gen, K, hand_over)
    try:
        a = _run(gen, req_a)
    finally:
        restore()
    assert handed["update"].result(timeout=60) == (v0 + 1, None)
    b = gen.completions(req_b, handed["b"].result(timeout=120))
    b_after = _run(gen, req_b)

    # A finished on the weights it started with: same tokens, one version
    assert [c.token_ids for c in a] == [c.token_ids for c in a_before]
    assert all(c.token_versions == () and c.policy_version == v0 for c in a)
    # B, sent after the update, waited for it: every token from v0 + 1, as on a generator already there
    assert [c.token_ids for c in b] == [c.token_ids for c in b_after]
    assert all(c.token_versions == () and c.policy_version == v0 + 1 for c in b)
    assert [c.token_ids for c in b] != [c.token_ids for c in b_before]
    assert gen.updates_in_flight == in_flight  # it landed on an idle engine


def test_concurrent_calls_share_the_engine_and_match_separate_calls(gen, fresh, heldout_prompts):
    """Two calls from two threads (as Ray runs them) are batched together and get exactly what each gets alone."""
    reqs = [GenerateRequest(tuple(heldout_prompts[i:i + 8]), 4, 1.0, 8, seed=7) for i in (0, 8)]
    alone = [_run(gen, r) for r in reqs]
    together: list = [None, None]
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, _run(gen, reqs[i]))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for got, want in zip(together, alone, strict=True):
        assert [(c.prompt.uid, c.token_ids) for c in got] == [(c.prompt.uid, c.token_ids) for c in want]
        assert all(c.policy_version == fresh for c in got)


def test_async_job_with_inflight_updates_trains_with_exact_accounting(tmp_path, default_cfg, world, ray_session):
    job = Job(small_job(tmp_path, default_cfg, mode="async", max_staleness=1, inflight_updates=True))
    job.wait_status(lambda s: s["step"] >= 4, "step 4")
    s = job.stop()

    check_accounting(s)  # syncs verified too: the fingerprint is taken in the same engine pause as the load
    rows = [r for x in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines() if "time/step_s" in (r := json.loads(x))]
    assert len(rows) == s["steps"]
    assert all(0 <= r["samples_multi_version"] <= 32 for r in rows)  # 8 prompts x 4 samples per step
    assert all(r["staleness/max"] <= 1 for r in rows)  # counted from a sample's first token
