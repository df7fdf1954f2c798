"""Kill the learner mid-run, resume from the checkpoint, finish: steps, data position, accounting and
metrics continue exactly where the checkpoint left them. Real Ray, real vLLM, the real driver."""

from __future__ import annotations

import json

import pytest
import ray

from cluster.driver import LearnerFailed, latest_checkpoint, resume_config
from tests._jobs import Job, small_job

pytestmark = pytest.mark.integration

P = 8  # prompts per step in small_job


def test_kill_learner_then_resume_continues_from_checkpoint(tmp_path, default_cfg, world, ray_session):
    # async: prompts are in flight at the checkpoint, so the accounting across the restart is the hard case
    cfg = small_job(tmp_path, default_cfg, mode="async")
    cfg.steps, cfg.checkpoint_every = 7, 2
    cfg.generator.num_generators = 1
    job = Job(cfg)
    job.wait_status(lambda s: s["step"] >= 3, "step 3 (a checkpoint exists at step 2)")
    ray.kill(ray.get_actor("learner"))
    summary, error = job.join()
    assert summary is None and isinstance(error, LearnerFailed)
    run_dir = tmp_path / "job"
    assert f"relayrl train --resume {run_dir}" in str(error)
    ckpt = latest_checkpoint(run_dir)
    saved = json.loads((ckpt / "driver.json").read_text())
    assert saved["step"] in (2, 4, 6) and (ckpt / "model" / "config.json").exists()

    resumed = Job(resume_config(str(run_dir), []), resume=True)
    s, err = resumed.join()
    assert err is None, err

    assert s["resumed_from_step"] == saved["step"] and s["steps"] == 7 and not s["stopped_early"]
    a = s["accounting"]
    assert a["prompts_trained"] == 7 * P and a["duplicates"] == 0 and a["prompts_unaccounted"] == 0
    assert a["prompts_drawn"] == a["prompts_trained"] + sum(a["prompts_dropped"].values())
    # the data stream continued from the checkpoint: nothing re-drawn, nothing skipped
    assert s["data_position"] == a["prompts_drawn"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(0, 8))  # each step logged once (the lost attempt's rows removed)
    assert rows[saved["step"]]["data/position"] == saved["stream"]["epoch"] * 4000 + saved["stream"]["pos"]
    assert s["heldout_accuracy_before"] == saved["acc_before"]


def test_learner_killed_outside_its_update_fails_the_job_with_the_resume_hint(tmp_path, default_cfg, world,
                                                                              ray_session, monkeypatch):
    """The learner dies while the driver checkpoints (it could as well be publishing or saving): the job ends with
    LearnerFailed and the resume command, as when it dies during an update, not with Ray's bare ActorDiedError
    (seen once the machine was fast enough for a kill to land outside train_step)."""
    import cluster.driver as driver

    cfg = small_job(tmp_path, default_cfg)
    cfg.steps, cfg.checkpoint_every = 6, 2
    cfg.generator.num_generators = 1
    real = driver.save_checkpoint

    def kill_then_save(run_dir, step, learner, *args, **kwargs):
        if step == 4:
            ray.kill(learner)
        return real(run_dir, step, learner, *args, **kwargs)

    monkeypatch.setattr(driver, "save_checkpoint", kill_then_save)
    summary, error = Job(cfg).join()
    assert summary is None and isinstance(error, LearnerFailed), error
    assert "at step 4" in str(error) and f"relayrl train --resume {tmp_path / 'job'}" in str(error)
    assert latest_checkpoint(tmp_path / "job").name == "step-000002"


def test_killed_data_parallel_rank_fails_the_job_then_both_ranks_resume(tmp_path, default_cfg, world, ray_session):
    """learner.data_parallel=2 through the real driver. Killing rank 1 (`learner-1`, not the named `learner`) ends
    the job with LearnerFailed and the resume command: its peer, waiting in the gradient all-reduce, is not waited
    for. The resumed job loads the checkpoint into both ranks and finishes."""
    cfg = small_job(tmp_path, default_cfg)
    cfg.steps, cfg.checkpoint_every = 5, 2
    cfg.generator.num_generators = 1
    cfg.learner.data_parallel, cfg.learner.num_cpus, cfg.learner.torch_threads = 2, 0.5, 1
    job = Job(cfg)
    job.wait_status(lambda s: s["step"] >= 3, "step 3 (a checkpoint exists at step 2)")
    ray.kill(ray.get_actor("learner-1"))
    summary, error = job.join()
    assert summary is None and isinstance(error, LearnerFailed), error
    run_dir = tmp_path / "job"
    assert f"relayrl train --resume {run_dir}" in str(error)
    saved = json.loads((latest_checkpoint(run_dir) / "driver.json").read_text())["step"]

    s, err = Job(resume_config(str(run_dir), []), resume=True).join()
    assert err is None, err
    assert s["resumed_from_step"] == saved and s["steps"] == 5 and not s["stopped_early"]
    assert s["accounting"]["prompts_trained"] == 5 * P and s["accounting"]["prompts_unaccounted"] == 0
    assert {"learner", "learner-1"} <= set(s["placement"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/allreduce_seconds"] > 0 for r in rows if r["step"] > 0)  # the ranks summed every update
