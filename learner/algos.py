"""Reinforcement-learning math for relayrl, as pure functions of torch tensors.

Nothing here reads config, does I/O, logs, or calls ``.item()``; every function
takes tensors and Python numbers and returns tensors (metrics are detached
0-dim tensors), so the whole module is safe inside compiled / async code.

Shape letters: B = sequences in the batch, T = completion length (padded),
V = vocabulary size, P = prompts, G = samples per prompt (B == P * G).

Mask convention (the ONLY one used in this module)
--------------------------------------------------
``mask`` is a float or bool tensor of shape (B, T); a nonzero entry (1) marks a
completion token that is trained on, 0 marks padding or prompt.  Completions
are RIGHT-padded, so each row's valid tokens are a prefix of the row.  Masked
positions never influence a result nor receive a gradient, even when they hold
garbage (huge values, inf, NaN): inputs are selected with ``torch.where``
before any arithmetic instead of being multiplied by the mask.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "masked_sum", "masked_mean", "masked_var", "masked_whiten",
    "grpo_advantages", "dr_grpo_advantages", "rloo_advantages", "tied_groups",
    "reinforce_baseline_advantages", "reinforce_pp_returns", "broadcast_to_tokens",
    "token_rewards", "gae", "value_loss", "explained_variance",
    "kl_estimate", "aggregate", "policy_loss", "entropy_from_logits",
    "importance_weights", "token_logprobs", "adaptive_kl_coef",
]

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]

# k3 uses exp(ref - logp); beyond |20| nats the estimate is meaningless and exp()
# overflows in low precision, so the log-ratio is clamped (as in verl).
_K3_LOG_RATIO_CLAMP = 20.0


def _valid(mask: Tensor, like: Tensor) -> Tensor:
    """Mask as a bool tensor broadcast to ``like``'s shape."""
    return torch.broadcast_to(mask.bool(), like.shape)


def _as_float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.float()


# --------------------------------------------------------------------------- masked reductions

def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over valid entries.  x: any shape, mask: broadcastable to x.

    # sum_i x_i * m_i   (masked entries are dropped, not multiplied, so NaN there is harmless)
    """
    xm = torch.where(_valid(mask, x), x, 0)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over valid entries; 0 (not NaN) where no entry is valid.

    # sum_i x_i m_i / max(sum_i m_i, 1)
    """
    valid = _valid(mask, x)
    s = masked_sum(x, valid, dim)
    cnt = valid.sum() if dim is None else valid.sum(dim)
    return s / cnt.clamp(min=1).to(s.dtype)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Population variance (unbiased=False) of ``x`` over all valid entries -> scalar.

    # var = mean_m((x - mean_m(x))^2)
    """
    mu = masked_mean(x, mask)
    return masked_mean((x - mu) ** 2, mask)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten ``x`` with statistics of its valid entries; masked positions become 0.

    x, mask: (B, T) -> (B, T).
    # y = (x - mean) / sqrt(var + eps);  if not shift_mean: y += mean  (keeps the original mean)
    """
    mu, var = masked_mean(x, mask), masked_var(x, mask)
    y = (x - mu) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mu
    return torch.where(_valid(mask, x), y, 0)


# --------------------------------------------------------------------------- outcome-reward advantages

