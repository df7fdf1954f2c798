"""Unit tests for learner/algos.py.

Expected values are worked out by hand in the comments next to each assertion.
Mask convention: 1 = trained completion token, 0 = padding; rows are right-padded.
"""
import math

import pytest
import torch
from torch.testing import assert_close

from learner import algos as A

ATOL = 1e-6
BIG = 1e6  # garbage written into padding positions
NAN = float("nan")


def close(actual, expected, atol=ATOL):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert_close(actual, expected, atol=atol, rtol=0)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


MASK = t([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # lengths 3, 1, 0


# --------------------------------------------------------------------------- masked reductions

def test_masked_sum_mean_var():
    x = t([[1, 2, 3, NAN], [4, BIG, -BIG, BIG], [BIG, BIG, BIG, BIG]])
    close(A.masked_sum(x, MASK), 10.0)                     # 1+2+3+4
    close(A.masked_sum(x, MASK, dim=-1), [6.0, 4.0, 0.0])
    close(A.masked_mean(x, MASK), 2.5)                     # 10/4
    close(A.masked_mean(x, MASK, dim=-1), [2.0, 4.0, 0.0])  # empty row -> 0, not NaN
    # values 1,2,3,4: mean 2.5, squared deviations 2.25+.25+.25+2.25 = 5 -> var 5/4
    close(A.masked_var(x, MASK), 1.25)
    assert A.masked_var(x, MASK).dim() == 0


def test_masked_mean_all_masked_is_zero():
    x = torch.full((2, 3), BIG)
    close(A.masked_mean(x, torch.zeros(2, 3)), 0.0)
    close(A.masked_mean(x, torch.zeros(2, 3), dim=-1), [0.0, 0.0])
    close(A.masked_mean(x, torch.zeros(2, 3, dtype=torch.bool)), 0.0)


def test_masked_whiten():
    x = t([[1, 2, 3, BIG]])
    m = t([[1, 1, 1, 0]])
    # mean 2, var (1+0+1)/3 = 2/3 -> (x-2)/sqrt(2/3) = [-1.2247449, 0, 1.2247449], pad -> 0
    s = math.sqrt(2 / 3 + 1e-8)
    close(A.masked_whiten(x, m), [[-1 / s, 0.0, 1 / s, 0.0]])
    # shift_mean=False adds the mean back: [2 - 1.2247, 2, 2 + 1.2247], pad -> 0
    close(A.masked_whiten(x, m, shift_mean=False), [[2 - 1 / s, 2.0, 2 + 1 / s, 0.0]])


# --------------------------------------------------------------------------- outcome advantages

def test_grpo_advantages():
    r = t([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 3]])
    eps = 1e-6
    # row0: mean .5, population std .5 -> [.5,-.5,-.5,.5]/(.5+eps) = [1,-1,-1,1] (up to eps)
    # row1: identical rewards -> 0/(0+eps) = 0
    # row2: mean .75, dev [-.75,-.75,-.75,2.25], var (3*.5625+5.0625)/4 = 1.6875
    s2 = math.sqrt(1.6875)
    exp = [[0.5 / (0.5 + eps), -0.5 / (0.5 + eps), -0.5 / (0.5 + eps), 0.5 / (0.5 + eps)],
           [0.0, 0.0, 0.0, 0.0],
           [-0.75 / (s2 + eps)] * 3 + [2.25 / (s2 + eps)]]
    close(A.grpo_advantages(r), exp)
    close(A.grpo_advantages(r, scale_by_std=False),
          [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [-0.75, -0.75, -0.75, 2.25]])


def test_grpo_edges_group_of_one_and_identical():
    close(A.grpo_advantages(t([[3.0], [-2.0]])), [[0.0], [0.0]])
    adv = A.grpo_advantages(t([[5, 5, 5]]))
    assert torch.isfinite(adv).all()
    close(adv, [[0.0, 0.0, 0.0]])
    # int input: mean .5, population std .5 -> +-.5/(.5+eps)
    close(A.grpo_advantages(torch.tensor([[1, 0]])), [[0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6)]])


