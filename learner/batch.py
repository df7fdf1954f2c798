"""From scored groups to padded tensors: the one place where padding happens.

Layout (stated once, used everywhere): each row is `prompt + completion`, RIGHT-padded with
`pad_id`. Log-prob tensors are aligned with `input_ids[:, 1:]` (position t holds the log-prob of
token t+1 given tokens <= t), so they are (B, W-1). `mask` (B, W-1) is 1 exactly where that
target token is a completion token (trained on) and 0 on prompt tokens and padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.messages import Group


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor       # (B, W) long, right-padded
    attention_mask: torch.Tensor  # (B, W) 1 = real token
    mask: torch.Tensor            # (B, W-1) float, 1 = completion token trained on
    sampler_logp: torch.Tensor    # (B, W-1) float, vLLM's log-probs at masked positions, 0 elsewhere
    rewards_PG: torch.Tensor      # (P, G) float
    versions: torch.Tensor        # (B,) long, policy version that sampled each row
    prompt_len: torch.Tensor      # (B,) long, prompt tokens at the start of each row
    group_id: torch.Tensor        # (B,) long, index of the row's group (rows of one group share the prompt)

    def rows(self, idx: torch.Tensor) -> "Batch":
        """Sub-batch of rows `idx` (rewards_PG is not sliced: it belongs to the whole batch)."""
        return Batch(self.input_ids[idx], self.attention_mask[idx], self.mask[idx], self.sampler_logp[idx],
                     self.rewards_PG, self.versions[idx], self.prompt_len[idx], self.group_id[idx])


def collate(groups: list[Group], pad_id: int) -> Batch:
    """Groups must all have the same size G (rows are ordered group by group)."""
    sizes = {len(g.completions) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"all groups must have the same size, got sizes {sorted(sizes)}")
    seqs, masks, lps, versions, plen, gid = [], [], [], [], [], []
    for gi, g in enumerate(groups):
        p = list(g.prompt.token_ids)
        for c in g.completions:
            plen.append(len(p))
            gid.append(gi)
            seqs.append(p + list(c.token_ids))
            # target index j (predicting token j+1) is a completion token iff j+1 >= len(p)
            masks.append([0.0] * (len(p) - 1) + [1.0] * len(c.token_ids))
            lps.append([0.0] * (len(p) - 1) + list(c.logprobs))
            versions.append(c.policy_version)
    width = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    mask = torch.zeros((B, width - 1))
    slp = torch.zeros((B, width - 1))
    for i, (s, m, lp) in enumerate(zip(seqs, masks, lps)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        mask[i, : len(m)] = torch.tensor(m)
        slp[i, : len(lp)] = torch.tensor(lp)
    rewards = torch.tensor([list(g.rewards) for g in groups], dtype=torch.float32)
    return Batch(input_ids, attn, mask, slp, rewards, torch.tensor(versions), torch.tensor(plen), torch.tensor(gid))
