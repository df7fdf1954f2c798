"""learner.data_parallel: W learner ranks (real Ray actors, torch.distributed over gloo) give the one-rank update.

Each rank runs its share of every minibatch (and of the no-grad pass) and the gradients are summed over ranks, so
after two updates every rank must hold the same bytes (weights, optimizer state, critic: `Learner.fingerprint`)
and rank 0's checkpoint must be the one-rank learner's up to float rounding, with the same metrics. The cases cover each path that crosses ranks:
the default GRPO (tied rows skipped, so ranks hold uneven shares; old log-probs from the sampler, a decision
that reads what only rank 0 knows: rank 0 publishes between updates, as the driver has it, the others never do,
and the second batch comes from the published version), the no-grad pass summed over ranks (reference and
recomputed old log-probs, entropy bonus), and PPO's critic over two epochs with the first minibatch's old
log-probs taken from its own forward pass on each rank and summed.
"""

from __future__ import annotations

import dataclasses

import pytest
import ray
import torch
from safetensors.torch import load_file

from cluster.world import PAD
from core.config import AlgoConfig, LearnerConfig
from learner.actor import Learner
from tests.integration.test_learner_algos import G, _groups

pytestmark = pytest.mark.integration

CASES = {  # name: (ranks, algo, learner config beyond the common one)
    "grpo-default, 3 ranks": (3, AlgoConfig(group_size=G, minibatches=2), {}),
    "grpo-kl-loss-recompute, 2 ranks": (2, AlgoConfig(group_size=G, minibatches=2, kl_coef=0.1, kl_mode="loss",
                                                      old_logprobs="recompute", entropy_coef=0.01), {}),
    "ppo-critic-recompute, 2 ranks": (2, AlgoConfig(estimator="ppo", group_size=G, minibatches=2, epochs=2,
                                                    old_logprobs="recompute"), {}),
    # only the adapters' gradients cross ranks; the reference is each rank's base with adapters off
    "grpo-lora-kl-loss, 2 ranks": (2, AlgoConfig(group_size=G, minibatches=2, kl_coef=0.1, kl_mode="loss"),
                                   dict(lora_rank=4, lora_alpha=8, lr=1e-2)),
}


def _state(ckpt: str) -> dict[str, torch.Tensor]:
    """Everything a checkpoint holds that the update moves: weights, AdamW moments, critic."""
    out = {f"policy.{k}": v for k, v in load_file(f"{ckpt}/model/model.safetensors").items()}
    rest = torch.load(f"{ckpt}/learner.pt", weights_only=False)
    for name in ("opt", "critic_opt"):
        for pid, st in rest.get(name, {"state": {}})["state"].items():
            out.update({f"{name}.{pid}.{k}": v for k, v in st.items() if k != "step"})
    out.update({f"critic.{k}": v for k, v in rest.get("critic", {}).items()})
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_data_parallel_ranks_train_to_the_one_rank_update(name, world, tokenizer, heldout_prompts, ray_session,
                                                          tmp_path):
    torch.set_num_threads(1)
    W, algo, extra = CASES[name]
    kw = dict(lr=1e-3, torch_threads=1, micro_batch_size=5) | extra
    one = Learner(world.model_path, algo, LearnerConfig(**kw), 10, 0, PAD)
    ranks = [ray.remote(Learner).options(num_cpus=0.1).remote(
        world.model_path, algo, LearnerConfig(data_parallel=W, **kw), 10, 0, PAD, rank=r) for r in range(W)]
    address = ray.get(ranks[0].rendezvous_address.remote(), timeout=120)
    assert ray.get([a.join.remote(address, 120) for a in ranks], timeout=120) == list(range(W))
    start = ray.get(ranks[0].fingerprint.remote(), timeout=60)
    one.save_checkpoint(str(tmp_path / "start"))
    before = _state(str(tmp_path / "start"))

    for seed in range(2):
        groups = [dataclasses.replace(g, completions=tuple(dataclasses.replace(c, policy_version=seed)
                                                           for c in g.completions))  # sampled by the version published
                  for g in _groups(one, tokenizer, heldout_prompts[:10], seed)]  # 10 prompts x 4: uneven over 3 ranks
        tied = groups[3]  # one group whose samples all tie: its rows carry no gradient and are left out
        groups[3] = dataclasses.replace(tied, completions=(tied.completions[0],) * G, rewards=(tied.rewards[0],) * G)
        expect = one.train_step(groups)
        got = ray.get([a.train_step.remote(groups) for a in ranks], timeout=300)
        one.publish()
        ray.get(ranks[0].publish.remote(), timeout=60)
        for key in ("policy_loss", "grad_norm", "entropy", "kl_ref", "value_loss", "clipfrac", "samples_trained",
                    "old_from_sampler", "logprob_mismatch"):
            if key in expect.metrics:  # (the mismatch is ~0 here: rounding of rows run in other micro-batches)
                tol = 1e-5 if key == "logprob_mismatch" else 1e-6
                assert got[0].metrics[key] == pytest.approx(expect.metrics[key], rel=1e-3, abs=tol), (seed, key)
        assert [s.metrics["grad_norm"] for s in got] == [got[0].metrics["grad_norm"]] * W
        # the cases' paths ran: vLLM's log-probs as the old ones on both updates (auto), or not; tied rows left out
        assert got[0].metrics["old_from_sampler"] == float(algo.old_logprobs == "auto"), seed
    tied_left_out = algo.estimator == "grpo" and not algo.entropy_coef and not (algo.kl_coef and algo.kl_mode == "loss")
    assert expect.metrics["samples_trained"] <= (36 if tied_left_out else 40)

    # the same gradient on every rank, so the same step: identical bytes (weights and optimizer state)
    prints = ray.get([a.fingerprint.remote() for a in ranks], timeout=120)
    assert prints == [prints[0]] * W and prints[0] != start
    one.save_checkpoint(str(tmp_path / "one"))
    ray.get(ranks[0].save_checkpoint.remote(str(tmp_path / "rank0")), timeout=120)  # rank 0 saves, as in a job
    ref, lead = _state(str(tmp_path / "one")), _state(str(tmp_path / "rank0"))
    assert lead.keys() == ref.keys() and any(k.startswith("opt.") for k in lead)
    for prefix in ("policy.", "critic."):
        keys = [k for k in lead if k.startswith(prefix)]
        if not keys:
            continue
        moved = torch.cat([(ref[k] - before[k]).flatten() for k in keys]).norm()
        apart = torch.cat([(lead[k] - ref[k]).flatten() for k in keys]).norm()
        assert moved > 1e-2 and apart < 1e-3 * moved, (prefix, float(moved), float(apart))
    for a in ranks:
        ray.kill(a)


def test_ranks_that_no_longer_match_stop_the_job_at_the_checkpoint_check(ray_session):
    """The driver's check after each checkpoint (`LearnerGroup.check_in_step`), on stand-in ranks that report
    fingerprints: equal ones pass, one differing rank raises, naming the divergence."""
    from cluster.learners import LearnerGroup

    @ray.remote(num_cpus=0)
    class Rank:
        def __init__(self, fp: str):
            self.fp = fp

        def fingerprint(self) -> str:
            return self.fp

    group = LearnerGroup.__new__(LearnerGroup)
    group.actors = [Rank.remote("a" * 64), Rank.remote("a" * 64)]
    group.check_in_step(60)
    group.actors.append(Rank.remote("b" * 64))
    with pytest.raises(RuntimeError, match=r"learner ranks diverged.*'aaaaaaaaaaaa', 'aaaaaaaaaaaa', 'bbbbbbbbbbbb'"):
        group.check_in_step(60)
