"""Multi-turn environments for the tests, loaded by import path in the generators (as tests/_reward_fns.py)."""

from __future__ import annotations

import threading
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


_went_on = threading.Event()


def waits_for_others(prompt: str, completion: str, answer: str, turn: int) -> str | None:
    """reverse_rest, except that a first reply to an answer starting with 'a' waits (20 s at most) until some other
    episode in this generator has taken its second turn. If episodes took their turns in lockstep, each turn waiting
    for every reply, that could never happen: the wait would run out and fail the episode."""
    if turn >= 2:
        _went_on.set()
    if answer.startswith("a") and turn == 1 and not _went_on.wait(20):
        raise TimeoutError("no other episode went on while this reply was pending")
    return reverse_rest(prompt, completion, answer, turn)
