"""Rollout.take: which buffered groups a step gets, and what is dropped and counted (no Ray needed)."""

from __future__ import annotations

from cluster.rollout import Accounting, Rollout
from core.messages import Completion, Group, Prompt


def _group(uid: int, rewards: tuple[float, ...], version: int = 0) -> Group:
    p = Prompt(uid, "abc", (1, 2, 3), "cba")
    return Group(p, tuple(Completion(p, (4,), (-0.5,), "x", "stop", version, "g") for _ in rewards), rewards)


def _rollout(groups: list[Group]) -> Rollout:
    r = Rollout(None, None, group_size=4, temperature=1.0, max_new_tokens=8, seed=0, prompts_per_request=0,
                max_inflight_per_generator=2, call_timeout_s=10.0, acct=Accounting(), reward_cfg=None)
    for g in groups:
        r.acct.draw(g.prompt.uid)
    r.buffer.extend(groups)
    return r


TIED, MIXED = (0.6, 0.6, 0.6, 0.6), (0.0, 0.2, 0.6, 1.0)


def test_dynamic_sampling_drops_tied_groups_up_to_its_budget_then_keeps_them():
    # buffer: uid 0 mixed, 1 tied, 2 tied, 3 mixed, 4 tied, 5 mixed
    r = _rollout([_group(0, MIXED), _group(1, TIED), _group(2, TIED), _group(3, MIXED), _group(4, TIED),
                  _group(5, MIXED)])
    got = r.take(3, learner_version=0, max_staleness=None, drop_tied=2)
    # 0 kept, 1 and 2 dropped (budget 2 used up), 3 kept, 4 kept although tied (no budget left)
    assert [g.prompt.uid for g in got] == [0, 3, 4]
    assert r.acct.dropped == {1: "tied_rewards", 2: "tied_rewards"} and r.tied_dropped == 2
    assert [g.prompt.uid for g in r.buffer] == [5]  # the rest stays buffered, in order


def test_without_dynamic_sampling_tied_groups_are_trained_and_stale_ones_still_dropped():
    r = _rollout([_group(0, TIED, version=0), _group(1, TIED, version=2), _group(2, MIXED, version=2)])
    got = r.take(5, learner_version=2, max_staleness=1)
    assert [g.prompt.uid for g in got] == [1, 2]  # uid 0 lags 2 versions > 1
    assert r.acct.dropped == {0: "stale"} and r.tied_dropped == 0
