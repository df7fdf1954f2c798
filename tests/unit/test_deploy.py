"""Deployment files: docker-compose and the KubeRay RayJob keep the safe defaults (loopback-only ports,
token authentication from a secret or the environment), and every example config names only real
fields."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from core.config import Config, apply_dict, load_config

REPO = Path(__file__).resolve().parents[2]


def test_compose_publishes_only_on_loopback_and_keeps_token_auth():
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"head", "generator", "learner"} <= set(services)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
        env = svc["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), "the token must come from the environment"
    gpu = services["learner"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed on this machine")
def test_docker_compose_config_validates():
    out = subprocess.run(["docker-compose", "-f", "docker-compose.yml", "config", "-q"], cwd=REPO,
                         env={**os.environ, "RAY_AUTH_TOKEN": "test-token"}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_kuberay_rayjob_keeps_auth_and_stays_inside_the_cluster():
    doc = yaml.safe_load((REPO / "deploy" / "kuberay-rayjob.yaml").read_text())
    assert doc["kind"] == "RayJob" and doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    templates.append(doc["spec"]["submitterPodTemplate"])
    for t in templates:
        for c in t["spec"]["containers"]:
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "relayrl-ray-token"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert "generator_node" in groups["generators"]["rayStartParams"]["resources"]
    assert "learner_node" in groups["learner"]["rayStartParams"]["resources"]
    assert "--generator.resources=generator_node=1" in doc["spec"]["entrypoint"]


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_name_only_real_fields(path):
    data = yaml.safe_load(path.read_text())
    apply_dict(Config(), data)  # raises ConfigError on an unknown field or a wrong type
    if "dataset" not in data.get("task", {}) and "path" not in data.get("model", {}):
        load_config(str(path))  # self-contained examples validate fully
