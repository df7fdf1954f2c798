"""pass@k (unbiased estimator) against numbers worked out by hand."""

from __future__ import annotations

import pytest

from cluster.evaluation import pass_at_k


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),        # 1 - C(3,1)/C(5,1) = 1 - 3/5
    (5, 2, 2, 0.7),        # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (5, 4, 2, 1.0),        # C(1,2) = 0: any 2 of the 5 include a correct one
    (5, 0, 5, 0.0),        # nothing correct
    (4, 4, 1, 1.0),
    (8, 1, 4, 0.5),        # 1 - C(7,4)/C(8,4) = 1 - 35/70
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)
