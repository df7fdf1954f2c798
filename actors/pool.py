"""GeneratorPool: the driver's handle on the generator actors.

- starts named actors (`generator-0`, ...) in the background; a new generator loads the current
  weights before it is given any work;
- hands each request to the serving generator with the least outstanding work;
- a generator that dies or misses its deadline is killed and replaced (counted); the caller gets
  its prompts back to re-queue;
- grows or shrinks to a target size while a job runs: a removed generator first finishes the
  requests it already holds (draining), then stops;
- pushes a published version to every generator, blocking (sync mode) or in the background
  (async mode), each transfer under a deadline.

Version switches never interleave with an engine step: each generator's engine thread applies
`update_weights` between two steps, after its running samples finish or, with
rollout.inflight_updates, at once (actors/generator.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.generator import ACTOR_CONCURRENCY, EngineSettings, Generator, engine_env
from core.messages import Completion, EnvSpec, GenerateRequest, Prompt, WeightsHandle


class GenerationFailed(RuntimeError):
    pass


@dataclass
class PoolStats:
    restarts: int = 0
    requeued_prompts: int = 0
    failures: list[str] = field(default_factory=list)
    scale_events: list[str] = field(default_factory=list)
    syncs_verified: int = 0
    # async: a newer version was queued before this one was confirmed; it still lands (versions queue in order),
    # but its confirmation is no longer awaited or checked
    syncs_superseded: int = 0
    sync_seconds: list[float] = field(default_factory=list)  # each confirmed sync: queued -> every generator on it


@dataclass
class _Starting:
    actor: ray.actor.ActorHandle
    ready_ref: ray.ObjectRef  # its info(), then its first weight load
    since: float
    loading: int | None = None  # the version it is loading before it serves


@dataclass
class _PendingSync:
    handle: WeightsHandle
    refs: dict[str, ray.ObjectRef]
    deadline: float
    started: float


class GeneratorPool:
    def __init__(self, settings: EngineSettings, num_cpus: float, num_gpus: float, startup_timeout_s: float,
                 call_timeout_s: float, sync_timeout_s: float, log=print, max_restarts: int = 8,
                 verify_sync: bool = False, resources: dict[str, float] | None = None, name_prefix: str = "generator",
                 inflight_updates: bool = False):
        self.settings = settings
        self.name_prefix = name_prefix  # actors are named <prefix>-<index> (Ray names are unique per namespace)
        self.resources = resources or {}
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.startup_timeout_s, self.call_timeout_s, self.sync_timeout_s = startup_timeout_s, call_timeout_s, sync_timeout_s
        self.log = log
        self.max_restarts = max_restarts
        self.verify_sync = verify_sync
        self.inflight_updates = inflight_updates  # see actors.generator: when an update lands in a busy generator
        self.actors: dict[str, ray.actor.ActorHandle] = {}  # serving
        self.starting: dict[str, _Starting] = {}
        self.draining: set[str] = set()
        self.load: dict[str, int] = {}  # outstanding generate calls per serving generator
        self.handle: WeightsHandle | None = None  # latest published version, loaded by new generators
        self.pending_sync: _PendingSync | None = None
        self.last_sync_s = 0.0
        self.stats = PoolStats()
        self.placement: dict[str, str] = {}  # generator name -> Ray node id it ran on
        self.target = 0
        self._next_index = 0

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self) -> None:
        name = f"{self.name_prefix}-{self._next_index}"
        self._next_index += 1
        cls = ray.remote(Generator).options(
            name=name, num_cpus=self.num_cpus, num_gpus=self.num_gpus, resources=self.resources,
            max_restarts=0, max_concurrency=ACTOR_CONCURRENCY,
            runtime_env={"env_vars": engine_env(self.settings)})
        actor = cls.remote(name, self.settings)
        self.starting[name] = _Starting(actor, actor.info.remote(), time.monotonic())

    def start(self, n: int) -> None:
        """Start n generators and wait until each is up and on the current version."""
        self.target += n
        for _ in range(n):
            self._spawn()
        deadline = time.monotonic() + self.startup_timeout_s + 5
        while self.starting:
            self.poll()
            if time.monotonic() > deadline:
                raise GenerationFailed(f"generators {sorted(self.starting)} did not start within "
                                       f"timeouts.startup_s={self.startup_timeout_s}s")
            time.sleep(0.05)

    def poll(self) -> None:
        """Admit generators that finished starting and loading the current weights, retire drained
        ones, and fail those past their start-up deadline. Cheap; call it often."""
        if self.starting:
            ready, _ = ray.wait([s.ready_ref for s in self.starting.values()], num_returns=len(self.starting), timeout=0)
            ready = set(ready)
            for name, s in list(self.starting.items()):
                if s.ready_ref in ready:
                    try:
                        result = ray.get(s.ready_ref)
                    except Exception as e:  # died, or its engine refused the weights
                        del self.starting[name]
                        self._failed(name, s.actor, f"died while starting: {e}")
                        continue
                    if s.loading is None:
                        self.placement[name] = result["node_id"]
                    if self.handle is not None and s.loading != self.handle.version:
                        # it serves only once it holds the current version: the actor is threaded, so a request
                        # sent now could reach its engine before the weights do
                        s.ready_ref, s.loading = s.actor.update_weights.remote(self.handle), self.handle.version
                        continue
                    del self.starting[name]
                    self.actors[name], self.load[name] = s.actor, 0
                    self.log(f"[pool] {name} serving (version {self.version})")
                elif time.monotonic() - s.since > self.startup_timeout_s:
                    del self.starting[name]
                    self._failed(name, s.actor, f"no start within timeouts.startup_s={self.startup_timeout_s}s")
        for name in [n for n in self.draining if self.load.get(n, 0) == 0]:
            self.draining.discard(name)
            self._stop(name)
            self.stats.scale_events.append(f"removed {name}")
            self.log(f"[pool] {name} drained and stopped")

    def scale(self, n: int) -> None:
        """Set the number of generators: new ones start in the background; removed ones (newest first)
        take no more work and stop once their outstanding requests are done."""
        if n < 1:
            raise ValueError(f"generators: need at least 1, got {n}")
        self.target = n
        active = [a for a in self.actors if a not in self.draining] + list(self.starting)
        for name in sorted(active, key=lambda s: int(s.rsplit("-", 1)[1]))[n:]:
            if name in self.starting:
                ray.kill(self.starting.pop(name).actor)
            else:
                self.draining.add(name)
        for _ in range(n - len(active)):
            self._spawn()
        self.stats.scale_events.append(f"target {n}")
        self.log(f"[pool] scaling to {n} generators")

    def _stop(self, name: str) -> None:
        actor = self.actors.pop(name, None)
        self.load.pop(name, None)
        if actor is not None:
            ray.kill(actor)

    def shutdown(self) -> None:
        for name in list(self.actors):
            self._stop(name)
        for s in self.starting.values():
            ray.kill(s.actor)
        self.starting.clear()

    def _failed(self, name: str, actor, reason: str) -> None:
        """Kill a failed generator and start a replacement (unless it was being removed anyway)."""
        self.stats.failures.append(f"{name}: {reason}")
        ray.kill(actor)
        if name in self.draining:
            self.draining.discard(name)
            return
        if self.stats.restarts >= self.max_restarts:
            raise GenerationFailed(f"generators failed {self.stats.restarts + 1} times; last: {name}: {reason}")
        self.stats.restarts += 1
        self.log(f"[pool] {name} failed ({reason}); starting a replacement")
        self._spawn()

    def replace(self, name: str, reason: str) -> None:
        """Report a serving generator as failed (idempotent: a name already gone is ignored)."""
        actor = self.actors.pop(name, None)
        self.load.pop(name, None)
        if actor is not None:
            self._failed(name, actor, reason)

    # ------------------------------------------------------------------ work
    @property
    def version(self) -> int:
        return self.handle.version if self.handle else 0

    def submit(self, req: GenerateRequest, max_load: int = 1 << 30) -> tuple[str, ray.ObjectRef] | None:
        """Send a request to the least-loaded serving generator; None when none is serving or all of them
        already hold max_load requests (backpressure)."""
        names = [n for n in self.actors if n not in self.draining and self.load[n] < max_load]
        if not names:
            return None
        name = min(names, key=lambda n: (self.load[n], n))
        self.load[name] += 1
        return name, self.actors[name].generate.remote(req)

    def done(self, name: str) -> None:
        if name in self.load:
            self.load[name] -= 1

    def wait_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not [n for n in self.actors if n not in self.draining]:
            self.poll()
            if time.monotonic() > deadline:
                raise GenerationFailed(f"no generator serving within {timeout_s:.0f}s")
            time.sleep(0.05)

    def generate(self, prompts: list[Prompt], n: int, temperature: float, max_new_tokens: int,
                 seed: int | None, env: EnvSpec | None = None) -> list[Completion]:
        """Blocking: completions for every prompt (n each), in prompt order, whatever generators fail on
        the way (their prompts go to the others or to replacements). ENV: whole multi-turn episodes."""
        pending = list(prompts)
        results: dict[int, list[Completion]] = {}
        while pending:
            self.wait_serving(self.startup_timeout_s)
            names = sorted(n for n in self.actors if n not in self.draining)
            calls = []
            for i, name in enumerate(names):
                chunk = pending[i::len(names)]
                if chunk:
                    req = GenerateRequest(tuple(chunk), n, temperature, max_new_tokens, seed, env=env)
                    self.load[name] += 1
                    calls.append((name, self.actors[name].generate.remote(req), chunk))
            pending = []
            deadline = time.monotonic() + self.call_timeout_s
            for name, ref, chunk in calls:
                try:
                    for c in ray.get(ref, timeout=max(0.0, deadline - time.monotonic())):
                        results.setdefault(c.prompt.uid, []).append(c)
                except (RayActorError, GetTimeoutError) as e:
                    self.stats.requeued_prompts += len(chunk)
                    pending.extend(chunk)
                    self.replace(name, "timeout" if isinstance(e, GetTimeoutError) else f"died: {e}")
                finally:
                    self.done(name)
            self.poll()
        return [c for p in prompts for c in results[p.uid]]

    # ------------------------------------------------------------------ weights
    def sync(self, handle: WeightsHandle) -> float:
        """Blocking: push a version to every serving generator; returns seconds taken."""
        self.start_sync(handle)
        self.finish_sync()
        return self.last_sync_s

    def finish_sync(self) -> None:
        """Block until the pending sync (if any) is confirmed or its generators replaced."""
        while self.pending_sync is not None:
            self.poll_sync(block_s=0.5)

    def start_sync(self, handle: WeightsHandle) -> None:
        """Queue a version on every serving generator; it lands between two of its engine steps (after its running
        samples, or at once with inflight_updates).
        A still-pending older sync is superseded (the newer version is queued behind it)."""
        self.handle = handle
        if self.pending_sync is not None:
            self.stats.syncs_superseded += 1
        refs = {name: a.update_weights.remote(handle, self.verify_sync, self.inflight_updates)
                for name, a in self.actors.items()}
        now = time.monotonic()
        self.pending_sync = _PendingSync(handle, refs, now + self.sync_timeout_s, now)

    def poll_sync(self, block_s: float = 0.0) -> bool:
        """Check the pending sync; True when it completed now. A generator that does not confirm within
        timeouts.sync_s is replaced (its replacement loads the version before serving)."""
        ps = self.pending_sync
        if ps is None:
            return False
        live = {n: r for n, r in ps.refs.items() if n in self.actors}
        ready, _ = ray.wait(list(live.values()), num_returns=len(live), timeout=block_s) if live else ([], [])
        if len(ready) < len(live) and time.monotonic() < ps.deadline:
            return False
        results = {}
        for name, ref in live.items():
            try:
                if ref not in ready:
                    raise GetTimeoutError()
                results[name] = ray.get(ref)
            except (RayActorError, GetTimeoutError) as e:
                detail = (f"weight sync to version {ps.handle.version} not confirmed within "
                          f"timeouts.sync_s={self.sync_timeout_s}s" if isinstance(e, GetTimeoutError) else f"died: {e}")
                self.replace(name, detail)
        self.pending_sync = None
        self.last_sync_s = time.monotonic() - ps.started
        self.stats.sync_seconds.append(self.last_sync_s)
        self._check_synced(ps.handle, results)
        return True

    def _check_synced(self, handle: WeightsHandle, results: dict[str, tuple[int, str | None]]) -> None:
        """Every confirming generator must now serve exactly this version (and, when verifying, hold
        bit-identical weights). A newer version may already be queued behind it: that is fine."""
        versions = {n: v for n, (v, _) in results.items()}
        if any(v != handle.version for v in versions.values()):
            raise GenerationFailed(f"after sync generators report versions {versions}, expected {handle.version}")
        if self.verify_sync and results:
            fps = {fp for _, fp in results.values()}
            if len(fps) != 1:
                raise GenerationFailed(f"after sync to version {handle.version} generators hold different weights")
            self.stats.syncs_verified += 1

    def versions(self) -> dict[str, int]:
        infos = ray.get([a.info.remote() for a in self.actors.values()], timeout=self.call_timeout_s)
        return {i["name"]: i["version"] for i in infos}

    def fingerprints(self) -> dict[str, str]:
        names = list(self.actors)
        fps = ray.get([self.actors[n].fingerprint.remote() for n in names], timeout=self.call_timeout_s)
        return dict(zip(names, fps))
