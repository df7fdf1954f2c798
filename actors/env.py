"""Multi-turn environments: what a generator asks between two of the model's turns.

An environment is a plain function, named by import path in `rollout.env`:

    def step(prompt: str, completion: str, answer: str, turn: int) -> str | None

- `prompt`: the prompt's text; `answer`: its label (dataset column `answer`);
- `completion`: everything after the prompt so far, as text: the model's turns and the environment's earlier
  replies, in order (special tokens left out);
- `turn`: how many turns the model has taken (1 after its first answer).

It returns the text to append, which the model then continues from (a tool's output, a judge's feedback, a
user's next message), or None to end the episode. It is called with these four keywords. The environment keeps no state between calls: everything it needs is in its arguments, so an
episode replays exactly from its seed and can move to another generator. Reply tokens are appended as the
tokenizer encodes the text (no special tokens added) and are never trained on (`Completion.loss_mask`).

Failures are data, as for rewards: a step that raises, returns something other than str or None, or takes
longer than `timeouts.env_step_s` ends its episode with `Completion.env_failure` set; the rollout drops the
sample's group (reason env_failed) and counts it. A step that hangs cannot be stopped from outside its thread:
it is abandoned (the thread is a daemon) and the generator goes on.
"""

from __future__ import annotations

import threading
import time
import traceback
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout  # the builtin TimeoutError only from Python 3.11
from typing import Callable

from core.messages import Completion, EnvSpec


def load_env(spec: EnvSpec | str) -> Callable:
    from reward.worker import load_function

    return load_function(spec if isinstance(spec, str) else spec.function, "rollout.env")


def _run(fn: Callable, kwargs: dict, fut: Future) -> None:
    try:
        fut.set_result(fn(**kwargs))
    except BaseException as e:  # noqa: BLE001 - any failure of user code is reported as data
        fut.set_exception(e)


def step_all(fn: Callable, samples: list[Completion], timeout_s: float) -> list[tuple[str | None, str]]:
    """Ask the environment about every sample at once (one daemon thread each), all under one deadline.
    Returns (reply or None, failure or '') per sample, in order."""
    futs: list[Future] = []
    for c in samples:
        fut: Future = Future()
        kwargs = dict(prompt=c.prompt.text, completion=c.text, answer=c.prompt.answer, turn=c.turns)
        threading.Thread(target=_run, args=(fn, kwargs, fut), daemon=True, name="relayrl-env").start()
        futs.append(fut)
    out: list[tuple[str | None, str]] = []
    deadline = time.monotonic() + timeout_s
    for fut in futs:
        try:
            reply = fut.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            out.append((None, f"timeout: no reply within timeouts.env_step_s={timeout_s}s"))
            continue
        except BaseException as e:  # noqa: BLE001
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            out.append((None, f"exception: {tb}"))
            continue
        if reply is not None and not isinstance(reply, str):
            out.append((None, f"type: the environment returned {type(reply).__name__}, expected str or None"))
            continue
        out.append((reply, ""))
    return out
