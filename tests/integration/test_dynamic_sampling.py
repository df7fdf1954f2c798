"""algo.dynamic_sampling through the real driver, Ray and vLLM: tied groups are dropped, counted and replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._jobs import Job, small_job

pytestmark = pytest.mark.integration


def test_tied_groups_are_dropped_counted_and_replaced(tmp_path, default_cfg, world, ray_session):
    cfg = small_job(tmp_path, default_cfg)
    cfg.steps, cfg.checkpoint_every = 3, 0
    cfg.reward.function = "tests._reward_fns:half_tied"  # about half of the groups tie
    cfg.algo.dynamic_sampling, cfg.algo.dynamic_sampling_max_draws = True, 3
    job = Job(cfg)
    job.thread.join(timeout=600)
    assert not job.thread.is_alive(), job.lines[-15:]
    if job.error:
        raise job.error
    s = job.summary
    a = s["accounting"]
    rows = [json.loads(x) for x in (Path(tmp_path) / "job" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert len(steps) == 3
    tied = [r["tied_groups_dropped"] for r in steps]
    assert all(1 <= t <= 2 * 8 for t in tied), tied  # some dropped every step, never past (3 - 1) x 8
    assert a["prompts_dropped"].get("tied_rewards") == sum(tied)
    assert a["prompts_trained"] == 3 * 8 and a["prompts_unaccounted"] == 0 and a["duplicates"] == 0
    assert a["prompts_drawn"] == a["prompts_trained"] + sum(a["prompts_dropped"].values())
    for r, t in zip(steps, tied):
        if t < 16:  # budget left: every group the learner got carries signal
            assert r["train/tied_group_frac"] == 0.0, r
        assert r["train/samples_trained"] <= 32 * (1 - r["train/tied_group_frac"])  # tied rows are never run