def grpo_advantages(rewards_PG: Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO group-normalised advantages (Shao et al. 2024, DeepSeekMath).

    rewards_PG: (P, G) -> (P, G).  std is the population std (unbiased=False), so a
    group of size 1 gives 0, never NaN.  A group of identical rewards gives exactly 0: its float
    mean can miss the common value by an ulp, and that ulp over (std ~ ulp) + eps is not small
    (0.056 for eight rewards of 0.6 in float32), the same sign for the whole group.
    # A_i = (r_i - mean_g r) / (std_g r + eps)      (without scale_by_std: r_i - mean_g r)
    # A_i = 0 for every i when all r_i of the group are equal
    """
    r = _as_float(rewards_PG)
    adv = r - r.mean(dim=-1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(dim=-1, unbiased=False, keepdim=True) + eps)
    return _zero_where_tied(adv, r)


def tied_groups(rewards_PG: Tensor) -> Tensor:
    """(P, G) -> (P,) bool: the groups whose rewards are all equal (no signal for a group baseline)."""
    return (rewards_PG == rewards_PG[..., :1]).all(dim=-1)


def _zero_where_tied(adv_PG: Tensor, rewards_PG: Tensor) -> Tensor:
    """Exactly 0 for groups whose rewards are all equal (no signal), whatever the rounding of their baseline."""
    return torch.where(tied_groups(rewards_PG)[..., None], 0, adv_PG)


def dr_grpo_advantages(rewards_PG: Tensor) -> Tensor:
    """Dr. GRPO advantages (Liu et al. 2025, "Understanding R1-Zero-like training").

    rewards_PG: (P, G) -> (P, G).  Drops GRPO's std scaling, which biases towards
    too-easy / too-hard prompts.
    # A_i = r_i - mean_g r
    """
    return grpo_advantages(rewards_PG, scale_by_std=False)


def rloo_advantages(rewards_PG: Tensor) -> Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, "Back to Basics").

    rewards_PG: (P, G) -> (P, G); G == 1, and a group of identical rewards, give exactly 0.
    # A_i = r_i - (1/(G-1)) sum_{j != i} r_j  =  G/(G-1) * (r_i - mean_g r)
    """
    r = _as_float(rewards_PG)
    G = r.shape[-1]
    if G < 2:
        return torch.zeros_like(r)
    loo_mean = (r.sum(dim=-1, keepdim=True) - r) / (G - 1)
    return _zero_where_tied(r - loo_mean, r)


def reinforce_baseline_advantages(rewards_PG: Tensor) -> Tensor:
    """REINFORCE (Williams 1992) with the batch-mean reward as baseline.

    rewards_PG: (P, G) (any shape) -> same shape.
    # A_i = r_i - mean_{whole batch} r
    """
    r = _as_float(rewards_PG)
    return r - r.mean()


def broadcast_to_tokens(adv_B: Tensor, mask_BT: Tensor) -> Tensor:
    """Give every valid token its sequence's advantage.  adv_B: (B,), mask_BT: (B, T) -> (B, T).

    # A_{b,t} = A_b * m_{b,t}
    """
    adv = adv_B.unsqueeze(-1).expand(mask_BT.shape)
    return torch.where(mask_BT.bool(), adv, 0)


def _last_valid_onehot(mask_BT: Tensor) -> Tensor:
    """(B, T) bool, True only at the last valid token of each row (all False for empty rows)."""
    valid = mask_BT.bool()
    pos = torch.arange(valid.shape[-1], device=valid.device).expand(valid.shape)
    last = torch.where(valid, pos, -1).amax(dim=-1, keepdim=True)  # -1 for empty rows
    return pos == last


def token_rewards(rewards_B: Tensor, mask_BT: Tensor, kl_BT: Tensor | None = None, kl_coef: float = 0.0) -> Tensor:
    """Per-token rewards for PPO / REINFORCE++: KL penalty everywhere, outcome at the end.

    rewards_B: (B,), mask_BT: (B, T), kl_BT: (B, T) or None -> (B, T).
    Rows with no valid token are all 0.  Rewards are targets, so the result is detached.
    # r_t = -kl_coef * kl_t * m_t  +  R * [t == last valid token]
    """
    valid = mask_BT.bool()
    r_B = _as_float(rewards_B.detach())
    out = torch.zeros(valid.shape, dtype=r_B.dtype, device=r_B.device)
    if kl_BT is not None:
        out = torch.where(valid, -kl_coef * kl_BT.detach(), out).to(r_B.dtype)
    return out + torch.where(_last_valid_onehot(valid), r_B.unsqueeze(-1), 0)


def reinforce_pp_returns(rewards_B: Tensor, kl_BT: Tensor, mask_BT: Tensor, kl_coef: float) -> Tensor:
    """REINFORCE++ token returns (Hu 2025), before the caller's batch whitening.

    rewards_B: (B,), kl_BT: (B, T), mask_BT: (B, T) -> (B, T), 0 at masked positions.
    # G_t = sum_{t' >= t} m_t' * r_t'   with r_t from token_rewards (gamma = 1)
    """
    r = token_rewards(rewards_B, mask_BT, kl_BT, kl_coef)  # already 0 at masked positions
    rtg = r.flip(-1).cumsum(-1).flip(-1)
    return torch.where(mask_BT.bool(), rtg, 0)


# --------------------------------------------------------------------------- PPO with a critic

def gae(token_rewards_BT: Tensor, values_BT: Tensor, mask_BT: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016).

    token_rewards_BT, values_BT, mask_BT: (B, T) -> (advantages_BT, returns_BT), both (B, T),
    0 at masked positions and detached (they are regression / policy targets).
    The value after the last valid token is 0 (the episode ends there). Masked positions inside a row (tokens
    an environment wrote between two model turns) are skipped, not treated as an end: t+1 below is the next
    VALID position, so a turn's last token bootstraps from the first token of the model's next turn.
    # delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
    # A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    # R_t     = A_t + V_t
    """
    valid = mask_BT.bool()
    r = torch.where(valid, token_rewards_BT.detach(), 0)
    v = torch.where(valid, values_BT.detach(), 0).to(r.dtype)
    m = valid.to(r.dtype)
    T = r.shape[-1]
    adv = torch.zeros_like(r)
    next_v = next_a = next_m = torch.zeros_like(r[..., 0])
    for t in reversed(range(T)):  # vectorised over B
        delta = r[..., t] + gamma * next_v * next_m - v[..., t]
        a_t = (delta + gamma * lam * next_m * next_a) * m[..., t]
        adv[..., t] = a_t
        keep = valid[..., t]  # a masked position passes the next valid one's value and advantage on
        next_v = torch.where(keep, v[..., t], next_v)
        next_a = torch.where(keep, a_t, next_a)
        next_m = torch.where(keep, m[..., t], next_m)
    returns = torch.where(valid, adv + v, 0)
    return adv, returns


def value_loss(values_BT: Tensor, old_values_BT: Tensor, returns_BT: Tensor, mask_BT: Tensor,
               clip_eps: float | None = None) -> Tensor:
    """PPO critic loss, optionally clipped around the rollout values (Schulman et al. 2017).

    values_BT (trainable), old_values_BT, returns_BT, mask_BT: (B, T) -> scalar (masked token mean).
    # unclipped: L = 0.5 * (V - R)^2
    # clipped:   L = 0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)
    """
    valid = mask_BT.bool()
    v = torch.where(valid, values_BT, 0)
    R = torch.where(valid, returns_BT.detach(), 0)
    loss = (v - R) ** 2
    if clip_eps is not None:
        old = torch.where(valid, old_values_BT.detach(), 0)
        v_clip = old + (v - old).clamp(-clip_eps, clip_eps)
        loss = torch.maximum(loss, (v_clip - R) ** 2)
    return masked_mean(0.5 * loss, valid)


def explained_variance(values_BT: Tensor, returns_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Critic diagnostic: share of return variance explained by the values (detached scalar).

    values_BT, returns_BT, mask_BT: (B, T) -> 0-dim; 0 when var(R) == 0 (not NaN).
    # EV = 1 - var_m(R - V) / var_m(R)
    """
    v, R = values_BT.detach(), returns_BT.detach()
    var_r = masked_var(R, mask_BT)
    var_res = masked_var(R - v, mask_BT)
    ev = 1 - var_res / torch.where(var_r > 0, var_r, 1)
    return torch.where(var_r > 0, ev, 0)


# --------------------------------------------------------------------------- KL to a reference policy

def kl_estimate(logp_BT: Tensor, ref_logp_BT: Tensor, kind: Literal["k1", "k2", "k3"]) -> Tensor:
    """Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman 2020,
    "Approximating KL divergence").  logp_BT, ref_logp_BT: (B, T) -> (B, T).

    # k1 = logp - ref                         (unbiased, high variance, can be < 0)
    # k2 = 0.5 * (logp - ref)^2               (biased, low variance)
    # k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, low variance, >= 0)
    For k3 the log-ratio is clamped to +-20 so that padding garbage cannot overflow.
    """
    if kind == "k1":
        return logp_BT - ref_logp_BT
    if kind == "k2":
        return 0.5 * (logp_BT - ref_logp_BT) ** 2
    if kind == "k3":
        d = (ref_logp_BT - logp_BT).clamp(-_K3_LOG_RATIO_CLAMP, _K3_LOG_RATIO_CLAMP)
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


# --------------------------------------------------------------------------- loss aggregation

def aggregate(loss_BT: Tensor, mask_BT: Tensor, mode: AggMode, norm_const: float | None = None) -> Tensor:
    """Reduce a per-token loss (B, T) to a scalar; an all-masked input gives 0, never NaN.

    # token-mean:              sum(l*m) / sum(m)                     (DAPO, Yu 2025)
    # seq-mean-token-mean:     mean over rows with >=1 valid token of sum_t(l*m)/sum_t(m)  (GRPO)
    # seq-mean-token-sum:      mean over all B rows of sum_t(l*m)
    # seq-mean-token-sum-norm: sum(l*m) / (B * norm_const)           (Dr. GRPO, Liu 2025;
    #                          norm_const is a constant such as the max completion length)
    """
    valid = mask_BT.bool()
    B = loss_BT.shape[0]
    if mode == "token-mean":
        return masked_mean(loss_BT, valid)
    if mode == "seq-mean-token-mean":
        row_mean = masked_mean(loss_BT, valid, dim=-1)
        return masked_mean(row_mean, valid.any(dim=-1))
    if mode == "seq-mean-token-sum":
        return masked_sum(loss_BT, valid, dim=-1).sum() / max(B, 1)
    if mode == "seq-mean-token-sum-norm":
        if norm_const is None or norm_const <= 0:
            raise ValueError("seq-mean-token-sum-norm needs a positive norm_const (e.g. max completion length)")
        return masked_sum(loss_BT, valid) / (max(B, 1) * norm_const)
    raise ValueError(f"unknown aggregation mode {mode!r}")


# --------------------------------------------------------------------------- policy loss

def policy_loss(logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor,
                clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                agg: AggMode = "token-mean", norm_const: float | None = None,
                is_weights_BT: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017) with clip-higher (DAPO, Yu et al. 2025),
    dual-clip (Ye et al. 2020) and optional off-policy weights (TIS, Yao et al. 2025).

    logp_BT (trainable), old_logp_BT, adv_BT, mask_BT, is_weights_BT: (B, T) -> (scalar loss, metrics).
    old_logp, adv and is_weights are treated as constants (detached).
    # ratio = exp(logp - old)
    # pg    = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
    # dual clip (dual_clip > 1), only where A < 0:  pg = min(pg, -A * dual_clip)
    # pg    = pg * w_is                      (if is_weights_BT is given)
    # loss  = aggregate(pg, mask, agg, norm_const)
    Metrics (detached 0-dim, over valid tokens): clipfrac (share where the clipped branch won,
    pg2 > pg1), approx_kl, ratio_mean, ratio_max.  approx_kl is the k3 estimate of
    KL(pi_old || pi) from the rollout samples (drawn from pi_old), r = exp(logp - old):
    # approx_kl = mean((r - 1) - log r)
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    valid = mask_BT.bool()
    log_ratio = torch.where(valid, logp_BT - old_logp_BT.detach(), 0)
    adv = torch.where(valid, adv_BT.detach(), 0).to(log_ratio.dtype)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    if is_weights_BT is not None:
        pg = pg * torch.where(valid, is_weights_BT.detach(), 0)
    loss = aggregate(pg, valid, agg, norm_const)

    with torch.no_grad():
        r, lr = ratio.detach(), log_ratio.detach()
        metrics = {
            "clipfrac": masked_mean((pg2 > pg1).to(r.dtype), valid),
            "approx_kl": masked_mean(r - 1 - lr, valid),
            "ratio_mean": masked_mean(r, valid),
            "ratio_max": _masked_max(r, valid),
        }
    return loss, metrics


def _masked_max(x: Tensor, valid: Tensor) -> Tensor:
    """Max over valid entries, 0 if there are none (x must be non-empty)."""
    m = torch.where(valid, x, float("-inf")).max()
    return torch.where(valid.any(), m, 0)


def entropy_from_logits(logits_BTV: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position.  logits_BTV: (B, T, V) finite -> (B, T).

    # H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v,  with z = logits - max(logits)
    # (shift-invariant; shifting first avoids cancellation between two large terms)
    """
    z = logits_BTV - logits_BTV.amax(dim=-1, keepdim=True).detach()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


def importance_weights(learner_logp_BT: Tensor, sampler_logp_BT: Tensor, mask_BT: Tensor,
                       mode: Literal["tis", "mis"], cap: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Correction weights for the sampler (vLLM) / learner mismatch (Yao et al. 2025,
    "Your efficient RL framework secretly brings you off-policy RL training").

    learner_logp_BT, sampler_logp_BT, mask_BT: (B, T) -> (weights (B, T) detached, 0 at masked
    positions; metrics).
    # w = exp(logp_learner - logp_sampler)
    # tis (truncated): w' = min(w, cap)
    # mis (masked):    w' = 0 if w > cap else w      (the token is dropped)
    Metrics over valid tokens, of the raw w: is_mean, is_max; is_clipped_frac = share with w > cap.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    valid = mask_BT.bool()
    w = torch.exp(torch.where(valid, learner_logp_BT.detach() - sampler_logp_BT.detach(), 0))
    over = w > cap
    if mode == "tis":
        out = w.clamp(max=cap)
    elif mode == "mis":
        out = torch.where(over, 0, w)
    else:
        raise ValueError(f"unknown importance-weight mode {mode!r}; expected 'tis' or 'mis'")
    out = torch.where(valid, out, 0)
    metrics = {
        "is_mean": masked_mean(w, valid),
        "is_max": _masked_max(w, valid),
        "is_clipped_frac": masked_mean(over.to(w.dtype), valid),
    }
    return out, metrics


def token_logprobs(logits_BTV: Tensor, tokens_BT: Tensor) -> Tensor:
    """log softmax(logits)[token] per position.  logits_BTV: (B, T, V), tokens_BT: (B, T) int -> (B, T).

    logits at position t score tokens_BT[:, t]; the caller does the usual one-step shift.
    # log p(y_t) = z_{t, y_t} - logsumexp_v z_{t, v}   (no (B, T, V) log_softmax materialised)
    """
    picked = logits_BTV.gather(-1, tokens_BT.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits_BTV, dim=-1)


def adaptive_kl_coef(coef: float, observed_kl: float, target: float, horizon: int, n_steps: int) -> float:
    """One update of the adaptive KL controller (Ziegler et al. 2019, as in OpenRLHF / TRL / verl).

    Python floats in and out (the learner calls it once per update with the measured KL to reference).
    # e    = clip(observed_kl / target - 1, -0.2, 0.2)      (proportional error, bounded)
    # coef = coef * (1 + e * n_steps / horizon)
    A KL above target raises the coefficient, below target lowers it; never below 0.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
    err = min(max(observed_kl / target - 1.0, -0.2), 0.2)
    return max(coef * (1.0 + err * n_steps / horizon), 0.0)
