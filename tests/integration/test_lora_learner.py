"""learner.lora_rank through the real Learner on the real warm-started model (in-process, no Ray, no vLLM).

What leaves the learner must be the adapted model: the published blob and final_model are plain weights
that give the LoRA policy's log-probs, final_adapter is a PEFT folder peft applies to the base model with
the same result, a checkpoint resumes to the same adapters and optimizer state, and the KL reference
(the base with adapters off) is the initial model's numbers, as a separate frozen copy would give.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.world import PAD
from core.config import AlgoConfig, LearnerConfig
from core.weights import deserialize_state_dict, merge_adapters
from learner.actor import Learner
from learner.batch import collate
from tests.integration.test_learner_algos import G, _groups

pytestmark = pytest.mark.integration

LORA = dict(lr=1e-2, torch_threads=1, micro_batch_size=12, lora_rank=4, lora_alpha=8)


def _logp(model, batch) -> torch.Tensor:
    """Per-token log-probs of BATCH's completion tokens under a plain Hugging Face model (masked to 0 elsewhere)."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    return lp * batch.mask


def _learner_logp(learner: Learner, batch) -> torch.Tensor:
    with torch.no_grad():
        return learner._logp(learner.policy, batch) * batch.mask


def test_lora_trains_only_adapters_and_every_output_is_the_adapted_model(world, tokenizer, heldout_prompts, tmp_path,
                                                                        ray_session):
    torch.set_num_threads(1)
    algo = AlgoConfig(group_size=G, kl_coef=0.1, kl_kind="k3", kl_mode="loss")
    learner = Learner(world.model_path, algo, LearnerConfig(**LORA), 10, 0, PAD)
    assert learner.ref is None  # the reference is the base with adapters off, not a second copy
    base = AutoModelForCausalLM.from_pretrained(world.model_path, dtype=torch.float32).eval()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}

    stats = [learner.train_step(_groups(learner, tokenizer, heldout_prompts[:8], seed)) for seed in range(3)]
    assert all(math.isfinite(v) for s in stats for v in s.metrics.values())
    assert stats[0].metrics["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # fresh adapters: policy == reference
    assert stats[2].metrics["kl_ref"] > 1e-6
    info = learner.info()
    assert 0 < info["trainable_params"] < info["params"] / 5

    # the frozen weights did not move (read through the merged names: every non-adapted tensor is the base's)
    merged_now = {k: v for k, v in learner.policy.state_dict().items() if "lora_" not in k}
    for k, v in merged_now.items():
        assert torch.equal(v, frozen[k.replace(".base_layer.", ".")]), k

    batch = collate(_groups(learner, tokenizer, heldout_prompts[8:14], seed=9), PAD)
    mine = _learner_logp(learner, batch)
    assert (mine - _logp(base, batch)).abs().max() > 1e-3  # the adapters moved the policy
    # the reference pass is the initial model's numbers
    pre = learner._no_grad_pass(batch, recompute=False)
    torch.testing.assert_close(pre["ref"] * batch.mask, _logp(base, batch), atol=1e-5, rtol=0)

    # what the generators get: plain weights under the model's own names, giving the LoRA policy's log-probs
    import ray  # ray_session's: publish puts the blob in its object store

    # learner.lora_sync=adapter (default): the adapters alone, which a generator merges into its base
    handle = learner.publish()
    assert handle.lora is not None and handle.lora.scale == LORA["lora_alpha"] / LORA["lora_rank"]
    published = AutoModelForCausalLM.from_pretrained(handle.lora.base_path, dtype=torch.float32).eval()
    adapters = deserialize_state_dict(ray.get(handle.blob_ref[0]), handle.checksum)
    published.load_state_dict(merge_adapters(published.state_dict(), adapters, handle.lora.scale))
    torch.testing.assert_close(_logp(published, batch), mine, atol=1e-5, rtol=0)
    # learner.lora_sync=merged: the merged model itself
    learner._sync_adapters = False
    handle = learner.publish()
    assert handle.lora is None
    published = AutoModelForCausalLM.from_pretrained(world.model_path, dtype=torch.float32).eval()
    published.load_state_dict(deserialize_state_dict(ray.get(handle.blob_ref[0]), handle.checksum))
    torch.testing.assert_close(_logp(published, batch), mine, atol=1e-5, rtol=0)

    # final_model (transformers loads it) and final_adapter (peft applies it to the base): the same policy
    import peft

    learner.save(str(tmp_path / "final_model"), str(tmp_path / "final_adapter"))
    assert not (tmp_path / "final_model" / "adapter_config.json").exists()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final_model", dtype=torch.float32).eval()
    torch.testing.assert_close(_logp(final, batch), mine, atol=1e-5, rtol=0)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "final_adapter").eval()
    torch.testing.assert_close(_logp(with_adapter, batch), mine, atol=1e-5, rtol=0)

    # a checkpoint resumes to the same adapters and optimizer state, then the same next update
    learner.save_checkpoint(str(tmp_path / "ckpt"))
    resumed = Learner(world.model_path, algo, LearnerConfig(**LORA), 10, 0, PAD)
    assert resumed.fingerprint() != learner.fingerprint()
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    assert resumed.fingerprint() == learner.fingerprint()
    nxt = _groups(learner, tokenizer, heldout_prompts[:8], seed=5)
    a, b = learner.train_step(nxt), resumed.train_step(nxt)
    assert resumed.fingerprint() == learner.fingerprint()
    assert a.metrics["policy_loss"] == b.metrics["policy_loss"]


def test_lora_ppo_critic_has_its_own_adapters_and_a_full_value_head(world, tokenizer, heldout_prompts):
    torch.set_num_threads(1)
    learner = Learner(world.model_path, AlgoConfig(estimator="ppo", group_size=G, epochs=2),
                      LearnerConfig(**LORA), 10, 0, PAD)
    trainable = {n for n, p in learner.critic.named_parameters() if p.requires_grad}
    assert "head.weight" in trainable and all(n.startswith("head.") or "lora_" in n for n in trainable)
    critic_before = {n: p.detach().clone() for n, p in learner.critic.named_parameters()}
    policy_a = {n: p for n, p in learner.policy.named_parameters() if "lora_A" in n}
    for seed in range(2):
        s = learner.train_step(_groups(learner, tokenizer, heldout_prompts[:8], seed))
        assert math.isfinite(s.metrics["value_loss"]) and s.metrics["grad_norm"] > 0
    critic_after = {n: p.detach() for n, p in learner.critic.named_parameters()}
    assert all(torch.equal(critic_after[n], v) for n, v in critic_before.items() if n not in trainable)
    assert float((critic_after["head.weight"] - critic_before["head.weight"]).abs().max()) > 0
    moved_lora = [n for n in trainable if "lora_B" in n and float(critic_after[n].abs().max()) > 0]
    assert moved_lora
    # the critic's adapters are its own parameters, not the policy's
    body_a = {n.removeprefix("body."): p for n, p in critic_after.items() if "lora_A" in n}
    assert all(body_a[n.removeprefix("model.")].data_ptr() != p.data_ptr() for n, p in policy_a.items())
