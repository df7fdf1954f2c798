"""Shared fixtures. Real Ray and real vLLM engines are expensive (~30 s each on 2 cores), so they are
session-scoped and shared by every integration test."""

from __future__ import annotations

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def default_cfg():
    from core.config import Config

    cfg = Config()
    cfg.model.cache_dir = os.path.join(REPO, ".relayrl_cache")
    return cfg


@pytest.fixture(scope="session")
def world(default_cfg):
    from cluster.world import ensure_world

    return ensure_world(default_cfg, log=lambda *_: None)


@pytest.fixture(scope="session")
def tokenizer(world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world.model_path)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=16, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def generator_pool(ray_session, world):
    from actors.generator import EngineSettings
    from actors.pool import GeneratorPool

    # tempered log-probs (what a job at a temperature other than 1 runs): at temperature 1 the same numbers as raw
    pool = GeneratorPool(EngineSettings(model_path=world.model_path, max_model_len=64, tempered_logprobs=True),
                         num_cpus=1, num_gpus=0,
                         startup_timeout_s=300, call_timeout_s=120, sync_timeout_s=120, log=lambda *_: None,
                         name_prefix="shared-generator")  # a job's own pool, started beside it, names its generator-N
    pool.start(2)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="session")
def heldout_prompts(world, tokenizer):
    from cluster.world import encode, read_rows
    from core.messages import Prompt

    rows = read_rows(world.heldout_path)[:64]
    return [Prompt(i, r["prompt"], tuple(encode(tokenizer, r["prompt"])), r["answer"]) for i, r in enumerate(rows)]
