"""Rollout: keeps the generators busy and streams scored groups into a bounded buffer.

The driver decides how many prompts to draw; the rollout sends them in small requests to the
least-loaded generator, scores each finished request, and puts its groups in the buffer the
learner takes from. Both modes use it: sync draws one step's prompts and drains them before the
learner trains; async keeps drawing (up to a bound) while the learner trains.

Every prompt drawn is accounted for exactly once: trained, or dropped with a reason. A request
whose generator dies or misses its deadline goes back to the front of the queue.

Partial rollouts (`chunk_tokens` > 0): each request generates at most that many tokens of any sample.
A group waits in `partial` until all its samples are finished; its unfinished samples go back to the
queue as `Continuation`s and carry on, on whichever generator takes them, with the weights it holds
then. A weight sync therefore lands within one chunk, and no generator waits behind long samples.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError

from core.messages import Completion, Continuation, EnvSpec, GenerateRequest, Group, Prompt, ScoreResult
from reward.policy import RewardSourceFailed, apply_failure_policy, check_failure_budget, failure_log_lines


@dataclass
class Accounting:
    """Exactly where every prompt of the run went (by uid)."""

    drawn: set[int] = field(default_factory=set)
    trained: set[int] = field(default_factory=set)
    dropped: dict[int, str] = field(default_factory=dict)
    reward_failures: Counter = field(default_factory=Counter)
    duplicates: int = 0  # a prompt trained or dropped twice: a bug, reported rather than hidden
    env_failures: Counter = field(default_factory=Counter)  # multi-turn environment steps that failed, by reason

    def draw(self, uid: int) -> None:
        if uid in self.drawn:
            self.duplicates += 1
        self.drawn.add(uid)

    def train(self, uid: int) -> None:
        if uid in self.trained or uid in self.dropped:
            self.duplicates += 1
        self.trained.add(uid)

    def drop(self, uid: int, reason: str) -> None:
        if uid in self.trained or uid in self.dropped:
            self.duplicates += 1
        self.dropped[uid] = reason

    def state(self) -> dict:
        return {"drawn": sorted(self.drawn), "trained": sorted(self.trained),
                "dropped": {str(k): v for k, v in self.dropped.items()}, "reward_failures": dict(self.reward_failures),
                "duplicates": self.duplicates, "env_failures": dict(self.env_failures)}

    @classmethod
    def from_state(cls, st: dict) -> "Accounting":
        return cls(set(st["drawn"]), set(st["trained"]), {int(k): v for k, v in st["dropped"].items()},
                   Counter(st["reward_failures"]), st["duplicates"], Counter(st.get("env_failures", {})))

    def as_dict(self) -> dict:
        return {"prompts_drawn": len(self.drawn), "prompts_trained": len(self.trained),
                "prompts_dropped": dict(Counter(self.dropped.values())),
                "prompts_unaccounted": len(self.drawn - self.trained - set(self.dropped)),
                "duplicates": self.duplicates, "reward_failures": dict(self.reward_failures),
                "env_failures": dict(self.env_failures)}


ENV_BUDGET_MIN_GROUPS = 16  # groups generated before the environment's failure budget is judged


class EnvironmentFailed(RuntimeError):
    """A multi-turn environment's failures dropped more than reward.max_failure_fraction of the groups generated so
    far (judged from ENV_BUDGET_MIN_GROUPS groups on): the job stops rather than train on what is left."""


def assemble(completions: list[Completion], scores: ScoreResult, group_size: int, acct: Accounting) -> list[Group]:
    """Group completions by prompt; a group with any unscorable sample is dropped whole (group-relative
    estimators need every member's score) and counted, never trained on with a made-up score. So is a group
    with an episode its environment failed in (multi-turn): that episode ended early for a reason of the
    environment's, not the model's."""
    for f in scores.failures:
        acct.reward_failures[f.reason] += 1
    groups = []
    for start in range(0, len(completions), group_size):
        members = completions[start:start + group_size]
        s = scores.scores[start:start + group_size]
        failed = [m.env_failure.split(":", 1)[0] for m in members if m.env_failure]
        acct.env_failures.update(failed)
        if failed:
            acct.drop(members[0].prompt.uid, "env_failed")
            continue
        if any(x is None for x in s):
            acct.drop(members[0].prompt.uid, "reward_failed")
            continue
        groups.append(Group(members[0].prompt, tuple(members), tuple(s)))  # type: ignore[arg-type]
    return groups


@dataclass
class _Request:
    generator: str
    prompts: tuple[Prompt, ...]
    deadline: float
    continuations: tuple[Continuation, ...] = ()


class Rollout:
    def __init__(self, pool, rewards, *, group_size: int, temperature: float, max_new_tokens: int, seed: int,
                 prompts_per_request: int, max_inflight_per_generator: int, call_timeout_s: float,
                 acct: Accounting, reward_cfg, chunk_tokens: int = 0, env: EnvSpec | None = None,
                 top_p: float = 1.0, top_k: int = 0, log=print):
        self.pool, self.rewards, self.acct, self.log = pool, rewards, acct, log
        self.group_size, self.temperature, self.max_new_tokens, self.seed = group_size, temperature, max_new_tokens, seed
        self.prompts_per_request, self.max_inflight = prompts_per_request, max_inflight_per_generator
        self.call_timeout_s = call_timeout_s
        self.reward_cfg = reward_cfg
        self.chunk_tokens = chunk_tokens if 0 < chunk_tokens < max_new_tokens else 0
        self.env = env  # multi-turn: every request's samples are whole episodes (actors/generator.py)
        self.top_p, self.top_k = top_p, top_k
        self.env_groups = [0, 0]  # multi-turn: groups generated, and dropped for an environment failure
        self.env_last_failure = ""
        self.scored: list[ScoreResult] = []  # this step's scored batches (reward component means)
        self.todo: deque[Prompt] = deque()
        self.inflight: dict[ray.ObjectRef, _Request] = {}
        self.buffer: deque[Group] = deque()
        # partial rollouts: groups with unfinished samples (slot None = still generating), by prompt uid
        self.partial: dict[int, tuple[Prompt, list[Completion | None]]] = {}
        self.cont_todo: deque[Continuation] = deque()
        self.continued = 0  # continuation chunks generated over the run
        self.generated_tokens = 0
        self.generated_samples = 0
        self.tied_dropped = 0  # groups dropped by take(drop_tied=...) over the run
        self.reward_seconds = 0.0

    # ------------------------------------------------------------------ state
    def add(self, prompts: list[Prompt]) -> None:
        for p in prompts:
            self.acct.draw(p.uid)
        self.todo.extend(prompts)

    def outstanding(self) -> int:
        """Prompts drawn and not yet trained or dropped: queued, being generated, or buffered."""
        return (len(self.todo) + sum(len(r.prompts) for r in self.inflight.values()) + len(self.partial)
                + len(self.buffer))

    def busy(self) -> bool:
        """Anything queued or being generated (buffered groups are finished work)."""
        return bool(self.todo or self.inflight or self.partial)

    # ------------------------------------------------------------------ progress
    def pump(self, block_s: float = 0.05) -> None:
        """Admit new generators, send queued prompts, collect and score finished requests."""
        self.pool.poll()
        self._send()
        if not self.inflight:
            if self.todo or self.cont_todo:  # nothing serving right now (all replaced or starting): wait for one
                time.sleep(min(block_s, 0.05))
            return
        refs = list(self.inflight)
        ready, _ = ray.wait(refs, num_returns=1, timeout=block_s)
        if ready:  # collect everything that is done, not just the first
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            if ref not in self.inflight:  # dropped with its generator while collecting an earlier one
                continue
            self._collect(ref)
        now = time.monotonic()
        for ref, req in list(self.inflight.items()):
            if now > req.deadline:
                self._requeue(ref, f"no answer within timeouts.generate_s={self.call_timeout_s}s")
        self._send()

    def _send(self) -> None:
        while self.todo or self.cont_todo:
            free = self._free_slots()
            # unfinished samples first: they complete groups that already hold finished ones
            n_cont = min(len(self.cont_todo), self.prompts_per_request * self.group_size if self.prompts_per_request
                         else -(-len(self.cont_todo) // free))
            conts = tuple(self.cont_todo.popleft() for _ in range(n_cont))
            size = self.prompts_per_request or -(-len(self.todo) // free)
            chunk = tuple(self.todo.popleft() for _ in range(min(size, len(self.todo))))
            req = GenerateRequest(chunk, self.group_size, self.temperature, self.max_new_tokens, seed=self.seed,
                                  continuations=conts, chunk_tokens=self.chunk_tokens, env=self.env,
                                  top_p=self.top_p, top_k=self.top_k)
            sent = self.pool.submit(req, max_load=self.max_inflight)
            if sent is None:
                self.todo.extendleft(reversed(chunk))
                self.cont_todo.extendleft(reversed(conts))
                return
            name, ref = sent
            self.inflight[ref] = _Request(name, chunk, time.monotonic() + self.call_timeout_s, conts)

    def _free_slots(self) -> int:
        """Request slots free now (at least 1). A queue is split evenly over them, rounded up: requests of a
        few prompts cost ~45% of vLLM's throughput on the default job (bench/generation.py), since each
        request is one engine batch."""
        free = sum(max(0, self.max_inflight - self.pool.load[n]) for n in self.pool.actors
                   if n not in self.pool.draining)
        return max(1, free)

    def _collect(self, ref) -> None:
        req = self.inflight[ref]
        try:
            completions: list[Completion] = ray.get(ref)
        except RayActorError as e:
            self._requeue(ref, f"died: {e}")
            return
        del self.inflight[ref]
        self.pool.done(req.generator)
        self._accept(req, completions)

    def _accept(self, req: _Request, completions: list[Completion]) -> None:
        """A request's completions: queue the unfinished ones, score and buffer every group now complete."""
        # the model's own tokens (multi-turn: not the environment's replies)
        self.generated_tokens += (sum(c.model_tokens for c in completions)
                                  - sum(k.sample.model_tokens for k in req.continuations))
        self.continued += len(req.continuations)
        completions = self._finished(req, completions)
        if not completions:
            return
        t0 = time.monotonic()
        scores = self.rewards.score(completions)
        self.reward_seconds += time.monotonic() - t0
        for line in failure_log_lines(completions, scores):
            self.log(line)
        # a source failing on most of a batch stops the job rather than training on what is left
        check_failure_budget(scores, self.reward_cfg.max_failure_fraction)
        scores = apply_failure_policy(scores, self.reward_cfg.on_failure, self.reward_cfg.failure_penalty)
        self.scored.append(scores)
        env_failed = [c.env_failure for c in completions if c.env_failure]
        if env_failed:
            self.env_last_failure = env_failed[-1]
            self.log(f"[env] {len(env_failed)} of {len(completions)} episodes ended by an environment failure "
                     f"(their groups are dropped); first: {env_failed[0]}")
        groups = assemble(completions, scores, self.group_size, self.acct)
        G = self.group_size
        whole = len(completions) // G  # groups this request completed
        env_dropped = sum(any(c.env_failure for c in completions[s:s + G]) for s in range(0, len(completions), G))
        self.env_groups[0] += whole
        self.env_groups[1] += env_dropped
        seen, lost = self.env_groups
        # over the run so far, not per request: a request may hold only a couple of groups
        if seen >= ENV_BUDGET_MIN_GROUPS and lost > seen * self.reward_cfg.max_failure_fraction:
            raise EnvironmentFailed(
                f"environment failures dropped {lost} of the {seen} groups generated so far "
                f"(reward.max_failure_fraction={self.reward_cfg.max_failure_fraction} bounds these too; failures "
                f"{dict(self.acct.env_failures)}); refusing to train on what is left. Latest: {env_failed[0] if env_failed else self.env_last_failure}")
        whole -= env_dropped
        if whole - len(groups) > whole * self.reward_cfg.max_failure_fraction:
            # the per-sample budget passed, but failures spread over groups left too few whole groups
            raise RewardSourceFailed(
                f"reward failures left {len(groups)} of {whole} groups of one request whole "
                f"(reward.max_failure_fraction={self.reward_cfg.max_failure_fraction}; failures so far "
                f"{dict(self.acct.reward_failures)}); refusing to train on what is left. "
                f"First failure: {scores.failures[0].detail if scores.failures else '?'}")
        self.generated_samples += len(completions)
        self.buffer.extend(groups)

    def _finished(self, req: _Request, completions: list[Completion]) -> list[Completion]:
        """The completions of every group this request finished, group by group (without partial rollouts:
        all of them, as they came). Unfinished samples are queued to continue; their groups wait."""
        if not self.chunk_tokens:
            return completions
        G = self.group_size
        for p in req.prompts:
            self.partial[p.uid] = (p, [None] * G)
        slots = [(p.uid, j) for p in req.prompts for j in range(G)] + [(k.sample.prompt.uid, k.index)
                                                                        for k in req.continuations]
        touched: dict[int, None] = {}
        for (uid, j), c in zip(slots, completions):
            if c.unfinished(self.max_new_tokens):
                self.cont_todo.append(Continuation(c, j))
            else:
                self.partial[uid][1][j] = c
            touched[uid] = None
        done = [uid for uid in touched if all(c is not None for c in self.partial[uid][1])]
        return [c for uid in done for c in self.partial.pop(uid)[1]]  # type: ignore[misc]

    def _requeue(self, ref, reason: str) -> None:
        req = self.inflight[ref]
        # this request and every other one held by the same generator are lost with it; unfinished samples
        # keep the tokens they had and continue elsewhere. Back to the front of the queues, in the order sent.
        for other, r in reversed(list(self.inflight.items())):
            if r.generator == req.generator:
                del self.inflight[other]
                self.pool.stats.requeued_prompts += len(r.prompts)
                self.todo.extendleft(reversed(r.prompts))
                self.cont_todo.extendleft(reversed(r.continuations))
        self.pool.replace(req.generator, reason)

    # ------------------------------------------------------------------ handing groups to the learner
    def take(self, n: int, learner_version: int, max_staleness: int | None, drop_tied: int = 0) -> list[Group]:
        """Up to n buffered groups, oldest first; groups older than max_staleness versions are dropped
        (and counted) instead. None = no staleness bound. DROP_TIED: up to this many groups whose rewards all
        tie are dropped too (dynamic sampling), counted in `tied_dropped` and as reason tied_rewards."""
        out: list[Group] = []
        while self.buffer and len(out) < n:
            g = self.buffer.popleft()
            if max_staleness is not None and learner_version - g.min_version > max_staleness:
                self.acct.drop(g.prompt.uid, "stale")
                continue
            if drop_tied > 0 and len(set(g.rewards)) == 1:
                self.acct.drop(g.prompt.uid, "tied_rewards")
                self.tied_dropped += 1
                drop_tied -= 1
                continue
            out.append(g)
        return out

    def outstanding_prompts(self) -> list[Prompt]:
        """Drawn, not trained or dropped (for checkpoints: re-queued on resume)."""
        return ([*self.todo] + [p for r in self.inflight.values() for p in r.prompts]
                + [p for p, _ in self.partial.values()] + [g.prompt for g in self.buffer])

    def drop_all(self, reason: str) -> None:
        """At the end of a run: whatever is still queued, in flight or buffered is reported as dropped."""
        for p in self.todo:
            self.acct.drop(p.uid, reason)
        for req in self.inflight.values():
            for p in req.prompts:
                self.acct.drop(p.uid, reason)
        for uid in self.partial:
            self.acct.drop(uid, reason)
        for g in self.buffer:
            self.acct.drop(g.prompt.uid, reason)
        self.todo.clear()
        self.inflight.clear()
        self.partial.clear()
        self.cont_todo.clear()
        self.buffer.clear()
