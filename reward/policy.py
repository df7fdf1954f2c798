"""What the driver does with samples the reward source could not score: pure functions of a ScoreResult.

    result = rewards.score(completions)
    for line in failure_log_lines(completions, result): log(line)      # every failure, with its sample
    check_failure_budget(result, cfg.reward.max_failure_fraction)      # raises RewardSourceFailed
    result = apply_failure_policy(result, cfg.reward.on_failure, cfg.reward.failure_penalty)
    metrics.update(component_means(result))                            # reward/<part> means

A failure is never turned into a score silently: under "drop" the sample keeps its None score (and
the driver does not train on it); under "penalty" it gets the configured penalty, and in both cases
the ScoreFailure stays in `result.failures`, so it is still counted and logged.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Literal

from core.messages import Completion, ScoreResult


class RewardSourceFailed(RuntimeError):
    """Too much of a batch could not be scored to keep training on the rest (or a reward actor cannot start)."""


def failure_counts(result: ScoreResult) -> Counter:
    """Failed samples by reason ({"timeout": 3, "nan": 1}); one failure per sample."""
    return Counter(f.reason for f in result.failures)


def check_failure_budget(result: ScoreResult, max_fraction: float) -> None:
    """Raise RewardSourceFailed when more than `max_fraction` of the batch failed.

    A reward source that fails on most samples is broken (a server down, a bug in the function);
    training on the few that were scored would quietly bias the update, so the job stops with a
    message that says how many failed, why, and the first failure's detail.
    """
    n = len(result.scores)
    failed = len({f.index for f in result.failures})
    if n == 0 or failed / n <= max_fraction:
        return
    first = min(result.failures, key=lambda f: f.index)
    reasons = ", ".join(f"{r}: {c}" for r, c in sorted(failure_counts(result).items()))
    raise RewardSourceFailed(
        f"the reward source failed on {failed} of {n} samples ({failed / n:.0%} > reward.max_failure_fraction="
        f"{max_fraction}); by reason: {reasons}. First failure (sample {first.index}, {first.reason}): "
        f"{first.detail.strip()}")


def apply_failure_policy(result: ScoreResult, on_failure: Literal["drop", "penalty"], penalty: float) -> ScoreResult:
    """"drop": unchanged (failed samples keep None, the driver leaves them out). "penalty": every
    failed sample's score becomes `penalty`; its components stay None (nothing was measured)."""
    if on_failure == "drop":
        return result
    if on_failure != "penalty":
        raise ValueError(f"reward.on_failure: must be 'drop' or 'penalty', got {on_failure!r}")
    failed = {f.index for f in result.failures}
    scores = tuple(penalty if (i in failed or s is None) else s for i, s in enumerate(result.scores))
    return ScoreResult(scores, result.failures, result.components)


def component_means(results: ScoreResult | Iterable[ScoreResult], prefix: str = "reward/") -> dict[str, float]:
    """Mean of each reward component over the samples that have it ({"reward/format": 0.75}), over one
    scored batch or several (e.g. all requests scored during one step: a mean over samples, not of means).

    A component no sample has (all failed) is left out rather than reported as 0 or NaN.
    """
    values: dict[str, list[float]] = {}
    for res in [results] if isinstance(results, ScoreResult) else results:
        for name, col in res.components.items():
            values.setdefault(name, []).extend(v for v in col if v is not None)
    return {prefix + name: math.fsum(vals) / len(vals) for name, vals in values.items() if vals}


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def failure_log_lines(completions: list[Completion], result: ScoreResult, width: int = 80) -> list[str]:
    """One log line per failed sample: index, reason, the sample (prompt and completion, truncated to
    `width` characters each) and the first line of the detail (an exception's message, not its traceback)."""
    lines = []
    for f in sorted(result.failures, key=lambda f: f.index):
        c = completions[f.index]
        detail = f.detail.strip().splitlines()[0] if f.detail.strip() else ""
        # repr() keeps a completion's newlines and quotes on one readable line
        lines.append(f"[reward] sample {f.index} failed ({f.reason}): {_short(detail, 2 * width)} | "
                     f"prompt={_short(c.prompt.text, width)!r} completion={_short(c.text, width)!r}")
    return lines
