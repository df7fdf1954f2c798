"""learner.batch.micro_batches and Batch.rows(trim=True): how a minibatch is cut for gradient accumulation."""

from __future__ import annotations

import random

import torch

from core.messages import Completion, Group, Prompt
from learner.batch import collate, micro_batches


def test_fixed_rows_are_consecutive_runs_in_order():
    assert micro_batches([5, 9, 3, 3, 7], [0, 0, 1, 1, 2], max_rows=2) == [[0, 1], [2, 3], [4]]


def test_token_budget_packs_groups_by_their_longest_row():
    # group longest rows: g0 = 9, g1 = 3, g2 = 7 -> order g1 (rows 2, 3), g2 (4, 5), g0 (0, 1)
    # [2, 3]: 2 x 3 = 6; + row 4 (7) -> 3 x 7 = 21 > 16: new; [4, 5]: 2 x 7 = 14; + row 0 -> 3 x 7 = 21: new;
    # [0] (5); + row 1 (9) -> 2 x 9 = 18 > 16: new
    lengths, groups = [5, 9, 3, 3, 7, 7], [0, 0, 1, 1, 2, 2]
    assert micro_batches(lengths, groups, max_rows=64, max_tokens=16) == [[2, 3], [4, 5], [0], [1]]
    # a bigger budget: 6 rows x 9 = 54 fits all at once, shortest group first
    assert micro_batches(lengths, groups, max_rows=2, max_tokens=54) == [[2, 3, 4, 5, 0, 1]]


def test_a_row_longer_than_the_budget_goes_alone():
    assert micro_batches([20, 2, 2], [0, 1, 1], max_rows=64, max_tokens=16) == [[1, 2], [0]]


def test_every_row_lands_in_exactly_one_micro_batch_within_budget():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 40)
        lengths = [rng.randint(1, 50) for _ in range(n)]
        gid = sorted(rng.randint(0, 9) for _ in range(n))
        budget = rng.randint(1, 300)
        parts = micro_batches(lengths, gid, max_rows=8, max_tokens=budget)
        assert sorted(i for p in parts for i in p) == list(range(n))
        for p in parts:
            assert len(p) == 1 or len(p) * max(lengths[i] for i in p) <= budget
            # a group's rows stay adjacent within a micro-batch (the shared-prompt forward needs that)
            g = [gid[i] for i in p]
            for v in set(g):
                at = [k for k, x in enumerate(g) if x == v]
                assert at == list(range(at[0], at[-1] + 1)), (p, g)


def _group(uid: int, prompt: list[int], completions: list[list[int]]) -> Group:
    p = Prompt(uid, "p", tuple(prompt), "a")
    comps = tuple(Completion(p, tuple(c), tuple(0.1 * t for t in c), "x", "stop", 0, "t") for c in completions)
    return Group(p, comps, tuple(0.0 for _ in comps))


def test_trimmed_rows_keep_every_real_token_and_cut_only_padding():
    b = collate([_group(0, [1, 5], [[6, 2], [6, 7, 8, 9, 2]]), _group(1, [1, 5, 5], [[7, 2], [8, 2]])], pad_id=0)
    assert b.input_ids.shape == (4, 7)  # longest row: 2 prompt + 5 completion tokens
    sub = b.rows(torch.tensor([0, 2, 3]), trim=True)
    assert sub.input_ids.tolist() == [[1, 5, 6, 2, 0], [1, 5, 5, 7, 2], [1, 5, 5, 8, 2]]  # width 5, not 7
    assert sub.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert sub.mask.tolist() == [[0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert torch.allclose(sub.sampler_logp, torch.tensor([[0, 0.6, 0.2, 0], [0, 0, 0.7, 0.2], [0, 0, 0.8, 0.2]]))
    assert sub.group_id.tolist() == [0, 1, 1] and sub.prompt_len.tolist() == [2, 3, 3]
    assert b.rows(torch.tensor([0, 2, 3])).input_ids.shape == (3, 7)  # untrimmed: the batch's width


def test_environment_tokens_are_masked_out_of_training():
    # multi-turn: prompt [1, 5]; the model wrote 6, 2 (end of its turn), an environment replied 9, 9, the model
    # wrote 7, 2. Targets are input_ids[1:]: [5 | 6, 2, 9, 9, 7, 2]; trained on exactly the model's four tokens.
    p = Prompt(0, "p", (1, 5), "a")
    c = Completion(p, (6, 2, 9, 9, 7, 2), (-0.1, -0.2, 0.0, 0.0, -0.3, -0.4), "x", "stop", 0, "t",
                   loss_mask=(1, 1, 0, 0, 1, 1), turns=2)
    b = collate([Group(p, (c,), (1.0,))], pad_id=0)
    assert b.input_ids.tolist() == [[1, 5, 6, 2, 9, 9, 7, 2]]
    assert b.mask.tolist() == [[0, 1, 1, 0, 0, 1, 1]]
    assert torch.allclose(b.sampler_logp, torch.tensor([[0, -0.1, -0.2, 0, 0, -0.3, -0.4]]))
    assert c.model_tokens == 4 and Completion(p, (6, 2), (0.0, 0.0), "x", "stop", 0, "t").model_tokens == 2
