"""Partial rollouts in the Rollout: unfinished samples go back to the queue with their tokens, their groups
wait until every sample is finished, and every prompt is still accounted for once. The generator here is a
fake that samples nothing (this is about scheduling and bookkeeping; tests/integration/test_partial_rollouts.py
runs real vLLM)."""

from __future__ import annotations

from types import SimpleNamespace

from cluster.rollout import Accounting, Rollout
from core.messages import Completion, GenerateRequest, Prompt, ScoreResult, continuation_seed, sample_seed

G, MAX_NEW, CHUNK = 2, 8, 3
# how many tokens each sample of prompt uid will have, and whether it ends by EOS (stop) or the budget
LENGTHS = {0: (2, 8), 1: (8, 5)}


class _FakePool:
    def __init__(self):
        self.actors, self.draining, self.load = {"generator-0": None}, set(), {"generator-0": 0}
        self.sent: list[GenerateRequest] = []
        self.replaced: list[str] = []
        self.stats = SimpleNamespace(requeued_prompts=0)

    def submit(self, req, max_load):
        if self.load["generator-0"] >= max_load:
            return None
        self.load["generator-0"] += 1
        self.sent.append(req)
        return "generator-0", len(self.sent) - 1  # the "ref": index of the request

    def done(self, name):
        self.load[name] -= 1

    def replace(self, name, reason):
        self.replaced.append(reason)


class _LengthReward:
    def score(self, completions):
        return ScoreResult(tuple(float(len(c.token_ids)) for c in completions))


def _extend(c: Completion | None, prompt: Prompt, index: int, req: GenerateRequest, version: int) -> Completion:
    """What a generator at VERSION returns for one sample: one more chunk of its predetermined length."""
    have = c.token_ids if c else ()
    total = LENGTHS[prompt.uid][index]
    new = tuple(range(100 + len(have), 100 + min(total, len(have) + (req.chunk_tokens or MAX_NEW))))
    ids = have + new
    reason = "stop" if len(ids) == total < MAX_NEW else "length"
    prev = (c.token_versions if c else ())
    return Completion(prompt, ids, (c.logprobs if c else ()) + tuple(-0.1 * t for t in new), "t" * len(ids), reason,
                      c.policy_version if c else version, "generator-0", prev + (version,) * len(new))


def _serve(r: Rollout, pool: _FakePool, version: int) -> None:
    """Answer every request in flight at VERSION, as the generator would, and hand the answers to the rollout."""
    for ref, req in list(r.inflight.items()):
        wire = pool.sent[ref]
        out = [_extend(None, p, j, wire, version) for p in wire.prompts for j in range(wire.n)]
        out += [_extend(k.sample, k.sample.prompt, k.index, wire, version) for k in wire.continuations]
        del r.inflight[ref]
        pool.done(req.generator)
        r._accept(req, out)


def _rollout(chunk: int = CHUNK) -> tuple[Rollout, _FakePool]:
    pool = _FakePool()
    r = Rollout(pool, _LengthReward(), group_size=G, temperature=1.0, max_new_tokens=MAX_NEW, seed=0,
                prompts_per_request=0, max_inflight_per_generator=2, call_timeout_s=10.0, acct=Accounting(),
                reward_cfg=SimpleNamespace(max_failure_fraction=0.5, on_failure="drop", failure_penalty=0.0),
                chunk_tokens=chunk, log=lambda *_: None)
    r.add([Prompt(0, "a", (1,), "a"), Prompt(1, "b", (2,), "b")])
    return r, pool


