"""RewardPool: the driver's handle on the reward actors.

Batches are split across workers; each call has a deadline. A worker that dies or misses its
deadline has its whole chunk reported as failures ("timeout" / "exception") and is replaced, so a
slow or crashing scorer costs that batch's scores, never the job.
"""

from __future__ import annotations

import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from core.messages import Completion, ScoreFailure, ScoreResult
from reward.worker import RewardWorker, load_function


class RewardPool:
    def __init__(self, function_path: str, num_workers: int, num_cpus: float, timeout_s: float, log=print):
        load_function(function_path)  # fail in the driver, before any actor starts
        self.function_path, self.num_cpus, self.timeout_s, self.log = function_path, num_cpus, timeout_s, log
        self.workers: dict[str, ray.actor.ActorHandle] = {}
        self.restarts = 0
        for i in range(num_workers):
            self._spawn(f"reward-{i}")

    def _spawn(self, name: str) -> None:
        cls = ray.remote(RewardWorker).options(name=name, num_cpus=self.num_cpus, max_restarts=0)
        self.workers[name] = cls.remote(self.function_path)

    def score(self, completions: list[Completion]) -> ScoreResult:
        names = sorted(self.workers)
        chunks = [list(range(i, len(completions), len(names))) for i in range(len(names))]
        calls = [(name, idx, self.workers[name].score.remote([completions[j] for j in idx]))
                 for name, idx in zip(names, chunks) if idx]
        scores: list[float | None] = [None] * len(completions)
        failures: list[ScoreFailure] = []
        deadline = time.monotonic() + self.timeout_s
        for name, idx, ref in calls:
            try:
                res: ScoreResult = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                for local, s in enumerate(res.scores):
                    scores[idx[local]] = s
                failures.extend(ScoreFailure(idx[f.index], f.reason, f.detail) for f in res.failures)
            except (GetTimeoutError, RayActorError) as e:
                reason = "timeout" if isinstance(e, GetTimeoutError) else "exception"
                detail = (f"{name} gave no answer within timeouts.reward_s={self.timeout_s}s"
                          if reason == "timeout" else f"{name} died: {e}")
                failures.extend(ScoreFailure(j, reason, detail) for j in idx)
                ray.kill(self.workers.pop(name))
                self.restarts += 1
                self.log(f"[reward] {detail}; replacing it")
                self._spawn(name)
        return ScoreResult(tuple(scores), tuple(failures))

    def shutdown(self) -> None:
        for a in self.workers.values():
            ray.kill(a)
        self.workers.clear()
