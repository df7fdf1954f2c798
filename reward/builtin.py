"""Built-in reward functions and scorers.

The reward function API: a plain Python function

    def reward(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]

taking a batch and returning one float per completion (or a dict {"total": [...], "<part>": [...]}
whose parts are logged). Point the job at any such function with `reward.function=module:function`;
the full guide is docs/rewards.md.

| import path | what it gives | settings |
|---|---|---|
| reward.builtin:exact_match | 1 if the completion equals the answer | |
| reward.builtin:reverse_partial | dense credit for the reversal task | |
| reward.builtin:reverse_multiturn | the reversal task over several turns (envs.builtin:reverse_rest) | rollout.env |
| reward.builtin:numeric_match | 1 if the last number in the completion equals the answer's | |
| reward.builtin:math_verify_match | 1 if math-verify finds the completion's answer equivalent | pip install 'relayrl[math]' |
| reward.builtin:RegexMatch | 1 if the completion matches a pattern (a format reward) | reward.format_pattern |
| reward.builtin:LengthPenalty | 0 up to a soft limit, then down to -1 (DAPO overlong penalty) | reward.length_soft_max, reward.length_max |
| reward.builtin:Combined | weighted sum of the above or any others, parts logged | reward.components |
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any, Callable, Mapping, Sequence

from core.messages import ScoreFailure, ScoreResult

Scorer = Callable[[list[str], list[str], list[str]], Any]


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


def reverse_multiturn(prompts: list[str], completions: list[str], answers: list[str]) -> dict[str, list[float]]:
    """The reversal task as a multi-turn episode with envs.builtin:reverse_rest: the answer the turns add up to
    counts, and each extra turn costs 0.1. Solved: 1.0 on the first turn, 0.9 on the second, 0.8 on the third;
    not solved: half the answer's reverse_partial credit (at most 0.4 for 5 letters), less 0.1 per extra turn.
    Parts logged: solved (0/1) and turns."""
    from envs.builtin import answer_so_far

    total, solved, turns = [], [], []
    for p, c, a in zip(prompts, completions, answers):
        got, n = answer_so_far(p, c)
        ok = got == a.strip()
        credit = 1.0 if ok else 0.5 * reverse_partial([""], [got], [a])[0]
        total.append(credit - 0.1 * (n - 1))
        solved.append(float(ok))
        turns.append(float(n))
    return {"total": total, "solved": solved, "turns": turns}


# --------------------------------------------------------------------------------------- numbers

# Last number in a text: thousands separators ("1,234"), decimals, exponents. "1,2,3" reads as 3
# (commas not in groups of three are list separators, not part of a number).
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")


def parse_last_number(text: str) -> float | None:
    """The last number written in `text` ("so x = 1,234.5." -> 1234.5), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric_match(prompts: list[str], completions: list[str], answers: list[str],
                  rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> list[float]:
    """1.0 when the last number in the completion equals the answer's number within tolerance, else 0.0.

    An answer with no number is a dataset error, not a wrong completion: it raises (the batch is
    reported as failed with this message) instead of silently scoring 0. For fractions, LaTeX or
    symbolic answers use math_verify_match.
    """
    out = []
    for c, a in zip(completions, answers):
        gold = parse_last_number(a)
        if gold is None:
            raise ValueError(f"numeric_match: answer {a!r} contains no number")
        pred = parse_last_number(c)
        out.append(float(pred is not None and math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=abs_tol)))
    return out


