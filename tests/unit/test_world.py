"""cluster/world.py's generated task: the fixed-length words of the default job and the long-tailed variant."""

from __future__ import annotations

from collections import Counter

import pytest

from cluster.world import _key, make_reverse_task, word_lengths
from core.config import Config, TaskConfig


def test_fixed_length_words_reverse_and_held_out_is_disjoint():
    train, held = make_reverse_task(TaskConfig(train_size=300, heldout_size=50), seed=0)
    assert len(train) == 300 and len(held) == 50
    assert all(len(r["answer"]) == 5 and r["prompt"] == r["answer"][::-1] + "=" for r in train + held)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_long_tailed_lengths_follow_one_over_l_squared():
    assert word_lengths(5, 0) == [5] and word_lengths(3, 6) == [3, 4, 5, 6]
    train, held = make_reverse_task(TaskConfig(word_length=5, max_word_length=40, train_size=4000, heldout_size=256),
                                    seed=0)
    lengths = [len(r["answer"]) for r in train + held]
    assert min(lengths) == 5 and max(lengths) <= 40
    assert all(r["prompt"] == r["answer"][::-1] + "=" for r in train + held)
    counts = Counter(lengths)
    # P(L) = L^-2 / S with S = sum_{k=5..40} k^-2 = 0.1966: P(5) = 0.04 / S = 0.203, and
    # P(L >= 20) = 0.0266 / S = 0.135 (4256 draws: standard errors 0.006 and 0.005)
    n = len(lengths)
    assert counts[5] / n == pytest.approx(0.203, abs=0.02)
    assert sum(c for L, c in counts.items() if L >= 20) / n == pytest.approx(0.135, abs=0.015)


def test_the_new_field_leaves_fixed_length_cache_keys_alone():
    """Worlds already built (a 27M warm start takes 9 minutes) stay valid: max_word_length = 0 is not hashed."""
    base = Config()
    assert _key(base) == "ca68a9db8314"  # the default world's key before the field existed
    long = Config()
    long.task.max_word_length = 40
    assert _key(long) != _key(base)
