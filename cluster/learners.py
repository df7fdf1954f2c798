"""The learner's ranks, driven as one (learner.data_parallel; one rank by default).

Rank 0 is the named actor `learner`, ranks 1.. are `learner-1`, ... (the Ray dashboard lists each). Calls that
change every rank's state (an update, loading a checkpoint) go to all ranks with the same arguments; the rest
(publishing weights, saving, info) to rank 0, whose weights every rank shares. A rank that dies fails the
job's learner as a whole (`RankDied`), like the one-rank learner dying: the job stops with the command that
resumes it from its latest checkpoint. A rank left waiting for a dead or stuck peer inside a collective gives
up after timeouts.train_s (torch.distributed's own timeout), so nothing waits without end.
"""

from __future__ import annotations

import time

from core.config import Config


class RankDied(RuntimeError):
    """A learner rank's actor is gone (the error that surfaced, maybe on another rank, is the cause)."""


class LearnerGroup:
    def __init__(self, cfg: Config, model_path: str, pad_id: int):
        import ray

        from core.config import parse_resources
        from learner.actor import Learner

        lc = cfg.learner
        self.cfg = cfg
        self.actors = [
            ray.remote(Learner).options(name="learner" if r == 0 else f"learner-{r}", num_cpus=lc.num_cpus,
                                        num_gpus=lc.num_gpus, resources=parse_resources(lc.resources),
                                        max_restarts=0).remote(
                model_path, cfg.algo, lc, cfg.steps, cfg.seed, pad_id, cfg.generator.dtype, rank=r,
                temperature=cfg.generator.temperature,
                truncated_sampling=cfg.generator.top_p < 1.0 or cfg.generator.top_k > 0)
            for r in range(lc.data_parallel)]
        self.lead = self.actors[0]

    def join(self, timeout_s: float) -> None:
        """Connect the ranks (after each has loaded its model); nothing to do for one."""
        import ray

        if len(self.actors) == 1:
            return
        address = ray.get(self.lead.rendezvous_address.remote(), timeout=timeout_s)
        ray.get([a.join.remote(address, self.cfg.timeouts.train_s) for a in self.actors], timeout=timeout_s)

    def call(self, method: str, *args) -> list:
        """METHOD(*ARGS) on every rank; the refs, rank 0's first."""
        return [getattr(a, method).remote(*args) for a in self.actors]

    def wait(self, refs: list, deadline: float, poll_s: float, on_idle=None) -> bool:
        """Wait until every rank's part of a call is done or one has failed (then waiting for the others is
        pointless: they wait for it); False when DEADLINE (monotonic) passes first. ON_IDLE runs between polls."""
        import ray

        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s)
            if not pending or self._failed(refs) is not None:
                return True
            if time.monotonic() > deadline:
                return False
            if on_idle is not None:
                on_idle()
        return True

    def gather(self, refs: list, timeout_s: float):
        """Rank 0's result of a call on every rank. A failure raises as it came, or as RankDied when a rank's
        actor is gone (whichever rank's error surfaced first: a dead rank's peers fail in their collectives)."""
        import ray

        try:
            failed = self._failed(refs)
            if failed is not None:
                ray.get(failed)
            return ray.get(refs, timeout=timeout_s)[0]
        except ray.exceptions.GetTimeoutError:
            raise
        except Exception as e:
            dead = self.dead_ranks()
            if dead:
                raise RankDied(f"learner rank(s) {dead} died ({type(e).__name__})") from e
            raise

    @staticmethod
    def _failed(refs: list):
        """A ref among REFS that is done and holds an error, or None."""
        import ray

        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            try:
                ray.get(ref, timeout=0)
            except Exception:
                return ref
        return None

    def dead_ranks(self, timeout_s: float = 10.0) -> list[int]:
        import ray

        dead = []
        for r, a in enumerate(self.actors):
            try:
                ray.get(a.__ray_ready__.remote(), timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                pass  # alive but busy
            except Exception:
                dead.append(r)
        return dead

    def owns(self, e) -> bool:
        """Whether a RayActorError is about one of the ranks."""
        return any(_is_actor(e, a) for a in self.actors)

    def check_in_step(self, timeout_s: float) -> None:
        """Raise when the ranks no longer hold the same weights and optimizer state (they must: they step on one
        summed gradient). Cheap next to a checkpoint, which is when the driver asks."""
        import ray

        if len(self.actors) == 1:
            return
        prints = ray.get(self.call("fingerprint"), timeout=timeout_s)
        if len(set(prints)) > 1:
            raise RuntimeError(f"learner ranks diverged: weight/optimizer fingerprints {[p[:12] for p in prints]} "
                               f"(rank 0 first); the checkpoint just written holds rank 0's state")

    def info(self, timeout_s: float) -> dict:
        """Rank 0's info, with every rank's node (placement)."""
        import ray

        infos = ray.get(self.call("info"), timeout=timeout_s)
        return {**infos[0], "data_parallel": len(infos), "rank_nodes": [i["node_id"] for i in infos]}

    def kill(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def _is_actor(e, handle) -> bool:
    """Whether a RayActorError is about HANDLE's actor (when Ray does not say which actor, probe it)."""
    if getattr(e, "actor_id", None):
        return e.actor_id == handle._actor_id.hex()
    import ray

    try:
        ray.get(handle.__ray_ready__.remote(), timeout=10)
        return False
    except Exception:
        return True
