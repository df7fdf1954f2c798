"""Built-in multi-turn environments (the interface: actors/env.py).

| import path | what it does |
|---|---|
| envs.builtin:reverse_rest | the reversal task, fixed turn by turn: after a wrong answer, the part of the word still to reverse |

With `reward.builtin:reverse_multiturn` it makes the multi-turn example job (examples/multiturn.yaml).
"""

from __future__ import annotations

import re

# a reply of reverse_rest: '?' + the letters still to reverse + '=' (it reads like a new, shorter prompt)
_REPLY = re.compile(r"\?([a-z]*)=")


def answer_so_far(prompt: str, completion: str) -> tuple[str, int]:
    """The answer a reverse_rest transcript adds up to, and the model's turns in it. Each reply '?<rest>=' keeps
    the first len(word) - len(rest) letters of the answer so far (the ones that were right), and the model's
    next turn supplies the rest: word 'abcde', 'edcab' then '?ab=' then 'ba' -> 'edc' + 'ba' = 'edcba'."""
    word = prompt.rstrip("=")
    parts = _REPLY.split(completion)  # attempt, rest, attempt, rest, ..., attempt
    answer = parts[0].strip()
    for rest, attempt in zip(parts[1::2], parts[2::2]):
        answer = answer[: len(word) - len(rest)] + attempt.strip()
    return answer, (len(parts) + 1) // 2


def reverse_rest(prompt: str, completion: str, answer: str, turn: int) -> str | None:
    """End the episode when the answer so far is right. Otherwise keep its right first letters and ask for the
    rest, as a shorter reversal: reply '?<the word's letters whose reversal is still missing>='. Prompt 'abcde='
    (answer 'edcba'), attempt 'edcab': 'edc' is right, so the reply is '?ab=' and the right next turn is 'ba'."""
    so_far, _ = answer_so_far(prompt, completion)
    if so_far == answer:
        return None
    k = next((i for i, (x, y) in enumerate(zip(so_far, answer)) if x != y), min(len(so_far), len(answer)))
    word = prompt.rstrip("=")
    return f"?{word[: len(word) - k]}="
