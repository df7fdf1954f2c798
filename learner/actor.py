"""The learner: holds the policy (and the frozen reference and the critic when used), turns scored
groups into one PPO-family update, and publishes versioned weights.

It only unpacks config and calls the pure functions of `learner.algos`; no RL math lives here.
One update, in order:
  1. collate groups into a right-padded batch (learner.batch);
  2. no-grad pass: the learner's "old" log-probs, the reference's, the critic's values (policy and
     reference run each group's prompt once: learner.forward). The old log-probs are vLLM's own instead
     when they are the same numbers (algo.old_logprobs=auto on CPU, fresh samples), and are never
     recomputed for the first minibatch, whose training forward runs the unchanged policy;
  3. advantages by the configured estimator;
  4. `epochs` x `minibatches` optimizer steps, each accumulated over micro-batches;
  5. scalar health metrics, read once at the end.

Data parallel (learner.data_parallel = W > 1): W of these actors, rank 0 the named `learner`, each holding the
whole model and optimizer. Every rank gets the same groups and computes the same batch, advantages and
minibatch rows; each runs the forward/backward of its share of each minibatch's rows (and of the no-grad
pass, whose tensors are then summed over ranks), the gradients are summed over ranks (torch.distributed: gloo
on CPU, NCCL on GPU), and every rank takes the same optimizer step on the same gradient. The loss weights are
shares of the whole minibatch, so the sum is the one-rank gradient. Rank 0 alone publishes and saves.

LoRA (learner.lora_rank > 0, learner.lora): the policy is frozen but for low-rank adapters, the reference is the
policy with its adapters off, and what is published or saved is the merged model (plus the adapter alone, in
PEFT's format, beside each saved model).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from core.config import AlgoConfig, LearnerConfig  # plain dataclasses; no driver logic
from core.messages import Group, LoRAVersion, TrainStats, WeightsHandle
from core.weights import serialize_state_dict
from learner import algos
from learner.batch import Batch, collate, micro_batches
from learner.forward import ValueModel, batch_logits
from learner.lora import adapter_tensors, adapters_off, apply_lora, load_adapter, merged_state_dict, save_adapter

log = logging.getLogger(__name__)
AUTO_MISMATCH = 1e-3  # algo.old_logprobs=auto: mean |vLLM - learner| log-prob above which old log-probs are recomputed


def _lr_lambda(cfg: LearnerConfig, total_steps: int):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return 1.0 - frac if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return f


def _atomic_dir(out_dir: str, write) -> None:
    """WRITE(tmp) into a sibling temporary folder, then swap it in for OUT_DIR."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