def test_tied_groups_get_exactly_zero_advantage_whatever_the_rounding():
    # eight float32 rewards of 0.6: their float mean misses 0.6 by ~6e-8, and so does the std; the old
    # (r - mean) / (std + 1e-6) then gave every sample 6e-8 / (6e-8 + 1e-6) = 0.056, one sign for the group.
    # A tied group carries no signal: exactly 0 (equality, not a tolerance), for every estimator built on a baseline
    for r in (t([[0.6] * 8, [0.1] * 8]), t([[0.7] * 7]), t([[0.3] * 6])):
        for f in (A.grpo_advantages, A.dr_grpo_advantages, A.rloo_advantages):
            assert (f(r) == 0).all(), (f.__name__, r[0, 0].item(), r.shape)
    # one differing reward in the group: not tied, a full-size advantage (8 rewards, 7 x 0.6 and 1 x 0.8:
    # mean 0.625, std sqrt(7 * 0.025^2 + 0.175^2) / sqrt(8) = 0.06614 -> the odd one gets 0.175 / 0.06614 = 2.6458)
    adv = A.grpo_advantages(t([[0.6] * 7 + [0.8]]))
    assert adv[0, 7].item() == pytest.approx(math.sqrt(7), rel=1e-4)


def test_dr_grpo_advantages():
    # r - group mean, no std: [1,0,0,1] -> mean .5 ; [0,0,0,3] -> mean .75
    close(A.dr_grpo_advantages(t([[1, 0, 0, 1], [0, 0, 0, 3]])),
          [[0.5, -0.5, -0.5, 0.5], [-0.75, -0.75, -0.75, 2.25]])


def test_rloo_advantages():
    # [1,0,0,1]: i=0 -> 1 - (0+0+1)/3 = 2/3 ; i=1 -> 0 - (1+0+1)/3 = -2/3
    # [0,0,0,3]: i=0 -> 0 - (0+0+3)/3 = -1 ; i=3 -> 3 - 0 = 3
    close(A.rloo_advantages(t([[1, 0, 0, 1], [0, 0, 0, 3]])),
          [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [-1, -1, -1, 3]])
    close(A.rloo_advantages(t([[1, 3]])), [[-2.0, 2.0]])  # 1-3, 3-1
    close(A.rloo_advantages(t([[1.0], [7.0]])), [[0.0], [0.0]])  # G == 1
    close(A.rloo_advantages(t([[2, 2, 2]])), [[0.0, 0.0, 0.0]])


def test_reinforce_baseline_advantages():
    # batch mean of [1,0,0,3] = 1 -> [[0,-1],[-1,2]]
    close(A.reinforce_baseline_advantages(t([[1, 0], [0, 3]])), [[0.0, -1.0], [-1.0, 2.0]])


