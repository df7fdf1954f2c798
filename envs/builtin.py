"""Built-in multi-turn environments (the interface: actors/env.py).

| import path | what it does |
|---|---|
| envs.builtin:reverse_hint | the reversal task with feedback: after a wrong answer, the correct answer up to the first wrong letter |

With `reward.builtin:reverse_multiturn` it makes the multi-turn example job (examples/multiturn.yaml).
"""

from __future__ import annotations

import re

# an environment reply of reverse_hint: '?' + the answer's first letters + '=' (it reads like a new prompt)
_REPLY = re.compile(r"\?[a-z]*=")


def attempts(completion: str) -> list[str]:
    """The model's answers in a reverse_hint transcript, in order (the text between the environment's replies)."""
    return [a.strip() for a in _REPLY.split(completion)]


def reverse_hint(prompt: str, completion: str, answer: str, turn: int) -> str | None:
    """End the episode when the model's last answer is right; otherwise reply '?<hint>=', where the hint is the
    answer up to and including the first letter the model got wrong (the whole answer at most), and let it
    answer again. prompt 'abcde=', answer 'edcba', attempt 'edcab' -> '?edcb='."""
    last = attempts(completion)[-1]
    if last == answer:
        return None
    k = next((i for i, (x, y) in enumerate(zip(last, answer)) if x != y), min(len(last), len(answer)))
    return f"?{answer[:k + 1]}="