def test_unfinished_samples_continue_and_their_group_waits_until_all_are_done():
    r, pool = _rollout()
    r._send()
    assert [len(q.prompts) for q in pool.sent] == [1, 1] and pool.sent[0].chunk_tokens == CHUNK
    _serve(r, pool, version=0)
    # after one chunk of 3: prompt 0's first sample stopped at 2 tokens, the other three samples are cut short
    assert not r.buffer and set(r.partial) == {0, 1} and len(r.cont_todo) == 3
    assert r.outstanding() == 2 and r.busy()  # each prompt counted once, wherever its samples are

    r._send()  # the three continuations, split over the two free request slots
    assert [len(q.continuations) for q in pool.sent[2:]] == [2, 1] and not any(q.prompts for q in pool.sent[2:])
    assert all(len(k.sample.token_ids) == 3 for q in pool.sent[2:] for k in q.continuations)  # tokens kept
    _serve(r, pool, version=1)  # a weight sync landed between the chunks
    # prompt 1's second sample stopped at 5; the two 8-token samples are at 6
    assert not r.buffer and len(r.cont_todo) == 2

    r._send()
    _serve(r, pool, version=2)
    assert [g.prompt.uid for g in r.buffer] == [0, 1] and not r.partial and not r.cont_todo and not r.busy()
    g0, g1 = r.buffer
    # each sample back in its slot, scored whole (the fake reward is the length)
    assert [len(c.token_ids) for c in g0.completions] == [2, 8] and g0.rewards == (2.0, 8.0)
    assert [len(c.token_ids) for c in g1.completions] == [8, 5] and g1.rewards == (8.0, 5.0)
    long = g0.completions[1]
    assert long.token_ids == tuple(range(100, 108)) and long.finish_reason == "length"
    assert long.logprobs == tuple(-0.1 * t for t in range(100, 108))
    assert long.token_versions == (0, 0, 0, 1, 1, 1, 2, 2) and long.policy_version == 0 and long.versions_spanned == 3
    assert g1.completions[1].token_versions == (0, 0, 0, 1, 1) and g0.completions[0].versions_spanned == 1
    assert r.continued == 5 and r.generated_tokens == 2 + 8 + 8 + 5 and r.generated_samples == 4
    assert r.take(2, learner_version=2, max_staleness=None) == [g0, g1]


def test_a_lost_generator_requeues_new_prompts_and_keeps_continued_samples_tokens():
    r, pool = _rollout()
    r._send()
    _serve(r, pool, version=0)
    r._send()
    first = next(iter(r.inflight))
    r._requeue(first, "died: test")  # both requests in flight on generator-0 are lost with it
    assert pool.replaced == ["died: test"] and not r.inflight and pool.stats.requeued_prompts == 0
    assert sorted((k.sample.prompt.uid, k.index, len(k.sample.token_ids)) for k in r.cont_todo) == [
        (0, 1, 3), (1, 0, 3), (1, 1, 3)]
    assert r.outstanding() == 2 and r.outstanding_prompts() == [r.partial[0][0], r.partial[1][0]]
    for version in (1, 2):
        pool.load["generator-0"] = 0  # the replacement
        r._send()
        _serve(r, pool, version)
    assert [g.prompt.uid for g in r.buffer] == [0, 1]
    assert r.buffer[0].completions[1].token_versions == (0, 0, 0, 1, 1, 1, 2, 2)

    r2, pool2 = _rollout()
    r2._send()
    r2._requeue(next(iter(r2.inflight)), "timeout")  # a request of new prompts: they go back to the queue
    assert [p.uid for p in r2.todo] == [0, 1] and pool2.stats.requeued_prompts == 2 and not r2.partial


def test_groups_waiting_for_samples_are_dropped_at_the_end_and_checkpointed_as_outstanding():
    r, pool = _rollout()
    r._send()
    _serve(r, pool, version=0)
    assert {p.uid for p in r.outstanding_prompts()} == {0, 1}
    r.drop_all("unused_at_end")
    assert r.acct.as_dict()["prompts_dropped"] == {"unused_at_end": 2} and r.acct.as_dict()["prompts_unaccounted"] == 0
    assert not r.partial and not r.cont_todo and r.outstanding() == 0


def test_without_partial_rollouts_a_request_finishes_its_groups():
    for chunk in (0, MAX_NEW):  # a chunk as long as the budget is no chunking
        r, pool = _rollout(chunk)
        assert r.chunk_tokens == 0
        r._send()
        assert pool.sent[0].chunk_tokens == 0
        _serve(r, pool, version=0)
        assert [g.prompt.uid for g in r.buffer] == [0, 1] and not r.partial and r.continued == 0


def test_continued_samples_have_streams_of_their_own():
    seeds = {continuation_seed(7, uid, i, done) for uid in range(50) for i in range(8) for done in range(1, 20)}
    firsts = {sample_seed(7, uid) + i for uid in range(50) for i in range(8)}  # vLLM's seed + i for a first chunk
    assert len(seeds) == 50 * 8 * 19 and not seeds & firsts and max(seeds) < 2 ** 62
    assert continuation_seed(7, 3, 1, 4) == continuation_seed(7, 3, 1, 4) != continuation_seed(8, 3, 1, 4)
    p = Prompt(0, "a", (1,), "a")
    cut = Completion(p, (5, 6), (-1.0, -1.0), "", "length", 0, "g")
    assert cut.unfinished(8) and not cut.unfinished(2)
    assert not Completion(p, (5,), (-1.0,), "", "stop", 0, "g").unfinished(8)
