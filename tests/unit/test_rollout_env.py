"""Multi-turn episodes in the rollout (no Ray needed): a group with an episode its environment failed in is
dropped and counted; the job stops once such failures take more than reward.max_failure_fraction of the groups
generated so far, judged from ENV_BUDGET_MIN_GROUPS groups on."""

from __future__ import annotations

import pytest

from cluster.rollout import ENV_BUDGET_MIN_GROUPS, Accounting, EnvironmentFailed, Rollout, _Request
from core.config import RewardConfig
from core.messages import Completion, Prompt, ScoreResult

G = 2


class _Rewards:
    def score(self, completions):
        return ScoreResult(tuple(1.0 for _ in completions))


def _request(r: Rollout, uids: list[int], failed: set[int]) -> tuple[_Request, list[Completion]]:
    """A finished request of one group per uid; the first episode of each uid in FAILED hit an env timeout."""
    prompts = tuple(Prompt(u, "abc=", (1, 2), "cba") for u in uids)
    comps = [Completion(p, (5, 2), (-0.1, -0.2), "x", "stop", 0, "g",
                        env_failure="timeout: no reply" if p.uid in failed and j == 0 else "")
             for p in prompts for j in range(G)]
    for u in uids:
        r.acct.draw(u)
    return _Request("g", prompts, 0.0), comps


def _rollout() -> Rollout:
    return Rollout(None, _Rewards(), group_size=G, temperature=1.0, max_new_tokens=8, seed=0, prompts_per_request=0,
                   max_inflight_per_generator=2, call_timeout_s=10.0, acct=Accounting(), reward_cfg=RewardConfig(),
                   log=lambda *_: None)


def test_a_group_with_a_failed_episode_is_dropped_and_counted():
    r = _rollout()
    r._accept(*_request(r, [0, 1, 2], failed={1}))
    assert [g.prompt.uid for g in r.buffer] == [0, 2]
    assert r.acct.dropped == {1: "env_failed"} and r.acct.env_failures == {"timeout": 1}
    assert r.acct.as_dict()["env_failures"] == {"timeout": 1}
    assert Accounting.from_state(r.acct.state()).env_failures == {"timeout": 1}  # survives a checkpoint


def test_the_failure_budget_is_judged_over_the_run_not_per_request():
    r = _rollout()  # reward.max_failure_fraction = 0.5
    # a first request lost whole: too early to judge (1 of ENV_BUDGET_MIN_GROUPS groups)
    r._accept(*_request(r, [0], failed={0}))
    uid = 1
    while uid < ENV_BUDGET_MIN_GROUPS + 3:  # then healthy requests: 1 lost of 19 groups
        r._accept(*_request(r, [uid], failed=set()))
        uid += 1
    assert r.env_groups == [uid, 1]
    # failures keep coming: the job stops once more than half of all groups so far were lost
    with pytest.raises(EnvironmentFailed, match=r"dropped \d+ of the \d+ groups generated so far"):
        for _ in range(40):
            r._accept(*_request(r, [uid, uid + 1], failed={uid, uid + 1}))
            uid += 2
    seen, lost = r.env_groups
    assert lost > seen * 0.5 and (lost - 2) <= (seen - 2) * 0.5  # it stopped at the first request over the line
