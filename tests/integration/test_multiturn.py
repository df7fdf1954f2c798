"""Multi-turn episodes with real vLLM: the environment's replies land in the sample exactly as it wrote them and
are masked out of training; the model's later turns are sampled from the whole transcript (vLLM's log-probs are
the learner's on it); sampled episodes repeat from their seed; environment failures end their episode and come
back as data; and a real async job trains on episodes, dropping the groups an environment failed in."""

from __future__ import annotations

import json

import pytest
import ray

from core.messages import EnvSpec, GenerateRequest
from envs.builtin import answer_so_far, reverse_rest
from tests._jobs import Job, check_accounting, small_job
from tests._weights import checkpoint_handle

pytestmark = pytest.mark.integration

MAX_NEW = 32
REST = EnvSpec("envs.builtin:reverse_rest", max_turns=3, step_timeout_s=30)


def _runs(c):
    """The completion's tokens as (is_model, tokens) runs, in order."""
    out = []
    for tok, m in zip(c.token_ids, c.loss_mask or (1,) * len(c.token_ids)):
        if out and out[-1][0] == bool(m):
            out[-1][1].append(tok)
        else:
            out.append((bool(m), [tok]))
    return out


@pytest.fixture(scope="module")
def served(generator_pool, world):
    """The shared generators on the checkpoint's own weights (other tests may have loaded others)."""
    generator_pool.sync(checkpoint_handle(world.model_path, generator_pool.version + 1))
    return generator_pool


