"""Multi-turn environments: the built-in one and its reward, worked by hand, and how a step's failures come back."""

from __future__ import annotations

import time

from actors.env import load_env, step_all
from core.messages import Completion, Prompt
from envs.builtin import attempts, reverse_hint
from reward.builtin import reverse_multiturn


def test_reverse_hint_by_hand():
    # answer 'edcba'; first wrong letter of 'edcab' is at index 3 -> the answer up to and including it
    assert reverse_hint("abcde=", "edcab", "edcba", 1) == "?edcb="
    assert reverse_hint("abcde=", "x", "edcba", 1) == "?e="
    assert reverse_hint("abcde=", "", "edcba", 1) == "?e="          # nothing written: the first letter
    assert reverse_hint("abcde=", "edc", "edcba", 1) == "?edcb="     # too short: up to the first missing letter
    assert reverse_hint("abcde=", "edcbaa", "edcba", 1) == "?edcba="  # too long: the whole answer
    assert reverse_hint("abcde=", "edcba", "edcba", 1) is None       # right: the episode ends
    # only the last answer counts: the second turn got it right
    assert reverse_hint("abcde=", "edcab?edcb=edcba", "edcba", 2) is None
    assert reverse_hint("abcde=", "edcab?edcb=edcbb", "edcba", 2) == "?edcba="


def test_attempts_split_on_the_environment_replies():
    assert attempts("edcab?edcb=edcba") == ["edcab", "edcba"]
    assert attempts("edcba") == ["edcba"]
    assert attempts("a?e=b?ed=") == ["a", "b", ""]


def test_reverse_multiturn_reward_by_hand():
    out = reverse_multiturn(["", "", "", ""], ["edcba", "edcab?edcb=edcba", "edcab", "edcab?edcb=ed"],
                            ["edcba"] * 4)
    # solved first turn 1.0; solved second 1 - 0.1; wrong 'edcab': 3 of 5 right -> 0.5 * 0.6 = 0.3;
    # wrong 'ed' on turn 2: 2/5 right, wrong length -> 0.5 * (0.4 - 0.5) - 0.1 = -0.15
    assert [round(x, 10) for x in out["total"]] == [1.0, 0.9, 0.3, -0.15]
    assert out["solved"] == [1.0, 1.0, 0.0, 0.0] and out["turns"] == [1.0, 2.0, 1.0, 2.0]


def _sample(text: str, turns: int = 1) -> Completion:
    return Completion(Prompt(7, "abcde=", (1,), "edcba"), (5,), (0.0,), text, "stop", 0, "g", turns=turns)


def _echo(prompt, completion, answer, turn):
    return f"{prompt}|{completion}|{answer}|{turn}"


def _raises(prompt, completion, answer, turn):
    raise KeyError("no such tool")


def _slow(prompt, completion, answer, turn):
    time.sleep(30)


def _wrong_type(prompt, completion, answer, turn):
    return 3


def test_step_all_passes_every_argument_and_reports_failures_as_data():
    s = [_sample("edcab", turns=2)]
    assert step_all(_echo, s, 5.0) == [("abcde=|edcab|edcba|2", "")]
    assert step_all(lambda **kw: None, s, 5.0) == [(None, "")]
    [(reply, failure)] = step_all(_raises, s, 5.0)
    assert reply is None and failure == "exception: KeyError: 'no such tool'"
    [(reply, failure)] = step_all(_wrong_type, s, 5.0)
    assert reply is None and failure.startswith("type: the environment returned int")


def test_a_hanging_step_is_abandoned_at_the_deadline_and_the_others_still_answer():
    t0 = time.monotonic()
    out = step_all(lambda **kw: _slow(**kw) if kw["completion"] == "hang" else "ok",
                   [_sample("a"), _sample("hang"), _sample("b")], 0.5)
    assert time.monotonic() - t0 < 5
    assert out[0] == ("ok", "") and out[2] == ("ok", "")
    assert out[1][0] is None and out[1][1].startswith("timeout: no reply within timeouts.env_step_s=0.5s")


def test_load_env_names_the_field():
    assert load_env("envs.builtin:reverse_hint") is reverse_hint
    try:
        load_env("envs.builtin:nope")
    except ValueError as e:
        assert str(e).startswith("rollout.env: cannot load 'envs.builtin:nope'")
    else:
        raise AssertionError("no error")
