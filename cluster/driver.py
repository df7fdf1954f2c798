"""The driver: starts the roles on Ray and runs the training loop.

One step, in order (each phase timed):
    prompts  = data.next(prompts_per_step)
    samples  = generators.generate(prompts, n=group_size)      # vLLM, versioned
    scores   = rewards.score(samples)                          # failures carried as data
    groups   = assemble(samples, scores)                       # failure policy applied, counted
    stats    = learner.train_step(groups)                      # PPO-family update
    every sync_every: generators.sync(learner.publish())       # versioned weights, checksummed
    every eval_every: held-out greedy accuracy
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from cluster.control import NAMESPACE, client_auth_env
from cluster.learners import LearnerGroup, RankDied
from core.config import Config, ConfigError, parse_resources, to_dict
from core.messages import EnvSpec, Prompt


class PromptStream:
    """Endless shuffled passes over the training rows; uid = epoch * N + row (unique within the run)."""

    def __init__(self, prompts: list[tuple[str, tuple[int, ...], str]], seed: int):
        self.prompts = prompts  # (text, token ids, answer), validated by cluster.data.load_prompts
        self.rng = random.Random(seed)
        self.epoch, self.pos, self.order = 0, 0, self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(len(self.prompts)))
        self.rng.shuffle(order)
        return order

    def state(self) -> dict:
        """JSON-able position in the data (for checkpoints)."""
        version, internal, gauss = self.rng.getstate()
        return {"epoch": self.epoch, "pos": self.pos, "order": self.order,
                "rng": [version, list(internal), gauss]}

    def load_state(self, st: dict) -> None:
        self.epoch, self.pos, self.order = st["epoch"], st["pos"], list(st["order"])
        version, internal, gauss = st["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    @property
    def position(self) -> int:
        """Prompts drawn so far in the run."""
        return self.epoch * len(self.prompts) + self.pos

    def next(self, k: int) -> list[Prompt]:
        out = []
        while len(out) < k:
            if self.pos == len(self.order):
                self.epoch, self.pos, self.order = self.epoch + 1, 0, self._shuffled()
            row = self.order[self.pos]
            text, ids, answer = self.prompts[row]
            out.append(Prompt(self.epoch * len(self.prompts) + row, text, ids, answer))
            self.pos += 1
        return out


def _init_ray(cfg: Config, log) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.ray_address:
        log(f"connecting to Ray at {cfg.ray_address}")
        client_auth_env()
        ray.init(address=cfg.ray_address, namespace=NAMESPACE, log_to_driver=False)
        return
    need = (cfg.generator.num_generators * cfg.generator.num_cpus + cfg.learner.data_parallel * cfg.learner.num_cpus
            + cfg.reward.num_workers * cfg.reward.num_cpus)
    # logical CPUs: room for two more generators than configured, so a replacement or a scale-up can
    # be placed while the actor it succeeds is still releasing its slot
    # address="local": always a fresh local instance. Without it ray.init() attaches to whatever cluster
    # /tmp/ray/ray_current_cluster names, even a dead one left by a killed `ray start`.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(need + 2 * cfg.generator.num_cpus)),
             include_dashboard=False,
             object_store_memory=256 * 2**20, log_to_driver=False, namespace=NAMESPACE)


def run(cfg: Config, log=print, resume: bool = False) -> dict:
    """Run one training job; returns the summary (also written to RUN_DIR/summary.json).
    resume: continue the job in RUN_DIR from its latest checkpoint (see `resume_config`)."""
    import ray
    from transformers import AutoConfig, AutoTokenizer

    from cluster.control import start_control
    from cluster.metrics import MetricsLog, RayMetrics, plot_run
    from cluster.rollout import Accounting, Rollout
    from cluster.data import load_prompts
    from cluster.world import PAD, encode, ensure_world
    from reward.pool import RewardPool
    from reward.policy import component_means
    from reward.worker import check_source

    t_start = time.monotonic()
    check_source(cfg.reward)  # a bad import path (function or component) fails before anything starts
    env = env_spec(cfg)
    run_dir = Path(cfg.run_dir) / (cfg.run_name or datetime.now().strftime("%Y%m%d-%H%M%S"))
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume {run_dir}: no checkpoint in {run_dir / 'checkpoints'}")
    if not resume:
        check_fresh_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    log(f"run directory: {run_dir}")

    world = ensure_world(cfg, log=log)
    model_path = os.path.abspath(cfg.model.path or world.model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_env_role(env, tokenizer, model_path)
    context = AutoConfig.from_pretrained(model_path).max_position_embeddings
    check_lora_targets(model_path, cfg.learner)  # a target matching no layer fails before anything starts
    max_prompt = context - cfg.generator.max_new_tokens
    # every row checked here, before Ray or vLLM start: a bad one stops the job naming its row
    train = load_prompts(cfg.task.dataset or world.train_path, tokenizer, encode, max_prompt)
    held = load_prompts(cfg.task.heldout_dataset or world.heldout_path, tokenizer, encode, max_prompt)
    stream = PromptStream(train, cfg.seed)
    heldout = [Prompt(-1 - i, text, ids, answer) for i, (text, ids, answer) in enumerate(held)]
    max_len = max(len(ids) for _, ids, _ in train + held) + cfg.generator.max_new_tokens

    _init_ray(cfg, log)
    log(f"ray: {ray.get_runtime_context().gcs_address} (relayrl status / scale / stop --address=...)")
    t_ray = time.monotonic()
    to, ro = cfg.timeouts, cfg.rollout
    control = start_control()
    learners = LearnerGroup(cfg, model_path, PAD)  # learner.data_parallel ranks; rank 0 publishes and saves
    learner = learners.lead
    rewards = RewardPool(cfg.reward, timeout_s=to.reward_s, log=log)
    pool = generator_pool(cfg, model_path, context, max_len, log)
    saved = json.loads((ckpt / "driver.json").read_text()) if ckpt else None
    if saved:  # metrics logged after the checkpoint belong to the lost attempt
        _truncate_metrics(run_dir / "metrics.jsonl", saved["step"])
    metrics = MetricsLog(run_dir)
    live = RayMetrics()
    acct = Accounting.from_state(saved["accounting"]) if saved else Accounting()
    rollout = Rollout(pool, rewards, group_size=cfg.algo.group_size, temperature=cfg.generator.temperature,
                      max_new_tokens=cfg.generator.max_new_tokens, seed=cfg.seed,
                      prompts_per_request=ro.prompts_per_request, max_inflight_per_generator=ro.max_inflight_per_generator,
                      call_timeout_s=to.generate_s, acct=acct, reward_cfg=cfg.reward,
                      chunk_tokens=ro.partial_rollout_tokens, env=env, top_p=cfg.generator.top_p,
                      top_k=cfg.generator.top_k, log=log)
    loop = _Loop(cfg, pool, rollout, stream, learners, control, log, run_dir)

    def evaluate_now() -> dict[str, float]:
        return evaluate_heldout(cfg, pool, rewards, heldout, env)
    try:
        learners.join(to.startup_s)
        if saved:
            ray.get(learners.call("load_checkpoint", str(ckpt)), timeout=to.startup_s)
            stream.load_state(saved["stream"])
            rollout.todo.extend(Prompt(p["uid"], p["text"], tuple(p["token_ids"]), p["answer"]) for p in saved["outstanding"])
            loop.samples_trained = saved["samples_trained"]
            pool.handle = ray.get(learner.publish.remote(), timeout=to.sync_s)  # generators start on these weights
            log(f"resuming from {ckpt} (step {saved['step']}, data position {stream.position})")
        pool.start(cfg.generator.num_generators)
        rewards.wait_ready()  # a scorer that cannot be built (bad model path, ...) fails at start-up
        learner_info = learners.info(to.startup_s)
        ranks = f" x {learner_info['data_parallel']} ranks" if learner_info["data_parallel"] > 1 else ""
        log(f"{len(pool.actors)} generators, learner on {learner_info['device']}{ranks} "
            f"({learner_info['params'] / 1e6:.2f}M params), {ro.mode} mode; start-up {time.monotonic() - t_ray:.0f}s")

        if saved:
            acc_before, acc, step = saved["acc_before"], saved["acc"], saved["step"]
        else:
            ev = evaluate_now()
            acc_before = ev["eval/heldout_accuracy"]
            metrics.write(0, ev)
            log(f"held-out accuracy before RL: {acc_before:.3f}")
            acc, step = acc_before, 0
        loop.publish_status(step, acc, {})
        t_loop, samples_at_start = time.monotonic(), loop.samples_trained
        try:
            while step < cfg.steps and not loop.stop_requested:
                step += 1
                row = loop.step(step)
                last = step == cfg.steps or loop.stop_requested
                if step % cfg.eval_every == 0 or last:
                    pool.finish_sync()  # evaluate the newest weights
                    row.update(evaluate_now())
                    acc = row["eval/heldout_accuracy"]
                row["data/position"] = stream.position
                row.update(component_means(rollout.scored))
                rollout.scored.clear()
                metrics.write(step, row)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    save_checkpoint(run_dir, step, learner, stream, rollout, loop, acc_before, acc, to.train_s)
                    learners.check_in_step(to.train_s)  # data parallel: every rank still holds rank 0's state
                loop.publish_status(step, acc, row)
                live.record({"samples_per_second": row["perf/samples_per_s"], "tokens_per_second": row["perf/gen_tokens_per_s"],
                             "reward_mean": row["train/reward_mean"], "kl_to_reference": row["train/kl_ref"],
                             "approx_kl": row["train/approx_kl"], "policy_version": row["policy_version"],
                             "staleness_max": row["staleness/max"], "buffer_groups": row["buffer_groups"],
                             "sync_seconds": row["time/sync_s"], "generators": row["generators"], "heldout_accuracy": acc},
                            {**{f"reward_{k}": v for k, v in acct.reward_failures.items()},
                             **{f"env_{k}": v for k, v in acct.env_failures.items()},
                             **{f"dropped_{k}": v for k, v in Counter(acct.dropped.values()).items()},
                             "generator_restart": pool.stats.restarts, "reward_worker_restart": rewards.restarts})
                loop.poll_control()
                log(f"step {step:>4}/{cfg.steps}  reward {row['train/reward_mean']:+.3f}  held-out {acc:.3f}  "
                    f"kl {row['train/approx_kl']:.4f}  clip {row['train/clipfrac']:.3f}  wait {row['time/wait_s']:.1f}s "
                    f"train {row['time/train_s']:.1f}s sync {row['time/sync_s']:.2f}s  gens {len(pool.actors)}")
            loop_s = time.monotonic() - t_loop
            rollout.drop_all("unused_at_end")
            adapter_dir = str((run_dir / "final_adapter").resolve()) if cfg.learner.lora_rank else None
            final_dir = ray.get(learner.save.remote(str((run_dir / "final_model").resolve()), adapter_dir),
                                timeout=to.train_s)
        except ray.exceptions.RayActorError as e:  # the learner died outside train_step: publish, checkpoint, save
            if not learners.owns(e):
                raise
            raise LearnerFailed(learner_died(f"at step {step}, outside its update (publishing, checkpointing or "
                                             "saving)", run_dir, type(e).__name__)) from None
        samples = loop.samples_trained
        summary = {
            "heldout_accuracy_before": acc_before,
            "heldout_accuracy_after": acc,
            "steps": step,
            "stopped_early": step < cfg.steps,
            "resumed_from_step": saved["step"] if saved else None,
            "data_position": stream.position,
            "mode": ro.mode,
            "wall_seconds": time.monotonic() - t_start,
            "train_loop_seconds": loop_s,
            "samples": samples,
            "samples_per_second": (samples - samples_at_start) / max(loop_s, 1e-9),
            "generated_samples": rollout.generated_samples,
            "continuation_chunks": rollout.continued,
            "samples_multi_version": loop.samples_multi_version,
            # how long a new version took to reach every generator (async: once running samples finish, or in flight)
            "sync_land_seconds_median": statistics.median(pool.stats.sync_seconds) if pool.stats.sync_seconds else None,
            "phase_seconds": dict(loop.timings),
            "sync_share_of_step": loop.timings["time/sync_s"] / max(loop.timings["time/step_s"], 1e-9),
            "accounting": acct.as_dict(),
            "generator_restarts": pool.stats.restarts,
            "generator_failures": pool.stats.failures,
            "requeued_prompts": pool.stats.requeued_prompts,
            "scale_events": pool.stats.scale_events,
            "placement": {"learner": learner_info["node_id"],
                          **{f"learner-{r}": n for r, n in enumerate(learner_info["rank_nodes"]) if r},
                          **pool.placement},
            "nodes": {n["NodeID"]: {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}
                      for n in ray.nodes() if n["Alive"]},
            "syncs_verified": pool.stats.syncs_verified,
            "syncs_superseded": pool.stats.syncs_superseded,
            "reward_worker_restarts": rewards.restarts,
            "final_model": final_dir,
            "final_adapter": adapter_dir,
            "config": to_dict(cfg),
        }
    finally:
        metrics.close()
        pool.shutdown()
        rewards.shutdown()
        learners.kill()
        ray.kill(control)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_run(run_dir)
    log(f"held-out accuracy {summary['heldout_accuracy_before']:.3f} -> {summary['heldout_accuracy_after']:.3f} "
        f"in {summary['wall_seconds']:.0f}s; prompts {summary['accounting']}")
    log(f"run directory: {run_dir}")
    return summary


def env_spec(cfg: Config) -> EnvSpec | None:
    """rollout.env as the generators get it, its import path checked here (a typo fails before anything starts)."""
    if not cfg.rollout.env:
        return None
    from actors.env import load_env

    try:
        load_env(cfg.rollout.env)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return EnvSpec(cfg.rollout.env, cfg.rollout.max_turns, cfg.timeouts.env_step_s, cfg.rollout.env_role)


def check_env_role(env: EnvSpec | None, tokenizer, model_path: str) -> None:
    """rollout.env_role: the model's chat template must take a message of that role after an assistant turn."""
    if env is None or not env.role:
        return
    from actors.env import chat_turn

    if not tokenizer.chat_template:
        raise ConfigError(f"rollout.env_role: the model's tokenizer ({model_path}) has no chat template")
    try:
        chat_turn(tokenizer, env.role, "check", tokenizer.eos_token or "")
    except Exception as e:  # the template's own error (an unknown role, say) or ours
        raise ConfigError(f"rollout.env_role: {env.role!r} does not fit the chat template of {model_path}: {e}") from None