def test_greedy_episodes_follow_the_environment_token_for_token(served, heldout_prompts, tokenizer, world):
    import torch
    from transformers import AutoModelForCausalLM

    prompts = heldout_prompts[:32]
    eps = served.generate(prompts, n=1, temperature=0.0, max_new_tokens=MAX_NEW, seed=0, env=REST)
    single = served.generate(prompts, n=1, temperature=0.0, max_new_tokens=MAX_NEW, seed=0)
    assert sum(c.turns >= 2 for c in eps) >= 8  # the warm start is wrong on most prompts: they get a second turn
    assert any(c.turns == 3 for c in eps)
    for c, s in zip(eps, single, strict=True):
        runs = _runs(c)
        assert len(c.loss_mask or c.token_ids) == len(c.token_ids) == len(c.logprobs)
        assert [m for m, _ in runs] == [True, False] * (c.turns - 1) + [True]  # model and environment take turns
        assert runs[0][1] == list(s.token_ids)  # the first turn is the single-turn answer
        # each reply is exactly what the environment says about the transcript before it, as the tokenizer
        # writes it; and the model's turns end on their own (EOS), except perhaps the last
        for k in range(1, len(runs), 2):
            before = tokenizer.decode([t for _, r in runs[:k] for t in r], skip_special_tokens=True)
            want = reverse_rest(c.prompt.text, before, c.prompt.answer, (k + 1) // 2)
            assert runs[k][1] == tokenizer(want, add_special_tokens=False)["input_ids"]
            assert runs[k - 1][1][-1] == tokenizer.eos_token_id
        assert all(lp == 0.0 for lp, m in zip(c.logprobs, c.loss_mask) if not m)
        # the episode ended for a reason: solved, out of turns, or out of tokens
        assert answer_so_far(c.prompt.text, c.text) == (c.prompt.answer, c.turns) or c.turns == 3 \
            or c.finish_reason == "length"

    # later turns are sampled from the whole transcript: vLLM's log-prob of every model token is the learner's
    # on prompt + everything before it (environment tokens included)
    model = AutoModelForCausalLM.from_pretrained(world.model_path, torch_dtype=torch.float32).eval()
    multi = [c for c in eps if c.turns >= 2]
    for c in multi:
        ids = torch.tensor([list(c.prompt.token_ids) + list(c.token_ids)])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        P = len(c.prompt.token_ids)
        ref = [float(lp[P - 1 + j, t]) for j, t in enumerate(c.token_ids)]
        got = [(x, y) for x, y, m in zip(c.logprobs, ref, c.loss_mask) if m]
        assert len(got) == c.model_tokens
        assert max(abs(x - y) for x, y in got) < 1e-4


def test_sampled_episodes_repeat_from_their_seed(served, heldout_prompts):
    prompts = heldout_prompts[:8]
    a = served.generate(prompts, n=4, temperature=1.0, max_new_tokens=MAX_NEW, seed=3, env=REST)
    b = served.generate(prompts[::-1], n=4, temperature=1.0, max_new_tokens=MAX_NEW, seed=3, env=REST)
    by_uid = {}
    for c in b:
        by_uid.setdefault(c.prompt.uid, []).append(c)
    # the same prompt's episodes, whatever request or generator it landed in
    assert [c.token_ids for c in a] == [c.token_ids for p in prompts for c in by_uid[p.uid]]
    assert any(c.turns >= 2 for c in a)
    other = served.generate(prompts, n=4, temperature=1.0, max_new_tokens=MAX_NEW, seed=4, env=REST)
    assert [c.token_ids for c in other] != [c.token_ids for c in a]


def test_turn_and_token_budgets_end_episodes(served, heldout_prompts):
    prompts = heldout_prompts[:4]
    spec = EnvSpec("tests._envs:always_a", max_turns=2, step_timeout_s=30)
    for c in served.generate(prompts, n=1, temperature=0.0, max_new_tokens=MAX_NEW, seed=0, env=spec):
        assert c.turns == 2 and c.loss_mask.count(0) == 3  # one reply of 3 tokens, then the turn budget
    # 12 tokens: the first answer (6) and one reply (3) fit; the second answer may use what is left
    tight = served.generate(prompts, n=1, temperature=0.0, max_new_tokens=12, seed=0,
                            env=EnvSpec("tests._envs:always_a", max_turns=10, step_timeout_s=30))
    for c in tight:
        assert len(c.token_ids) <= 12 and c.turns <= 3


def test_environment_failures_end_their_episode_and_are_reported(served, heldout_prompts):
    spec = EnvSpec("tests._envs:fails_on_a", max_turns=3, step_timeout_s=2)
    prompts = [p for p in heldout_prompts if p.answer[0] in "abc"][:12]
    assert {p.answer[0] for p in prompts} == {"a", "b", "c"}
    before = sum(i["env_failures"] for i in ray.get([a.info.remote() for a in served.actors.values()]))
    eps = served.generate(prompts, n=1, temperature=0.0, max_new_tokens=MAX_NEW, seed=0, env=spec)
    failed = 0
    for c in eps:
        solved_first = c.text == c.prompt.answer  # the environment is asked only after a wrong answer
        if c.prompt.answer[0] == "a" and not solved_first:
            assert c.env_failure == "exception: RuntimeError: tool crashed" and c.turns == 1
        elif c.prompt.answer[0] == "b" and not solved_first:
            assert c.env_failure.startswith("timeout: no reply within timeouts.env_step_s=2")
        else:
            assert c.env_failure == ""
        failed += bool(c.env_failure)
    assert failed >= 2
    after = sum(i["env_failures"] for i in ray.get([a.info.remote() for a in served.actors.values()]))
    assert after - before == failed
    # the generators carry on serving
    assert len(served.generate(prompts[:2], n=1, temperature=0.0, max_new_tokens=8, seed=0)) == 2


def test_an_episode_goes_on_without_waiting_for_the_other_episodes_replies(served, heldout_prompts):
    """Episodes are not in lockstep: while some episodes' replies are still pending, the others take their next
    turns (tests._envs.waits_for_others would fail every 'a' episode otherwise)."""
    slow = [p for p in heldout_prompts if p.answer[0] == "a"][:8]
    fast = [p for p in heldout_prompts if p.answer[0] != "a"][:8]
    spec = EnvSpec("tests._envs:waits_for_others", max_turns=3, step_timeout_s=30)
    actor = served.actors[sorted(served.actors)[0]]  # one generator: the episodes share its process
    eps = ray.get(actor.generate.remote(GenerateRequest(tuple(slow + fast), 1, 0.0, MAX_NEW, seed=0, env=spec)),
                  timeout=120)
    assert all(c.env_failure == "" for c in eps), [c.env_failure for c in eps if c.env_failure]
    assert any(c.turns >= 2 for c in eps[:len(slow)])  # a slow episode did wait for its reply, and went on
    assert any(c.turns >= 2 for c in eps[len(slow):])


def test_an_async_job_trains_on_episodes_and_drops_groups_an_environment_failed_in(tmp_path, default_cfg,
                                                                                   ray_session):
    # async: episodes keep running in the generators while the learner trains (the CLI smoke test runs sync)
    cfg = small_job(tmp_path, default_cfg, env="tests._envs:fails_on_a", max_turns=3, mode="async", max_staleness=1)
    cfg.generator.max_new_tokens = MAX_NEW
    cfg.timeouts.env_step_s = 2
    cfg.reward.function = "reward.builtin:reverse_multiturn"
    cfg.eval_correct_threshold = 0.75
    job = Job(cfg)
    job.wait_status(lambda s: s["step"] >= 3, "step 3")
    s = job.stop()

    check_accounting(s)
    a = s["accounting"]
    assert a["prompts_dropped"].get("env_failed", 0) > 0  # prompts whose answer starts with a or b, answered wrong
    assert set(a["env_failures"]) <= {"exception", "timeout"} and sum(a["env_failures"].values()) > 0
    rows = [json.loads(x) for x in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["eval/turns_mean"] > 1.0  # the held-out episodes take more than one turn
    assert all(r["reward/turns"] >= 1.0 for r in rows if "reward/turns" in r)
    steps = [r for r in rows if "env_failures" in r]  # the running count, per step
    assert steps and steps[-1]["env_failures"] <= sum(a["env_failures"].values())
    assert any("[env]" in line for line in job.lines)
