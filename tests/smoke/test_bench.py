"""Smoke test of the benchmarks, run as a user runs them (their own process), with a tiny budget.

Only that they run end to end and write their results; no timing is asserted (this machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import ISA_FLAGS

REPO = Path(__file__).resolve().parents[2]


def test_generation_bench_tiny_budget(tmp_path):
    """bench/generation.py: bare vLLM and relayrl's generator pool on the tiny model, 8 prompts, 1 pass each
    (about 60-100 s on 2 cores: one in-process engine and one generator actor start in parallel)."""
    out = subprocess.run([sys.executable, "-m", "bench.generation", "--models", "tiny", "--generators", "1",
                          "--prompts", "8", "--repeats", "1", "--results-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "generation.json").read_text())
    assert (tmp_path / "generation.md").exists()
    paths = {r["path"] for r in res["rows"]}
    assert paths == {"bare vLLM (in-process)", "relayrl rollout", "relayrl pool.generate", "bare vLLM, unseeded"}
    for r in res["rows"]:
        assert r["tokens_per_s"] > 0 and r["ratio"] > 0, r
        assert r["tokens"] > 0 and r["model"] == "tiny"
    assert set(res["ratios"]) == {"tiny/1gen/relayrl rollout", "tiny/1gen/relayrl pool.generate"}
    assert set(res["unseeded_vs_seeded_bare"]) == {"tiny/1gen"}
    assert res["ratio_rollout_1gen"]["tiny"] > 0
    assert isinstance(res["target_met"]["tiny"], bool)
    assert res["machine"]["cpus"] >= 1
    assert set(res["machine"]["cpu_isa"]) <= set(ISA_FLAGS)  # which of torch's/vLLM's CPU kernel families apply
    # every path did the same work: 8 prompts x 8 samples
    assert all(run["samples"] == 64 for runs in res["raw"]["tiny/1"].values() for run in runs)


@pytest.mark.parametrize("estimator,bf16", [("grpo", False), ("ppo", False), ("grpo", True)])
def test_learner_step_bench_tiny_budget(tmp_path, estimator, bf16):
    """bench/learner_step.py: the four learner variants on the tiny shape, 4 prompts, one timed update each
    (with --estimator ppo the critic trains in every update too; with --bf16 float32 against bf16 autocast)."""
    out = subprocess.run([sys.executable, "-m", "bench.learner_step", "--model", "tiny", "--prompts", "4",
                          "--repeats", "1", "--threads", "1", "--estimator", estimator, "--results-dir", str(tmp_path),
                          *(["--bf16"] if bf16 else [])],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    name = "learner_step_tiny" + ("_ppo" if estimator == "ppo" else "") + ("_bf16" if bf16 else "")
    res = json.loads((tmp_path / f"{name}.json").read_text())
    assert res["args"]["estimator"] == estimator and res["args"]["bf16"] == bf16
    variants = ["+ reuse", "bf16, SDPA attention", "bf16"] if bf16 else ["plain", "shared prefix", "+ reuse", "+ sampler"]
    assert [r["variant"] for r in res["rows"]] == variants
    assert all(r["s"] > 0 and r["runs"] == 1 for r in res["rows"])
    md = (tmp_path / f"{name}.md").read_text()
    assert res["rows"][0]["speedup"] == 1.0 and f"| {variants[-1]} |" in md and f"Estimator: {estimator}." in md


def test_learner_step_bench_lora_tiny_budget(tmp_path):
    """bench/learner_step.py --lora: the default learner against LoRA adapters, with trained parameters and AdamW
    state (two moments per trained parameter, float32)."""
    out = subprocess.run([sys.executable, "-m", "bench.learner_step", "--model", "tiny", "--prompts", "4",
                          "--repeats", "1", "--threads", "1", "--lora", "4", "--results-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "learner_step_tiny_lora4.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["+ sampler", "+ sampler, LoRA r=4"]
    full, lora = rows
    assert lora["trainable_m"] < full["trainable_m"] / 10
    for r in rows:
        assert r["adam_mb"] == pytest.approx(2 * 4 * r["trainable_m"] * 1e6 / 2**20, rel=1e-6)


def test_weight_sync_bench_lora_tiny_budget(tmp_path):
    """bench/weight_sync.py --lora: the floor, the whole model, and a LoRA learner publishing merged weights and
    adapters alone to one generator, tiny shape, one timed sync each."""
    out = subprocess.run([sys.executable, "-m", "bench.weight_sync", "--sizes", "tiny", "--generators", "1",
                          "--repeats", "1", "--lora", "4", "--results-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {r["sent"]: r for r in json.loads((tmp_path / "weight_sync_lora4.json").read_text())["rows"]}
    assert set(rows) == {"whole model", "LoRA r=4, merged", "LoRA r=4, adapter"}
    assert rows["LoRA r=4, merged"]["mib"] == pytest.approx(rows["whole model"]["mib"], rel=1e-3)
    # r (in + out) numbers per adapted layer against in x out: a few % of the model
    assert rows["LoRA r=4, adapter"]["mib"] < rows["whole model"]["mib"] / 10
    assert all(r["floor_s"] > 0 and r["publish_s"] > 0 and r["sync_s"] > 0 for r in rows.values())
    assert "| LoRA r=4, adapter |" in (tmp_path / "weight_sync_lora4.md").read_text()


def test_data_parallel_bench_tiny_budget(tmp_path):
    """bench/data_parallel.py: one learner rank with 2 threads against two with 1 (real actors, gloo), tiny shape,
    4 prompts, one timed update each."""
    out = subprocess.run([sys.executable, "-m", "bench.data_parallel", "--model", "tiny", "--prompts", "4",
                          "--repeats", "1", "--cores", "2", "--results-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "data_parallel_tiny.json").read_text())
    assert [(r["variant"], r["ranks"]) for r in res["rows"]] == [("1 rank x 2 threads", 1), ("2 ranks x 1 thread", 2)]
    assert all(r["s"] > 0 and r["runs"] == 1 for r in res["rows"]) and res["rows"][0]["speedup"] == 1.0
    # one rank has nothing to sum; two sum every gradient
    assert res["rows"][0]["allreduce_s"] == 0.0 and res["rows"][1]["allreduce_s"] > 0
    assert "| 2 ranks x 1 thread |" in (tmp_path / "data_parallel_tiny.md").read_text()


def test_algos_bench_tiny_budget(tmp_path):
    """bench/algos.py: two variants through the real `relayrl train` CLI, 2 steps each, one table and one JSON."""
    extra = ["--steps=2", "--prompts_per_step=8", "--eval_every=2", "--generator.num_generators=1",
             "--algo.group_size=4"]
    out = subprocess.run([sys.executable, "-m", "bench.algos", "--only", "grpo", "grpo whole-groups", "--seeds", "0",
                          *(f"--extra={e}" for e in extra), "--out", str(tmp_path / "runs"),
                          "--results-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "algos.json").read_text())
    assert res["model"] == "tiny" and res["extra"] == extra and res["seeds"] == [0]
    assert [r["variant"] for r in res["rows"]] == ["grpo", "grpo whole-groups"]
    for r in res["rows"]:
        assert r["repeats"] == 1 and 0.0 <= r["acc_after"] <= 1.0 and r["per_run"] == f"{r['acc_after']:.3f}", r
        assert r["samples_per_s"] > 0
    for name, runs in res["runs"].items():
        assert [s["accounting"]["prompts_trained"] for s in runs] == [16], name
    # each variant's overrides reached its run: the resolved config the run wrote
    assert "minibatch_split: groups" in (tmp_path / "runs" / "grpo_whole-groups-r0" / "config.yaml").read_text()
    assert "minibatch_split: samples" in (tmp_path / "runs" / "grpo-r0" / "config.yaml").read_text()  # the default
    assert "| grpo whole-groups |" in (tmp_path / "algos.md").read_text()


def test_algos_bench_rejects_an_unknown_variant(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.algos", "--only", "grpo", "gpro",
                          "--results-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown variant(s) ['gpro']" in out.stderr
    assert not (tmp_path / "algos.json").exists()


def test_long_tail_bench_tiny_budget(tmp_path):
    """bench/long_tail.py (through bench.async_sync.compare, which async_sync uses too): two configurations on
    a short long-tailed task, 2 steps each, then the same table re-made from the JSON alone."""
    extra = ["--task.max_word_length=12", "--generator.max_new_tokens=13", "--model.warmstart_steps=5", "--steps=2",
             "--prompts_per_step=8", "--eval_every=2", "--algo.group_size=4"]
    only = ["async 1+1, partial 8", "async 1+1, dynamic micro-batches"]
    out = subprocess.run([sys.executable, "-m", "bench.long_tail", "--only", *only, *(f"--extra={e}" for e in extra),
                          "--out", str(tmp_path / "runs"), "--results-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "long_tail.json").read_text())
    assert [r["config"] for r in res["rows"]] == only and res["extra"] == extra
    assert "--task.max_word_length=40" in res["base"]
    for r in res["rows"]:
        assert r["samples_per_s"] > 0 and r["train_s"] > 0 and r["wait_s"] >= 0 and r["repeats"] == 1, r
    partial, dynamic = (res["runs"][c][0] for c in only)
    assert partial["accounting"]["prompts_trained"] == dynamic["accounting"]["prompts_trained"] == 16
    assert partial["continuation_chunks"] > 0 and dynamic["continuation_chunks"] == 0  # answers of up to 13 tokens
    # the overrides reached the runs (extra after base: the short task), as the resolved configs show
    cfg = (tmp_path / "runs" / "async-2-r0" / "config.yaml").read_text()
    assert "max_word_length: 12" in cfg and "partial_rollout_tokens: 8" in cfg
    assert "micro_batch_tokens: 2048" in (tmp_path / "runs" / "async-3-r0" / "config.yaml").read_text()
    md = (tmp_path / "long_tail.md").read_text()
    again = subprocess.run([sys.executable, "-m", "bench.long_tail", "--from-json", str(tmp_path / "long_tail.json"),
                            "--results-dir", str(tmp_path / "again")], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "again" / "long_tail.md").read_text() == md
