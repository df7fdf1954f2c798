"""The rollout engine under faults and scaling, with real Ray, real vLLM and the real driver.

Each test runs `cluster.driver.run` in a thread and steers it from the test through the job's control
actor (the path `relayrl scale` / `relayrl stop` use), so the timeline is set by the test, not by
racing the job: scale or kill, wait until the pool has reacted, then stop the job.
"""

from __future__ import annotations

import pytest
import ray

from tests._jobs import Job, check_accounting, small_job

pytestmark = pytest.mark.integration


def _assert_on_prometheus_endpoint(names: list[str], timeout_s: float = 60) -> None:
    """The job's custom metrics reach the node's Prometheus endpoint (exported every few seconds)."""
    import time
    import urllib.request

    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, text = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if all(n in text for n in names):
            return
        time.sleep(2)
    missing = [n for n in names if n not in text]
    raise AssertionError(f"{missing} not on the Prometheus endpoint :{port} after {timeout_s}s")


def test_scale_up_and_down_during_a_run(tmp_path, default_cfg, world, ray_session):
    cfg = small_job(tmp_path, default_cfg, mode="sync")
    cfg.generator.num_generators = 1
    job = Job(cfg)
    job.wait_status(lambda s: s["step"] >= 2, "step 2")
    ray.get(job.control.request_generators.remote(2), timeout=30)
    up = job.wait_status(lambda s: len(s["generators"]) == 2, "2 generators serving")
    # the newcomer loaded the current weights before serving: the learner's next steps are verified syncs
    job.wait_status(lambda s: s["step"] >= up["step"] + 2, "two steps with 2 generators")
    _assert_on_prometheus_endpoint(["ray_relayrl_policy_version", "ray_relayrl_samples_per_second",
                                    "ray_relayrl_generators"])
    ray.get(job.control.request_generators.remote(1), timeout=30)
    down = job.wait_status(lambda s: len(s["generators"]) == 1, "back to 1 generator")
    job.wait_status(lambda s: s["step"] >= down["step"] + 1, "a step after scaling down")
    s = job.stop()

    check_accounting(s)
    assert s["accounting"]["prompts_dropped"] == {}  # sync mode: nothing stale, nothing lost
    assert s["generator_restarts"] == 0
    assert s["scale_events"] == ["target 2", "target 1", "removed generator-1"]


def test_async_job_survives_a_killed_generator(tmp_path, default_cfg, world, ray_session):
    job = Job(small_job(tmp_path, default_cfg, mode="async", max_staleness=1))
    job.wait_status(lambda s: s["step"] >= 3 and len(s["generators"]) == 2, "step 3 with 2 generators")
    ray.kill(ray.get_actor("generator-0"))
    # the job goes on with one generator while a replacement starts, loads the current weights and serves
    job.wait_status(lambda s: s["generator_restarts"] == 1, "the restart to be counted")
    back = job.wait_status(lambda s: len(s["generators"]) == 2 and "generator-0" not in s["generators"],
                           "the replacement serving")
    job.wait_status(lambda s: s["step"] >= back["step"] + 2, "two steps with the replacement")
    s = job.stop()

    check_accounting(s)
    assert s["generator_restarts"] == 1
    assert len(s["generator_failures"]) == 1 and s["generator_failures"][0].startswith("generator-0")
    assert set(s["accounting"]["prompts_dropped"]) <= {"stale", "unused_at_end"}
