"""Built-in reward functions.

The reward function API: a plain Python function

    def reward(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]

taking a batch and returning one float per completion. Point the job at any such function with
`reward.function=module:function`.
"""

from __future__ import annotations


def exact_match(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """1.0 when the completion equals the answer (surrounding whitespace ignored), else 0.0."""
    return [float(c.strip() == a.strip()) for c, a in zip(completions, answers)]


def reverse_partial(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """Dense credit for the reversal task: share of positions right, minus 0.5 for a wrong length.

    A sparse exact-match reward from a weak start gives most groups identical (all-zero) rewards,
    hence no group-relative signal; per-position credit lets every sample be ranked
    (shared/FACTS.md: exact-match-only collapsed from 11% to 0%, partial credit reached 95%).
    """
    out = []
    for c, a in zip(completions, answers):
        c = c.strip()
        right = sum(x == y for x, y in zip(c, a)) / max(len(a), 1)
        out.append(right - (0.5 if len(c) != len(a) else 0.0))
    return out
