"""GeneratorPool: the driver's handle on the generator actors.

- starts N named actors (`generator-0`, ...), each with the current weights;
- splits a batch of prompts across live generators, every call under a deadline;
- when a generator dies or misses its deadline, its prompts are re-queued to the others, it is
  replaced by a fresh actor that loads the current weights before serving, and the restart is
  counted;
- pushes a published version to every generator and checks they all report it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.generator import EngineSettings, Generator, engine_env
from core.messages import Completion, GenerateRequest, Prompt, WeightsHandle


class GenerationFailed(RuntimeError):
    pass


@dataclass
class PoolStats:
    restarts: int = 0
    requeued_prompts: int = 0
    failures: list[str] = field(default_factory=list)


class GeneratorPool:
    def __init__(self, settings: EngineSettings, num_cpus: float, num_gpus: float, startup_timeout_s: float,
                 call_timeout_s: float, sync_timeout_s: float, log=print, max_restarts: int = 8):
        self.settings = settings
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.startup_timeout_s, self.call_timeout_s, self.sync_timeout_s = startup_timeout_s, call_timeout_s, sync_timeout_s
        self.log = log
        self.max_restarts = max_restarts
        self.actors: dict[str, ray.actor.ActorHandle] = {}
        self.handle: WeightsHandle | None = None  # latest published version, loaded by new generators
        self.stats = PoolStats()
        self._next_index = 0

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self) -> tuple[str, ray.actor.ActorHandle]:
        name = f"generator-{self._next_index}"
        self._next_index += 1
        cls = ray.remote(Generator).options(
            name=name, num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0, max_concurrency=1,
            runtime_env={"env_vars": engine_env(self.settings)})
        return name, cls.remote(name, self.settings)

    def start(self, n: int) -> None:
        """Start n generators in parallel and wait until each is up and on the current version."""
        fresh = dict(self._spawn() for _ in range(n))
        self._wait_ready(fresh)
        self.actors.update(fresh)

    def _wait_ready(self, fresh: dict) -> None:
        try:
            ray.get([a.info.remote() for a in fresh.values()], timeout=self.startup_timeout_s)
            if self.handle is not None:
                ray.get([a.update_weights.remote(self.handle) for a in fresh.values()], timeout=self.sync_timeout_s)
        except GetTimeoutError:
            for a in fresh.values():
                ray.kill(a)
            raise GenerationFailed(
                f"generators {sorted(fresh)} did not start within timeouts.startup_s={self.startup_timeout_s}s") from None

    def scale(self, n: int) -> None:
        """Grow or shrink to n generators (a removed generator has no call in flight between steps)."""
        while len(self.actors) > n:
            name = sorted(self.actors, key=lambda s: int(s.rsplit("-", 1)[1]))[-1]
            ray.kill(self.actors.pop(name))
        if len(self.actors) < n:
            self.start(n - len(self.actors))

    def shutdown(self) -> None:
        for a in self.actors.values():
            ray.kill(a)
        self.actors.clear()

    def _replace(self, name: str, reason: str) -> None:
        self.stats.failures.append(f"{name}: {reason}")
        actor = self.actors.pop(name, None)
        if actor is not None:
            ray.kill(actor)
        if self.stats.restarts >= self.max_restarts:
            raise GenerationFailed(f"generators failed {self.stats.restarts} times; last: {name}: {reason}")
        self.stats.restarts += 1
        self.log(f"[pool] {name} failed ({reason}); starting a replacement")
        self.start(1)

    # ------------------------------------------------------------------ work
    def generate(self, prompts: list[Prompt], n: int, temperature: float, max_new_tokens: int,
                 seed: int | None) -> list[Completion]:
        """Completions for every prompt (n each), in prompt order, whatever generators fail on the way."""
        pending = list(prompts)
        results: dict[int, list[Completion]] = {}
        while pending:
            names = sorted(self.actors)
            chunks = [pending[i::len(names)] for i in range(len(names))]
            calls = {}
            for name, chunk in zip(names, chunks):
                if chunk:
                    req = GenerateRequest(tuple(chunk), n, temperature, max_new_tokens,
                                          None if seed is None else seed + chunk[0].uid)
                    calls[name] = (self.actors[name].generate.remote(req), chunk)
            pending = []
            deadline = time.monotonic() + self.call_timeout_s
            for name, (ref, chunk) in calls.items():
                try:
                    for c in ray.get(ref, timeout=max(0.0, deadline - time.monotonic())):
                        results.setdefault(c.prompt.uid, []).append(c)
                except (RayActorError, GetTimeoutError) as e:
                    reason = "timeout" if isinstance(e, GetTimeoutError) else "died"
                    self.stats.requeued_prompts += len(chunk)
                    pending.extend(chunk)
                    self._replace(name, reason)
        return [c for p in prompts for c in results[p.uid]]

    def sync(self, handle: WeightsHandle) -> float:
        """Push a version to every generator; returns seconds taken. Raises on timeout."""
        t0 = time.monotonic()
        self.handle = handle
        refs = {name: a.update_weights.remote(handle) for name, a in self.actors.items()}
        try:
            versions = ray.get(list(refs.values()), timeout=self.sync_timeout_s)
        except GetTimeoutError:
            raise GenerationFailed(
                f"weight sync to version {handle.version} did not finish within timeouts.sync_s={self.sync_timeout_s}s") from None
        if set(versions) != {handle.version}:
            raise GenerationFailed(f"after sync generators report versions {versions}, expected {handle.version}")
        return time.monotonic() - t0

    def versions(self) -> dict[str, int]:
        infos = ray.get([a.info.remote() for a in self.actors.values()], timeout=self.call_timeout_s)
        return {i["name"]: i["version"] for i in infos}

    def fingerprints(self) -> dict[str, str]:
        names = list(self.actors)
        fps = ray.get([self.actors[n].fingerprint.remote() for n in names], timeout=self.call_timeout_s)
        return dict(zip(names, fps))
