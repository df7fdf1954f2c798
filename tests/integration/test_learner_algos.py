"""Every advantage estimator and KL mode, through the real Learner on the real warm-started model.

No Ray and no vLLM here: the learner class runs in-process on groups whose sampler log-probs are
the learner's own, so what is checked is the learner's wiring of config to the math in
learner/algos.py (whose numbers are pinned by tests/unit/test_algos.py).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from cluster.world import EOS, PAD
from core.config import AlgoConfig, LearnerConfig
from core.messages import Completion, Group, Prompt
from learner.actor import Learner
from reward.builtin import reverse_partial

pytestmark = pytest.mark.integration

G = 4  # samples per prompt


def _groups(learner: Learner, tokenizer, prompts: list[Prompt], seed: int) -> list[Group]:
    """Random 1-6 letter completions (+ EOS), scored by the task reward, with the learner's log-probs."""
    rng = random.Random(seed)
    letters = "abcdefgh"
    groups = []
    for p in prompts:
        comps = []
        for _ in range(G):
            text = "".join(rng.choice(letters) for _ in range(rng.randint(1, 6)))
            ids = tuple(tokenizer.convert_tokens_to_ids(list(text))) + (EOS,)
            comps.append(Completion(p, ids, (0.0,) * len(ids), text, "stop", 0, "test"))
        scores = reverse_partial([p.text] * G, [c.text for c in comps], [p.answer] * G)
        groups.append(Group(p, tuple(comps), tuple(scores)))
    lps = learner.logprobs(groups)
    out, k = [], 0
    for g in groups:
        comps = []
        for c in g.completions:
            comps.append(Completion(c.prompt, c.token_ids, tuple(lps[k]), c.text, c.finish_reason, 0, "test"))
            k += 1
        out.append(Group(g.prompt, tuple(comps), g.rewards))
    return out


