"""learner/forward.py: running each group's prompt once gives the plain forward's log-probs and gradients.

The batch has what real batches have: prompts of different lengths, completions of different lengths
(one empty, one one token long), two groups with the same prompt text, and micro-batches that cut a
group in two.
"""
import pytest
import torch
from torch.testing import assert_close

from core.messages import Completion, Group, Prompt
from learner import algos
from learner.batch import collate
from learner.forward import ValueModel, batch_logits, plain_logits, shared_prefix_logits

CPU = torch.device("cpu")
VOCAB = 24


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _group(uid: int, prompt: list[int], completions: list[list[int]]) -> Group:
    p = Prompt(uid=uid, text="", token_ids=tuple(prompt), answer="")
    comps = tuple(Completion(p, tuple(c), tuple(0.0 for _ in c), "", "stop", 0, "g") for c in completions)
    return Group(p, comps, tuple(float(i) for i in range(len(completions))))


def _batch():
    g = torch.Generator().manual_seed(1)

    def toks(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    groups = [
        _group(0, [1, *toks(6)], [toks(5), toks(3), toks(1), toks(6)]),
        _group(1, [1, *toks(2)], [toks(4), [], toks(6), toks(2)]),     # short prompt, one empty completion
        _group(2, [1, *toks(9)], [toks(6), toks(6), toks(5), toks(3)]),  # the longest prompt
    ]
    groups.append(_group(3, list(groups[0].prompt.token_ids), [toks(2), toks(4), toks(6), toks(1)]))  # same text
    return collate(groups, pad_id=0)


def _logp_and_grads(model, b, fn):
    model.zero_grad(set_to_none=True)
    logits = fn(model, b, CPU)
    logp = algos.token_logprobs(logits, b.input_ids[:, 1:])
    loss = algos.masked_mean(logp * torch.linspace(-1, 1, logp.shape[1]), b.mask)  # weights differ by position
    loss.backward()
    return logp.detach() * b.mask, torch.cat([p.grad.flatten() for p in model.parameters()])


def test_shared_prefix_matches_plain_forward_in_logprobs_and_gradients(model):
    b = _batch()
    lp0, g0 = _logp_and_grads(model, b, plain_logits)
    lp1, g1 = _logp_and_grads(model, b, shared_prefix_logits)
    assert b.mask.sum() == 5 + 3 + 1 + 6 + 4 + 0 + 6 + 2 + 6 + 6 + 5 + 3 + 2 + 4 + 6 + 1
    assert_close(lp1, lp0, atol=1e-5, rtol=0)
    assert_close(g1, g0, atol=1e-6, rtol=1e-4)
    # what is compared is not trivially equal: log-probs spread over several nats, gradients are not zero
    assert float(lp0.min()) < -3.0 and float(g0.abs().max()) > 1e-3


def test_shared_prefix_micro_batches_that_cut_a_group(model):
    b = _batch()
    full, _ = _logp_and_grads(model, b, plain_logits)
    for lo, hi in [(0, 3), (3, 9), (9, 16)]:  # every cut falls inside a group of 4
        mb = b.rows(torch.arange(lo, hi))
        lp, _ = _logp_and_grads(model, mb, shared_prefix_logits)
        assert_close(lp, full[lo:hi, : lp.shape[1]], atol=1e-5, rtol=0)


def test_the_tolerance_can_fail_a_wrong_prompt_is_caught(model):
    """Guard for the tests above: give group 1's rows group 0's prompt cache and the log-probs move by far more
    than the tolerance."""
    b = _batch()
    lp0, _ = _logp_and_grads(model, b, plain_logits)
    wrong = b.rows(torch.arange(16))
    wrong = type(b)(**{**wrong.__dict__, "group_id": torch.tensor([0] * 8 + [2] * 4 + [3] * 4)})
    wrong_lp = (algos.token_logprobs(shared_prefix_logits(model, wrong, CPU), b.input_ids[:, 1:]) * b.mask).detach()
    assert float((wrong_lp[4:8] - lp0[4:8]).abs().max()) > 1e-2


def test_batch_logits_uses_the_plain_pass_when_no_prompt_repeats(model):
    b = _batch()
    one_per_group = b.rows(torch.tensor([0, 4, 8, 12]))
    assert_close(batch_logits(model, one_per_group, CPU, shared_prefix=True),
                 plain_logits(model, one_per_group, CPU), atol=0, rtol=0)


def test_the_critic_runs_the_shared_prefix_too_same_values_and_gradients(model):
    """PPO's critic answers like a one-entry causal LM, so the same shared-prefix pass serves it: its values at
    every position that predicts a completion token (the ones GAE and the value loss read) and its gradients
    equal the plain pass's."""
    critic = ValueModel(model)
    torch.nn.init.normal_(critic.head.weight, std=1.0)  # the real head starts at zero: every value would be 0
    b = _batch()

    def values_and_grads(fn):
        critic.zero_grad(set_to_none=True)
        v = fn(critic, b, CPU)[..., 0]
        assert v.shape == b.mask.shape
        loss = algos.masked_mean((v - torch.linspace(-1, 1, v.shape[1])) ** 2, b.mask)  # a value loss
        loss.backward()
        return v.detach() * b.mask, torch.cat([p.grad.flatten() for p in critic.parameters()])

    v0, g0 = values_and_grads(plain_logits)
    v1, g1 = values_and_grads(shared_prefix_logits)
    assert_close(v1, v0, atol=1e-5, rtol=0)
    scale = float(g0.abs().max())  # ~400: the random head makes them far larger than the policy test's
    assert_close(g1, g0, atol=1e-7 * scale, rtol=1e-4)
    assert float(v0.abs().max()) > 0.1 and scale > 1e-3  # not trivially equal