def evaluate_heldout(cfg: Config, pool, rewards, heldout: list[Prompt], env: EnvSpec | None) -> dict[str, float]:
    """The job's held-out evaluation (cluster.evaluation.evaluate with the config's settings)."""
    from cluster.evaluation import evaluate

    ks = tuple(sorted({1, cfg.eval_pass_k})) if cfg.eval_samples else ()
    return evaluate(pool, rewards, heldout, cfg.generator.max_new_tokens, cfg.eval_correct_threshold,
                    cfg.eval_samples, ks, env)


def generator_pool(cfg: Config, model_path: str, context: int, max_len: int, log):
    """The job's GeneratorPool (not started) serving MODEL_PATH, whose engines fit MAX_LEN tokens (at least 64,
    at most the model's CONTEXT)."""
    from actors.generator import EngineSettings
    from actors.pool import GeneratorPool

    g, to, ro = cfg.generator, cfg.timeouts, cfg.rollout
    settings = EngineSettings(model_path=model_path, max_model_len=min(context, max(64, max_len)),
                              kv_cache_gib=g.kv_cache_gib, gpu_memory_utilization=g.gpu_memory_utilization,
                              enforce_eager=g.enforce_eager,
                              seed=cfg.seed, dtype=g.dtype,
                              # log-probs of the distribution the samples come from (tempered, truncated)
                              tempered_logprobs=not sampling_is_plain(g))
    return GeneratorPool(settings, g.num_cpus, g.num_gpus, to.startup_s, to.generate_s, to.sync_s, log=log,
                         max_restarts=ro.max_generator_restarts, verify_sync=ro.verify_sync,
                         inflight_updates=ro.inflight_updates, resources=parse_resources(g.resources))


