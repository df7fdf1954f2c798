"""Multi-turn samples through the real Learner (in-process, no Ray or vLLM): the environment's tokens are context,
never trained on. What the sampler logged for them changes nothing; the tokens themselves change the update,
since the model's later turns read them."""

from __future__ import annotations

import random

import pytest
import torch

from cluster.world import EOS, PAD
from core.config import AlgoConfig, LearnerConfig
from core.messages import Completion, Group, Prompt
from learner.actor import Learner

pytestmark = pytest.mark.integration

G = 4


def _episodes(learner: Learner, tokenizer, prompts: list[Prompt], reply: str, env_logprob: float, seed: int = 0):
    """Two-turn samples: random letters + EOS, the environment's REPLY (loss_mask 0, sampler log-prob ENV_LOGPROB),
    random letters + EOS; the model tokens' log-probs are the learner's own; rewards by a fixed random draw."""
    rng = random.Random(seed)
    ids_of = lambda s: tuple(tokenizer.convert_tokens_to_ids(list(s)))  # noqa: E731
    groups = []
    for p in prompts:
        comps = []
        for _ in range(G):
            a = ids_of("".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 5)))) + (EOS,)
            r = ids_of(reply)
            b = ids_of("".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 5)))) + (EOS,)
            mask = (1,) * len(a) + (0,) * len(r) + (1,) * len(b)
            comps.append(Completion(p, a + r + b, (0.0,) * len(mask), "", "stop", 0, "t", loss_mask=mask, turns=2))
        groups.append(Group(p, tuple(comps), tuple(rng.random() for _ in range(G))))
    lps = iter(learner.logprobs(groups))  # the learner's own log-probs of the model's tokens, in order
    out = []
    for g in groups:
        comps = []
        for c in g.completions:
            own = iter(next(lps))
            full = tuple(next(own) if m else env_logprob for m in c.loss_mask)
            comps.append(Completion(c.prompt, c.token_ids, full, c.text, c.finish_reason, 0, "t",
                                    loss_mask=c.loss_mask, turns=2))
        out.append(Group(g.prompt, tuple(comps), g.rewards))
    return out


@pytest.mark.parametrize("algo", [AlgoConfig(group_size=G), AlgoConfig(estimator="ppo", group_size=G, epochs=2,
                                                                       kl_coef=0.05, entropy_coef=0.01)],
                         ids=["grpo", "ppo-kl-entropy"])
def test_environment_tokens_are_context_not_training_targets(algo, world, tokenizer, heldout_prompts):
    torch.set_num_threads(1)

    def update(reply: str, env_logprob: float) -> tuple[torch.Tensor, dict]:
        lrn = Learner(world.model_path, algo, LearnerConfig(lr=1e-3, torch_threads=1), 10, 0, PAD)
        before = torch.cat([v.flatten().clone() for v in lrn.policy.state_dict().values()])
        stats = lrn.train_step(_episodes(lrn, tokenizer, heldout_prompts[:8], reply, env_logprob))
        return torch.cat([v.flatten() for v in lrn.policy.state_dict().values()]) - before, stats.metrics

    step, m = update("?abc=", 0.0)
    assert float(step.abs().max()) > 1e-4  # it trained
    # the sampler's numbers at the environment's tokens are read by nothing: the same update, bit for bit
    junk, m_junk = update("?abc=", -37.5)
    assert torch.equal(step, junk)
    assert m_junk["logprob_mismatch"] == m["logprob_mismatch"] < 1e-5 and m_junk["is_max"] == m["is_max"]
    # the reply's tokens are context: the model's second turn reads them, so other ones give another update
    other, _ = update("?hgf=", 0.0)
    assert float((other - step).norm()) > 1e-3 * float(step.norm())
    # response_len counts the model's tokens only: 2 turns of 2-6 tokens, never the 5-token reply
    assert 4 <= m["response_len"] <= 12