VARIANTS = {
    "grpo": AlgoConfig(estimator="grpo", group_size=G),
    "dr_grpo": AlgoConfig(estimator="dr_grpo", group_size=G, loss_agg="seq-mean-token-sum-norm"),
    "rloo": AlgoConfig(estimator="rloo", group_size=G),
    "reinforce": AlgoConfig(estimator="reinforce", group_size=G, whiten_advantages=True),
    "reinforce_pp-kl-reward": AlgoConfig(estimator="reinforce_pp", group_size=G, kl_coef=0.05, kl_mode="reward",
                                         kl_kind="k1"),
    "ppo-critic-gae": AlgoConfig(estimator="ppo", group_size=G, epochs=2, dual_clip=3.0),
    "grpo-kl-k1-loss": AlgoConfig(group_size=G, kl_coef=0.1, kl_kind="k1", kl_mode="loss"),
    "grpo-kl-k2-loss": AlgoConfig(group_size=G, kl_coef=0.1, kl_kind="k2", kl_mode="loss", entropy_coef=0.01),
    "grpo-kl-k3-reward": AlgoConfig(group_size=G, kl_coef=0.1, kl_kind="k3", kl_mode="reward"),
    "grpo-kl-adaptive": AlgoConfig(group_size=G, kl_coef=0.1, kl_target=1e-6, kl_horizon=64, is_correction="mis"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_estimator_and_kl_mode_trains(name, world, tokenizer, heldout_prompts):
    torch.set_num_threads(1)
    algo = VARIANTS[name]
    learner = Learner(world.model_path, algo, LearnerConfig(lr=1e-3, torch_threads=1, micro_batch_size=12), 10, 0, PAD)
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    stats = [learner.train_step(_groups(learner, tokenizer, heldout_prompts[:8], seed)) for seed in range(2)]

    for s in stats:
        bad = {k: v for k, v in s.metrics.items() if not math.isfinite(v)}
        assert not bad, f"{name}: non-finite metrics {bad}"
        for key in ("policy_loss", "approx_kl", "clipfrac", "entropy", "grad_norm", "is_mean", "kl_ref"):
            assert key in s.metrics, f"{name}: missing health metric {key}"
    assert stats[0].metrics["grad_norm"] > 0
    moved = max(float((learner.policy.state_dict()[k] - v).abs().max()) for k, v in before.items())
    assert moved > 1e-5, f"{name}: no parameter moved"

    if algo.estimator == "ppo":
        assert {"value_loss", "explained_variance"} <= set(stats[1].metrics)
    if algo.kl_coef > 0:
        # the first update starts at the reference (KL 0); the second sees the moved policy
        assert stats[0].metrics["kl_ref"] == pytest.approx(0.0, abs=1e-6)
        # (k1 = log pi - log ref is signed per sample: on these off-policy samples it may be negative)
        kl = stats[1].metrics["kl_ref"]
        assert (abs(kl) if algo.kl_kind == "k1" else kl) > 1e-6
    if algo.kl_target > 0:
        # KL far above the tiny target: the adaptive coefficient rises by (1 + 0.2 * 32 / 64) = 1.1 per update
        # once KL > 0 (the first update saw KL 0 and lowered it by 0.9)
        assert stats[1].metrics["kl_coef"] == pytest.approx(0.1 * 0.9, rel=1e-9)
        assert learner.kl_coef == pytest.approx(0.1 * 0.9 * 1.1, rel=1e-9)
    else:
        assert learner.kl_coef == algo.kl_coef


def _shift(groups: list[Group], delta: float) -> list[Group]:
    """The same groups with every sampler log-prob moved by DELTA (a sampler that disagrees with the learner)."""
    return [Group(g.prompt, tuple(Completion(c.prompt, c.token_ids, tuple(x + delta for x in c.logprobs), c.text,
                                             c.finish_reason, c.policy_version, c.generator)
                                  for c in g.completions), g.rewards) for g in groups]


def test_sampler_logprobs_as_old_skip_the_recompute_and_change_nothing_when_they_agree(world, tokenizer,
                                                                                      heldout_prompts):
    """algo.old_logprobs=sampler: where the sampler's log-probs equal the learner's (float32 on CPU), the update is
    the one recomputing would give, and logprob_mismatch (then measured on the first minibatch's forward pass)
    still reports a sampler that disagrees."""
    torch.set_num_threads(1)
    learners = {mode: Learner(world.model_path, AlgoConfig(group_size=G, old_logprobs=mode),
                              LearnerConfig(lr=1e-3, torch_threads=1, micro_batch_size=12), 10, 0, PAD)
                for mode in ("recompute", "sampler")}
    groups = _groups(learners["recompute"], tokenizer, heldout_prompts[:8], seed=0)
    before = {k: v.clone() for k, v in learners["recompute"].policy.state_dict().items()}
    stats = {mode: lrn.train_step(groups) for mode, lrn in learners.items()}

    after = {mode: lrn.policy.state_dict() for mode, lrn in learners.items()}
    step = {mode: torch.cat([(after[mode][k] - v).flatten() for k, v in before.items()]) for mode in learners}
    moved, apart = float(step["recompute"].norm()), float((step["sampler"] - step["recompute"]).norm())
    # The two updates differ by rounding only (old log-probs ~1e-7 apart), compared over all weights at once:
    # Adam's first step divides by |grad| + eps, so a parameter whose gradient is ~0 can turn rounding into an
    # update ~1e-3 of its largest (measured 2.8e-6 against 2.0e-3 on an AVX-512 host), while the step as a
    # whole agrees to 3e-6 of its norm there. Old log-probs 0.01 nats off give 2.6e-5, 0.25 nats off 1.3.
    assert float(step["recompute"].abs().max()) > 1e-4 and apart < 1e-5 * moved, (moved, apart)
    for mode in learners:
        assert stats[mode].metrics["logprob_mismatch"] < 1e-6
        assert stats[mode].metrics["policy_loss"] == pytest.approx(stats["recompute"].metrics["policy_loss"],
                                                                   rel=1e-4, abs=1e-7)

    # a sampler 0.25 nats off on every token: both modes see it (sampler mode on its first minibatch's tokens)
    fresh = Learner(world.model_path, AlgoConfig(group_size=G, old_logprobs="sampler"),
                    LearnerConfig(lr=1e-3, torch_threads=1, micro_batch_size=12), 10, 0, PAD)
    assert fresh.train_step(_shift(groups, -0.25)).metrics["logprob_mismatch"] == pytest.approx(0.25, abs=1e-4)


def test_recompute_takes_the_first_minibatchs_old_logprobs_from_its_own_forward(world, tokenizer, heldout_prompts):
    """With no reference model the no-grad pass skips the first minibatch's rows (the policy has not moved when
    that minibatch runs, so its forward pass is the old log-probs); the update equals the full recompute's."""
    torch.set_num_threads(1)
    algo = AlgoConfig(group_size=G, minibatches=2, epochs=2, old_logprobs="recompute")
    # (skip_zero_advantage off: this seed has a tied group, whose rows would need no old log-probs at all)
    lazy, full = (Learner(world.model_path, algo, LearnerConfig(lr=1e-3, torch_threads=1, micro_batch_size=12,
                                                                skip_zero_advantage=False), 10, 0, PAD)
                  for _ in range(2))
    seen = []
    lazy_pass, full_pass = lazy._no_grad_pass, full._no_grad_pass
    lazy._no_grad_pass = lambda b, old_rows=None, **kw: (seen.append(len(old_rows)), lazy_pass(b, old_rows, **kw))[1]
    full._no_grad_pass = lambda b, old_rows=None, **kw: full_pass(b, None, **kw)  # every row, before any update
    groups = _groups(full, tokenizer, heldout_prompts[:8], seed=0)
    before = {k: v.clone() for k, v in full.policy.state_dict().items()}
    s_lazy, s_full = lazy.train_step(groups), full.train_step(groups)

    assert seen == [16]  # 8 prompts x 4 samples = 32 rows; the first of 2 minibatches' 16 come from its forward
    moved = max(float((full.policy.state_dict()[k] - v).abs().max()) for k, v in before.items())
    apart = max(float((lazy.policy.state_dict()[k] - full.policy.state_dict()[k]).abs().max()) for k in before)
    assert moved > 1e-4 and apart < 1e-3 * moved, (moved, apart)
    for key in ("policy_loss", "approx_kl", "is_mean", "logprob_mismatch"):
        assert s_lazy.metrics[key] == pytest.approx(s_full.metrics[key], rel=1e-4, abs=1e-6), key


def test_ppo_with_the_shared_prefix_updates_policy_and_critic_as_the_plain_pass_does(world, tokenizer,
                                                                                     heldout_prompts):
    """learner.shared_prefix also serves PPO's critic (values in the no-grad pass, the value loss in the update):
    two PPO steps move the policy and the critic as the plain one-forward-per-row learner does."""
    torch.set_num_threads(1)
    algo = AlgoConfig(estimator="ppo", group_size=G, epochs=2)
    shared, plain = (Learner(world.model_path, algo, LearnerConfig(lr=1e-3, torch_threads=1, micro_batch_size=12,
                                                                   shared_prefix=sp), 10, 0, PAD)
                     for sp in (True, False))
    before = {name: {k: v.clone() for k, v in getattr(plain, name).state_dict().items()} for name in ("policy", "critic")}
    for seed in range(2):  # the second step's values come from a critic whose head has left zero
        groups = _groups(plain, tokenizer, heldout_prompts[:8], seed)
        s_shared, s_plain = shared.train_step(groups), plain.train_step(groups)
    for name in ("policy", "critic"):
        now, other = getattr(plain, name).state_dict(), getattr(shared, name).state_dict()
        moved = torch.cat([(now[k] - v).flatten() for k, v in before[name].items()]).norm()
        apart = torch.cat([(other[k] - now[k]).flatten() for k in now]).norm()
        # as vectors (measured ~2e-5 policy, ~2e-6 critic): Adam turns float rounding in near-zero gradient
        # entries into differences of a few % of one lr step there, so the largest entry alone says little
        assert moved > 1e-2 and apart < 1e-3 * moved, (name, float(moved), float(apart))
    for key in ("policy_loss", "value_loss", "explained_variance"):
        assert s_shared.metrics[key] == pytest.approx(s_plain.metrics[key], rel=1e-3, abs=1e-6), key


def _at_version(groups: list[Group], version: int) -> list[Group]:
    """The same groups, as if sampled by policy VERSION."""
    return [Group(g.prompt, tuple(Completion(c.prompt, c.token_ids, c.logprobs, c.text, c.finish_reason, version,
                                             c.generator) for c in g.completions), g.rewards) for g in groups]


def test_auto_old_logprobs_take_the_samplers_only_for_the_weights_the_learner_holds(world, tokenizer, heldout_prompts,
                                                                                    ray_session):
    """algo.old_logprobs=auto (the default) on CPU: vLLM's log-probs serve as old log-probs exactly when the batch
    was sampled by the weights the learner holds (its current version, no update since they were published); a
    learner that has moved, stale samples, or a sampler measured to disagree get the recompute."""
    torch.set_num_threads(1)
    lrn = Learner(world.model_path, AlgoConfig(group_size=G), LearnerConfig(lr=1e-3, torch_threads=1,
                                                                           micro_batch_size=12), 10, 0, PAD)
    assert lrn.algo.old_logprobs == "auto"
    recomputed = []
    no_grad = lrn._no_grad_pass
    lrn._no_grad_pass = lambda b, old_rows=None, recompute=True: (recomputed.append(recompute),
                                                                  no_grad(b, old_rows, recompute))[1]
    groups = _groups(lrn, tokenizer, heldout_prompts[:8], seed=0)  # version 0: the weights the learner starts with

    def used_sampler(batch) -> bool:
        flag = lrn.train_step(batch).metrics["old_from_sampler"]
        assert flag == (not recomputed[-1])  # the metric says what the no-grad pass did
        return bool(flag)

    assert used_sampler(groups)  # fresh samples of the weights held: no recompute
    assert not used_sampler(groups)  # the learner has moved since (no publish): recompute
    lrn.publish()  # version 1, put at this step
    assert not used_sampler(groups)  # samples of version 0 are stale now
    lrn.publish()  # version 2
    fresh = _groups(lrn, tokenizer, heldout_prompts[:8], seed=1)
    assert used_sampler(_at_version(fresh, 2))
    lrn.publish()  # version 3; a sampler 0.25 nats off: used once, measured, then never again
    off = _shift(_at_version(_groups(lrn, tokenizer, heldout_prompts[:8], seed=2), 3), -0.25)
    stats = lrn.train_step(off)
    assert stats.metrics["old_from_sampler"] == 1.0 and stats.metrics["logprob_mismatch"] > 0.2
    lrn.publish()  # version 4
    assert not used_sampler(_at_version(_groups(lrn, tokenizer, heldout_prompts[:8], seed=3), 4))

    forced = Learner(world.model_path, AlgoConfig(group_size=G, old_logprobs="recompute"),
                     LearnerConfig(lr=1e-3, torch_threads=1, micro_batch_size=12), 10, 0, PAD)
    assert forced.train_step(groups).metrics["old_from_sampler"] == 0.0
    # top-p / top-k sampling: the sampler's numbers are a truncated distribution's, never the policy's own
    truncated = Learner(world.model_path, AlgoConfig(group_size=G), LearnerConfig(lr=1e-3, torch_threads=1,
                        micro_batch_size=12), 10, 0, PAD, truncated_sampling=True)
    assert truncated.train_step(groups).metrics["old_from_sampler"] == 0.0


@pytest.mark.parametrize("split", ["groups", "samples"])
def test_minibatch_split_covers_every_row_once_per_epoch(world, tokenizer, heldout_prompts, split):
    """algo.minibatch_split: groups puts each group's G rows in one minibatch; samples spreads groups over the
    minibatches (as TRL shuffles), rows sorted so the shared-prefix forward still finds each group's rows together.
    Either way every row is trained once per epoch."""
    torch.set_num_threads(1)
    lrn = Learner(world.model_path, AlgoConfig(group_size=G, minibatches=2, epochs=2, minibatch_split=split),
                  LearnerConfig(lr=1e-3, torch_threads=1, micro_batch_size=12), 10, 0, PAD)
    seen = []
    step = lrn._optimizer_step
    lrn._optimizer_step = lambda mb, rows, *args, **kw: (seen.append(rows.clone()), step(mb, rows, *args, **kw))[1]
    stats = lrn.train_step(_groups(lrn, tokenizer, heldout_prompts[:8], seed=0))  # 8 groups x 4 = 32 rows
    assert math.isfinite(stats.metrics["policy_loss"]) and len(seen) == 4
    for epoch in (seen[:2], seen[2:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(32))
        groups_per_minibatch = [set((rows // G).tolist()) for rows in epoch]
        split_groups = groups_per_minibatch[0] & groups_per_minibatch[1]
        assert (len(split_groups) == 0) if split == "groups" else (len(split_groups) >= 1)
    for rows in seen:
        assert torch.equal(rows.sort().values, rows) or split == "groups"


def _tie(groups: list[Group], which: set[int], value: float = 0.6) -> list[Group]:
    """The same groups, those at positions WHICH scored VALUE on every sample (no signal: zero advantage), the
    others rescored 0, 0.2, 0.6, 1 (untied)."""
    return [Group(g.prompt, g.completions, (value,) * G if i in which else (0.0, 0.2, 0.6, 1.0))
            for i, g in enumerate(groups)]


@pytest.mark.parametrize("old", ["sampler", "recompute"])
def test_zero_advantage_rows_are_left_out_and_the_update_is_the_same(world, tokenizer, heldout_prompts, old):
    """learner.skip_zero_advantage: rows of tied groups add exactly 0 to the GRPO loss, so leaving them out of the
    forward/backward (the default) gives the update of running them. Step 1: 3 of 8 groups tied. Step 2: all tied,
    nothing runs, and Adam still steps on the zero gradient (its momentum moves the weights) as it does with it."""
    torch.set_num_threads(1)
    algo = AlgoConfig(group_size=G, minibatches=2, epochs=2, old_logprobs=old)
    skip, full = (Learner(world.model_path, algo, LearnerConfig(lr=1e-3, torch_threads=1, micro_batch_size=12,
                                                                skip_zero_advantage=s), 10, 0, PAD)
                  for s in (True, False))
    groups = _groups(full, tokenizer, heldout_prompts[:8], seed=0)
    before = {k: v.clone() for k, v in full.policy.state_dict().items()}
    for step, batch in enumerate([_tie(groups, {1, 4, 6}), _tie(groups, set(range(8)))]):
        s_skip, s_full = skip.train_step(batch), full.train_step(batch)
        assert s_full.metrics["samples_trained"] == 32
        assert s_skip.metrics["samples_trained"] == (20 if step == 0 else 0)  # 5 untied groups x 4 samples
        assert s_skip.metrics["tied_group_frac"] == s_full.metrics["tied_group_frac"] == (3 / 8 if step == 0 else 1.0)
        moved = torch.cat([(full.policy.state_dict()[k] - v).flatten() for k, v in before.items()]).norm()
        apart = torch.cat([(skip.policy.state_dict()[k] - full.policy.state_dict()[k]).flatten()
                           for k in before]).norm()
        assert moved > 1e-2 and apart < 1e-4 * moved, (step, float(moved), float(apart))
        # Adam hides a wrongly scaled gradient in the weights; the loss and the gradient's norm show it
        for key in ("policy_loss", "grad_norm"):
            assert s_skip.metrics[key] == pytest.approx(s_full.metrics[key], rel=1e-4, abs=1e-7), (step, key)
        if step == 0:
            after_step1 = {k: v.clone() for k, v in skip.policy.state_dict().items()}
    # step 2 had no gradient at all, yet moved the weights through Adam's momentum, with and without the skip
    assert s_skip.metrics["grad_norm"] == 0.0 and s_full.metrics["grad_norm"] == 0.0
    assert s_skip.metrics["clipfrac"] == s_skip.metrics["entropy"] == 0.0  # nothing ran: reported, as empty means
    assert torch.cat([(skip.policy.state_dict()[k] - v).flatten() for k, v in after_step1.items()]).norm() > 1e-2


def test_zero_advantage_rows_still_run_when_another_loss_term_reads_them(world, tokenizer, heldout_prompts):
    """An entropy bonus (or a KL loss, or a critic) gives tied rows a gradient: nothing is skipped then."""
    torch.set_num_threads(1)
    lrn = Learner(world.model_path, AlgoConfig(group_size=G, entropy_coef=0.01), LearnerConfig(
        lr=1e-3, torch_threads=1, micro_batch_size=12), 10, 0, PAD)
    stats = lrn.train_step(_tie(_groups(lrn, tokenizer, heldout_prompts[:8], seed=0), {0, 1}))
    assert stats.metrics["tied_group_frac"] == 2 / 8 and stats.metrics["samples_trained"] == 32
