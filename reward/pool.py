"""RewardPool: the driver's handle on the reward actors.

Batches are split across workers; each call has a deadline. A worker that dies or misses its
deadline has its whole chunk reported as failures ("timeout" / "exception") and is replaced, so a
slow or crashing scorer costs that batch's scores, never the job. The replacement must be ready
before the next batch goes out, so it serves that batch under the full deadline. Scores and the
logged reward components of the chunks are put back in batch order.
"""

from __future__ import annotations

import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from core.config import RewardConfig
from core.messages import Completion, ScoreFailure, ScoreResult
from reward.policy import RewardSourceFailed
from reward.worker import RewardWorker, check_source


class RewardPool:
    """`num_workers` reward actors, sized independently of the generators (reward.num_workers).

    `source` is the reward section of the config (or, as before, just the function's import path);
    it travels to each actor, which builds its scorer once. Actors are named `<name_prefix>-<i>`;
    two pools alive at once in one Ray namespace need different prefixes.
    """

    def __init__(self, source: str | RewardConfig, num_workers: int | None = None, num_cpus: float | None = None,
                 timeout_s: float = 60.0, log=print, startup_timeout_s: float = 300.0, name_prefix: str = "reward"):
        self.config = source if isinstance(source, RewardConfig) else RewardConfig(function=source)
        check_source(self.config)  # fail in the driver, before any actor starts
        self.function_path = self.config.function
        self.num_cpus = self.config.num_cpus if num_cpus is None else num_cpus
        self.timeout_s, self.startup_timeout_s, self.log = timeout_s, startup_timeout_s, log
        self.workers: dict[str, ray.actor.ActorHandle] = {}
        self._starting: dict[str, ray.ObjectRef] = {}
        self.restarts = 0
        for i in range(self.config.num_workers if num_workers is None else num_workers):
            self._spawn(f"{name_prefix}-{i}")

    def _spawn(self, name: str) -> None:
        from core.config import parse_resources

        cls = ray.remote(RewardWorker).options(name=name, num_cpus=self.num_cpus, max_restarts=0,
                                               resources=parse_resources(self.config.resources))
        for attempt in range(100):
            try:
                handle = cls.remote(self.config)
                break
            except ValueError as e:  # the killed predecessor's name is released asynchronously
                if "already taken" not in str(e) or attempt == 99:
                    raise
                time.sleep(0.05)
        self.workers[name] = handle
        self._starting[name] = handle.ready.remote()

    def wait_ready(self) -> None:
        """Block until every (re)started actor has built its scorer. Start-up (loading a reward model)
        is not charged to a batch's deadline, or a slow load would be killed and restarted forever.
        An actor that cannot build its scorer is a configuration problem: raise, naming it."""
        for name, ref in list(self._starting.items()):
            try:
                ray.get(ref, timeout=self.startup_timeout_s)
            except GetTimeoutError:
                raise RewardSourceFailed(f"{name} did not build its scorer ({self.function_path}) within "
                                         f"{self.startup_timeout_s}s") from None
            except RayActorError as e:
                # Ray's message is the whole remote traceback: its last line is the scorer's own error
                cause = [ln for ln in str(e).strip().splitlines() if ln.strip()][-1:] or ["?"]
                self.log(f"[reward] {name} could not build its scorer: {e}")
                raise RewardSourceFailed(f"{name} could not build its scorer ({self.function_path}): "
                                         f"{cause[0].strip()}") from None
            del self._starting[name]

    def score(self, completions: list[Completion]) -> ScoreResult:
        self.wait_ready()
        names = sorted(self.workers)
        chunks = [list(range(i, len(completions), len(names))) for i in range(len(names))]
        calls = [(name, idx, self.workers[name].score.remote([completions[j] for j in idx]))
                 for name, idx in zip(names, chunks) if idx]
        scores: list[float | None] = [None] * len(completions)
        components: dict[str, list[float | None]] = {}
        failures: list[ScoreFailure] = []
        deadline = time.monotonic() + self.timeout_s
        for name, idx, ref in calls:
            try:
                res: ScoreResult = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                for local, s in enumerate(res.scores):
                    scores[idx[local]] = s
                for part, col in res.components.items():
                    merged = components.setdefault(part, [None] * len(completions))
                    for local, v in enumerate(col):
                        merged[idx[local]] = v
                failures.extend(ScoreFailure(idx[f.index], f.reason, f.detail) for f in res.failures)
            except RayTaskError as e:  # the actor is alive but the call failed outside user code
                failures.extend(ScoreFailure(j, "exception", f"{name}: {e}") for j in idx)
            except (GetTimeoutError, RayActorError) as e:
                reason = "timeout" if isinstance(e, GetTimeoutError) else "exception"
                detail = (f"{name} gave no answer within timeouts.reward_s={self.timeout_s}s"
                          if reason == "timeout" else f"{name} died: {e}")
                failures.extend(ScoreFailure(j, reason, detail) for j in idx)
                ray.kill(self.workers.pop(name))
                self._starting.pop(name, None)
                self.restarts += 1
                self.log(f"[reward] {detail}; replacing it")
                self._spawn(name)
        failures.sort(key=lambda f: f.index)
        return ScoreResult(tuple(scores), tuple(failures), {k: tuple(v) for k, v in components.items()})

    def shutdown(self) -> None:
        for a in self.workers.values():
            ray.kill(a)
        self.workers.clear()
        self._starting.clear()
