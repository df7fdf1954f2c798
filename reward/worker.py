"""Reward actors: score completions with a function named by import path, and check what it returns.

The reward API (docs/rewards.md has the full guide). A reward is a plain function of a batch:

    def my_reward(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
        return [float(a in c) for c, a in zip(completions, answers)]

or, to have the parts of a reward logged (as reward/<part>), a dict of equal-length lists with a
"total" that is trained on:

    def my_reward(prompts, completions, answers) -> dict[str, list[float]]:
        correct = [float(c.strip() == a) for c, a in zip(completions, answers)]
        short = [float(len(c) < 20) for c in completions]
        return {"total": [x + 0.1 * y for x, y in zip(correct, short)], "correct": correct, "short": short}

Plug it in with `--reward.function=my_module:my_reward`. The path may also name a class: it is
built once per reward actor (to load a model or open a session once) with
`Class.from_config(reward_config)` when it defines that, else `Class()`, and then called like the
function. A scorer may return a `ScoreResult` to report per-sample failures itself (reward.http
does, to pass on a server's failures with their reasons).

A reward function may raise, return NaN or inf, return the wrong type or the wrong number of
scores. None of that is ever silently turned into a score: each bad index becomes a
`ScoreFailure` carried back as data, and the driver counts it and applies the failure policy
(reward/policy.py).
"""

from __future__ import annotations

import importlib
import math
import numbers
import traceback
from typing import Any, Callable

from core.config import RewardConfig, parse_components
from core.messages import Completion, ScoreFailure, ScoreResult

Scorer = Callable[[list[str], list[str], list[str]], Any]


def load_function(path: str, field: str = "reward.function") -> Callable:
    """'package.module:function' (or ':Class') -> the object; raises ValueError naming `field`."""
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{field}: cannot load {path!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"{field}: {path!r} is not callable")
    return fn


def check_source(cfg: RewardConfig) -> None:
    """Import (without building) everything the reward config names: run in the driver, so a typo
    fails before any actor or engine starts."""
    load_function(cfg.function)
    for path, _ in parse_components(cfg.components):
        load_function(path, "reward.components")


def instantiate(path: str, cfg: RewardConfig, field: str = "reward.function") -> Scorer:
    """Load `path`; a class is built here (once per actor): Class.from_config(cfg) or Class()."""
    obj = load_function(path, field)
    if isinstance(obj, type):
        factory = getattr(obj, "from_config", None)
        obj = factory(cfg) if factory is not None else obj()
        if not callable(obj):
            raise TypeError(f"{field}: {path} built a {type(obj).__name__}, which is not callable")
    return obj


def _fail_all(n: int, reason: str, detail: str) -> ScoreResult:
    return ScoreResult((None,) * n, tuple(ScoreFailure(i, reason, detail) for i in range(n)))  # type: ignore[arg-type]


def _value_problem(v: Any) -> tuple[str, str] | None:
    """Why one returned value is not a usable score, or None when it is."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return "type", f"score {v!r} is {type(v).__name__}, expected float"
    if math.isnan(v):
        return "nan", "score is NaN"
    if math.isinf(v):
        return "inf", f"score is {float(v)}"
    return None


def _as_list(col: Any) -> list | None:
    if isinstance(col, (list, tuple)):
        return list(col)
    if hasattr(col, "tolist") and not isinstance(col, (str, bytes)):  # numpy array / torch tensor
        out = col.tolist()
        return out if isinstance(out, list) else None
    return None


def check_output(raw: Any, n: int) -> ScoreResult:
    """Validate what a scorer returned for a batch of n completions.

    Accepts a list of n numbers, a dict {"total": [...n], "<part>": [...n], ...}, or a ScoreResult.
    A wrong container, a missing "total" or a wrong length fails every index (nothing can be trusted);
    a bad value (NaN, inf, not a number) in the total or in any part fails that index only, with the
    part named in the detail. Failed indices hold None in the scores and in every component.
    """
    given: dict[int, ScoreFailure] = {}
    if isinstance(raw, ScoreResult):
        for f in raw.failures:
            if not isinstance(f.index, int) or not 0 <= f.index < n:
                return _fail_all(n, "type", f"returned a ScoreFailure for index {f.index!r}, outside 0..{n - 1}")
            given.setdefault(f.index, f)
        columns: dict[Any, Any] = {"total": raw.scores, **raw.components}
    elif isinstance(raw, dict):
        if "total" not in raw:
            return _fail_all(n, "type", f"returned a dict without 'total' (keys: {sorted(map(str, raw))})")
        columns = dict(raw)
    else:
        columns = {"total": raw}
    lists: dict[str, list] = {}
    for name, col in columns.items():
        label = "" if name == "total" else f"component {name!r}: "
        if not isinstance(name, str) or not name:
            return _fail_all(n, "type", f"component name {name!r} is not a non-empty string")
        as_list = _as_list(col)
        if as_list is None:
            return _fail_all(n, "type", f"{label}returned {type(col).__name__}, expected list[float] "
                                        "(or a dict of such lists with a 'total')")
        if len(as_list) != n:
            return _fail_all(n, "length", f"{label}returned {len(as_list)} scores for {n} completions")
        lists[name] = as_list
    failures: list[ScoreFailure] = []
    for i in range(n):
        if i in given:
            failures.append(given[i])
            continue
        for name, col in lists.items():
            problem = _value_problem(col[i])
            if problem:
                label = "" if name == "total" else f"component {name!r}: "
                failures.append(ScoreFailure(i, problem[0], label + problem[1]))  # type: ignore[arg-type]
                break
    failed = {f.index for f in failures}
    clean = {name: tuple(None if i in failed else float(v) for i, v in enumerate(col)) for name, col in lists.items()}
    total = clean.pop("total")
    return ScoreResult(total, tuple(failures), clean)


def check_scores(raw: Any, n: int) -> ScoreResult:
    """Backward-compatible name of `check_output`."""
    return check_output(raw, n)


def score_batch(scorer: Scorer, prompts: list[str], completions: list[str], answers: list[str]) -> ScoreResult:
    """Call a scorer on one batch and validate its output; an exception fails the whole batch, as data."""
    n = len(completions)
    try:
        raw = scorer(prompts, completions, answers)
    except Exception as e:  # user code: report, never crash the actor
        return _fail_all(n, "exception", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
    try:
        return check_output(raw, n)
    except Exception as e:  # an output so odd that inspecting it raised (a len() that raises, ...)
        return _fail_all(n, "type", f"output could not be checked: {type(e).__name__}: {e}")


class RewardWorker:
    """Plain class; `reward.pool` wraps it with `ray.remote` (named `reward-0`, ...).

    The scorer is built once, in the actor process, so a stateful scorer (a reward model, an HTTP
    session) loads once per actor, not once per batch.
    """

    def __init__(self, source: str | RewardConfig):
        self.config = source if isinstance(source, RewardConfig) else RewardConfig(function=source)
        self.function_path = self.config.function
        self.scorer = instantiate(self.config.function, self.config)

    def ready(self) -> bool:
        return True

    def score(self, completions: list[Completion]) -> ScoreResult:
        return score_batch(self.scorer, [c.prompt.text for c in completions], [c.text for c in completions],
                           [c.prompt.answer for c in completions])
