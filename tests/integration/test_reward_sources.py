"""Every reward source through real Ray reward actors (the session `ray_session`), and every way a
reward can fail: the failed samples carry None and a ScoreFailure with the right reason, the counts
are exact, nothing is silently scored, and the pool scores the next batch fine.

Sources: an import-path function, a stateful class, the built-ins combined from config, a remote
server (reward.server on a loopback port, in a thread of this process) and a tiny reward model.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import subprocess
import sys
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.config import RewardConfig, load_config
from core.messages import Completion, Prompt, ScoreResult
from reward.http import HttpScorer
from reward.policy import RewardSourceFailed, apply_failure_policy, check_failure_budget, failure_log_lines
from reward.pool import RewardPool
from reward.server import BackgroundServer, build_app
from tests._reward_fns import VALUES

pytestmark = pytest.mark.integration

def batch(completions: list[str], answers: list[str], prompts: list[str] | None = None) -> list[Completion]:
    prompts = prompts or [f"prompt {i}" for i in range(len(completions))]
    return [Completion(Prompt(i, p, (1,), a), (2,), (0.0,), c, "stop", 0, "generator-0")
            for i, (p, c, a) in enumerate(zip(prompts, completions, answers))]


def reasons(res: ScoreResult) -> dict[int, str]:
    return {f.index: f.reason for f in res.failures}


def consistent(res: ScoreResult) -> None:
    """Failed indices hold None (scores and components); every other index a finite float."""
    failed = {f.index for f in res.failures}
    assert len(failed) == len(res.failures)
    for i, s in enumerate(res.scores):
        if i in failed:
            assert s is None and all(col[i] is None for col in res.components.values())
        else:
            assert isinstance(s, float) and math.isfinite(s)


def rcfg(*overrides: str) -> RewardConfig:
    """A reward section through the real config loader, so the cross-field rules run too."""
    return load_config(None, list(overrides)).reward


# --------------------------------------------------------------------------- import-path function: faults

CLEAN = (["good", "bad", "other", "good"], ["a"] * 4)
CLEAN_SCORES = (1.0, 0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def fault_pool(ray_session):
    # 2 actors: a batch of 4 goes [0, 2] to rfault-0 and [1, 3] to rfault-1
    pool = RewardPool(RewardConfig(function="tests._reward_fns:by_mode", num_workers=2, num_cpus=0.25),
                      timeout_s=2.0, log=lambda *_: None, name_prefix="rfault")
    yield pool
    pool.shutdown()


def test_pool_size_comes_from_reward_num_workers(fault_pool, ray_session):
    assert sorted(fault_pool.workers) == ["rfault-0", "rfault-1"]
    res = fault_pool.score(batch(*CLEAN))
    assert res == ScoreResult(CLEAN_SCORES, (), {})
    for name in ("rfault-0", "rfault-1"):
        assert ray_session.get_actor(name) is not None


# (completions, answers, {index: reason}, fragment of every failure's detail, restarts it causes)
FAULTS = {
    "nan_inf_type": (["good", "nan", "inf", "str", "-inf", "bad"], ["a"] * 6,
                     {1: "nan", 2: "inf", 3: "type", 4: "inf"}, "score", 0),
    "raise": (["good"] * 4, ["raise", "a", "b", "c"], {0: "exception", 2: "exception"}, "boom from the test reward", 0),
    "hang": (["good"] * 4, ["hang", "a", "b", "c"], {0: "timeout", 2: "timeout"}, "timeouts.reward_s=2.0s", 1),
    "die": (["good"] * 4, ["a", "die", "b", "c"], {1: "exception", 3: "exception"}, "rfault-1 died", 1),
    "wrong_type": (["good"] * 4, ["a", "notalist", "b", "c"], {1: "type", 3: "type"}, "returned str", 0),
    "wrong_length": (["good"] * 4, ["a", "length", "b", "c"], {1: "length", 3: "length"}, "1 scores for 2", 0),
    "dict_missing_total": (["good"] * 4, ["dict_no_total", "a", "b", "c"], {0: "type", 2: "type"}, "without 'total'", 0),
    "dict_bad_part": (["good"] * 4, ["dict_bad_part", "a", "b", "c"], {0: "nan"}, "component 'bonus'", 0),
}


@pytest.mark.parametrize("case", list(FAULTS))
def test_fault_is_data_and_the_pool_keeps_working(fault_pool, case):
    completions, answers, expected, fragment, restarts = FAULTS[case]
    before = fault_pool.restarts
    t0 = time.monotonic()
    res = fault_pool.score(batch(completions, answers))
    assert time.monotonic() - t0 < 10.0  # a hang costs the deadline (2 s), not the job
    assert reasons(res) == expected
    assert all(fragment in f.detail for f in res.failures), res.failures
    consistent(res)
    for i, s in enumerate(res.scores):  # nothing silently scored, nothing lost
        if i not in expected:
            assert s == VALUES.get(completions[i], 0.5)
    assert fault_pool.restarts == before + restarts
    # the next batch is scored in full, by the replacement where one was needed
    assert fault_pool.score(batch(*CLEAN)) == ScoreResult(CLEAN_SCORES, (), {})


def test_dict_components_are_merged_across_actors(fault_pool):
    res = fault_pool.score(batch(["good", "bad", "other", "good"], ["dict"] * 4))
    assert res == ScoreResult(CLEAN_SCORES, (), {"bonus": (0.25,) * 4})


def test_policy_on_a_failed_batch(fault_pool):
    completions = batch(["good"] * 4, ["raise", "a", "b", "c"], prompts=["p0", "p1", "reverse me=", "p3"])
    res = fault_pool.score(completions)
    check_failure_budget(res, 0.5)  # 2 of 4: not more than half
    with pytest.raises(RewardSourceFailed, match=r"failed on 2 of 4 samples .* by reason: exception: 2"):
        check_failure_budget(res, 0.25)
    assert apply_failure_policy(res, "penalty", -1.0).scores == (-1.0, 1.0, -1.0, 1.0)
    lines = failure_log_lines(completions, res)
    assert len(lines) == 2 and "sample 2 failed (exception): RuntimeError: boom" in lines[1]
    assert "prompt='reverse me='" in lines[1] and "completion='good'" in lines[1]


# --------------------------------------------------------------------------- stateful scorers

def test_class_scorer_is_built_once_per_actor(ray_session):
    pool = RewardPool("tests._reward_fns:Counting", 1, 0.25, timeout_s=10.0, log=lambda *_: None, name_prefix="rcount")
    try:
        assert pool.score(batch(["x", "y"], ["a", "a"])).scores == (1.0, 1.0)
        assert pool.score(batch(["x"], ["a"])).scores == (2.0,)  # same instance: it counted the first call
    finally:
        pool.shutdown()


def test_scorer_that_cannot_be_built_stops_with_its_reason(ray_session):
    pool = RewardPool("tests._reward_fns:BrokenInit", 1, 0.25, timeout_s=10.0, log=lambda *_: None, name_prefix="rbroken")
    try:
        with pytest.raises(RewardSourceFailed, match=r"rbroken-0 could not build its scorer .*no such reward model"):
            pool.score(batch(["x"], ["a"]))
    finally:
        pool.shutdown()


# --------------------------------------------------------------------------- built-ins from config

def test_builtins_combined_from_config(ray_session):
    cfg = rcfg("reward.function=reward.builtin:Combined",
               "reward.components=reward.builtin:numeric_match=1.0,reward.builtin:RegexMatch=0.5,"
               "reward.builtin:LengthPenalty=1.0",
               "reward.format_pattern='answer: -?\\d+'", "reward.length_soft_max=10", "reward.length_max=20")
    pool = RewardPool(cfg, timeout_s=20.0, log=lambda *_: None, name_prefix="rbuiltin")
    try:
        res = pool.score(batch(["answer: 42", "answer: 41", "the answer is 42, surely", "answer: 7 is it"],
                               ["42", "42", "42", "7"]))
    finally:
        pool.shutdown()
    # numeric, format, length (chars 10, 10, 24, 15 -> 0, 0, -1, -0.5); total = n + 0.5 f + l
    assert res.components == {"numeric_match": (1.0, 0.0, 1.0, 1.0), "RegexMatch": (1.0, 1.0, 0.0, 0.0),
                              "LengthPenalty": (0.0, 0.0, -1.0, -0.5)}
    assert res.scores == pytest.approx((1.5, 0.5, 0.0, 0.5)) and res.failures == ()


# --------------------------------------------------------------------------- remote server

@pytest.fixture(scope="module")
def parts_server():
    app = build_app(RewardConfig(function="tests._reward_fns:with_parts"), max_body_bytes=4096)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def modes_server():
    with BackgroundServer(build_app(RewardConfig(function="tests._reward_fns:by_mode"))) as srv:
        yield srv


def post(url: str, body: bytes, ctype: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_health_and_input_checks(parts_server):
    with urllib.request.urlopen(parts_server.url + "/health", timeout=10) as resp:
        assert json.loads(resp.read()) == {"status": "ok", "function": "tests._reward_fns:with_parts"}
    assert parts_server.host == "127.0.0.1"
    url = parts_server.url + "/score"
    ok = {"prompts": ["p", "p"], "completions": ["ab", "abcd"], "answers": ["ab", "x"]}
    # correct [1, 0], short [1, 0]: total = correct + 0.5 short = [1.5, 0]
    assert post(url, json.dumps(ok).encode()) == (200, {"total": [1.5, 0.0],
                                                        "components": {"correct": [1.0, 0.0], "short": [1.0, 0.0]}})
    for bad in ({**ok, "prompts": [1, 2]}, {**ok, "answers": ["a"]}, {"prompts": ["p"]}, [1, 2]):
        status, body = post(url, json.dumps(bad).encode())
        assert status == 422 and body["detail"], bad
    assert post(url, b"{not json")[0] == 422
    assert post(url, json.dumps(ok).encode(), ctype="text/plain")[0] == 415
    status, body = post(url, json.dumps({**ok, "completions": ["x" * 5000, "y"]}).encode())
    assert status == 413 and "4096" in body["detail"]
    # a chunked body declares no length: it is cut off while being read
    conn = http.client.HTTPConnection(parts_server.host, parts_server.port, timeout=10)
    conn.request("POST", "/score", body=iter([b'{"prompts": ["', b"x" * 5000, b'"]}']),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and "limit of 4096" in json.loads(resp.read())["detail"]
    conn.close()


def test_http_client_batches_and_keeps_the_good_requests(parts_server):
    scorer = HttpScorer(parts_server.url + "/score", timeout_s=5, retries=0, batch_size=2)
    completions = ["ab", "abcd", "x" * 5000, "a", "zz"]
    answers = ["ab", "abcd", "x", "b", "zz"]
    res = scorer(["p"] * 5, completions, answers)
    assert scorer.requests == 3  # [0, 1], [2, 3], [4]
    # the request holding the 5000-character completion is refused (413): its two samples fail, no retry
    assert reasons(res) == {2: "exception", 3: "exception"}
    assert "HTTP 413" in res.failures[0].detail and "reward.http_batch_size" in res.failures[0].detail
    assert res.scores == (1.5, 1.0, None, None, 1.5)  # [1 + 0.5, 1 + 0, -, -, 1 + 0.5]
    assert res.components == {"correct": (1.0, 1.0, None, None, 1.0), "short": (1.0, 0.0, None, None, 1.0)}
    consistent(res)


def test_http_client_passes_on_the_servers_failures(modes_server):
    scorer = HttpScorer(modes_server.url + "/score", timeout_s=5, retries=0)
    res = scorer(["p"] * 3, ["good", "nan", "str"], ["a"] * 3)
    assert res.scores == (1.0, None, None)
    assert [(f.index, f.reason, f.detail) for f in res.failures] == [
        (1, "nan", "remote: score is NaN"), (2, "type", "remote: score 'high' is str, expected float")]
    res = scorer(["p"] * 2, ["good", "good"], ["raise", "a"])
    assert reasons(res) == {0: "exception", 1: "exception"}
    assert res.failures[0].detail.startswith("remote: RuntimeError: boom from the test reward")


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first `server.fail_left` requests, after `server.delay` seconds each."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(self.server.delay)
        if self.server.fail_left > 0:
            self.server.fail_left -= 1
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"busy")
            return
        out = json.dumps({"scores": [1.0] * len(body["completions"])}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    server.daemon_threads, server.block_on_close = True, False
    server.handle_error = lambda request, address: None  # the timeout test hangs up on purpose
    server.fail_left, server.delay = 0, 0.0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_http_client_retries_with_backoff(flaky):
    url = f"http://127.0.0.1:{flaky.server_address[1]}/score"
    waits = []
    flaky.fail_left = 2
    scorer = HttpScorer(url, timeout_s=5, retries=2, backoff_s=0.01, sleep=lambda s: (waits.append(s), time.sleep(s)))
    assert scorer(["p"], ["c"], ["a"]) == ScoreResult((1.0,), (), {})
    assert scorer.requests == 3 and waits == [0.01, 0.02]  # 503, 503, then 200
    flaky.fail_left = 5
    scorer = HttpScorer(url, timeout_s=5, retries=1, backoff_s=0.01)
    res = scorer(["p"], ["c"], ["a"])
    assert scorer.requests == 2 and reasons(res) == {0: "exception"}
    assert "failed 2 times; last: HTTP 503: busy" in res.failures[0].detail


def test_http_client_timeout_and_unreachable(flaky):
    flaky.delay = 1.5
    scorer = HttpScorer(f"http://127.0.0.1:{flaky.server_address[1]}/score", timeout_s=0.3, retries=1, backoff_s=0.01)
    t0 = time.monotonic()
    res = scorer(["p"], ["c"], ["a"])
    assert time.monotonic() - t0 < 1.5 and scorer.requests == 2
    assert reasons(res) == {0: "exception"} and "no answer within reward.http_timeout_s=0.3s" in res.failures[0].detail
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scorer = HttpScorer(f"http://127.0.0.1:{port}/score", timeout_s=1, retries=2, backoff_s=0.01)
    res = scorer(["p"] * 2, ["c"] * 2, ["a"] * 2)
    assert scorer.requests == 3 and reasons(res) == {0: "exception", 1: "exception"}
    assert "refused" in res.failures[0].detail.lower()


def test_http_source_in_a_reward_actor(parts_server, ray_session):
    cfg = rcfg("reward.function=reward.http:HttpScorer", f"reward.url={parts_server.url}/score",
               "reward.http_timeout_s=5", "reward.http_batch_size=2")
    pool = RewardPool(cfg, timeout_s=20.0, log=lambda *_: None, name_prefix="rhttp")
    try:
        res = pool.score(batch(["ab", "abcd", "zz"], ["ab", "abcd", "x"]))
    finally:
        pool.shutdown()
    # correct [1, 1, 0], short [1, 0, 1]: total [1.5, 1.0, 0.5]
    assert res == ScoreResult((1.5, 1.0, 0.5), (), {"correct": (1.0, 1.0, 0.0), "short": (1.0, 0.0, 1.0)})


def test_reward_server_command(tmp_path):
    """`relayrl reward-server` as a user starts it: serves a function from the working directory."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    relayrl = os.path.join(os.path.dirname(sys.executable), "relayrl")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([relayrl, "reward-server", "--function", "tests._reward_fns:with_parts",
                             "--port", str(port), "--max-body-bytes", "2000"],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    assert json.loads(resp.read())["status"] == "ok"
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.monotonic() < deadline, "reward-server did not come up"
                time.sleep(0.2)
        scorer = HttpScorer(f"http://127.0.0.1:{port}/score", timeout_s=10, retries=0)
        assert scorer(["p"], ["ab"], ["ab"]) == ScoreResult((1.5,), (), {"correct": (1.0,), "short": (1.0,)})
        status, _ = post(f"http://127.0.0.1:{port}/score", json.dumps({"prompts": ["x" * 3000]}).encode())
        assert status == 413
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"serving tests._reward_fns:with_parts on http://127.0.0.1:{port}/score" in out


