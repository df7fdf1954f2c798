"""A training job running in a thread of the test process, steered through its control actor."""

from __future__ import annotations

import threading
import time

import ray

from cluster.control import CONTROL_NAME, NAMESPACE
from core.config import Config


def small_job(tmp_path, default_cfg, **rollout) -> Config:
    """A short-step job (8 prompts x 4 samples) meant to be ended by the test with a stop request."""
    cfg = Config()
    cfg.model.cache_dir = default_cfg.model.cache_dir
    cfg.run_dir, cfg.run_name = str(tmp_path), "job"
    cfg.steps, cfg.prompts_per_step, cfg.eval_every = 500, 8, 1000  # ended by the test with a stop request
    cfg.algo.group_size, cfg.algo.minibatches = 4, 1
    cfg.reward.num_cpus = 0.1
    cfg.generator.num_generators = 2
    cfg.rollout.verify_sync = True  # every sync: all generators confirm the version and identical weights
    for k, v in rollout.items():
        setattr(cfg.rollout, k, v)
    return cfg


def check_accounting(s: dict) -> None:
    """A stopped small_job's summary: every prompt accounted for once, a full batch every step, syncs verified."""
    a = s["accounting"]
    assert a["duplicates"] == 0 and a["prompts_unaccounted"] == 0
    assert a["prompts_drawn"] == a["prompts_trained"] + sum(a["prompts_dropped"].values())
    assert a["prompts_trained"] == s["steps"] * 8  # every step trained on a full batch
    # every sync was confirmed and verified, or (async) superseded by the next version before it was confirmed;
    # the last one may still be in flight at the stop
    assert s["syncs_verified"] + s["syncs_superseded"] >= s["steps"] - 1 and s["syncs_verified"] >= s["steps"] // 2


class Job:
    def __init__(self, cfg: Config, resume: bool = False):
        from cluster.driver import run

        self.summary, self.error, self.lines = None, None, []
        self.thread = threading.Thread(target=self._run, args=(run, cfg, resume), daemon=True)
        self.thread.start()
        self.control = self._wait(lambda: ray.get_actor(CONTROL_NAME, namespace=NAMESPACE), "control actor", 120)

    def _run(self, run, cfg, resume):
        try:
            self.summary = run(cfg, log=self.lines.append, resume=resume)
        except BaseException as e:  # surfaced by the test
            self.error = e

    def _wait(self, probe, what: str, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.error:
                raise self.error
            try:
                got = probe()
                if got:
                    return got
            except ValueError:  # named actor not there yet
                pass
            except ray.exceptions.RayActorError:  # the control actor went with the job: show why the job ended
                self.thread.join(timeout=60)
                if self.error:
                    raise self.error from None
                raise AssertionError(f"the job ended while waiting for {what}; log tail: {self.lines[-15:]}") from None
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; job log tail: {self.lines[-15:]}")

    def status(self) -> dict:
        return ray.get(self.control.status.remote(), timeout=30)

    def wait_status(self, pred, what: str, timeout_s: float = 240) -> dict:
        return self._wait(lambda: (lambda s: s if s and pred(s) else None)(self.status()), what, timeout_s)

    def stop(self) -> dict:
        ray.get(self.control.request_stop.remote(), timeout=30)
        self.thread.join(timeout=300)
        if self.error:
            raise self.error
        assert self.summary is not None, "job did not finish after a stop request"
        return self.summary

    def join(self, timeout_s: float = 300):
        """Wait for the job to end on its own; returns (summary, error)."""
        self.thread.join(timeout=timeout_s)
        assert not self.thread.is_alive(), f"job still running; log tail: {self.lines[-15:]}"
        return self.summary, self.error
