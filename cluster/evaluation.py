"""Held-out evaluation: greedy accuracy and sampled pass@k, judged by the job's own reward source.

A completion counts as correct when its reward is >= `eval_correct_threshold` (1.0 by default:
exact match for the built-in task, a verified answer for math-verify), so evaluation works for any
dataset and reward without a separate metric.
"""

from __future__ import annotations

from math import comb

from core.messages import EnvSpec, Prompt


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code"): the chance that at least one of k samples drawn without
    replacement from the n is correct.
    # pass@k = 1 - C(n - c, k) / C(n, k)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def _correct(rewards, completions, threshold: float) -> list[bool]:
    scores = rewards.score(completions).scores
    # an unscorable completion is not correct (and the reward pool has already counted the failure)
    return [s is not None and s >= threshold for s in scores]


def evaluate(pool, rewards, prompts: list[Prompt], max_new_tokens: int, threshold: float = 1.0,
             samples: int = 0, ks: tuple[int, ...] = (), env: EnvSpec | None = None) -> dict[str, float]:
    """{'eval/heldout_accuracy': greedy accuracy, 'eval/pass@k': ...} on the current generators. With ENV, each
    completion is a whole multi-turn episode, judged by the reward as in training; 'eval/turns_mean' is the
    greedy episodes' mean number of model turns."""
    greedy = pool.generate(prompts, n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=0, env=env)
    ok = _correct(rewards, greedy, threshold)
    out = {"eval/heldout_accuracy": sum(ok) / max(len(ok), 1)}
    if env is not None:
        out["eval/turns_mean"] = sum(c.turns for c in greedy) / max(len(greedy), 1)
    if samples:
        sampled = pool.generate(prompts, n=samples, temperature=1.0, max_new_tokens=max_new_tokens, seed=12345,
                                env=env)
        ok = _correct(rewards, sampled, threshold)
        counts = [sum(ok[i:i + samples]) for i in range(0, len(ok), samples)]
        for k in ks:
            out[f"eval/pass@{k}"] = sum(pass_at_k(samples, c, k) for c in counts) / len(counts)
    return out
