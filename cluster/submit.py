"""`relayrl submit`: a thin layer over the Ray Jobs API.

    relayrl submit --address http://127.0.0.1:8265 -- --config examples/demo.yaml --run_dir=/shared/runs

uploads the working directory (without virtualenvs, caches and run outputs), runs
`python -m cluster.cli train ARGS` as a Ray job with `--ray_address=auto` (the job's driver joins
the cluster it runs on), prints the job id, and by default follows its status until it ends.
Relative run directories resolve inside the job's temporary working directory: pass an absolute
`--run_dir` on storage the head node keeps.
"""

from __future__ import annotations

import shlex
import time

# never uploaded: environments, caches and outputs (they can be gigabytes)
EXCLUDES = [".venv", ".venv-bench", ".git", ".relayrl_cache", "runs", "__pycache__", "*.pyc", "bench/results"]


AGENT_NOT_READY = "No available agent to submit job"  # the Jobs API answers, its agent on the head is still starting
AGENT_WAIT_S = 120.0


def submit_when_ready(client, wait_s: float = AGENT_WAIT_S, log=print, sleep=time.sleep, **job) -> str:
    """client.submit_job(**job), retried while the cluster's job agent is still starting (a cluster submitted to
    right after `ray start` answers HTTP before its agent is up). Any other error, or the agent still missing
    after WAIT_S, is raised as it is."""
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if AGENT_NOT_READY not in str(e) or time.monotonic() >= deadline:
                raise
            if not waited:
                log(f"the cluster's job agent is not up yet; retrying for up to {wait_s:.0f}s")
                waited = True
            sleep(2.0)


def submit(address: str, train_args: list[str], wait: bool, timeout_s: float, log=print) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    args = [*train_args] if any(a.startswith("--ray_address") for a in train_args) else [*train_args, "--ray_address=auto"]
    entrypoint = "python -m cluster.cli train " + " ".join(shlex.quote(a) for a in args)
    job_id = submit_when_ready(client, log=log, entrypoint=entrypoint,
                               runtime_env={"working_dir": ".", "excludes": EXCLUDES})
    log(f"submitted {job_id}: {entrypoint}")
    if not wait:
        log(f"follow it with: ray job logs --follow --address {address} {job_id}")
        return 0
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            log(f"{job_id} still {status} after {timeout_s:.0f}s; stop waiting (the job keeps running)")
            return 1
        time.sleep(2)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    log("\n".join(logs.splitlines()[-20:]))
    log(f"{job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1
