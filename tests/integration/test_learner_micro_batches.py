"""learner.micro_batch_tokens (dynamic micro-batches) and per-micro-batch trimming, through the real Learner.

A long-tailed batch (completions of 1 to 40 tokens) is cut three ways: one micro-batch holding every row at
the batch's width (what the learner did before it trimmed), micro_batch_size rows each cut to its own
longest row, and a token budget over rows sorted by length. Where a row lands and how much padding it
carries must not change the update: the same weights after two steps, for the paths that read the
no-grad pass (KL to a reference, recomputed old log-probs) and PPO's critic.
"""

from __future__ import annotations

import random

import pytest
import torch

from cluster.world import EOS, PAD
from core.config import AlgoConfig, LearnerConfig
from core.messages import Completion, Group, Prompt
from learner.actor import Learner
from reward.builtin import reverse_partial

pytestmark = pytest.mark.integration

G = 4


def _long_tailed(learner: Learner, tokenizer, prompts: list[Prompt], seed: int) -> list[Group]:
    """Completions of 1-40 letters, most short (40 // k letters, k uniform in 1..40), one of 40 in the 4th group;
    scored by the task reward."""
    rng = random.Random(seed)
    groups = []
    for i, p in enumerate(prompts):
        comps = []
        for j in range(G):
            n = 40 if (i, j) == (3, 1) else 40 // rng.randint(1, 40)
            text = "".join(rng.choice("abcdefgh") for _ in range(n))
            ids = tuple(tokenizer.convert_tokens_to_ids(list(text))) + (EOS,)
            comps.append(Completion(p, ids, (0.0,) * len(ids), text, "stop", 0, "test"))
        groups.append(Group(p, tuple(comps), tuple(reverse_partial([p.text] * G, [c.text for c in comps],
                                                                   [p.answer] * G))))
    lps = learner.logprobs(groups)
    it = iter(lps)
    return [Group(g.prompt, tuple(Completion(c.prompt, c.token_ids, tuple(next(it)), c.text, c.finish_reason, 0, "t")
                                  for c in g.completions), g.rewards) for g in groups]


CASES = {
    "grpo-kl-loss-recompute": AlgoConfig(group_size=G, minibatches=2, kl_coef=0.1, kl_kind="k3", kl_mode="loss",
                                         old_logprobs="recompute", entropy_coef=0.01),
    "ppo-critic": AlgoConfig(estimator="ppo", group_size=G, minibatches=2, epochs=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_how_rows_are_cut_into_micro_batches_does_not_change_the_update(name, world, tokenizer, heldout_prompts):
    torch.set_num_threads(1)
    cuts = {"one micro-batch": dict(micro_batch_size=1000),
            "12 rows, trimmed": dict(micro_batch_size=12),
            "60-token budget": dict(micro_batch_tokens=60)}
    learners = {k: Learner(world.model_path, CASES[name], LearnerConfig(lr=1e-3, torch_threads=1, **kw), 10, 0, PAD)
                for k, kw in cuts.items()}
    ref = learners["one micro-batch"]
    nets = ("policy", "critic") if name.startswith("ppo") else ("policy",)
    before = {n: {k: v.clone() for k, v in getattr(ref, n).state_dict().items()} for n in nets}
    for seed in range(2):
        groups = _long_tailed(ref, tokenizer, heldout_prompts[:8], seed)
        lens = [len(c.token_ids) for g in groups for c in g.completions]
        assert min(lens) <= 3 and max(lens) == 41, lens  # a long tail, or the test shows nothing
        stats = {k: lrn.train_step(groups) for k, lrn in learners.items()}
    for k in ("12 rows, trimmed", "60-token budget"):
        for n in nets:
            now, other = getattr(ref, n).state_dict(), getattr(learners[k], n).state_dict()
            moved = torch.cat([(now[p] - v).flatten() for p, v in before[n].items()]).norm()
            apart = torch.cat([(other[p] - now[p]).flatten() for p in now]).norm()
            assert moved > 1e-2 and apart < 1e-3 * moved, (k, n, float(moved), float(apart))
        for key in ("policy_loss", "grad_norm", "entropy", "kl_ref", "value_loss"):
            if key in stats[k].metrics:
                assert stats[k].metrics[key] == pytest.approx(stats["one micro-batch"].metrics[key], rel=1e-3,
                                                              abs=1e-6), (k, key)


def test_logprobs_are_the_same_however_the_batch_is_cut(world, tokenizer, heldout_prompts):
    """Learner.logprobs (evaluation, tests) assembles per-micro-batch results back into the batch's row order."""
    torch.set_num_threads(1)
    algo = AlgoConfig(group_size=G)
    whole = Learner(world.model_path, algo, LearnerConfig(torch_threads=1, micro_batch_size=1000), 10, 0, PAD)
    packed = Learner(world.model_path, algo, LearnerConfig(torch_threads=1, micro_batch_tokens=50), 10, 0, PAD)
    groups = _long_tailed(whole, tokenizer, heldout_prompts[:8], 0)
    a, b = whole.logprobs(groups), packed.logprobs(groups)
    assert [len(x) for x in a] == [len(c.token_ids) for g in groups for c in g.completions] == [len(x) for x in b]
    for x, y in zip(a, b):
        assert x == pytest.approx(y, abs=1e-5)