def evaluate_model(cfg: Config, log=print) -> dict:
    """`relayrl eval`: the held-out evaluation a job runs, on any model folder (model.path; empty = the built-in
    world's warm start): greedy accuracy judged by the job's reward, pass@k with eval_samples, multi-turn
    episodes with rollout.env. Local Ray (or ray_address), generator.num_generators generators, the reward
    actors; nothing is trained or written."""
    import ray
    from transformers import AutoConfig, AutoTokenizer

    from cluster.data import load_prompts
    from cluster.world import encode, ensure_world
    from reward.pool import RewardPool
    from reward.worker import check_source

    t0 = time.monotonic()
    check_source(cfg.reward)
    env = env_spec(cfg)
    world = ensure_world(cfg, log=log)
    model_path = os.path.abspath(cfg.model.path or world.model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_env_role(env, tokenizer, model_path)
    context = AutoConfig.from_pretrained(model_path).max_position_embeddings
    held = load_prompts(cfg.task.heldout_dataset or world.heldout_path, tokenizer, encode,
                        context - cfg.generator.max_new_tokens)
    heldout = [Prompt(-1 - i, text, ids, answer) for i, (text, ids, answer) in enumerate(held)]
    max_len = max(len(p.token_ids) for p in heldout) + cfg.generator.max_new_tokens
    own_ray = not ray.is_initialized() and not cfg.ray_address  # a local instance of its own, ended with it
    _init_ray(cfg, log)
    rewards = RewardPool(cfg.reward, timeout_s=cfg.timeouts.reward_s, log=log)
    pool = generator_pool(cfg, model_path, context, max_len, log)
    try:
        pool.start(cfg.generator.num_generators)
        rewards.wait_ready()
        t1 = time.monotonic()
        out = evaluate_heldout(cfg, pool, rewards, heldout, env)
        return {"model": model_path, "heldout": cfg.task.heldout_dataset or world.heldout_path,
                "heldout_prompts": len(heldout), **{k.removeprefix("eval/"): v for k, v in out.items()},
                "eval_seconds": time.monotonic() - t1, "wall_seconds": time.monotonic() - t0}
    finally:
        pool.shutdown()
        rewards.shutdown()
        if own_ray:
            ray.shutdown()


def sampling_is_plain(gc) -> bool:
    """Training rollouts sample softmax(logits) itself: temperature 1, no top-p or top-k truncation."""
    return gc.temperature == 1.0 and gc.top_p == 1.0 and gc.top_k == 0


class LearnerFailed(RuntimeError):
    pass


def learner_died(when: str, run_dir: Path, error: str) -> str:
    """LearnerFailed's message: what died, and how to go on from the latest checkpoint."""
    return (f"the learner died {when} ({error}). Continue the job with `relayrl train --resume {run_dir}` "
            f"(latest checkpoint: {latest_checkpoint(run_dir) or 'none yet'})")


RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "checkpoints", "final_model", "final_adapter")