def math_verify_match(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """1.0 when Hugging Face's math-verify judges the completion's final answer equivalent to the
    answer (LaTeX, \\boxed{}, fractions, sets, ...), else 0.0. Needs `pip install 'relayrl[math]'`."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ImportError("reward.builtin:math_verify_match needs the math-verify package: "
                          "pip install 'relayrl[math]' (or pip install math-verify)") from None
    # math-verify bounds its own parsing with signal.alarm, which works only in the main thread. A
    # Ray actor's calls run there; the reward server's run in worker threads, where we switch that
    # off and rely on the reward pool's per-batch deadline instead.
    in_main = threading.current_thread() is threading.main_thread()
    parse_kw: dict = {} if in_main else {"parsing_timeout": None}
    verify_kw: dict = {} if in_main else {"timeout_seconds": None}
    out = []
    for c, a in zip(completions, answers):
        gold, pred = parse(a, **parse_kw), parse(c, **parse_kw)
        out.append(float(bool(gold) and bool(pred) and verify(gold, pred, **verify_kw)))
    return out


# --------------------------------------------------------------------------------------- format

class RegexMatch:
    """Format reward: 1.0 when the whole completion (surrounding whitespace ignored) matches `pattern`,
    else 0.0. `.` also matches newlines. From config: reward.format_pattern."""

    def __init__(self, pattern: str):
        self.pattern = re.compile(pattern, re.DOTALL)

    @classmethod
    def from_config(cls, cfg) -> "RegexMatch":
        if not cfg.format_pattern:
            raise ValueError("reward.format_pattern: required by reward.builtin:RegexMatch")
        return cls(cfg.format_pattern)

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
        return [float(self.pattern.fullmatch(c.strip()) is not None) for c in completions]


def regex_match(pattern: str) -> RegexMatch:
    """A format reward for `pattern`, e.g. regex_match(r"<think>.*</think>\\s*<answer>.*</answer>")."""
    return RegexMatch(pattern)


# --------------------------------------------------------------------------------------- length

def overlong_penalty(length: int, soft_max: int, hard_max: int) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), with soft_max = L_max - L_cache and
    hard_max = L_max:

        R(y) = 0                             if |y| <= soft_max
             = (soft_max - |y|) / (hard_max - soft_max)   if soft_max < |y| <= hard_max
             = -1                            if |y| > hard_max
    """
    if length <= soft_max:
        return 0.0
    if length >= hard_max:
        return -1.0
    return (soft_max - length) / (hard_max - soft_max)


class LengthPenalty:
    """overlong_penalty of each completion's length in characters (= tokens for the built-in
    character-level tokenizer; the reward API sees text, not token ids). Meant as a term of
    Combined next to a correctness reward. From config: reward.length_soft_max, reward.length_max."""

    def __init__(self, soft_max: int, hard_max: int):
        if not 0 <= soft_max < hard_max:
            raise ValueError(f"LengthPenalty: need 0 <= soft_max < hard_max, got {soft_max} and {hard_max}")
        self.soft_max, self.hard_max = soft_max, hard_max

    @classmethod
    def from_config(cls, cfg) -> "LengthPenalty":
        return cls(cfg.length_soft_max, cfg.length_max)

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
        return [overlong_penalty(len(c), self.soft_max, self.hard_max) for c in completions]


def length_penalty(soft_max: int, hard_max: int) -> LengthPenalty:
    """A DAPO overlong penalty: 0 up to soft_max characters, linear to -1 at hard_max."""
    return LengthPenalty(soft_max, hard_max)


# --------------------------------------------------------------------------------------- combination

def combine(parts: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> dict[str, list[float]]:
    """{"total": [sum_k weights[k] * parts[k][i] for each i], **parts}: the dict form of the reward API.

    Every part needs a weight and all parts the same length; anything else is a bug and raises.
    """
    if set(parts) != set(weights):
        raise ValueError(f"combine: parts {sorted(parts)} and weights {sorted(weights)} name different terms")
    if "total" in parts:
        raise ValueError("combine: 'total' is reserved for the weighted sum")
    lengths = {k: len(v) for k, v in parts.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"combine: parts have different lengths {lengths}")
    n = next(iter(lengths.values()), 0)
    total = [math.fsum(weights[k] * parts[k][i] for k in parts) for i in range(n)]
    return {"total": total, **{k: list(v) for k, v in parts.items()}}


class Combined:
    """A weighted sum of reward terms, each logged as a component: reward/<name>.

        Combined({"correct": (exact_match, 1.0), "length": (length_penalty(48, 64), 0.1)})

    or from config: reward.function=reward.builtin:Combined with
    reward.components="reward.builtin:exact_match=1.0,reward.builtin:LengthPenalty=0.1" (names are
    the part after ':'; a term that is a class is built from the same reward config).

    Each term is checked on its own (reward.worker.score_batch), so a sample whose term raised or
    returned NaN fails with that term named in the detail; the sample's total is then None, never a
    sum over the terms that happened to work. A term returning a dict contributes its total, and its
    parts are logged as <name>.<part>.
    """

    def __init__(self, terms: Mapping[str, tuple[Scorer, float]]):
        if not terms:
            raise ValueError("Combined: needs at least one term")
        self.terms = dict(terms)

    @classmethod
    def from_config(cls, cfg) -> "Combined":
        from core.config import parse_components
        from reward.worker import instantiate

        return cls({path.partition(":")[2]: (instantiate(path, cfg, "reward.components"), weight)
                    for path, weight in parse_components(cfg.components)})

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str]) -> ScoreResult:
        from reward.worker import score_batch

        n = len(completions)
        results = {name: score_batch(fn, prompts, completions, answers) for name, (fn, _) in self.terms.items()}
        failed: dict[int, ScoreFailure] = {}
        for name, res in results.items():  # the first term that failed a sample names the reason
            for f in res.failures:
                failed.setdefault(f.index, ScoreFailure(f.index, f.reason, f"{name}: {f.detail}"))
        parts = {name: [0.0 if i in failed else res.scores[i] for i in range(n)] for name, res in results.items()}
        combined = combine(parts, {name: w for name, (_, w) in self.terms.items()})
        columns = {k: tuple(None if i in failed else v for i, v in enumerate(col)) for k, col in combined.items()}
        for name, res in results.items():
            for sub, col in res.components.items():
                columns[f"{name}.{sub}"] = tuple(None if i in failed else v for i, v in enumerate(col))
        total = columns.pop("total")
        return ScoreResult(total, tuple(sorted(failed.values(), key=lambda f: f.index)), columns)
