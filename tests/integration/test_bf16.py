"""Real Ray + real vLLM in bfloat16: generator.dtype=bfloat16 with learner.compute_dtype=bfloat16.

The learner keeps float32 weights and autocasts its matmuls to bf16; it publishes its weights in bf16, and
bf16 generators serve exactly those. The sampler's log-probs are then not the learner's own numbers, so the
PPO ratio's old log-probs are recomputed (algo.old_logprobs=auto), and a real job still learns."""

from __future__ import annotations

import pytest
import ray
import torch

from cluster.world import PAD
from core.config import AlgoConfig, Config, LearnerConfig
from core.messages import Group
from core.weights import deserialize_state_dict
from learner.actor import Learner
from reward.builtin import reverse_partial

pytestmark = pytest.mark.integration

BF16 = "bfloat16"


@pytest.fixture(scope="module")
def bf16_pool(ray_session, world):
    from actors.generator import EngineSettings
    from actors.pool import GeneratorPool

    pool = GeneratorPool(EngineSettings(model_path=world.model_path, max_model_len=64, dtype=BF16), num_cpus=1,
                         num_gpus=0, startup_timeout_s=300, call_timeout_s=120, sync_timeout_s=120,
                         log=lambda *_: None, name_prefix="bf16-generator", verify_sync=True)
    pool.start(1)
    yield pool
    pool.shutdown()


def _groups(pool, prompts, n, seed):
    comps = pool.generate(prompts, n=n, temperature=1.0, max_new_tokens=8, seed=seed)
    scores = reverse_partial([c.prompt.text for c in comps], [c.text for c in comps], [c.prompt.answer for c in comps])
    return [Group(comps[i].prompt, tuple(comps[i:i + n]), tuple(scores[i:i + n])) for i in range(0, len(comps), n)]


def _mismatch(groups, learner_lps) -> list[float]:
    sampler = [lp for g in groups for c in g.completions for lp in c.logprobs]
    learner = [lp for row in learner_lps for lp in row]
    assert len(sampler) == len(learner) >= 3 * sum(len(g.completions) for g in groups)
    return [abs(a - b) for a, b in zip(sampler, learner)]


def test_bf16_learner_autocasts_float32_weights_with_eager_attention(world):
    """learner.compute_dtype=bfloat16 on CPU: float32 parameters, bf16 logits under its autocast, eager attention
    (torch's CPU SDPA backward is slow in bf16), and never vLLM's log-probs as old ones under auto."""
    ids = torch.tensor([[1, 3, 4, 5, 6]])
    got = {}
    for dtype, sampler in (("float32", "float32"), (BF16, BF16), ("float32", BF16)):
        learner = Learner(world.model_path, AlgoConfig(), LearnerConfig(compute_dtype=dtype), 10, 0, PAD, sampler)
        assert all(p.dtype == torch.float32 for p in learner.policy.parameters())
        with learner.autocast():
            logits = learner.policy(input_ids=ids).logits
        got[dtype, sampler] = (logits.dtype, learner.policy.config._attn_implementation, learner._sampler_exact)
    assert got == {("float32", "float32"): (torch.float32, "sdpa", True),
                   (BF16, BF16): (torch.bfloat16, "eager", False),
                   ("float32", BF16): (torch.float32, "sdpa", False)}  # bf16 generators alone: recompute too


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def test_bf16_weights_reach_bf16_generators_and_old_logprobs_are_recomputed(bf16_pool, world, heldout_prompts):
    from safetensors.torch import load_file

    learner = ray.remote(Learner).options(num_cpus=1).remote(
        world.model_path, AlgoConfig(), LearnerConfig(lr=5e-3, compute_dtype=BF16), 10, 0, PAD, BF16)
    try:
        # the published blob holds the learner's float32 weights rounded to bf16, nothing else
        handle = ray.get(learner.publish.remote(), timeout=60)
        sent = deserialize_state_dict(ray.get(handle.blob_ref[0], timeout=60), handle.checksum)
        start = load_file(f"{world.model_path}/model.safetensors")
        assert set(sent) == set(start)
        for k, t in sent.items():
            assert t.dtype == torch.bfloat16 and torch.equal(t, start[k].to(torch.bfloat16)), k
        assert handle.num_bytes < sum(t.numel() for t in start.values()) * 4 * 0.55  # half float32's bytes

        engine_dtypes = {str(ray.get(a.__ray_call__.remote(lambda g: g.llm.llm_engine.model_config.dtype), timeout=60))
                         for a in bf16_pool.actors.values()}
        assert engine_dtypes == {"torch.bfloat16"}
        bf16_pool.sync(handle)  # verify_sync: the generator confirms the version and fingerprints its weights
        groups = _groups(bf16_pool, heldout_prompts[:32], 4, seed=5)
        before = _mismatch(groups, ray.get(learner.logprobs.remote(groups), timeout=120))
        # bf16 on both sides, different kernels (vLLM's CPU linears and attention against transformers' eager
        # attention under autocast): the same weights agree to bf16 rounding, measured 5e-3 on average per token
        # (0.12 at most, on unlikely tokens), where float32 on both sides agrees to ~3e-7
        assert _mean(before) < 0.02

        stats = [ray.get(learner.train_step.remote(_groups(bf16_pool, heldout_prompts[32:48], 8, s)), timeout=120)
                 for s in range(2)]
        # not float32 on both sides: algo.old_logprobs=auto recomputes instead of taking vLLM's numbers
        assert [s.metrics["old_from_sampler"] for s in stats] == [0.0, 0.0]
        # two updates at lr 5e-3 move the learner's log-probs of the same samples far outside that tolerance
        after = _mismatch(groups, ray.get(learner.logprobs.remote(groups), timeout=120))
        assert _mean(after) > 1.0  # measured 5.5

        # published again, the generator serves the new weights: back within bf16 rounding of the learner
        bf16_pool.sync(ray.get(learner.publish.remote(), timeout=60))
        assert bf16_pool.versions() == {name: 2 for name in bf16_pool.actors}
        regenerated = _groups(bf16_pool, heldout_prompts[:32], 4, seed=5)
        assert _mean(_mismatch(regenerated, ray.get(learner.logprobs.remote(regenerated), timeout=120))) < 0.02
    finally:
        ray.kill(learner)


def test_default_job_learns_in_bf16(ray_session, tmp_path, default_cfg):
    """The default job (2 generators, verified syncs) with bf16 generators and a bf16-autocast learner, shortened
    to 30 steps: held-out greedy accuracy (vLLM, bf16) rises well past the warm start's."""
    from cluster.driver import run

    cfg = Config()
    cfg.model.cache_dir = default_cfg.model.cache_dir
    cfg.run_dir, cfg.run_name = str(tmp_path), "bf16"
    cfg.steps, cfg.eval_every, cfg.checkpoint_every = 30, 30, 0
    cfg.reward.num_cpus = 0.1
    cfg.generator.dtype, cfg.learner.compute_dtype = BF16, BF16
    cfg.rollout.verify_sync = True
    s = run(cfg, log=lambda *_: None)
    assert s["steps"] == 30 and s["syncs_verified"] >= 29
    assert s["accounting"]["prompts_trained"] == 30 * cfg.prompts_per_step
    assert s["heldout_accuracy_after"] > s["heldout_accuracy_before"] + 0.2, s