def check_lora_targets(model_path: str, lc) -> None:
    """learner.lora_targets against the model's layers, on a weightless (meta-device) copy of it: a suffix that
    matches no linear layer is a ConfigError before any actor starts."""
    if not lc.lora_rank:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from learner.lora import target_names

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    try:
        target_names(model, lc.lora_targets)
    except ValueError as e:
        raise ConfigError(f"learner.lora_targets: {e}") from None


def check_fresh_run_dir(run_dir: Path) -> None:
    """A new run never writes into another run's directory: its metrics would be appended to the old ones
    (mixing two runs in metrics.jsonl, TensorBoard and the plots) and its checkpoints mixed with theirs.
    Raises ConfigError, before anything starts, naming what is there and the ways out."""
    held = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if held:
        raise ConfigError(f"run_name: {run_dir} already holds a run ({', '.join(held)}); continue it with "
                          f"`relayrl train --resume {run_dir}`, or start afresh under another --run_name (empty = a "
                          f"timestamp) or after removing that directory")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """RUN_DIR/checkpoints/<latest>, following the pointer file written last by save_checkpoint."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "driver.json").exists() else None


def save_checkpoint(run_dir: Path, step: int, learner, stream: PromptStream, rollout, loop, acc_before: float,
                    acc: float, timeout_s: float, keep: int = 2) -> Path:
    """Atomic: everything goes into step-N.tmp, which is renamed to step-N, and only then does the
    `latest` pointer move (itself replaced atomically). A crash at any point leaves the previous
    checkpoint intact. Outstanding prompts (async mode) are saved and re-queued on resume, so the
    accounting stays exact across a restart."""
    import ray

    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ray.get(learner.save_checkpoint.remote(str(tmp.resolve())), timeout=timeout_s)
    state = {"step": step, "stream": stream.state(), "accounting": rollout.acct.state(),
             "outstanding": [{"uid": p.uid, "text": p.text, "token_ids": list(p.token_ids), "answer": p.answer}
                             for p in rollout.outstanding_prompts()],
             "samples_trained": loop.samples_trained, "acc_before": acc_before, "acc": acc}
    (tmp / "driver.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (root / "latest.tmp").write_text(final.name)
    os.replace(root / "latest.tmp", root / "latest")
    for old in sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resume_config(run_dir: str, overrides: list[str]) -> Config:
    """The config a run was started with (RUN_DIR/config.yaml), with command-line overrides on top."""
    from core.config import load_config

    path = Path(run_dir)
    if not (path / "config.yaml").exists():
        raise FileNotFoundError(f"--resume {run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(str(path / "config.yaml"), overrides)
    saved = load_config(str(path / "config.yaml"))
    for name in ("lora_rank", "lora_alpha", "lora_targets"):  # the checkpoint's trained tensors depend on them
        was, now = getattr(saved.learner, name), getattr(cfg.learner, name)
        if was != now:
            raise ConfigError(f"learner.{name}: the run in {run_dir} was trained with {was!r}; its checkpoints "
                              f"cannot continue with {now!r} (start a new run from its final_model instead)")
    cfg.run_dir, cfg.run_name = str(path.parent), path.name
    return cfg


def _truncate_metrics(path: Path, last_step: int) -> None:
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in keep))


class _Loop:
    """One training step in either mode:

    sync:  draw P prompts -> generate + score them all -> train -> publish + sync (blocking)
    async: take P buffered groups (dropping those > max_staleness versions old) -> train, while the
           rollout keeps generating ahead (bounded) -> publish -> sync in the background
    """

    def __init__(self, cfg: Config, pool, rollout, stream: PromptStream, learners, control, log, run_dir: Path):
        self.cfg, self.pool, self.rollout, self.stream, self.learners, self.control, self.log = (
            cfg, pool, rollout, stream, learners, control, log)
        self.run_dir = run_dir
        self.is_async = cfg.rollout.mode == "async"
        self.timings: Counter = Counter()
        self.samples_trained = 0
        self.samples_multi_version = 0  # partial rollouts: trained samples whose tokens span policy versions
        self.needed = cfg.steps * cfg.prompts_per_step  # prompts the run will train on
        self._last_control = 0.0
        self.in_training = 0  # groups handed to the learner, not yet confirmed trained
        self.step_tied_dropped = 0  # tied groups dynamic sampling dropped while building the last step
        self.stop_requested = False
        self._tokens_seen = 0

    # -------------------------------------------------------------- helpers
    def _top_up(self, have: int = 0) -> None:
        """Draw prompts so the outstanding work stays within the mode's bound (backpressure) and the run
        draws no more than it will train on. `have`: groups already taken for the step being built."""
        c = self.cfg
        # async: one step's prompts per version of allowed lag. Generating further ahead only fills the
        # buffer with samples that will be too stale by the time the learner reaches them.
        bound = c.prompts_per_step * (max(1, c.rollout.max_staleness) if self.is_async else 1)
        remaining = self.needed - len(self.rollout.acct.trained) - self.in_training
        want = min(bound, remaining) - have - self.rollout.outstanding()
        if want > 0:
            self.rollout.add(self.stream.next(want))

    def _tick(self) -> None:
        self.rollout.pump(0.05)
        self.pool.poll_sync()
        if time.monotonic() - self._last_control > 1.0:
            self.poll_control()

    def poll_control(self) -> None:
        """Apply `relayrl scale` / `relayrl stop` requests (between calls, never inside one)."""
        import ray

        self._last_control = time.monotonic()
        req = ray.get(self.control.take_requests.remote(), timeout=self.cfg.timeouts.generate_s)
        if req["generators"] is not None:
            self.pool.scale(req["generators"])
        if req["stop"] and not self.stop_requested:
            self.stop_requested = True
            self.log("[control] stop requested: finishing this step")

    def _groups(self) -> list:
        """Block until one step's groups are ready (drawing more when groups were dropped). With
        algo.dynamic_sampling, tied groups are dropped too, up to (max_draws - 1) x P per step; each
        shortfall is drawn again (in sync mode: one more, smaller generation round)."""
        P = self.cfg.prompts_per_step
        a = self.cfg.algo
        bound = self.cfg.rollout.max_staleness if self.is_async else None
        tied_budget = (a.dynamic_sampling_max_draws - 1) * P if a.dynamic_sampling else 0
        tied_before = self.rollout.tied_dropped
        groups: list = []
        while len(groups) < P:
            self._top_up(len(groups))
            if not self.is_async and self.rollout.busy():  # sync: the whole step's prompts first
                self._tick()
                continue
            groups += self.rollout.take(P - len(groups), self.pool.version, bound,
                                        drop_tied=tied_budget - (self.rollout.tied_dropped - tied_before))
            if len(groups) < P:
                self._tick()
        self.step_tied_dropped = self.rollout.tied_dropped - tied_before
        return groups

    # -------------------------------------------------------------- one step
    def step(self, step: int) -> dict:
        import ray

        to = self.cfg.timeouts
        t0 = time.monotonic()
        groups = self._groups()
        t1 = time.monotonic()
        # every rank gets the same groups (one copy in the object store) and trains on its share of them
        refs = self.learners.call("train_step", groups if len(self.learners.actors) == 1 else ray.put(groups))
        self.in_training = len(groups)

        def generate_meanwhile():  # async: generation continues while the learner trains
            self._top_up()
            self._tick()
        if not self.learners.wait(refs, t1 + to.train_s, 0.0 if self.is_async else 0.5,
                                  generate_meanwhile if self.is_async else None):
            raise TimeoutError(f"learner update {step} did not finish within timeouts.train_s={to.train_s}s")
        try:
            stats = self.learners.gather(refs, to.train_s)
        except (ray.exceptions.RayActorError, RankDied) as e:
            cause = e.__cause__ if isinstance(e, RankDied) and e.__cause__ is not None else e  # Ray's own error
            raise LearnerFailed(learner_died(f"during step {step}", self.run_dir, type(cause).__name__)) from None
        self.in_training = 0
        for g in groups:
            self.rollout.acct.train(g.prompt.uid)
        self.samples_trained += sum(len(g.completions) for g in groups)
        multi = sum(c.versions_spanned > 1 for g in groups for c in g.completions)
        self.samples_multi_version += multi
        t2 = time.monotonic()
        if step % self.cfg.learner.sync_every == 0:
            handle = ray.get(self.learners.lead.publish.remote(), timeout=to.sync_s)
            if self.is_async:
                self.pool.start_sync(handle)  # lands between engine steps; confirmed in _tick
            else:
                self.pool.sync(handle)
        t3 = time.monotonic()
        # sync = publish (serialise + put) and, in sync mode, every generator loading it: all of the step it costs
        phase = {"time/wait_s": t1 - t0, "time/train_s": t2 - t1, "time/sync_s": t3 - t2, "time/step_s": t3 - t0}
        self.timings.update(phase)
        staleness = [stats.policy_version - g.min_version for g in groups]
        return {**{f"train/{k}": v for k, v in stats.metrics.items()}, **phase,
                "perf/samples_per_s": sum(len(g.completions) for g in groups) / (t3 - t0),
                "perf/gen_tokens_per_s": self._new_tokens() / (t3 - t0),
                "policy_version": self.pool.version, "staleness/mean": sum(staleness) / len(staleness),
                "staleness/max": max(staleness), "buffer_groups": len(self.rollout.buffer),
                "generators": len(self.pool.actors), "generator_restarts": self.pool.stats.restarts,
                "prompts_dropped": len(self.rollout.acct.dropped), "tied_groups_dropped": self.step_tied_dropped,
                # partial rollouts: trained samples whose tokens came from more than one policy version
                "samples_multi_version": multi,
                "time/sync_land_s": self.pool.last_sync_s,  # the last confirmed sync: queued to every generator serving it
                "reward_failures": sum(self.rollout.acct.reward_failures.values()),
                "env_failures": sum(self.rollout.acct.env_failures.values())}

    def _new_tokens(self) -> int:
        n = self.rollout.generated_tokens - self._tokens_seen
        self._tokens_seen = self.rollout.generated_tokens
        return n

    def publish_status(self, step: int, acc: float, row: dict) -> None:
        status = {"step": step, "steps": self.cfg.steps, "mode": self.cfg.rollout.mode,
                  "policy_version": self.pool.version, "generators": sorted(self.pool.actors),
                  "generators_starting": sorted(self.pool.starting), "heldout_accuracy": acc,
                  "reward_mean": row.get("train/reward_mean"), "samples_per_s": row.get("perf/samples_per_s"),
                  "accounting": self.rollout.acct.as_dict(), "generator_restarts": self.pool.stats.restarts}
        self.control.publish_status.remote(status)
