"""Multi-turn environments for the tests, loaded by import path in the generators (as tests/_reward_fns.py)."""

from __future__ import annotations

import time

from envs.builtin import reverse_rest


def fails_on_a(prompt: str, completion: str, answer: str, turn: int) -> str | None:
    """reverse_rest, except that it raises for answers starting with 'a' and hangs for those starting with 'b'."""
    if answer.startswith("a"):
        raise RuntimeError("tool crashed")
    if answer.startswith("b"):
        time.sleep(60)
    return reverse_rest(prompt, completion, answer, turn)


def always_a(prompt: str, completion: str, answer: str, turn: int) -> str | None:
    """Replies '?a=' (three tokens) whatever the model wrote: episodes end only at max_turns or at the token
    budget."""
    return "?a="
