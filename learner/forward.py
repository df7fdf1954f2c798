"""Logits for a batch of `prompt + completion` rows, the plain way or with each group's prompt run once.

In a GRPO-style batch every group's G completions share one prompt. The plain forward runs that
prompt G times. `shared_prefix_logits` runs it once, keeps its keys/values (with their autograd
history), repeats them for the group's rows and runs only the completion tokens on top. The math
is the same function of the same weights: the logits of every completion token, and the gradients
of anything computed from them, equal the plain pass's up to float rounding (pinned by
tests/unit/test_forward.py). It saves (G-1)/G of the prompt tokens' compute, so the gain grows with
prompt length and group size.

Both return logits aligned with `input_ids[:, 1:]` (see learner.batch): (B, W-1, V). The shared
version fills only the positions that predict completion tokens (mask == 1); the prompt positions
hold zeros, which every consumer multiplies by the mask.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from learner.batch import Batch


class ValueModel(torch.nn.Module):
    """Critic for PPO: the policy's transformer body with a scalar head, initialised from the policy.

    It answers like a causal LM whose vocabulary is one entry, the value: `logits` (B, W, 1), and
    `past_key_values` when asked. So `plain_logits` and `shared_prefix_logits` serve it unchanged, and
    the critic runs each group's prompt once too."""

    def __init__(self, policy):
        super().__init__()
        import copy

        self.body = copy.deepcopy(policy.model)
        self.head = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, position_ids=None, past_key_values=None, use_cache=False):
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values, use_cache=use_cache)
        return CausalLMOutputWithPast(logits=self.head(out.last_hidden_state), past_key_values=out.past_key_values)


def plain_logits(model, b: Batch, device) -> torch.Tensor:
    out = model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)
    return out.logits[:, :-1].float()


def shared_prefix_logits(model, b: Batch, device) -> torch.Tensor:
    B, W = b.input_ids.shape
    ids = b.input_ids.to(device)
    plen = b.prompt_len.to(device)
    clen = b.attention_mask.to(device).sum(1) - plen  # completion tokens per row
    Lp, Lc = int(plen.max()), int(clen.max())
    if Lc == 0:  # nothing to predict beyond the prompt
        return plain_logits(model, b, device)
    # one prompt per run of rows from the same group (rows are ordered group by group)
    _, row_to_prompt, counts = torch.unique_consecutive(b.group_id, return_inverse=True, return_counts=True)
    row_to_prompt = row_to_prompt.to(device)
    first = (torch.cumsum(counts, 0) - counts).to(device)  # first row of each prompt
    p_len = plen[first]
    ar_p = torch.arange(Lp, device=device)
    p_attn = (ar_p[None] < p_len[:, None]).long()
    # prompt columns past a prompt's end hold its completion's tokens in the row layout; they are masked out
    pre = model(input_ids=ids[first, :Lp], attention_mask=p_attn, position_ids=ar_p[None].expand(len(first), Lp),
                use_cache=True)
    cache = pre.past_key_values
    cache.reorder_cache(row_to_prompt)  # (P, ...) -> (B, ...), differentiable (index_select)

    ar_c = torch.arange(Lc, device=device)
    src = (plen[:, None] + ar_c[None]).clamp(max=W - 1)
    c_ids = ids.gather(1, src)
    c_attn = (ar_c[None] < clen[:, None]).long()
    post = model(input_ids=c_ids, attention_mask=torch.cat([p_attn[row_to_prompt], c_attn], 1),
                 position_ids=plen[:, None] + ar_c[None], past_key_values=cache, use_cache=True)

    # logits predicting completion token j: j = 0 from the prompt's last position, j >= 1 from completion token j-1
    first_logits = pre.logits[torch.arange(len(first), device=device), p_len - 1][row_to_prompt]  # (B, V)
    pred = torch.cat([first_logits[:, None], post.logits[:, : Lc - 1]], 1).float()  # (B, Lc, V)
    V = pred.shape[-1]
    out = torch.zeros(B, W - 1 + Lc, V, device=device, dtype=pred.dtype)
    pos = (plen - 1)[:, None] + ar_c[None]  # target position of completion token j, aligned with input_ids[:, 1:]
    out = out.scatter(1, pos[..., None].expand(-1, -1, V), pred)
    return out[:, : W - 1]


def batch_logits(model, b: Batch, device, shared_prefix: bool) -> torch.Tensor:
    """The learner's one entry point: shared-prefix when asked and some prompt has more than one row."""
    if shared_prefix and len(torch.unique_consecutive(b.group_id)) < b.group_id.numel():
        return shared_prefix_logits(model, b, device)
    return plain_logits(model, b, device)
