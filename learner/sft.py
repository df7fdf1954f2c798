"""Supervised warm-start: a few steps of next-token training on (prompt, answer) pairs, loss on the
answer tokens only, so that RL starts from a policy that is right some of the time (RL from a
policy that is never right gets no signal from a sparse reward)."""

from __future__ import annotations

import random

import torch


def pad_batch(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], dtype=torch.long)


def supervised_warmstart(model, examples: list[tuple[list[int], list[int]]], *, steps: int, lr: float,
                         batch_size: int, seed: int, pad_id: int) -> float:
    """Train `model` in place; returns the last batch's loss."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss_value = float("nan")
    for _ in range(steps):
        batch = rng.sample(examples, min(batch_size, len(examples)))
        ids = pad_batch([p + a for p, a in batch], pad_id)
        # labels: -100 on prompt and padding, so only answer tokens (and EOS) are learned
        labels = pad_batch([[-100] * len(p) + a for p, a in batch], -100)
        attn = pad_batch([[1] * (len(p) + len(a)) for p, a in batch], 0)
        out = model(input_ids=ids, attention_mask=attn, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        loss_value = float(out.loss.detach())
    model.eval()
    return loss_value
