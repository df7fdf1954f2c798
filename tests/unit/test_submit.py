"""`relayrl submit` against a cluster whose job agent is still starting (failure handling: a fake client)."""

from __future__ import annotations

import pytest

from cluster.submit import AGENT_NOT_READY, submit_when_ready

# what ray.job_submission raises while the head's dashboard answers but its job agent is not up (seen in CI)
NOT_READY = RuntimeError(f"Request failed with status code 500: {AGENT_NOT_READY}, please try again later..")


class Client:
    def __init__(self, errors):
        self.errors, self.calls = list(errors), []

    def submit_job(self, **job):
        self.calls.append(job)
        if self.errors:
            raise self.errors.pop(0)
        return "raysubmit_1"


def test_retries_while_the_agent_starts_then_submits_once():
    client, slept, lines = Client([NOT_READY, NOT_READY]), [], []
    job_id = submit_when_ready(client, wait_s=60, log=lines.append, sleep=slept.append, entrypoint="python -m x")
    assert job_id == "raysubmit_1" and len(client.calls) == 3 and slept == [2.0, 2.0]
    assert client.calls[-1] == {"entrypoint": "python -m x"}
    assert len(lines) == 1 and "not up yet" in lines[0]  # said once, not every retry


def test_other_errors_are_not_retried():
    client = Client([RuntimeError("Request failed with status code 401: Unauthorized")])
    with pytest.raises(RuntimeError, match="401"):
        submit_when_ready(client, wait_s=60, log=lambda *_: None, sleep=lambda s: None, entrypoint="x")
    assert len(client.calls) == 1


def test_an_agent_that_never_comes_up_fails_after_the_wait():
    client = Client([NOT_READY] * 1000)
    with pytest.raises(RuntimeError, match=AGENT_NOT_READY):
        submit_when_ready(client, wait_s=0.0, log=lambda *_: None, sleep=lambda s: None, entrypoint="x")
    assert len(client.calls) == 1
