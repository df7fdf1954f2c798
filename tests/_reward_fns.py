"""Reward functions for the tests, loaded by import path (`tests._reward_fns:by_mode`) in the test
process, in Ray reward actors and in the reward server alike.

Ray workers import it because Ray puts the driver's working directory (the repo root, where the
tests are run from) on their sys.path; pyproject's `pythonpath = ["."]` does the same for pytest.
"""

from __future__ import annotations

import os
import time

# completion text -> what the function returns for that sample
VALUES = {"good": 1.0, "bad": 0.0, "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "str": "high"}


def by_mode(prompts: list[str], completions: list[str], answers: list[str]):
    """Per sample: the completion picks the value (VALUES; anything else scores 0.5).
    Per batch: an answer naming a mode makes the whole call misbehave that way."""
    modes = set(answers)
    if "raise" in modes:
        raise RuntimeError("boom from the test reward")
    if "hang" in modes:
        time.sleep(600)
    if "die" in modes:
        os._exit(3)  # the actor process dies without a word
    scores = [VALUES.get(c, 0.5) for c in completions]
    if "notalist" in modes:
        return "not a list"
    if "length" in modes:
        return scores[:-1]
    if "dict_no_total" in modes:
        return {"score": scores}
    if "dict" in modes:
        return {"total": scores, "bonus": [0.25] * len(scores)}
    if "dict_bad_part" in modes:  # the total is fine, a logged part is not: the sample still fails
        return {"total": scores, "bonus": [float("nan")] + [0.25] * (len(scores) - 1)}
    return scores


def with_parts(prompts: list[str], completions: list[str], answers: list[str]) -> dict[str, list[float]]:
    """Dict form: total = correct + 0.5 * short; correct and short are logged."""
    correct = [float(c == a) for c, a in zip(completions, answers)]
    short = [float(len(c) <= 3) for c in completions]
    return {"total": [x + 0.5 * y for x, y in zip(correct, short)], "correct": correct, "short": short}


class Counting:
    """A stateful scorer: built once per actor, it counts the calls it has served."""

    def __init__(self):
        self.calls = 0
        self.pid = os.getpid()

    def __call__(self, prompts, completions, answers) -> list[float]:
        self.calls += 1
        return [float(self.calls)] * len(completions)


class BrokenInit:
    """A scorer that cannot be built (a missing model file, say): the pool must say so, not retry forever."""

    def __init__(self):
        raise FileNotFoundError("no such reward model: /nowhere/model.safetensors")

    def __call__(self, prompts, completions, answers) -> list[float]:
        raise AssertionError("never built")


def half_tied(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """The task's reward, except that prompts starting with a-d score 0.5 whatever the completion: about half of
    all groups tie (no signal), for dynamic sampling to drop."""
    from reward.builtin import reverse_partial

    real = reverse_partial(prompts, completions, answers)
    return [0.5 if p[:1] in "abcd" else r for p, r in zip(prompts, real)]
