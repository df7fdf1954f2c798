"""Reward actors: score completions with a function named by import path, and check what it returns.

A reward function may raise, return NaN or inf, return the wrong type or the wrong number of
scores. None of that is ever silently turned into a score: each bad index becomes a
`ScoreFailure` carried back as data, and the driver counts it and applies the failure policy.
"""

from __future__ import annotations

import importlib
import math
import traceback
from typing import Callable

from core.messages import Completion, ScoreFailure, ScoreResult


def load_function(path: str) -> Callable:
    """'package.module:function' -> the function; raises ValueError with the reason."""
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward.function: cannot load {path!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward.function: {path!r} is not callable")
    return fn


def check_scores(raw, n: int) -> ScoreResult:
    """Validate a reward function's output for a batch of n completions."""
    if not isinstance(raw, (list, tuple)):
        return ScoreResult((None,) * n, tuple(ScoreFailure(i, "type", f"returned {type(raw).__name__}, expected list[float]") for i in range(n)))
    if len(raw) != n:
        return ScoreResult((None,) * n, tuple(ScoreFailure(i, "length", f"returned {len(raw)} scores for {n} completions") for i in range(n)))
    scores: list[float | None] = []
    failures = []
    for i, s in enumerate(raw):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            failures.append(ScoreFailure(i, "type", f"score {s!r} is {type(s).__name__}, expected float"))
            scores.append(None)
        elif math.isnan(s):
            failures.append(ScoreFailure(i, "nan", "score is NaN"))
            scores.append(None)
        elif math.isinf(s):
            failures.append(ScoreFailure(i, "inf", f"score is {s}"))
            scores.append(None)
        else:
            scores.append(float(s))
    return ScoreResult(tuple(scores), tuple(failures))


class RewardWorker:
    """Plain class; `reward.pool` wraps it with `ray.remote` (named `reward-0`, ...)."""

    def __init__(self, function_path: str):
        self.function_path = function_path
        self.fn = load_function(function_path)

    def score(self, completions: list[Completion]) -> ScoreResult:
        n = len(completions)
        try:
            raw = self.fn([c.prompt.text for c in completions], [c.text for c in completions],
                          [c.prompt.answer for c in completions])
        except Exception as e:  # user code: report, never crash the actor
            detail = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
            return ScoreResult((None,) * n, tuple(ScoreFailure(i, "exception", detail) for i in range(n)))
        return check_scores(raw, n)
