"""Multi-turn environments: what a generator asks between two of the model's turns.

An environment is a plain function, named by import path in `rollout.env`:

    def step(prompt: str, completion: str, answer: str, turn: int) -> str | None

- `prompt`: the prompt's text; `answer`: its label (dataset column `answer`);
- `completion`: everything after the prompt so far, as text: the model's turns and the environment's earlier
  replies, in order (special tokens left out);
- `turn`: how many turns the model has taken (1 after its first answer).

It returns the text to append, which the model then continues from (a tool's output, a judge's feedback, a
user's next message), or None to end the episode. It is called with these four keywords. It keeps no state
between calls: everything it needs is in its arguments, so an episode replays exactly from its seed. Reply tokens
are appended as the tokenizer encodes the text (no special tokens added) and are never trained on
(`Completion.loss_mask`).

For chat models, `rollout.env_role=user` (or `tool`, or any role the model's chat template knows) wraps each reply
as a message of that role with the chat template, followed by the template's prompt for the next assistant turn
(`chat_turn`), so the environment returns plain content.

Failures are data, as for rewards: a step that raises, returns something other than str or None, or takes
longer than `timeouts.env_step_s` ends its episode with `Completion.env_failure` set; the rollout drops the
sample's group (reason env_failed) and counts it. A step that hangs cannot be stopped from outside its thread:
it is abandoned (the thread is a daemon) and the generator goes on.
"""

from __future__ import annotations

import threading
import traceback
from concurrent.futures import Future, wait
from typing import Callable

from core.messages import Completion, EnvSpec


def load_env(spec: EnvSpec | str) -> Callable:
    from reward.worker import load_function

    return load_function(spec if isinstance(spec, str) else spec.function, "rollout.env")


def chat_turn(tokenizer, role: str, content: str, ended_with: str) -> str:
    """The text the tokenizer's chat template puts after an assistant turn for one more message of ROLE holding
    CONTENT, and then the prompt for the next assistant turn. ENDED_WITH is the token the model's turn ended on
    (its EOS, say '<|im_end|>'): the part of the template's turn closing it already wrote is left out, so the
    transcript reads as the template renders the whole conversation. ChatML, role 'tool', content '42', ended on
    '<|im_end|>': '\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n'."""
    base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    before = tokenizer.apply_chat_template(base, tokenize=False)
    after = tokenizer.apply_chat_template(base + [{"role": role, "content": content}], tokenize=False,
                                          add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError(f"the chat template renders a conversation differently once a {role!r} message follows, so "
                         "a reply cannot be appended to the transcript")
    closing = before[before.rindex("a") + 1:]  # what the template writes after an assistant message's content
    if ended_with and closing.startswith(ended_with):
        closing = closing[len(ended_with):]
    return closing + after[len(before):]


def _run(fn: Callable, kwargs: dict, fut: Future) -> None:
    try:
        fut.set_result(fn(**kwargs))
    except BaseException as e:  # noqa: BLE001 - any failure of user code is reported as data
        fut.set_exception(e)


def start_step(fn: Callable, c: Completion) -> Future:
    """Ask the environment about sample C in a daemon thread of its own; the future holds its reply."""
    fut: Future = Future()
    kwargs = dict(prompt=c.prompt.text, completion=c.text, answer=c.prompt.answer, turn=c.turns)
    threading.Thread(target=_run, args=(fn, kwargs, fut), daemon=True, name="relayrl-env").start()
    return fut


def step_outcome(fut: Future, timeout_s: float) -> tuple[str | None, str]:
    """(reply or None, failure or '') of a finished step (or one given up on: failure 'timeout: ...')."""
    if not fut.done():
        return None, f"timeout: no reply within timeouts.env_step_s={timeout_s}s"
    try:
        reply = fut.result()
    except BaseException as e:  # noqa: BLE001
        return None, f"exception: {traceback.format_exception_only(type(e), e)[-1].strip()}"
    if reply is not None and not isinstance(reply, str):
        return None, f"type: the environment returned {type(reply).__name__}, expected str or None"
    return reply, ""


def step_all(fn: Callable, samples: list[Completion], timeout_s: float) -> list[tuple[str | None, str]]:
    """Ask the environment about every sample at once, all under one deadline. Returns (reply or None, failure or
    '') per sample, in order."""
    futs = [start_step(fn, c) for c in samples]
    wait(futs, timeout=timeout_s)
    return [step_outcome(f, timeout_s) for f in futs]