class Learner:
    """Plain class; the driver wraps it with `ray.remote` (named `learner`)."""

    def __init__(self, model_path: str, algo: AlgoConfig, cfg: LearnerConfig, total_steps: int, seed: int,
                 pad_id: int = 0, sampler_dtype: str = "float32", rank: int = 0, temperature: float = 1.0,
                 truncated_sampling: bool = False):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(cfg.torch_threads)
        torch.manual_seed(seed)
        self.device = torch.device("cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.algo, self.cfg, self.pad_id, self.model_path = algo, cfg, pad_id, model_path
        # generator.temperature: the samples come from softmax(logits / T), so the policy (and its reference) is
        # that distribution: log-probs, ratios, KL and entropy all read logits / T (as TRL and veRL do). The
        # generators report log-probs of the same tempered distribution (EngineSettings.tempered_logprobs).
        self.temperature = temperature
        # generator.top_p / top_k: the sampler's log-probs are of a truncated distribution, not the policy's own
        # numbers, so algo.old_logprobs=auto recomputes old log-probs (the importance weights see the truncation)
        self.truncated_sampling = truncated_sampling
        self.rank, self.world = rank, cfg.data_parallel  # the ranks meet in join(); one rank needs nothing more
        self._comm_s = 0.0  # seconds in collectives during the current update (data parallel)
        # learner.compute_dtype: bf16 autocast (auto: on GPU) or exact float32 (auto: on CPU, where only AMX makes
        # bf16 matmuls faster); parameters, gradients and AdamW state are float32 either way
        bf16 = cfg.compute_dtype == "bfloat16" or (cfg.compute_dtype == "auto" and self.device.type == "cuda")
        self._bf16 = bf16
        # torch's CPU flash-attention backward is slow in bf16 (8.6 ms a call on the 27M model, a third of the
        # update; in float32 it is not among the profile's top 30 ops); eager attention in bf16 is not
        # (python -m bench.learner_step --bf16)
        load = dict(dtype=torch.float32)
        if bf16 and self.device.type == "cpu":
            load["attn_implementation"] = "eager"
        self.policy = AutoModelForCausalLM.from_pretrained(model_path, **load).to(self.device)
        self.policy.config.use_cache = False
        # learner.lora_rank: the policy is frozen but for its adapters (learner.lora); the critic, a copy of its
        # body, carries adapters of its own
        self.lora = cfg.lora_rank > 0
        if self.lora:
            apply_lora(self.policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        # KL's frozen reference: a second copy of the initial model, or with LoRA the policy with adapters off
        self.has_ref = algo.kl_coef > 0
        self.ref = None
        if self.has_ref and not self.lora:
            self.ref = AutoModelForCausalLM.from_pretrained(model_path, **load).to(self.device)
            self.ref.eval().requires_grad_(False)
        self.critic = ValueModel(self.policy).to(self.device) if algo.estimator == "ppo" else None
        # fused: one kernel over all tensors (3x faster than the per-tensor loop on CPU, same update)
        self.opt = torch.optim.AdamW(self._trainable(self.policy), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg, total_steps))
        self.critic_opt = (torch.optim.AdamW(self._trainable(self.critic), lr=algo.critic_lr, fused=True)
                           if self.critic is not None else None)
        self.step = 0
        self.version = 0
        self._blob = None  # publish()'s serialisation buffer, reused
        self._published_step: int | None = 0  # self.step when the generators' weights were put; None = unknown
        # generator.dtype: the generators' weights are published in it (vLLM would cast them on load anyway)
        self.publish_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[sampler_dtype]
        # learner.lora_sync=adapter: versions carry the adapters alone; generators read the base from the model
        # folder's safetensors files, so a folder without them gets merged versions
        self._sync_adapters = self.lora and cfg.lora_sync == "adapter" and os.path.isdir(model_path) and any(
            f.endswith(".safetensors") for f in os.listdir(model_path))
        # algo.old_logprobs=auto takes the sampler's log-probs while they are the learner's own numbers: float32
        # on both sides on CPU (bf16 anywhere rounds differently); a measured disagreement turns it off for good
        self._sampler_exact = self.device.type == "cpu" and not bf16 and self.publish_dtype == torch.float32
        self.kl_coef = algo.kl_coef  # moves each update when algo.kl_target > 0 (adaptive controller)

    # ------------------------------------------------------------------ data parallel (learner.data_parallel > 1)
    def rendezvous_address(self) -> str:
        """A tcp:// address on this rank's node for torch.distributed to meet at (asked of rank 0)."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def join(self, address: str, timeout_s: float) -> int:
        """Join the other ranks at ADDRESS; every rank then holds rank 0's weights. A collective that waits
        longer than TIMEOUT_S for a rank (dead or stuck) raises instead of hanging."""
        import datetime

        import torch.distributed as dist

        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", init_method=address,
                                rank=self.rank, world_size=self.world, timeout=datetime.timedelta(seconds=timeout_s))
        with torch.no_grad():  # the same folder gives the same weights; make it so whatever was loaded
            for p in self._params():
                dist.broadcast(p.data, 0)
        return self.rank

    def fingerprint(self) -> str:
        """sha256 of each tensor's sum and absolute sum, over the weights (policy, critic) and the optimizers'
        state, taken on the device (no copy of the model to the host): equal on every data-parallel rank as long
        as the ranks hold the same bytes, which they do while they step together."""
        import hashlib

        opts = [self.opt] + ([self.critic_opt] if self.critic_opt is not None else [])
        tensors = [p.detach() for p in self._params()]
        tensors += [v for o in opts for st in o.state.values() for k, v in sorted(st.items()) if k != "step"]
        sums = torch.stack([torch.stack([t.double().sum(), t.double().abs().sum()]) for t in tensors])
        return hashlib.sha256(sums.cpu().numpy().tobytes()).hexdigest()

    @staticmethod
    def _trainable(model) -> list[torch.Tensor]:
        return [p for p in model.parameters() if p.requires_grad]

    def _params(self) -> list[torch.Tensor]:
        return [p for m in (self.policy, self.critic) if m is not None for p in self._trainable(m)]

    def _shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's share of ROWS: contiguous, so most groups' rows stay together for the shared prefix."""
        return rows if self.world == 1 else rows.tensor_split(self.world)[self.rank]

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """T summed over ranks, in place (every rank gets the same bytes)."""
        if self.world > 1:
            import torch.distributed as dist

            t0 = time.monotonic()
            dist.all_reduce(t)
            self._comm_s += time.monotonic() - t0
        return t

    def _sum_grads(self) -> None:
        """Gradients summed over ranks, in one flat all-reduce. A rank that ran no row contributes zeros."""
        params = self._params()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = self._sum(torch._utils._flatten_dense_tensors(grads))
        for g, s in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(s)

    def _sum_metrics(self, acc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Share-weighted metric sums added over ranks (a rank that ran no row has none)."""
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, {k: float(v) for k, v in acc.items()})
        out: dict[str, float] = {}
        for part in parts:
            for k, v in part.items():
                out[k] = out.get(k, 0.0) + v
        return {k: torch.tensor(v, device=self.device) for k, v in out.items()}

    def _same_on_every_rank(self, flag: bool) -> bool:
        """Rank 0's FLAG on every rank (for decisions that read state only rank 0 keeps, like publishing)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([float(flag)], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())

    # ------------------------------------------------------------------ forward passes
    def autocast(self):
        """A fresh autocast context (learner.compute_dtype). Autocast keeps the bf16 copies of the weights until
        its outermost region exits, so a region around every micro-batch of one optimizer step (the weights only
        change at opt.step, after it) casts them once instead of once per micro-batch."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16)

    def _logits(self, model, b: Batch) -> torch.Tensor:
        with self.autocast():
            return batch_logits(model, b, self.device, self.cfg.shared_prefix)

    def _policy_logits(self, model, b: Batch) -> torch.Tensor:
        """The policy's (or reference's) logits of the distribution the generators sample: divided by the
        temperature (the critic's outputs are values and are not)."""
        logits = self._logits(model, b)
        return logits if self.temperature == 1.0 else logits / self.temperature

    def _logp(self, model, b: Batch) -> torch.Tensor:
        return algos.token_logprobs(self._policy_logits(model, b), b.input_ids[:, 1:].to(self.device))

    def _ref_logp(self, b: Batch) -> torch.Tensor:
        if self.ref is not None:
            return self._logp(self.ref, b)
        with adapters_off(self.policy):  # LoRA: the base model is the initial policy
            return self._logp(self.policy, b)

    def _values(self, b: Batch) -> torch.Tensor:
        """The critic's V(s_t) aligned like the log-probs, (B, W-1): the same forward path as the policy's."""
        return self._logits(self.critic, b)[..., 0]

    def _micro(self, b: Batch):
        """(positions, micro-batch): B's rows split by learner.micro_batch_size / micro_batch_tokens, each
        micro-batch cut to its own longest row (its tensors are (n, w) and (n, w-1), w <= B's width)."""
        parts = micro_batches(b.attention_mask.sum(1).tolist(), b.group_id.tolist(), self.cfg.micro_batch_size,
                              self.cfg.micro_batch_tokens)
        for pos in parts:
            idx = torch.tensor(pos, dtype=torch.long)
            yield idx, b.rows(idx, trim=True)

    def _rowwise(self, fn, b: Batch, shard: bool = False) -> torch.Tensor:
        """FN (micro-batch -> (n, w-1)) over B's rows by micro-batch, assembled into (B, W-1) (zeros beyond each
        micro-batch's width, where every row is padding). SHARD: each rank runs its share of the rows and the
        result is summed over ranks (every rank must call it then)."""
        out = torch.zeros(b.mask.shape, device=self.device)
        rows = self._shard(torch.arange(b.mask.shape[0])) if shard and self.world > 1 else None
        for idx, mb in self._micro(b if rows is None else b.rows(rows)):
            out[(idx if rows is None else rows[idx]).to(self.device), : mb.mask.shape[1]] = fn(mb)
        return self._sum(out) if rows is not None else out

    @torch.no_grad()
    def _no_grad_pass(self, b: Batch, old_rows: torch.Tensor | None = None,
                      recompute: bool = True) -> dict[str, torch.Tensor]:
        """Old log-probs (when RECOMPUTE), reference log-probs and values over the whole batch, micro-batched.
        OLD_ROWS, when given: compute old log-probs for these rows only (zeros elsewhere)."""
        pre: dict[str, torch.Tensor] = {}
        with self.autocast():  # one region: each model's weights are cast once for all micro-batches
            if self.has_ref:
                pre["ref"] = self._rowwise(self._ref_logp, b, shard=True)
            if self.critic is not None:
                pre["values"] = self._rowwise(self._values, b, shard=True)
            if recompute:
                sub = b if old_rows is None else b.rows(old_rows)
                old = self._rowwise(lambda mb: self._logp(self.policy, mb), sub, shard=True)
                if old_rows is None:
                    pre["old"] = old
                else:
                    pre["old"] = torch.zeros(b.mask.shape, device=self.device)
                    pre["old"][old_rows.to(self.device)] = old
        return pre

    # ------------------------------------------------------------------ advantages
    def _advantages(self, b: Batch, mask, pre: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Returns (advantages (B, T), returns (B, T) or None, per-token KL to reference (B, T))."""
        a = self.algo
        kl = (algos.kl_estimate(pre["old"], pre["ref"], a.kl_kind) * mask if "ref" in pre
              else torch.zeros_like(mask))
        kl_in_reward = a.kl_mode == "reward" and "ref" in pre
        rewards_B = b.rewards_PG.reshape(-1).to(self.device)
        if a.estimator == "ppo":
            r_tok = algos.token_rewards(rewards_B, mask, kl if kl_in_reward else None, self.kl_coef if kl_in_reward else 0.0)
            adv, ret = algos.gae(r_tok, pre["values"], mask, a.gamma, a.lam)
            return algos.masked_whiten(adv, mask), ret, kl
        if a.estimator == "reinforce_pp":
            ret = algos.reinforce_pp_returns(rewards_B, kl, mask, self.kl_coef if kl_in_reward else 0.0)
            return algos.masked_whiten(ret, mask), None, kl
        if kl_in_reward:  # sequence-level penalty folded into the outcome reward before baselining
            rewards_B = rewards_B - self.kl_coef * algos.masked_sum(kl, mask, dim=1)
        rewards_PG = rewards_B.reshape(b.rewards_PG.shape)
        adv_PG = {
            "grpo": lambda r: algos.grpo_advantages(r, scale_by_std=True),
            "dr_grpo": algos.dr_grpo_advantages,
            "rloo": algos.rloo_advantages,
            "reinforce": algos.reinforce_baseline_advantages,
        }[a.estimator](rewards_PG)
        adv = algos.broadcast_to_tokens(adv_PG.reshape(-1), mask)
        if a.whiten_advantages:
            adv = algos.masked_whiten(adv, mask)
        return adv, None, kl

    # ------------------------------------------------------------------ one update
    def train_step(self, groups: list[Group]) -> TrainStats:
        t0 = time.monotonic()
        self._comm_s = 0.0
        a = self.algo
        # the update depends on which groups came, not on the order generators finished them in (reproducible runs)
        groups = sorted(groups, key=lambda g: g.prompt.uid)
        b = collate(groups, self.pad_id)
        mask = b.mask.to(self.device)
        self.policy.eval()  # no dropout in these models; eval() keeps sampler and learner numerics equal
        sampler_logp = b.sampler_logp.to(self.device)
        B = b.input_ids.shape[0]
        G = b.rewards_PG.shape[1]
        gen = torch.Generator().manual_seed(self.step)
        if a.minibatch_split == "groups":  # rows are ordered group by group; minibatches keep groups whole
            minibatch_rows = [[(gi[:, None] * G + torch.arange(G)[None, :]).reshape(-1)
                               for gi in torch.randperm(B // G, generator=gen).chunk(a.minibatches)]
                              for _ in range(a.epochs)]
        else:  # any samples together; sorted, so a group's rows stay adjacent for the shared-prefix forward
            minibatch_rows = [[rows.sort().values for rows in torch.randperm(B, generator=gen).chunk(a.minibatches)]
                              for _ in range(a.epochs)]
        # The first optimizer step runs the unchanged policy, so its rows' old log-probs are its own forward
        # pass, detached: the no-grad pass skips them unless the advantages need old log-probs first (KL to a
        # reference). With one minibatch and one epoch the no-grad policy pass disappears.
        from_sampler = self._same_on_every_rank(self._old_from_sampler(b))  # rank 0 alone knows what it published
        # Without a reference or a critic the advantages are a function of the rewards alone: compute them first,
        # so the rows that carry no gradient are known before any forward pass (and skip the no-grad one too).
        early = not self.has_ref and self.critic is None
        adv, ret, kl = self._advantages(b, mask, {}) if early else (None, None, None)
        trained = self._trained_rows(adv, mask) if early else None
        lazy_rows = minibatch_rows[0][0] if not from_sampler and not self.has_ref else None
        old_rows = None
        if lazy_rows is not None:
            keep = torch.ones(B, dtype=torch.bool) if trained is None else trained.cpu().clone()
            keep[lazy_rows] = False
            old_rows = keep.nonzero().squeeze(1)
        pre = self._no_grad_pass(b, old_rows, recompute=not from_sampler)
        if from_sampler:
            pre["old"] = sampler_logp
        if not early:
            adv, ret, kl = self._advantages(b, mask, pre)
            trained = self._trained_rows(adv, mask)
        # metrics that read the learner's old log-probs cover the rows trained on (skipped rows may have none)
        m_trained = mask if trained is None else mask * trained[:, None]
        norm_const = float(mask.sum(1).max().clamp(min=1))  # max completion length in the batch (Dr. GRPO)

        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        n_updates = 0
        # the first minibatch's forward pass runs the unchanged policy: its log-probs are the learner's view of
        # the sampler's, so the mismatch metric costs nothing extra when old log-probs are not recomputed
        mismatch = [torch.zeros((), device=self.device), torch.zeros((), device=self.device)] \
            if from_sampler else None
        for epoch_rows in minibatch_rows:
            for rows in epoch_rows:
                first = n_updates == 0
                stats = self._optimizer_step(b, rows, mask, pre, adv, ret, kl, sampler_logp, norm_const,
                                             mismatch if first else None, fill_old=first and lazy_rows is not None,
                                             trained=trained)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
                if first and lazy_rows is not None and self.world > 1:  # each rank filled the rows it ran
                    idx = lazy_rows.to(self.device)
                    pre["old"][idx] = self._sum(pre["old"][idx].contiguous())
                n_updates += 1
        if mismatch is not None and self.world > 1:
            mismatch = list(self._sum(torch.stack(mismatch)))
        if a.is_correction != "none":  # the weights each micro-batch used, summarised over the batch
            _, is_metrics = algos.importance_weights(pre["old"], sampler_logp, m_trained, a.is_correction, a.is_cap)
        else:
            is_metrics = {}
        self.sched.step()
        self.step += 1
        kl_ref = float(algos.masked_mean(kl, mask))
        if from_sampler and a.old_logprobs == "auto" and float(mismatch[0] / mismatch[1].clamp(min=1)) > AUTO_MISMATCH:
            self._sampler_exact = False  # the sampler's numbers are not the learner's here: recompute from now on
            log.warning("old_logprobs=auto: vLLM's log-probs are %.2e from the learner's (> %.0e); recomputing "
                        "them from the next step on", float(mismatch[0] / mismatch[1].clamp(min=1)), AUTO_MISMATCH)
        metrics = {k: v / counts[k] for k, v in sums.items()}  # a minibatch with no row trained has no ratio/entropy
        for k in ("entropy", "clipfrac", "approx_kl", "ratio_mean", "ratio_max"):
            metrics.setdefault(k, 0.0)  # no row trained this step: a mean over nothing, 0 as algos.masked_mean gives
        metrics["kl_coef"] = self.kl_coef
        if a.kl_target > 0:
            self.kl_coef = algos.adaptive_kl_coef(self.kl_coef, kl_ref, a.kl_target, a.kl_horizon, B)
        metrics.update({k: float(v) for k, v in is_metrics.items()})
        valid = mask.bool()
        metrics.update({
            "reward_mean": float(b.rewards_PG.mean()),
            "reward_std": float(b.rewards_PG.std(unbiased=False)),
            "kl_ref": kl_ref,
            "logprob_mismatch": float(algos.masked_mean((pre["old"] - sampler_logp).abs(), m_trained)) if mismatch is None
            else float(mismatch[0] / mismatch[1].clamp(min=1)),
            "old_from_sampler": float(from_sampler),
            "response_len": float(valid.sum(1).float().mean()),
            "lr": self.sched.get_last_lr()[0],
            "train_seconds": time.monotonic() - t0,
            # data parallel: this rank's seconds in all-reduces (gradients, no-grad pass), waiting for slower ranks included
            "allreduce_seconds": self._comm_s,
            "samples": float(B),
            # share of groups whose rewards all tie (TRL's frac_reward_zero_std): no signal for a group baseline
            "tied_group_frac": float(algos.tied_groups(b.rewards_PG).float().mean()),
            "samples_trained": float(B if trained is None else trained.sum()),
            "max_staleness": float(self.version - int(b.versions.min())),
        })
        return TrainStats(step=self.step, policy_version=self.version, metrics=metrics)

    def _old_from_sampler(self, b: Batch) -> bool:
        """Whether this batch's old log-probs are the sampler's (see algo.old_logprobs)."""
        mode = self.algo.old_logprobs
        if mode != "auto":
            return mode == "sampler"
        # the sampler ran exactly the weights the learner holds now: the current version, no update since its put
        return (self._sampler_exact and not self.truncated_sampling and self._published_step == self.step
                and int(b.versions.min()) == int(b.versions.max()) == self.version)

    def _trained_rows(self, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """(B,) bool: rows the update has to run, or None for all. A row whose advantage is exactly 0 on every
        token adds exactly 0 to the policy-gradient loss and its gradient (PPO's clipped terms, dual clip and
        importance weights all multiply the advantage); it is left out when no other term reads it."""
        a = self.algo
        kl_loss = self.has_ref and a.kl_mode == "loss"
        if not self.cfg.skip_zero_advantage or a.entropy_coef or kl_loss or self.critic is not None:
            return None
        return ((adv * mask) != 0).any(1)

    def _optimizer_step(self, b: Batch, rows, mask, pre, adv, ret, kl, sampler_logp, norm_const,
                        mismatch: list[torch.Tensor] | None = None, fill_old: bool = False,
                        trained: torch.Tensor | None = None) -> dict[str, float]:
        """One optimizer step over minibatch ROWS of B. MISMATCH, when given: [sum |logp - sampler|, tokens] is
        accumulated into it (the policy has not moved yet, so logp are the old log-probs). FILL_OLD: the
        policy has not moved yet and these rows' old log-probs were not computed: write logp, detached.
        TRAINED (B,) bool, when given: only those rows run; the loss keeps the whole minibatch's denominators
        (tokens, rows), so the gradient is the one of all rows, whose others add exactly 0."""
        a = self.algo
        self.opt.zero_grad(set_to_none=True)
        if self.critic_opt is not None:
            self.critic_opt.zero_grad(set_to_none=True)
        m_rows = mask[rows]
        total_tokens = m_rows.sum().clamp(min=1)
        n_rows = len(rows)
        if trained is not None:
            rows = rows[trained[rows].cpu()]
        mine = self._shard(rows)  # data parallel: this rank's rows; the shares below stay the whole minibatch's
        acc: dict[str, torch.Tensor] = {}
        with self.autocast():  # one region for the step's micro-batches (see autocast)
            for pos, mb in self._micro(b.rows(mine)):
                idx = mine[pos]
                w1 = mb.mask.shape[1]  # the micro-batch's own width (its longest row), minus 1

                def cut(t: torch.Tensor) -> torch.Tensor:
                    return t[idx, :w1]

                m = cut(mask)
                # weight each micro-batch by its share of the minibatch (tokens for token-mean, rows otherwise),
                # so accumulated gradients equal one big batch's
                share = (m.sum() / total_tokens) if a.loss_agg == "token-mean" else torch.tensor(len(idx) / n_rows)
                logits = self._policy_logits(self.policy, mb)
                logp = algos.token_logprobs(logits, mb.input_ids[:, 1:].to(self.device))
                if fill_old:
                    pre["old"][idx, :w1] = logp.detach()
                is_w = None
                if a.is_correction != "none":
                    is_w, _ = algos.importance_weights(cut(pre["old"]), cut(sampler_logp), m, a.is_correction, a.is_cap)
                if mismatch is not None:
                    mismatch[0] += ((logp.detach() - cut(pre["old"])).abs() * m).sum()
                    mismatch[1] += m.sum()
                pg, pm = algos.policy_loss(
                    logp, cut(pre["old"]), cut(adv), m, clip_low=a.clip_low, clip_high=a.clip_high,
                    dual_clip=a.dual_clip or None, agg=a.loss_agg, norm_const=norm_const,
                    is_weights_BT=is_w)
                loss = pg
                ent = algos.aggregate(algos.entropy_from_logits(logits), m, a.loss_agg, norm_const)
                if a.entropy_coef:
                    loss = loss - a.entropy_coef * ent
                if self.has_ref and a.kl_mode == "loss":
                    kl_now = algos.kl_estimate(logp, cut(pre["ref"]), a.kl_kind)
                    loss = loss + self.kl_coef * algos.aggregate(kl_now, m, a.loss_agg, norm_const)
                (loss * share).backward()
                parts = {"policy_loss": pg.detach(), "entropy": ent.detach(), **pm}
                if self.critic is not None:
                    v = self._values(mb)
                    vl = algos.value_loss(v, cut(pre["values"]), cut(ret), m, a.value_clip or None)
                    (vl * share).backward()
                    parts["value_loss"] = vl.detach()
                    parts["explained_variance"] = algos.explained_variance(cut(pre["values"]), cut(ret), m)
                for k, val in parts.items():
                    acc[k] = acc.get(k, 0.0) + val * share
        if self.world > 1:  # every rank now holds the whole minibatch's gradient and metric sums
            self._sum_grads()
            acc = self._sum_metrics(acc)
        # shares sum to 1 over all rows; rows left out added exactly 0 to the loss but are not in the diagnostics
        covered = (mask[rows].sum() / total_tokens) if a.loss_agg == "token-mean" else torch.tensor(len(rows) / n_rows)
        acc = {k: v if k == "policy_loss" else v / covered.clamp(min=1e-12) for k, v in acc.items()}
        if not len(rows):  # nothing ran: the gradient is exactly zero, and the optimizer steps on it as it would
            critic = list(self.critic.parameters()) if self.critic is not None else []
            for p in list(self.policy.parameters()) + critic:
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
            acc["policy_loss"] = torch.zeros((), device=self.device)
        if self.cfg.max_grad_norm > 0:
            gn = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm)
            if self.critic is not None:
                torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.cfg.max_grad_norm)
        else:
            gn = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.policy.parameters() if p.grad is not None))
        self.opt.step()
        if self.critic_opt is not None:
            self.critic_opt.step()
        acc["grad_norm"] = gn
        return {k: float(v) for k, v in acc.items()}  # the one host sync of this minibatch

    # ------------------------------------------------------------------ weights out
    def publish(self) -> WeightsHandle:
        """Bump the version and put the weights into the object store once, for every generator."""
        import ray

        self.version += 1
        self._published_step = self.step
        lora = None
        if self._sync_adapters:  # float32 adapters; the generators merge them (and cast, as vLLM's loader does)
            state = adapter_tensors(self.policy)
            lora = LoRAVersion(base_path=os.path.abspath(self.model_path), scale=self.cfg.lora_alpha / self.cfg.lora_rank)
        else:
            state = merged_state_dict(self.policy) if self.lora else self.policy.state_dict()
            if self.publish_dtype != torch.float32:
                state = {k: v.to(self.publish_dtype) if v.is_floating_point() else v for k, v in state.items()}
        blob, checksum = serialize_state_dict(state, out=self._blob)
        ref = ray.put(blob)  # copies into the object store: the buffer is free to reuse next time
        self._blob = blob
        return WeightsHandle(version=self.version, blob_ref=[ref], num_bytes=blob.nbytes, checksum=checksum, lora=lora)

    def save(self, out_dir: str, adapter_dir: str | None = None) -> str:
        """Write a plain Hugging Face folder (model + tokenizer) atomically; returns its path. With LoRA the
        weights are merged, and ADAPTER_DIR, when given, gets the adapter alone as a PEFT folder (a separate
        folder: transformers would read an adapter_config.json beside the merged weights as an adapter to apply
        on top of them)."""
        def write(tmp: Path) -> None:
            state = merged_state_dict(self.policy) if self.lora else None
            self.policy.save_pretrained(str(tmp), safe_serialization=True, state_dict=state)
            for f in os.listdir(self.model_path):
                if f.startswith(("tokenizer", "special_tokens")) or f == "generation_config.json":
                    shutil.copy(os.path.join(self.model_path, f), tmp / f)

        _atomic_dir(out_dir, write)
        if self.lora and adapter_dir:
            _atomic_dir(adapter_dir, lambda tmp: save_adapter(self.policy, tmp, self.model_path, self.cfg.lora_rank,
                                                              self.cfg.lora_alpha))
        return str(out_dir)

    def save_checkpoint(self, out_dir: str) -> str:
        """Everything needed to continue training exactly: the policy as a Hugging Face folder
        (OUT/model) and the rest (optimizers, LR schedule, critic, adaptive KL coefficient, step,
        version, RNG) in OUT/learner.pt. The caller makes the directory swap atomic."""
        out = Path(out_dir)
        self.save(str(out / "model"), str(out / "adapter"))
        state = {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "step": self.step,
                 "version": self.version, "kl_coef": self.kl_coef, "torch_rng": torch.get_rng_state()}
        if self.critic is not None:
            state["critic"] = self.critic.state_dict()
            state["critic_opt"] = self.critic_opt.state_dict()
        torch.save(state, out / "learner.pt")
        return str(out)

    def load_checkpoint(self, ckpt_dir: str) -> dict:
        """Inverse of save_checkpoint (the frozen reference stays the run's initial model)."""
        from safetensors.torch import load_file

        ckpt = Path(ckpt_dir)
        if self.lora:  # the base is the run's initial model, as loaded; only the adapters moved
            load_adapter(self.policy, ckpt / "adapter")
        else:
            weights = {}
            for f in sorted((ckpt / "model").glob("*.safetensors")):
                weights.update(load_file(str(f)))
            missing, unexpected = self.policy.load_state_dict(weights, strict=False)
            # tied / non-persistent buffers may be absent from the file; real parameters must not be
            if unexpected or [m for m in missing if "rotary" not in m]:
                raise ValueError(f"checkpoint {ckpt_dir} does not match the policy: missing {missing}, "
                                 f"unexpected {unexpected}")
        state = torch.load(ckpt / "learner.pt", map_location=self.device, weights_only=False)
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
            self.critic_opt.load_state_dict(state["critic_opt"])
        self.step, self.version, self.kl_coef = state["step"], state["version"], state["kl_coef"]
        self._published_step = None  # the generators' weights are unknown until the next publish
        torch.set_rng_state(state["torch_rng"])
        return {"step": self.step, "version": self.version}

    # ------------------------------------------------------------------ for tests and evaluation
    @torch.no_grad()
    def logprobs(self, groups: list[Group]) -> list[list[float]]:
        """The learner's log-probs of each completion's tokens (same order as the groups' completions)."""
        b = collate(groups, self.pad_id)
        lp = self._rowwise(lambda mb: self._logp(self.policy, mb), b).cpu()
        return [lp[i][b.mask[i].bool()].tolist() for i in range(lp.shape[0])]

    @torch.no_grad()
    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int, eos_id: int) -> list[list[int]]:
        out = []
        for ids in prompt_ids:
            x = torch.tensor([ids], device=self.device)
            y = self.policy.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=eos_id, pad_token_id=self.pad_id)
            out.append(y[0, len(ids):].tolist())
        return out

    def info(self) -> dict:
        import ray

        return {"step": self.step, "version": self.version, "device": str(self.device), "rank": self.rank,
                "node_id": ray.get_runtime_context().get_node_id(),
                "params": sum(p.numel() for p in self.policy.parameters()),
                "trainable_params": sum(p.numel() for p in self._trainable(self.policy)), "algo": asdict(self.algo)}
