"""Multi-turn environments: the built-in one and its reward, worked by hand, and how a step's failures come back."""

from __future__ import annotations

import time

import pytest

from actors.env import chat_turn, load_env, step_all
from core.messages import Completion, Prompt
from envs.builtin import answer_so_far, reverse_rest
from reward.builtin import reverse_multiturn


def test_reverse_rest_by_hand():
    # word 'abcde', answer 'edcba'. 'edcab' has 'edc' right: the reversal of 'ab' is still missing
    assert reverse_rest("abcde=", "edcab", "edcba", 1) == "?ab="
    assert reverse_rest("abcde=", "x", "edcba", 1) == "?abcde="        # nothing right: the whole word again
    assert reverse_rest("abcde=", "", "edcba", 1) == "?abcde="
    assert reverse_rest("abcde=", "edc", "edcba", 1) == "?ab="         # too short: the rest
    assert reverse_rest("abcde=", "edcbaa", "edcba", 1) == "?="         # too long: nothing is missing, but 'a' is extra
    assert reverse_rest("abcde=", "edcba", "edcba", 1) is None         # right: the episode ends
    # later turns supply the rest: 'edc' + 'ba'
    assert reverse_rest("abcde=", "edcab?ab=ba", "edcba", 2) is None
    assert reverse_rest("abcde=", "edcab?ab=bb", "edcba", 2) == "?a="  # 'edcb' right now: 'a' left
    assert reverse_rest("abcde=", "edcbaa?=", "edcba", 2) is None      # an empty turn drops the extra letter


def test_answer_so_far_adds_the_turns_up():
    assert answer_so_far("abcde=", "edcab?ab=ba") == ("edcba", 2)
    assert answer_so_far("abcde=", "edcba") == ("edcba", 1)
    assert answer_so_far("abcde=", "x?abcde=ed?abc=cba") == ("edcba", 3)  # 'ed' kept from turn 2
    assert answer_so_far("abcde=", "edcab?ab=") == ("edc", 2)  # the model wrote nothing on its last turn


def test_reverse_multiturn_reward_by_hand():
    out = reverse_multiturn(["abcde="] * 4, ["edcba", "edcab?ab=ba", "edcab", "edcab?ab=bb?a="], ["edcba"] * 4)
    # solved first turn 1.0; solved second 1 - 0.1; wrong 'edcab': 3 of 5 right -> 0.5 * 0.6 = 0.3;
    # 'edcbb' then nothing on turn 3 -> 'edcb': 4/5 right, wrong length -> 0.5 * (0.8 - 0.5) - 0.2 = -0.05
    assert [round(x, 10) for x in out["total"]] == [1.0, 0.9, 0.3, -0.05]
    assert out["solved"] == [1.0, 1.0, 0.0, 0.0] and out["turns"] == [1.0, 2.0, 1.0, 3.0]


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
    assert load_env("envs.builtin:reverse_rest") is reverse_rest
    try:
        load_env("envs.builtin:nope")
    except ValueError as e:
        assert str(e).startswith("rollout.env: cannot load 'envs.builtin:nope'")
    else:
        raise AssertionError("no error")


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ '<|begin_of_text|>' }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'tool'] %}"
          "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ '<|start_header_id|>' + m['role'] + "
          "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def _chat_tokenizer(tmp_path, template):
    from transformers import AutoTokenizer

    from cluster.world import build_tokenizer

    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    tok.chat_template = template
    return tok


def test_chat_turn_continues_the_transcript_as_the_template_renders_it(tmp_path):
    chatml = _chat_tokenizer(tmp_path / "chatml", CHATML)
    # the model's turn ended on <|im_end|>: the template's newline after it, the tool message, the next prompt
    assert chat_turn(chatml, "tool", "42", "<|im_end|>") == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    # ended on some other token: the template's whole closing comes first
    assert chat_turn(chatml, "user", "again", "</s>") == \
        "<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"
    llama = _chat_tokenizer(tmp_path / "llama", LLAMA3)
    assert chat_turn(llama, "tool", "42", "<|eot_id|>") == \
        "<|start_header_id|>tool<|end_header_id|>\n\n42<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    with pytest.raises(Exception, match="unknown role system2"):  # the template's own check
        chat_turn(llama, "system2", "x", "<|eot_id|>")
