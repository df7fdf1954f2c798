"""From scored groups to padded tensors: the one place where padding happens.

Layout (stated once, used everywhere): each row is `prompt + completion`, RIGHT-padded with
`pad_id`. Log-prob tensors are aligned with `input_ids[:, 1:]` (position t holds the log-prob of
token t+1 given tokens <= t), so they are (B, W-1). `mask` (B, W-1) is 1 exactly where that
target token is a completion token the model sampled (trained on) and 0 on prompt tokens, padding and, in
multi-turn episodes, the tokens an environment wrote between the model's turns (`Completion.loss_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.messages import Group


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor       # (B, W) long, right-padded
    attention_mask: torch.Tensor  # (B, W) 1 = real token
    mask: torch.Tensor            # (B, W-1) float, 1 = completion token the model sampled (trained on)
    sampler_logp: torch.Tensor    # (B, W-1) float, vLLM's log-probs at masked positions, 0 elsewhere
    rewards_PG: torch.Tensor      # (P, G) float
    versions: torch.Tensor        # (B,) long, policy version that sampled each row
    prompt_len: torch.Tensor      # (B,) long, prompt tokens at the start of each row
    group_id: torch.Tensor        # (B,) long, index of the row's group (rows of one group share the prompt)

    def rows(self, idx: torch.Tensor, trim: bool = False) -> "Batch":
        """Sub-batch of rows `idx` (rewards_PG is not sliced: it belongs to the whole batch). TRIM: cut the
        columns to the sub-batch's own longest row, so a micro-batch of short rows does not pay for the
        batch's longest one (right padding: the cut columns are padding in every row kept)."""
        w = int(self.attention_mask[idx].sum(1).max()) if trim and len(idx) else self.input_ids.shape[1]
        return Batch(self.input_ids[idx, :w], self.attention_mask[idx, :w], self.mask[idx, : w - 1],
                     self.sampler_logp[idx, : w - 1], self.rewards_PG, self.versions[idx], self.prompt_len[idx],
                     self.group_id[idx])


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
            # target index j (predicting token j+1) is a completion token iff j+1 >= len(p); of those, tokens an
            # environment wrote (multi-turn, loss_mask 0) are not trained on
            masks.append([0.0] * (len(p) - 1) + ([float(x) for x in c.loss_mask] if c.loss_mask
                                                 else [1.0] * len(c.token_ids)))
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


def micro_batches(lengths: list[int], group_id: list[int], max_rows: int, max_tokens: int = 0) -> list[list[int]]:
    """Split rows 0..len(lengths)-1 into micro-batches (lists of row positions) for gradient accumulation.

    MAX_TOKENS = 0: consecutive runs of MAX_ROWS rows, in order. MAX_TOKENS > 0 (veRL's dynamic batch size):
    rows ordered by their group's longest row (a group's rows stay adjacent, for the shared-prompt forward;
    ties keep row order), then packed greedily so that each micro-batch's padded size, rows x its longest row,
    is at most MAX_TOKENS. A row longer than the budget goes alone. MAX_ROWS does not apply then: short rows
    share a micro-batch, long ones get smaller ones, and a long-tailed batch stops padding every micro-batch
    to its longest sample. Which micro-batch a row lands in does not change the accumulated gradient."""
    n = len(lengths)
    if not max_tokens:
        return [list(range(s, min(n, s + max_rows))) for s in range(0, n, max_rows)]
    longest: dict[int, int] = {}
    for g, L in zip(group_id, lengths):
        longest[g] = max(longest.get(g, 0), L)
    order = sorted(range(n), key=lambda i: (longest[group_id[i]], group_id[i], i))
    out: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        w = max(width, lengths[i])
        if cur and (len(cur) + 1) * w > max_tokens:
            out.append(cur)
            cur, w = [], lengths[i]
        cur.append(i)
        width = w
    if cur:
        out.append(cur)
    return out
