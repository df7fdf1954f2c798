"""relayrl on a real multi-node Ray cluster: a head and a worker node started as separate `ray start`
processes on this machine, a job submitted with `relayrl submit` through the Jobs API (token
authentication on), generators placed on the worker node and the learner on the head by custom
resources."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    # the cluster's token, from the environment as the README says to deploy it; a fresh machine has no
    # ~/.ray/auth_token, and `ray start` with token auth on and no token refuses to start
    env.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    gcs, dash = _free_port(), _free_port()
    logs = tmp_path_factory.mktemp("ray-nodes")
    procs = []

    def start(name, args):
        with open(logs / f"{name}.log", "w") as f:
            procs.append(subprocess.Popen([str(BIN / "ray"), "start", *args, "--block"], env=env, stdout=f,
                                          stderr=subprocess.STDOUT, start_new_session=True))

    # Each node's dashboard agent on a free port: its default, 52365, is taken whenever another Ray instance runs on
    # this machine (the session's own, started by an earlier test), and a head whose agent cannot bind never
    # accepts a job ("No available agent to submit job")
    start("head", ["--head", f"--port={gcs}", f"--dashboard-port={dash}", "--include-dashboard=true",
                   "--dashboard-host=127.0.0.1", "--num-cpus=2", '--resources={"learner_node": 1}',
                   f"--dashboard-agent-listen-port={_free_port()}"])
    _wait_http(f"http://127.0.0.1:{dash}", 120, logs / "head.log")
    # Its own temp dir, as a node on another machine has: two nodes of one machine otherwise share one session
    # directory, and a node setting up the job's working_dir for its first worker deletes and re-extracts it
    # (Ray's WorkingDirPlugin.create unpacks with overwrite=True) under the processes the other node runs there
    # (seen: the driver's cwd gone, FileNotFoundError; the learner dead). Short: Ray's socket paths live under it.
    worker_tmp = tempfile.mkdtemp(prefix="rw")
    start("worker", [f"--address=127.0.0.1:{gcs}", "--num-cpus=3", '--resources={"generator_node": 4}',
                     f"--temp-dir={worker_tmp}", f"--dashboard-agent-listen-port={_free_port()}"])
    try:
        yield {"jobs": f"http://127.0.0.1:{dash}", "env": env, "logs": logs}
    finally:
        for p in procs[::-1]:  # SIGTERM to `ray start --block` stops that node's processes only
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
        shutil.rmtree(worker_tmp, ignore_errors=True)


def _wait_http(url: str, timeout_s: float, log: Path) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except urllib.error.HTTPError:  # answering (401 without a token): up
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} not up after {timeout_s}s:\n{log.read_text()[-2000:]}")


def test_submitted_job_runs_with_generators_on_the_worker_node(two_nodes, tmp_path, default_cfg, world):
    out = subprocess.run(
        [str(BIN / "relayrl"), "submit", f"--address={two_nodes['jobs']}", "--timeout=600", "--",
         "--steps=2", "--prompts_per_step=8", "--algo.group_size=4", "--algo.minibatches=1", "--eval_every=2",
         "--generator.num_generators=1", "--generator.resources=generator_node=1",
         "--learner.resources=learner_node=1", "--reward.resources=generator_node=0.5",
         f"--model.cache_dir={os.path.abspath(default_cfg.model.cache_dir)}",
         f"--run_dir={tmp_path}", "--run_name=submitted"],
        cwd=REPO, env=two_nodes["env"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SUCCEEDED" in out.stdout

    s = json.loads((tmp_path / "submitted" / "summary.json").read_text())
    assert s["steps"] == 2 and s["accounting"]["prompts_trained"] == 16
    nodes, placed = s["nodes"], s["placement"]
    assert len(nodes) == 2
    assert "generator_node" in nodes[placed["generator-0"]] and "learner_node" in nodes[placed["learner"]]
    assert placed["generator-0"] != placed["learner"]