# --------------------------------------------------------------------------- reward model

@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    """A 1-layer Llama sequence classifier (hidden 32, num_labels=1) on the project's own tokenizer.

    The tokenizer is built with cluster.world.build_tokenizer (the one ensure_world saves next to the
    policy), so this test does not need the warm-started world model to exist."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from cluster.world import build_tokenizer

    path = tmp_path_factory.mktemp("tiny_reward_model")
    build_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, num_labels=1, pad_token_id=tok.pad_token_id)).eval()
    model.save_pretrained(path)
    return str(path), model, tok


RM_PROMPTS = ["abcde=", "hgfed=", "aa=", "bcd="]
RM_COMPLETIONS = ["edcba", "defgh", "a", "dcbxxxxx"]  # different lengths: the batches are padded


def direct_scores(model, tok) -> list[float]:
    """One unpadded forward pass per text, straight through transformers."""
    import torch

    with torch.inference_mode():
        return [model(input_ids=tok(p + c, return_tensors="pt")["input_ids"]).logits[0, 0].item()
                for p, c in zip(RM_PROMPTS, RM_COMPLETIONS)]


def test_reward_model_scores_equal_a_direct_forward_pass(tiny_reward_model):
    from reward.model import RewardModel

    path, model, tok = tiny_reward_model
    expected = direct_scores(model, tok)
    assert len(set(expected)) == len(expected)  # the texts really get different scores
    rm = RewardModel(path, batch_size=3)  # batches of 3 and 1
    got = rm(RM_PROMPTS, RM_COMPLETIONS, [""] * 4)
    assert all(isinstance(s, float) for s in got)
    assert got == pytest.approx(expected, abs=1e-5)
    assert rm(RM_PROMPTS, RM_COMPLETIONS, [""] * 4) == got  # deterministic


def test_reward_model_in_a_reward_actor(tiny_reward_model, ray_session):
    path, model, tok = tiny_reward_model
    cfg = rcfg("reward.function=reward.model:RewardModel", f"reward.model_path={path}", "reward.model_batch_size=2")
    pool = RewardPool(cfg, timeout_s=30.0, log=lambda *_: None, name_prefix="rmodel")
    try:
        res = pool.score(batch(RM_COMPLETIONS, [""] * 4, prompts=RM_PROMPTS))
    finally:
        pool.shutdown()
    assert res.failures == ()
    assert list(res.scores) == pytest.approx(direct_scores(model, tok), abs=1e-5)