def test_broadcast_to_tokens():
    m = t([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    close(A.broadcast_to_tokens(t([1.5, -2.0, 9.0]), m), [[1.5, 1.5, 0], [-2, 0, 0], [0, 0, 0]])


KL = t([[0.1, 0.2, 0.3, BIG], [0.4, NAN, 7, 7], [1, 1, 1, 1]])
R_B = t([1.0, 2.0, 5.0])


def test_token_rewards():
    # row0: -.5*[.1,.2,.3] = [-.05,-.1,-.15], +1 at t=2 -> [-.05,-.1,.85,0]
    # row1: -.5*.4 = -.2, +2 at t=0 -> [1.8,0,0,0]
    # row2: no valid token -> zeros (outcome reward 5 is dropped)
    close(A.token_rewards(R_B, MASK, KL, kl_coef=0.5),
          [[-0.05, -0.1, 0.85, 0], [1.8, 0, 0, 0], [0, 0, 0, 0]])
    close(A.token_rewards(R_B, MASK), [[0, 0, 1, 0], [2, 0, 0, 0], [0, 0, 0, 0]])
    m2 = t([[1, 1, 0], [1, 1, 1]])
    close(A.token_rewards(t([3, 4]), m2.bool()), [[0, 3, 0], [0, 0, 4]])


def test_reinforce_pp_returns():
    # return-to-go (gamma=1) of token rewards [-.05,-.1,.85]: t2 .85, t1 .75, t0 .70 ; row1 [1.8]
    close(A.reinforce_pp_returns(R_B, KL, MASK, kl_coef=0.5),
          [[0.70, 0.75, 0.85, 0], [1.8, 0, 0, 0], [0, 0, 0, 0]])
    # kl_coef=0 -> every valid token gets the outcome reward
    close(A.reinforce_pp_returns(R_B, KL, MASK, kl_coef=0.0), [[1, 1, 1, 0], [2, 0, 0, 0], [0, 0, 0, 0]])


# --------------------------------------------------------------------------- GAE

def gae_reference(rewards, values, mask, gamma, lam):
    """Slow pure-Python GAE on nested lists, straight from the definition."""
    adv_out, ret_out = [], []
    for r, v, m in zip(rewards, values, mask):
        T = len(r)
        adv = [0.0] * T
        for i in reversed(range(T)):
            if not m[i]:
                continue
            m_next = m[i + 1] if i + 1 < T else 0
            v_next = v[i + 1] if m_next else 0.0
            a_next = adv[i + 1] if m_next else 0.0
            delta = r[i] + gamma * v_next - v[i]
            adv[i] = delta + gamma * lam * a_next
        adv_out.append(adv)
        ret_out.append([adv[i] + v[i] if m[i] else 0.0 for i in range(T)])
    return adv_out, ret_out


def test_gae_by_hand():
    g, lam = 0.9, 0.8
    r = t([[0, 0, 1, BIG], [2, NAN, 0, 0]])
    v = t([[0.5, 0.6, 0.7, BIG], [0.5, NAN, BIG, 0]])
    m = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    # row0: d2 = 1 - .7 = .3 (no bootstrap after the last token) ; A2 = .3
    #       d1 = 0 + .9*.7 - .6 = .03 ; A1 = .03 + .72*.3 = .246
    #       d0 = 0 + .9*.6 - .5 = .04 ; A0 = .04 + .72*.246 = .21712
    #       returns = A + V = [.71712, .846, 1.0]
    # row1: A0 = 2 - .5 = 1.5 ; return 2.0
    adv, ret = A.gae(r, v, m, g, lam)
    close(adv, [[0.21712, 0.246, 0.3, 0], [1.5, 0, 0, 0]])
    close(ret, [[0.71712, 0.846, 1.0, 0], [2.0, 0, 0, 0]])


def test_gae_skips_environment_tokens_between_turns():
    # multi-turn row: model tokens at 0, 1 and 4; positions 2-3 are an environment's reply (mask 0, garbage in
    # r and v there). GAE runs over the model's tokens as if the reply were not there:
    g, lam = 0.9, 0.8
    r = t([[0, 0, BIG, BIG, 1]])
    v = t([[0.5, 0.6, NAN, BIG, 0.7]])
    m = t([[1, 1, 0, 0, 1]])
    # the same numbers as test_gae_by_hand's row 0 with the gap closed: A = [.21712, .246, .3] at 0, 1, 4
    # (d1 = 0 + .9 * V4 - V1 = .03 bootstraps from the next turn's first token, not 0 as at an episode's end)
    adv, ret = A.gae(r, v, m, g, lam)
    close(adv, [[0.21712, 0.246, 0, 0, 0.3]])
    close(ret, [[0.71712, 0.846, 0, 0, 1.0]])


def test_gae_gamma_lam_one_is_monte_carlo():
    # gamma = lam = 1: returns are plain reward-to-go, advantages = RTG - V
    r = t([[1, 2, 3]])
    v = t([[0.5, 0.25, 1.0]])
    adv, ret = A.gae(r, v, torch.ones(1, 3), 1.0, 1.0)
    close(ret, [[6.0, 5.0, 3.0]])
    close(adv, [[5.5, 4.75, 2.0]])


def _right_padded_mask(B, T, gen):
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[0], lengths[1] = 0, T  # always cover the empty and the full row
    return (torch.arange(T)[None, :] < lengths[:, None]).float()


def test_gae_matches_reference_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    B, T = 6, 9
    for gamma, lam in [(1.0, 1.0), (0.99, 0.95), (0.9, 0.8), (0.5, 0.0)]:
        m = _right_padded_mask(B, T, gen)
        r = torch.randn(B, T, generator=gen, dtype=torch.float64)
        v = torch.randn(B, T, generator=gen, dtype=torch.float64)
        exp_adv, exp_ret = gae_reference(r.tolist(), v.tolist(), m.bool().tolist(), gamma, lam)
        r_garbage = torch.where(m.bool(), r, BIG)
        v_garbage = torch.where(m.bool(), v, -BIG)
        adv, ret = A.gae(r_garbage, v_garbage, m, gamma, lam)
        assert_close(adv, torch.tensor(exp_adv, dtype=torch.float64), atol=1e-10, rtol=0)
        assert_close(ret, torch.tensor(exp_ret, dtype=torch.float64), atol=1e-10, rtol=0)


def test_gae_outputs_are_detached():
    v = torch.ones(1, 2, requires_grad=True)
    adv, ret = A.gae(torch.ones(1, 2), v, torch.ones(1, 2), 1.0, 1.0)
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------- critic

def _value_inputs():
    v = t([[1.0, 2.0, 3.0, BIG]]).requires_grad_()
    old = t([[1.5, 1.5, 1.5, NAN]])
    R = t([[2.0, 2.0, 0.0, -BIG]])
    m = t([[1, 1, 1, 0]])
    return v, old, R, m


def test_value_loss_unclipped():
    v, old, R, m = _value_inputs()
    # 0.5*[(1-2)^2, (2-2)^2, (3-0)^2] = [.5, 0, 4.5] -> mean 5/3
    loss = A.value_loss(v, old, R, m)
    close(loss, 5 / 3)
    loss.backward()
    # dL/dV = (V-R)/3 = [-1/3, 0, 1], 0 at the pad
    close(v.grad, [[-1 / 3, 0.0, 1.0, 0.0]])


def test_value_loss_clipped():
    v, old, R, m = _value_inputs()
    # clip(V, 1.3, 1.7) = [1.3, 1.7, 1.7] ; (Vc-R)^2 = [.49, .09, 2.89] ; (V-R)^2 = [1, 0, 9]
    # max -> [1, .09, 9] -> 0.5* -> [.5, .045, 4.5] -> mean 5.045/3
    loss = A.value_loss(v, old, R, m, clip_eps=0.2)
    close(loss, 5.045 / 3)
    loss.backward()
    # token 1 takes the clipped branch (constant) -> grad 0 ; others (V-R)/3
    close(v.grad, [[-1 / 3, 0.0, 1.0, 0.0]])


def test_value_loss_all_masked():
    v, old, R, _ = _value_inputs()
    close(A.value_loss(v, old, R, torch.zeros(1, 4), clip_eps=0.2), 0.0)


def test_explained_variance():
    m = t([[1, 1, 1, 0]])
    R = t([[1, 2, 3, BIG]])
    V = t([[1, 2, 2, NAN]])
    # R-V = [0,0,1]: mean 1/3, var (1/9+1/9+4/9)/3 = 2/9 ; var(R) = 2/3 -> EV = 1 - (2/9)/(2/3) = 2/3
    close(A.explained_variance(V, R, m), 2 / 3)
    close(A.explained_variance(R, R, m), 1.0)
    # constant returns -> var(R) = 0 -> 0, not NaN
    close(A.explained_variance(V, t([[4, 4, 4, BIG]]), m), 0.0)
    close(A.explained_variance(V, R, torch.zeros(1, 4)), 0.0)


# --------------------------------------------------------------------------- KL

def test_kl_estimators():
    logp = t([math.log(0.5), math.log(0.25)])
    ref = t([math.log(0.25), math.log(0.5)])
    l2 = math.log(2)
    close(A.kl_estimate(logp, ref, "k1"), [l2, -l2])                 # logp - ref
    close(A.kl_estimate(logp, ref, "k2"), [0.5 * l2 ** 2] * 2)       # .5*(+-log2)^2
    # k3: ref-logp = [-log2, log2] -> exp = [.5, 2] -> [.5+log2-1, 2-log2-1]
    close(A.kl_estimate(logp, ref, "k3"), [l2 - 0.5, 1 - l2])
    close(A.kl_estimate(logp, logp, "k3"), [0.0, 0.0])
    with pytest.raises(ValueError):
        A.kl_estimate(logp, ref, "k4")


def test_kl_k3_is_finite_for_garbage():
    logp = t([0.0, -BIG]).requires_grad_()
    ref = t([-BIG, 0.0])
    k3 = A.kl_estimate(logp, ref, "k3")
    assert torch.isfinite(k3).all()
    k3.sum().backward()
    assert torch.isfinite(logp.grad).all()


# --------------------------------------------------------------------------- aggregation

LOSS = t([[1, 2, 3, BIG], [4, NAN, BIG, BIG], [BIG, BIG, BIG, BIG]])


@pytest.mark.parametrize("mode,norm,expected", [
    ("token-mean", None, 2.5),                  # (1+2+3+4)/4
    ("seq-mean-token-mean", None, 3.0),         # row means [2, 4]; empty row excluded
    ("seq-mean-token-sum", None, 10 / 3),       # row sums [6, 4, 0] / 3 rows
    ("seq-mean-token-sum-norm", 4.0, 10 / 12),  # 10 / (B=3 * 4)
])
def test_aggregate_modes(mode, norm, expected):
    close(A.aggregate(LOSS, MASK, mode, norm), expected)
    close(A.aggregate(LOSS, MASK.bool(), mode, norm), expected)
    close(A.aggregate(LOSS, torch.zeros(3, 4), mode, norm), 0.0)  # all masked -> 0


def test_aggregate_errors():
    with pytest.raises(ValueError):
        A.aggregate(LOSS, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError):
        A.aggregate(LOSS, MASK, "sum")


def test_aggregate_seq_mean_token_mean_matches_loop():
    gen = torch.Generator().manual_seed(1)
    B, T = 7, 5
    m = _right_padded_mask(B, T, gen)
    loss = torch.randn(B, T, generator=gen, dtype=torch.float64)
    row_means = []
    for b in range(B):
        vals = [loss[b, i].item() for i in range(T) if m[b, i]]
        if vals:
            row_means.append(sum(vals) / len(vals))
    expected = sum(row_means) / len(row_means)
    assert_close(A.aggregate(loss, m, "seq-mean-token-mean"),
                 torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- policy loss

# Five valid tokens (ratio r, advantage A), clip_low .2, clip_high .28:
#   a: A=+1 r=1.5 -> pg1 -1.5, pg2 -1.28 -> -1.28 (clipped)
#   b: A=-1 r=0.5 -> pg1   .5, pg2   .8  ->   .8  (clipped)
#   c: A=+1 r=1.1 -> pg1 -1.1, pg2 -1.1  -> -1.1
#   d: A=-1 r=1.5 -> pg1  1.5, pg2  1.28 ->  1.5  (pessimistic: unclipped)
#   e: A=+1 r=0.5 -> pg1  -.5, pg2  -.8  ->  -.5  (pessimistic: unclipped)
# sum = -1.28+.8-1.1+1.5-.5 = -.58
PL_MASK = t([[1, 1, 1, 0], [1, 1, 0, 0]])
PL_RATIO = [[1.5, 0.5, 1.1, 1.0], [1.5, 0.5, 1.0, 1.0]]
PL_ADV = t([[1, -1, 1, 0], [-1, 1, 0, 0]])


def _pl_inputs(garbage=0.0):
    old = t([[-1.0, -2.0, -0.5, garbage], [-3.0, -1.5, garbage, -garbage]])
    logp = old + torch.log(t(PL_RATIO))
    logp = torch.where(PL_MASK.bool(), logp, garbage).requires_grad_()
    adv = torch.where(PL_MASK.bool(), PL_ADV, garbage)
    return logp, old, adv


def test_policy_loss_clipping_both_sides():
    logp, old, adv = _pl_inputs()
    loss, met = A.policy_loss(logp, old, adv, PL_MASK, clip_low=0.2, clip_high=0.28)
    close(loss, -0.58 / 5)
    close(met["clipfrac"], 2 / 5)                 # tokens a, b
    close(met["ratio_mean"], 5.1 / 5)             # (1.5+.5+1.1+1.5+.5)/5
    close(met["ratio_max"], 1.5)
    # k3 of KL(old||new): (r-1) - log r per token
    k = [0.5 - math.log(1.5), -0.5 - math.log(0.5), 0.1 - math.log(1.1), 0.5 - math.log(1.5), -0.5 - math.log(0.5)]
    close(met["approx_kl"], sum(k) / 5)
    assert all(v.dim() == 0 and not v.requires_grad for v in met.values())
    loss.backward()
    # d/dlogp of -A*r is -A*r ; divided by 5 tokens ; clipped tokens (a, b) and pads get 0
    # c: -1.1/5 = -.22 ; d: +1.5/5 = .3 ; e: -.5/5 = -.1
    close(logp.grad, [[0.0, 0.0, -0.22, 0.0], [0.3, -0.1, 0.0, 0.0]])


def test_policy_loss_symmetric_clip_and_aggregation():
    logp, old, adv = _pl_inputs()
    # clip_high .2: token a -> -1.2 ; sum = -1.2+.8-1.1+1.5-.5 = -.5
    loss, _ = A.policy_loss(logp, old, adv, PL_MASK)
    close(loss, -0.5 / 5)
    # Dr. GRPO aggregation with clip_high .28: -.58 / (B=2 * 4)
    loss, _ = A.policy_loss(logp, old, adv, PL_MASK, clip_high=0.28, agg="seq-mean-token-sum-norm", norm_const=4)
    close(loss, -0.58 / 8)
    # seq-mean-token-mean: row0 (-1.28+.8-1.1)/3 = -1.58/3 ; row1 (1.5-.5)/2 = .5
    loss, _ = A.policy_loss(logp, old, adv, PL_MASK, clip_high=0.28, agg="seq-mean-token-mean")
    close(loss, (-1.58 / 3 + 0.5) / 2)


@pytest.mark.parametrize("r,adv,clip_low,clip_high,expected,clipped", [
    (1.25, 1.0, 0.2, 0.2, -1.2, 1.0),    # upper clip at 1.2
    (1.25, 1.0, 0.2, 0.28, -1.25, 0.0),  # clip-higher: 1.25 < 1.28, not clipped
    (0.75, -1.0, 0.2, 0.2, 0.8, 1.0),    # lower clip at .8: max(.75, .8)
    (0.75, -1.0, 0.3, 0.2, 0.75, 0.0),   # wider low side: .75 > .7
])
def test_policy_loss_clip_higher_asymmetry(r, adv, clip_low, clip_high, expected, clipped):
    old = t([[-1.0]])
    logp = old + math.log(r)
    loss, met = A.policy_loss(logp, old, t([[adv]]), torch.ones(1, 1), clip_low=clip_low, clip_high=clip_high)
    close(loss, expected)
    close(met["clipfrac"], clipped)


def test_policy_loss_dual_clip():
    # tokens (A, r): (-1, 5) -> max(5, 1.2) = 5, dual min(5, 3) = 3
    #                (+1, 5) -> max(-5, -1.2) = -1.2 (A > 0: dual clip does not apply)
    #                (-1, 2) -> max(2, 1.2) = 2 < 3, unchanged
    old = t([[0.0, 0.0, 0.0]])
    logp = t([[math.log(5), math.log(5), math.log(2)]]).requires_grad_()
    adv = t([[-1, 1, -1]])
    m = torch.ones(1, 3)
    loss, _ = A.policy_loss(logp, old, adv, m, dual_clip=3.0)
    close(loss, (3 - 1.2 + 2) / 3)
    loss.backward()
    # token 0 is the constant -A*c, token 1 is clipped -> 0 ; token 2: -A*r/3 = 2/3
    close(logp.grad, [[0.0, 0.0, 2 / 3]])
    loss, _ = A.policy_loss(logp, old, adv, m)
    close(loss, (5 - 1.2 + 2) / 3)
    # A = -2, r = 5: max(10, 2.4) = 10 -> min(10, 2*3) = 6
    loss, _ = A.policy_loss(t([[math.log(5)]]), t([[0.0]]), t([[-2.0]]), torch.ones(1, 1), dual_clip=3.0)
    close(loss, 6.0)
    with pytest.raises(ValueError):
        A.policy_loss(logp, old, adv, m, dual_clip=1.0)


def test_policy_loss_is_weights():
    logp, old, adv = _pl_inputs()
    w = t([[2.0, 0.5, 1.0, BIG], [0.0, 3.0, NAN, BIG]]).requires_grad_()
    # pg * w: -1.28*2 + .8*.5 - 1.1*1 + 1.5*0 - .5*3 = -2.56+.4-1.1+0-1.5 = -4.76 -> /5
    loss, _ = A.policy_loss(logp, old, adv, PL_MASK, clip_high=0.28, is_weights_BT=w)
    close(loss, -4.76 / 5)
    loss.backward()
    assert w.grad is None  # weights are constants
    # grads scale by w: c: -.22*1 ; d: .3*0 ; e: -.1*3
    close(logp.grad, [[0.0, 0.0, -0.22, 0.0], [0.0, -0.3, 0.0, 0.0]])


def test_policy_loss_padding_does_not_matter():
    results = []
    for garbage in (0.0, BIG, -BIG):
        logp, old, adv = _pl_inputs(garbage)
        w = torch.where(PL_MASK.bool(), t([[1.0, 2.0, 0.5, 0], [1.5, 1.0, 0, 0]]), garbage)
        for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
            logp.grad = None
            loss, met = A.policy_loss(logp, old, adv, PL_MASK, clip_high=0.28, dual_clip=3.0,
                                      agg=agg, norm_const=4.0, is_weights_BT=w)
            loss.backward()
            assert torch.isfinite(logp.grad).all()
            results.append((garbage, agg, loss.detach(), logp.grad.clone(), met))
    base = {agg: (loss, grad, met) for g, agg, loss, grad, met in results if g == 0.0}
    for _, agg, loss, grad, met in results:
        b_loss, b_grad, b_met = base[agg]
        assert_close(loss, b_loss, atol=1e-7, rtol=0)
        assert_close(grad, b_grad, atol=1e-7, rtol=0)
        for k in met:
            assert_close(met[k], b_met[k], atol=1e-7, rtol=0)
        assert (grad[~PL_MASK.bool()] == 0).all()


def test_policy_loss_random_grad_only_at_valid_tokens():
    gen = torch.Generator().manual_seed(2)
    m = _right_padded_mask(5, 6, gen)
    logp = torch.randn(5, 6, generator=gen).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(5, 6, generator=gen)
    adv = torch.randn(5, 6, generator=gen)
    loss, _ = A.policy_loss(logp, old, adv, m, clip_high=0.28)
    loss.backward()
    assert (logp.grad[~m.bool()] == 0).all()
    assert (logp.grad[m.bool()] != 0).any()


def test_policy_loss_all_masked():
    logp = torch.full((2, 3), BIG, requires_grad=True)
    loss, met = A.policy_loss(logp, torch.full((2, 3), -BIG), torch.full((2, 3), BIG), torch.zeros(2, 3))
    close(loss, 0.0)
    for v in met.values():
        close(v, 0.0)
    loss.backward()
    close(logp.grad, torch.zeros(2, 3))


# --------------------------------------------------------------------------- entropy / log-probs / IS weights

def test_entropy_uniform_is_log_v():
    close(A.entropy_from_logits(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)))
    # constant shift must not matter and huge logits must not overflow
    close(A.entropy_from_logits(torch.full((1, 1, 2), 1000.0)), [[math.log(2)]])


def test_entropy_by_hand_and_vs_definition():
    # logits [0, log 3] -> p = [.25, .75] -> H = -(.25 ln .25 + .75 ln .75)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(A.entropy_from_logits(t([[[0.0, math.log(3)]]])), [[h]])
    # one-hot-like distribution -> ~0
    close(A.entropy_from_logits(t([[[1000.0, 0.0, 0.0]]])), [[0.0]])
    z = torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    assert_close(A.entropy_from_logits(z), ref, atol=1e-12, rtol=0)


def test_token_logprobs():
    # row position 0: uniform over 4 -> log(1/4) ; position 1: logits [0, log 3, 0, 0] -> p(1) = 3/6
    logits = t([[[0, 0, 0, 0], [0, math.log(3), 0, 0]]])
    tokens = torch.tensor([[2, 1]])
    close(A.token_logprobs(logits, tokens), [[math.log(0.25), math.log(0.5)]])
    z = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    tok = torch.randint(0, 5, (2, 3), generator=torch.Generator().manual_seed(5))
    ref = torch.log_softmax(z, -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    assert_close(A.token_logprobs(z, tok), ref, atol=1e-12, rtol=0)


def test_importance_weights():
    m = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    sampler = t([[-1.0, -2.0, -3.0, BIG], [-1.0, NAN, 0, 0]])
    # raw w = [.5, 1, 3 | pad] [5 | pad]
    learner = torch.where(m.bool(), sampler + torch.log(t([[0.5, 1, 3, 1], [5, 1, 1, 1]])), -BIG)
    learner.requires_grad_()
    w, met = A.importance_weights(learner, sampler, m, "tis", cap=2.0)
    close(w, [[0.5, 1, 2, 0], [2, 0, 0, 0]])      # min(w, 2)
    assert not w.requires_grad
    close(met["is_mean"], 9.5 / 4)                # (.5+1+3+5)/4 raw weights
    close(met["is_max"], 5.0)
    close(met["is_clipped_frac"], 0.5)            # 3 and 5 exceed the cap
    w, met = A.importance_weights(learner, sampler, m, "mis", cap=2.0)
    close(w, [[0.5, 1, 0, 0], [0, 0, 0, 0]])      # tokens over the cap are dropped
    close(met["is_clipped_frac"], 0.5)
    with pytest.raises(ValueError):
        A.importance_weights(learner, sampler, m, "xis", cap=2.0)


def test_importance_weights_all_masked():
    w, met = A.importance_weights(torch.full((1, 2), BIG), torch.zeros(1, 2), torch.zeros(1, 2), "tis", 2.0)
    close(w, [[0.0, 0.0]])
    for v in met.values():
        close(v, 0.0)


# --------------------------------------------------------------------------- adaptive KL controller

def test_adaptive_kl_coef_by_hand():
    # KL 0.15 against target 0.1: error = 0.5, clipped to 0.2; 64 samples over horizon 640:
    # coef = 0.05 * (1 + 0.2 * 64 / 640) = 0.05 * 1.02 = 0.051
    assert A.adaptive_kl_coef(0.05, 0.15, 0.1, 640, 64) == pytest.approx(0.051, rel=1e-12)
    # KL 0.09 against 0.1: error = -0.1 (inside the clip); coef = 0.05 * (1 - 0.1 * 0.1) = 0.0495
    assert A.adaptive_kl_coef(0.05, 0.09, 0.1, 640, 64) == pytest.approx(0.0495, rel=1e-12)
    # on target: unchanged
    assert A.adaptive_kl_coef(0.05, 0.1, 0.1, 640, 64) == pytest.approx(0.05, rel=1e-12)
    # KL 0 (error -1, clipped to -0.2) with n_steps 10x the horizon: 1 - 2 < 0, floored at 0
    assert A.adaptive_kl_coef(0.05, 0.0, 0.1, 10, 100) == 0.0


def test_adaptive_kl_coef_rejects_bad_target():
    with pytest.raises(ValueError):
        A.adaptive_kl_coef(0.05, 0.1, 0.0, 640, 64)
