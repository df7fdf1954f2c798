"""Smoke tests of every user-facing command, run as a user runs them: the installed `relayrl` script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RELAYRL = str(Path(sys.executable).with_name("relayrl"))


def _run(args, timeout, **kw):
    return subprocess.run([RELAYRL, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


def test_help_documents_every_field():
    from core.config import Config, iter_fields

    out = _run(["train", "--help"], 60)
    assert out.returncode == 0
    for name, *_ in iter_fields(Config()):
        assert f"--{name}=" in out.stdout, name


@pytest.mark.parametrize("args, field", [
    (["--learner.lr=-1"], "learner.lr"),
    (["--generator.num_generators", "0"], "generator.num_generators"),
    (["--algo.estimator=ppo2"], "algo.estimator"),
    (["--no_such_field=1"], "no_such_field"),
    (["--reward.function=nomodule"], "reward.function"),
    (["--rollout.env=nomodule"], "rollout.env"),
    (["--rollout.env=envs.builtin:nope"], "rollout.env"),  # importable module, no such function: checked by run()
])
def test_bad_config_fails_fast_naming_the_field(args, field):
    t0 = time.monotonic()
    out = _run(["train", *args], 60)
    assert out.returncode == 2
    assert f"config error: {field}:" in out.stderr
    assert time.monotonic() - t0 < 20  # no Ray, no vLLM: interpreter start-up only
    assert "Started a local Ray instance" not in out.stderr + out.stdout


def test_bad_yaml_field_fails_fast(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("learner:\n  lr: 1e-4\n  momentum: 0.9\n")
    out = _run(["train", "--config", str(cfg)], 60)
    assert out.returncode == 2 and "learner.momentum: unknown field" in out.stderr


def test_train_tiny_budget_end_to_end(tmp_path):
    """`relayrl train` with a tiny budget: real Ray, real vLLM, real learner; all outputs written,
    and the final checkpoint is a plain Hugging Face folder that transformers loads."""
    out = _run(["train", "--steps=2", "--prompts_per_step=8", "--eval_every=1", "--generator.num_generators=1",
                "--algo.group_size=4", "--eval_samples=4", "--eval_pass_k=4", f"--run_dir={tmp_path}",
                "--run_name=smoke"], 600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "smoke"
    summary = json.loads((run / "summary.json").read_text())
    for key in ("heldout_accuracy_before", "heldout_accuracy_after", "steps", "wall_seconds", "config"):
        assert key in summary
    assert summary["steps"] == 2
    assert summary["accounting"]["prompts_trained"] == 16
    assert (run / "curves.png").stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:  # sampled pass@k beside greedy accuracy at every evaluation; more tries never hurt
        assert 0.0 <= r["eval/pass@1"] <= r["eval/pass@4"] <= 1.0
    assert f"run directory: {tmp_path / 'smoke'}" in out.stdout

    # the same name again, without --resume: refused before anything starts, the first run's outputs untouched
    metrics_before = (run / "metrics.jsonl").read_bytes()
    t0 = time.monotonic()
    again = _run(["train", "--steps=2", f"--run_dir={tmp_path}", "--run_name=smoke"], 60)
    assert again.returncode == 2 and time.monotonic() - t0 < 20
    assert f"config error: run_name: {run} already holds a run (metrics.jsonl, summary.json" in again.stderr
    assert "--resume" in again.stderr and "Started a local Ray instance" not in again.stderr + again.stdout
    assert (run / "metrics.jsonl").read_bytes() == metrics_before

    # the same seed again, on 2 generators instead of 1: the same run, number for number (each prompt samples
    # from its own seeded stream whatever engine it lands on; the learner orders groups by prompt)
    twin = _run(["train", "--steps=2", "--prompts_per_step=8", "--eval_every=1", "--generator.num_generators=2",
                 "--algo.group_size=4", "--eval_samples=4", "--eval_pass_k=4", f"--run_dir={tmp_path}",
                 "--run_name=twin"], 600)
    assert twin.returncode == 0, twin.stdout[-3000:] + twin.stderr[-3000:]
    twin_rows = [json.loads(x) for x in (tmp_path / "twin" / "metrics.jsonl").read_text().splitlines()]

    def outcome(r):  # what the run computed, not how long it took or where
        return {k: v for k, v in r.items() if not k.startswith(("time/", "perf/")) and k not in
                ("train/train_seconds", "generators")}

    assert [outcome(r) for r in twin_rows] == [outcome(r) for r in rows]
    assert rows[1]["train/policy_loss"] != 0 and twin_rows[-1]["generators"] == 2  # not vacuous

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "final_model")
    tok = AutoTokenizer.from_pretrained(run / "final_model")
    assert model.config.model_type == "llama" and tok.eos_token == "</s>"

    # `relayrl eval` on the saved model: the job's last evaluation, number for number (same weights, same greedy
    # and seeded sampled decoding, same reward); JSON alone on stdout
    ev = _run(["eval", f"--model.path={run / 'final_model'}", "--generator.num_generators=1", "--eval_samples=4",
               "--eval_pass_k=4"], 600)
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    got = json.loads(ev.stdout)
    assert got["model"] == str(run / "final_model") and got["heldout_prompts"] == 256
    for key in ("heldout_accuracy", "pass@1", "pass@4"):
        assert got[key] == rows[-1][f"eval/{key}"], key
    assert rows[-1]["eval/heldout_accuracy"] != rows[0]["eval/heldout_accuracy"] or \
        rows[-1]["eval/pass@1"] != rows[0]["eval/pass@1"]  # training moved it: the equality above says something


def test_status_scale_and_stop_a_running_job(tmp_path):
    """`relayrl status`, `relayrl scale` and `relayrl stop` against a `relayrl train` running in another process."""
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        job = subprocess.Popen([RELAYRL, "train", "--steps=100000", "--prompts_per_step=8", "--eval_every=100000",
                                "--generator.num_generators=1", "--algo.group_size=4", "--algo.minibatches=1",
                                "--rollout.mode=async", f"--run_dir={tmp_path}", "--run_name=live"],
                               cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        address = None
        while address is None:
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            address = next((line.split()[1] for line in log.read_text().splitlines() if line.startswith("ray: ")), None)
            time.sleep(0.5)
        while True:
            out = _run(["status", f"--address={address}"], 60)
            assert out.returncode == 0, out.stderr[-2000:]
            status = json.loads(out.stdout)
            if status.get("step", 0) >= 1:
                break
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert status["mode"] == "async" and status["generators"] == ["generator-0"]

        out = _run(["scale", "--generators=2", f"--address={address}"], 60)
        assert out.returncode == 0 and "requested 2 generators" in out.stdout, out.stderr[-2000:]
        out = _run(["stop", f"--address={address}"], 60)
        assert out.returncode == 0, out.stderr[-2000:]
        assert job.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    summary = json.loads((tmp_path / "live" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] >= 1
    assert summary["scale_events"][0] == "target 2"
    assert summary["accounting"]["prompts_unaccounted"] == 0 and summary["accounting"]["duplicates"] == 0


def test_control_commands_without_a_job_fail_clearly():
    out = _run(["status", "--address=127.0.0.1:1"], 120)
    assert out.returncode == 1 and "relayrl:" in out.stderr


def test_malformed_dataset_fails_before_ray_naming_the_row(tmp_path):
    good = tmp_path / "heldout.jsonl"
    good.write_text(json.dumps({"prompt": "abcde=", "answer": "edcba"}) + "\n")
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps({"prompt": "abcde=", "answer": "edcba"}) + "\n" + json.dumps({"prompt": "abcde="}) + "\n")
    out = _run(["train", f"--task.dataset={bad}", f"--task.heldout_dataset={good}", f"--run_dir={tmp_path}"], 300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"data error: {bad}: row 1: missing field 'answer'" in out.stderr
    assert "Started a local Ray instance" not in out.stderr + out.stdout


def test_train_with_lora_writes_merged_model_and_adapter_then_resumes(tmp_path):
    """`relayrl train --learner.lora_rank=4`: the generators train on merged weights, the run ends with a plain
    final_model and a PEFT final_adapter, and --resume continues from a checkpoint's adapter."""
    job = ["--prompts_per_step=8", "--eval_every=1", "--generator.num_generators=1", "--algo.group_size=4",
           "--learner.lora_rank=4", "--learner.lora_alpha=8", "--learner.lr=1e-2", "--checkpoint_every=1",
           f"--run_dir={tmp_path}", "--run_name=lora"]
    out = _run(["train", "--steps=2", *job], 600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "lora"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_adapter"] == str(run / "final_adapter")
    adapter = json.loads((run / "final_adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4 and "q_proj" in adapter["target_modules"]
    assert (run / "checkpoints" / "step-000001" / "adapter" / "adapter_model.safetensors").exists()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # the published (merged) weights are the learner's: vLLM's log-probs stay the learner's own numbers
    assert all(r["train/logprob_mismatch"] < 1e-5 for r in rows if "train/logprob_mismatch" in r)

    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(run / "final_model")
    assert not any("lora" in k for k in final.state_dict())

    resumed = _run(["train", "--resume", str(run), "--steps=3"], 600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 3  # the latest checkpoint: step 1


def test_lora_target_matching_no_layer_fails_before_ray(tmp_path):
    """learner.lora_targets is checked against the model's own layers (a weightless copy) before anything starts."""
    out = _run(["train", "--learner.lora_rank=4", "--learner.lora_targets=q_proj,qkv_proj", f"--run_dir={tmp_path}"],
               300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "config error: learner.lora_targets: ['qkv_proj'] match no linear layer" in out.stderr
    assert "down_proj" in out.stderr  # it says which layers there are
    assert "Started a local Ray instance" not in out.stderr + out.stdout


def test_train_multi_turn_example(tmp_path):
    """examples/multiturn.yaml as the README runs it, on a tiny budget: episodes of several turns, and the
    held-out evaluation runs them too."""
    out = _run(["train", "--config", "examples/multiturn.yaml", "--steps=2", "--prompts_per_step=8", "--eval_every=1",
                "--generator.num_generators=1", "--algo.group_size=4", f"--run_dir={tmp_path}", "--run_name=mt"], 600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "mt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(1.0 < r["eval/turns_mean"] <= 3.0 for r in rows)  # the warm start is wrong on most prompts at first
    assert all(1.0 <= r["reward/turns"] <= 3.0 for r in rows[1:])
    summary = json.loads((tmp_path / "mt" / "summary.json").read_text())
    assert summary["accounting"]["prompts_trained"] == 16 and summary["accounting"]["env_failures"] == {}


def test_env_role_needs_a_chat_template_and_fails_before_ray(tmp_path):
    """rollout.env_role wraps replies with the model's chat template; the built-in character-level model has none."""
    out = _run(["train", "--rollout.env=envs.builtin:reverse_rest", "--rollout.env_role=user",
                "--generator.max_new_tokens=32", f"--run_dir={tmp_path}"], 300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "config error: rollout.env_role: the model's tokenizer" in out.stderr and "no chat template" in out.stderr
    assert "Started a local Ray instance" not in out.stderr + out.stdout
