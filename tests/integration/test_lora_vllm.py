"""The LoRA learner's two outputs in vLLM: final_adapter, applied by vLLM's own LoRA support to the base model, and
final_model (the merged weights, also what generators load) give the same greedy completions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.world import PAD
from core.config import AlgoConfig, LearnerConfig
from learner.actor import Learner
from tests.integration.test_learner_algos import G, _groups

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_vllm_applies_the_saved_adapter_as_the_merged_model(world, tokenizer, heldout_prompts, tmp_path):
    torch.set_num_threads(1)
    learner = Learner(world.model_path, AlgoConfig(group_size=G),
                      LearnerConfig(lr=2e-2, torch_threads=1, lora_rank=4, lora_alpha=8), 10, 0, PAD)
    for seed in range(3):  # a large learning rate on random completions: the adapters move far
        learner.train_step(_groups(learner, tokenizer, heldout_prompts[:8], seed))
    learner.save(str(tmp_path / "final_model"), str(tmp_path / "final_adapter"))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([list(p.token_ids) for p in heldout_prompts[:64]]))

    out = subprocess.run([sys.executable, str(REPO / "tests" / "_vllm_lora.py"), "--base", world.model_path,
                          "--adapter", str(tmp_path / "final_adapter"), "--merged", str(tmp_path / "final_model"),
                          "--prompts", str(prompts)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["adapter"] == got["merged"]
    assert sum(a != b for a, b in zip(got["base"], got["merged"])) >= 8  # the adapter changed what is generated
