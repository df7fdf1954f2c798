"""Unit tests for the pure parts of the reward sources (no Ray, no network): output checking, the
built-ins, the combination, the failure policy, the reward config rules and the wire format.
Expected numbers are worked out by hand in the comments."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from cluster import cli
from core.config import Config, ConfigError, RewardConfig, load_config, parse_components
from core.messages import Completion, Prompt, ScoreFailure, ScoreResult
from reward.builtin import (Combined, LengthPenalty, RegexMatch, combine, exact_match, length_penalty,
                            math_verify_match, numeric_match, overlong_penalty, parse_last_number, regex_match)
from reward.http import HttpScorer, ScoringRequestFailed, backoff_delays, parse_response
from reward.policy import (RewardSourceFailed, apply_failure_policy, check_failure_budget, component_means,
                           failure_counts, failure_log_lines)
from reward.server import ScoreRequest, result_to_json
from reward.worker import check_output, check_source, instantiate, load_function, score_batch

NAN, INF = float("nan"), float("inf")


def reasons(res: ScoreResult) -> dict[int, str]:
    return {f.index: f.reason for f in res.failures}


def consistent(res: ScoreResult) -> None:
    """Failed indices hold None (in scores and every component), the others a finite float."""
    failed = {f.index for f in res.failures}
    assert len(failed) == len(res.failures)  # one failure per sample
    for i, s in enumerate(res.scores):
        if i in failed:
            assert s is None and all(col[i] is None for col in res.components.values())
        else:
            assert isinstance(s, float) and math.isfinite(s)


# --------------------------------------------------------------------------- check_output

def test_list_output_is_scored():
    res = check_output([1, 0.5, -2], 3)
    assert res == ScoreResult((1.0, 0.5, -2.0), (), {})
    assert all(isinstance(s, float) for s in res.scores)


def test_bad_values_fail_their_index_only():
    res = check_output([1.0, NAN, INF, -INF, "high", True, None, 0.0], 8)
    assert res.scores == (1.0, None, None, None, None, None, None, 0.0)
    assert reasons(res) == {1: "nan", 2: "inf", 3: "inf", 4: "type", 5: "type", 6: "type"}
    consistent(res)


@pytest.mark.parametrize("raw,reason,fragment", [
    ("not a list", "type", "str"),
    (3.0, "type", "float"),
    (None, "type", "NoneType"),
    ([1.0, 2.0], "length", "2 scores for 3"),
    ([1.0] * 4, "length", "4 scores for 3"),
    ({"score": [1, 2, 3]}, "type", "without 'total'"),
    ({"total": [1, 2, 3], "part": [1, 2]}, "length", "component 'part'"),
    ({"total": [1, 2, 3], "part": 7}, "type", "component 'part'"),
    ({"total": [1, 2, 3], 5: [1, 2, 3]}, "type", "component name 5"),
])
def test_broken_output_fails_every_index(raw, reason, fragment):
    res = check_output(raw, 3)
    assert res.scores == (None, None, None)
    assert reasons(res) == {0: reason, 1: reason, 2: reason}
    assert fragment in res.failures[0].detail


def test_dict_output_keeps_components():
    res = check_output({"total": [1.5, 0.0], "correct": [1, 0], "short": [1.0, 0.0]}, 2)
    assert res.scores == (1.5, 0.0) and res.failures == ()
    assert res.components == {"correct": (1.0, 0.0), "short": (1.0, 0.0)}


def test_bad_component_value_fails_the_sample_and_names_the_part():
    res = check_output({"total": [1.0, 2.0, 3.0], "part": [0.0, NAN, 1.0]}, 3)
    assert res.scores == (1.0, None, 3.0)
    assert res.failures == (ScoreFailure(1, "nan", "component 'part': score is NaN"),)
    assert res.components == {"part": (0.0, None, 1.0)}
    consistent(res)


def test_numpy_output_is_accepted():
    res = check_output(np.array([0.25, 1.0], dtype=np.float32), 2)
    assert res.scores == (0.25, 1.0) and res.failures == ()
    res = check_output({"total": np.array([np.nan, 2.0])}, 2)
    assert res.scores == (None, 2.0) and reasons(res) == {0: "nan"}


def test_score_result_output_keeps_its_failures():
    given = ScoreResult((1.0, None, 3.0), (ScoreFailure(1, "timeout", "remote: slow"),), {"p": (0.0, None, 1.0)})
    res = check_output(given, 3)
    assert res == given
    # a None with no failure to explain it is not trusted
    res = check_output(ScoreResult((1.0, None)), 2)
    assert reasons(res) == {1: "type"}
    # a failure outside the batch means the result is not about this batch
    res = check_output(ScoreResult((1.0,), (ScoreFailure(5, "nan", ""),)), 1)
    assert reasons(res) == {0: "type"} and "outside" in res.failures[0].detail


def test_score_batch_turns_an_exception_into_failures():
    def boom(p, c, a):
        raise ZeroDivisionError("division by zero")

    res = score_batch(boom, ["p"] * 3, ["c"] * 3, ["a"] * 3)
    assert res.scores == (None,) * 3 and reasons(res) == {0: "exception", 1: "exception", 2: "exception"}
    assert res.failures[0].detail.startswith("ZeroDivisionError: division by zero")
    assert "boom" in res.failures[0].detail  # the traceback names the user's frame
    assert score_batch(exact_match, [], [], []) == ScoreResult((), (), {})


def test_load_function_and_instantiate():
    assert load_function("reward.builtin:exact_match") is exact_match
    with pytest.raises(ValueError, match="^reward.components: cannot load 'nomodule:f'"):
        load_function("nomodule:f", "reward.components")
    with pytest.raises(ValueError, match="^reward.function: 'reward.builtin:math' is not callable"):
        load_function("reward.builtin:math")
    cfg = RewardConfig(format_pattern="a+", length_soft_max=1, length_max=3)
    assert instantiate("reward.builtin:exact_match", cfg) is exact_match            # a function: as is
    counting = instantiate("tests._reward_fns:Counting", cfg)                         # a class: Class()
    assert counting(["p"], ["c"], ["a"]) == [1.0] and counting(["p"], ["c"], ["a"]) == [2.0]
    rx = instantiate("reward.builtin:RegexMatch", cfg)                                # from_config(cfg)
    assert rx(["", ""], ["aaa", "ab"], ["", ""]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="reward.components"):
        check_source(RewardConfig(function="reward.builtin:Combined", components="reward.builtin:nope=1"))


# --------------------------------------------------------------------------- built-ins

@pytest.mark.parametrize("text,value", [
    ("42", 42.0), ("so x = 1,234.5.", 1234.5), ("-3e2 then .5", 0.5), ("1,2,3", 3.0),
    ("answer: -7", -7.0), ("+0.25", 0.25), ("no digits", None), ("", None),
])
def test_parse_last_number(text, value):
    assert parse_last_number(text) == value


def test_numeric_match():
    got = numeric_match([""] * 6, ["The answer is 42.", "41", "42.0000000001", "1,000", "none", "x=0.1"],
                        ["42", "42", "42", "1000", "3", "0.1"])
    assert got == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert numeric_match([""], ["43"], ["42"], rel_tol=0.05) == [1.0]  # |43-42| = 1 <= 0.05 * 43
    with pytest.raises(ValueError, match="answer 'seven' contains no number"):
        numeric_match([""], ["7"], ["seven"])


def test_math_verify_match():
    got = math_verify_match([""] * 4, ["so \\boxed{0.5}", "x = \\frac{2}{4}", "the answer is 3", "\\boxed{7}"],
                            ["\\frac{1}{2}", "$\\frac{1}{2}$", "4", "7"])
    assert got == [1.0, 1.0, 0.0, 1.0]


def test_math_verify_match_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'relayrl\[math\]'"):
        math_verify_match([""], ["1"], ["1"])


def test_regex_match():
    fmt = regex_match(r"<think>.*</think>\s*<answer>.*</answer>")
    got = fmt([""] * 4, ["<think>a\nb</think> <answer>3</answer>", "  <think></think><answer>x</answer>\n",
                         "<answer>3</answer>", "<think>a</think><answer>3</answer> trailing"], [""] * 4)
    assert got == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="^reward.format_pattern: required"):
        RegexMatch.from_config(RewardConfig())


@pytest.mark.parametrize("length,expected", [
    # soft 10, hard 20: 0 up to 10, then (10 - L) / 10, -1 from 20 on
    (0, 0.0), (10, 0.0), (11, -0.1), (15, -0.5), (19, -0.9), (20, -1.0), (25, -1.0),
])
def test_overlong_penalty(length, expected):
    assert overlong_penalty(length, 10, 20) == pytest.approx(expected)


def test_length_penalty_scorer():
    assert length_penalty(2, 4)([""] * 4, ["ab", "abc", "abcd", "abcdefg"], [""] * 4) == [0.0, -0.5, -1.0, -1.0]
    assert LengthPenalty.from_config(RewardConfig(length_soft_max=1, length_max=5)).hard_max == 5
    for soft, hard in ((4, 4), (5, 3), (-1, 3)):
        with pytest.raises(ValueError, match="soft_max < hard_max"):
            LengthPenalty(soft, hard)


def test_combine():
    # total_i = 1.0 * a_i + 0.5 * b_i: [1 + 0.5, 0 + (-1)] = [1.5, -1.0]
    out = combine({"a": [1.0, 0.0], "b": [1.0, -2.0]}, {"a": 1.0, "b": 0.5})
    assert out == {"total": [1.5, -1.0], "a": [1.0, 0.0], "b": [1.0, -2.0]}
    assert combine({}, {}) == {"total": []}
    with pytest.raises(ValueError, match="different terms"):
        combine({"a": [1.0]}, {"b": 1.0})
    with pytest.raises(ValueError, match="different lengths"):
        combine({"a": [1.0], "b": [1.0, 2.0]}, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="reserved"):
        combine({"total": [1.0]}, {"total": 1.0})


def test_combined_scorer_sums_and_logs_terms():
    scorer = Combined({"exact": (exact_match, 1.0), "len": (length_penalty(2, 4), 0.5),
                       "parts": (lambda p, c, a: {"total": [2.0] * len(c), "x": [1.0] * len(c)}, -0.25)})
    res = check_output(scorer(["p"] * 3, ["ab", "abc", "abcdef"], ["ab", "abc", "zz"]), 3)
    # exact [1, 1, 0]; len [0, -0.5, -1]; parts total [2, 2, 2]
    # total = exact + 0.5 * len - 0.25 * 2 = [0.5, 0.25, -1.0]
    assert res.scores == pytest.approx((0.5, 0.25, -1.0)) and res.failures == ()
    assert res.components == {"exact": (1.0, 1.0, 0.0), "len": (0.0, -0.5, -1.0), "parts": (2.0, 2.0, 2.0),
                              "parts.x": (1.0, 1.0, 1.0)}


def test_combined_never_sums_over_a_failed_term():
    def half_nan(p, c, a):
        return [NAN if x == "bad" else 1.0 for x in c]

    def boom(p, c, a):
        raise KeyError("nope")

    res = check_output(Combined({"ok": (exact_match, 1.0), "flaky": (half_nan, 1.0)})(
        [""] * 3, ["a", "bad", "c"], ["a", "b", "x"]), 3)
    # sample 1: its 'flaky' term is NaN -> no total for it; samples 0 and 2: 1 + 1 and 0 + 1
    assert res.scores == (2.0, None, 1.0)
    assert res.failures == (ScoreFailure(1, "nan", "flaky: score is NaN"),)
    consistent(res)
    res = check_output(Combined({"ok": (exact_match, 1.0), "boom": (boom, 1.0)})([""] * 2, ["a", "b"], ["a", "b"]), 2)
    assert res.scores == (None, None) and reasons(res) == {0: "exception", 1: "exception"}
    assert res.failures[0].detail.startswith("boom: KeyError")


def test_combined_from_config():
    cfg = load_config(None, ["reward.function=reward.builtin:Combined",
                             "reward.components=reward.builtin:exact_match=1.0, reward.builtin:LengthPenalty=0.5",
                             "reward.length_soft_max=2", "reward.length_max=4"])
    scorer = instantiate(cfg.reward.function, cfg.reward)
    res = check_output(scorer([""] * 2, ["ab", "abcd"], ["ab", "ab"]), 2)
    # [1 + 0.5 * 0, 0 + 0.5 * -1] = [1.0, -0.5]
    assert res.scores == (1.0, -0.5)
    assert res.components == {"exact_match": (1.0, 0.0), "LengthPenalty": (0.0, -1.0)}


# --------------------------------------------------------------------------- failure policy

def _result() -> ScoreResult:
    return ScoreResult((1.0, None, 0.5, None),
                       (ScoreFailure(1, "nan", "score is NaN"), ScoreFailure(3, "exception", "ValueError: x\nTraceback")),
                       {"part": (1.0, None, 0.0, None)})


def test_apply_failure_policy():
    res = _result()
    assert apply_failure_policy(res, "drop", -1.0) is res
    pen = apply_failure_policy(res, "penalty", -1.0)
    assert pen.scores == (1.0, -1.0, 0.5, -1.0)
    assert pen.failures == res.failures                  # still counted and logged
    assert pen.components == {"part": (1.0, None, 0.0, None)}  # nothing was measured for them
    with pytest.raises(ValueError, match="reward.on_failure"):
        apply_failure_policy(res, "ignore", 0.0)  # type: ignore[arg-type]


def test_check_failure_budget():
    res = _result()                          # 2 of 4 failed = 50%
    check_failure_budget(res, 0.5)           # not more than half: goes on
    check_failure_budget(res, 1.0)
    with pytest.raises(RewardSourceFailed) as ei:
        check_failure_budget(res, 0.25)
    msg = str(ei.value)
    assert "failed on 2 of 4 samples (50% > reward.max_failure_fraction=0.25)" in msg
    assert "by reason: exception: 1, nan: 1" in msg
    assert "First failure (sample 1, nan): score is NaN" in msg
    with pytest.raises(RewardSourceFailed):
        check_failure_budget(ScoreResult((None, 1.0), (ScoreFailure(0, "timeout", "slow"),)), 0.0)
    check_failure_budget(ScoreResult((1.0, 2.0)), 0.0)  # no failure: fine even at 0
    check_failure_budget(ScoreResult(()), 0.0)         # empty batch: nothing to judge
    assert failure_counts(res) == {"nan": 1, "exception": 1}


def test_component_means():
    res = ScoreResult((1.0, None, 0.0), (ScoreFailure(1, "nan", ""),),
                      {"a": (1.0, None, 0.5), "b": (None, None, None)})
    assert component_means(res) == {"reward/a": 0.75}   # (1 + 0.5) / 2; b has no value at all
    assert component_means(ScoreResult((1.0,))) == {}
    # over several batches: the mean of all samples, (1 + 0.5 + 0 + 0 + 0) / 5 = 0.3, not of the batch means
    more = ScoreResult((0.0, 0.0, 0.0), (), {"a": (0.0, 0.0, 0.0)})
    assert component_means([res, more]) == {"reward/a": pytest.approx(0.3)}
    assert component_means([]) == {}


def test_failure_log_lines_show_the_sample_and_reason():
    def comp(prompt: str, text: str) -> Completion:
        return Completion(Prompt(0, prompt, (1,), "ans"), (2,), (0.0,), text, "stop", 0, "generator-0")

    completions = [comp("p0", "c0"), comp("reverse abc=", "cb\na"), comp("p2", "c2"), comp("p" * 200, "x" * 200)]
    lines = failure_log_lines(completions, _result(), width=20)
    assert len(lines) == 2
    assert lines[0] == "[reward] sample 1 failed (nan): score is NaN | prompt='reverse abc=' completion='cb\\na'"
    assert lines[1].startswith("[reward] sample 3 failed (exception): ValueError: x | ")  # no traceback
    assert "prompt='" + "p" * 17 + "...'" in lines[1] and "completion='" + "x" * 17 + "...'" in lines[1]


# --------------------------------------------------------------------------- reward config

def test_reward_config_defaults_unchanged():
    r = Config().reward
    assert (r.function, r.on_failure, r.failure_penalty, r.max_failure_fraction, r.components) == (
        "reward.builtin:reverse_partial", "drop", 0.0, 0.5, "")


def test_parse_components():
    assert parse_components("") == [] and parse_components("  ") == []
    assert parse_components("a.b:f=1, a.c:g=-0.5") == [("a.b:f", 1.0), ("a.c:g", -0.5)]
    for bad, fragment in (("a.b:f", "module:function=weight"), ("a.b:f=x", "not a number"),
                          ("a.b:f=1,", "module:function=weight"), ("f=1", "module:function=weight"),
                          ("a:f=1,b:f=2", "appears twice"), ("a:f=nan", "finite"), (":f=1", "module:function")):
        with pytest.raises(ValueError, match=fragment):
            parse_components(bad)


@pytest.mark.parametrize("overrides,field,fragment", [
    (["reward.components=reward.builtin:exact_match"], "reward.components", "module:function=weight"),
    (["reward.components=reward.builtin:exact_match=1"], "reward.components", "only read when"),
    (["reward.function=reward.builtin:Combined"], "reward.components", "at least one"),
    (["reward.function=reward.http:HttpScorer"], "reward.url", "required"),
    (["reward.url=ftp://x"], "reward.url", "http://"),
    (["reward.function=reward.http:HttpScorer", "reward.url=http://h/score", "reward.http_timeout_s=30"],
     "reward.http_timeout_s", "timeouts.reward_s=60.0"),  # 30 s x 3 tries >= 60 s
    (["reward.http_batch_size=0"], "reward.http_batch_size", "must be > 0"),
    (["reward.http_retries=-1"], "reward.http_retries", "must be >= 0"),
    (["reward.function=reward.model:RewardModel"], "reward.model_path", "required"),
    (["reward.function=reward.builtin:RegexMatch"], "reward.format_pattern", "required"),
    (["reward.format_pattern=("], "reward.format_pattern", "not a valid regular expression"),
    (["reward.function=reward.builtin:Combined", "reward.components=reward.builtin:LengthPenalty=1",
      "reward.length_soft_max=5", "reward.length_max=5"], "reward.length_max", "0 < reward.length_soft_max"),
    (["reward.on_failure=ignore"], "reward.on_failure", "must be one of"),
    (["reward.max_failure_fraction=1.5"], "reward.max_failure_fraction", "must be in [0, 1]"),
    (["reward.failure_penalty=nan"], "reward.failure_penalty", "must be finite"),
])
def test_bad_reward_config_names_the_field(overrides, field, fragment):
    with pytest.raises(ConfigError) as ei:
        load_config(None, overrides)
    assert str(ei.value).startswith(field + ":"), str(ei.value)
    assert fragment in str(ei.value)


def test_good_reward_configs():
    cfg = load_config(None, ["reward.function=reward.http:HttpScorer", "reward.url=http://127.0.0.1:8000/score",
                             "reward.http_timeout_s=5", "reward.http_retries=3", "reward.on_failure=penalty",
                             "reward.failure_penalty=-1"])
    assert cfg.reward.url.endswith("/score") and cfg.reward.failure_penalty == -1.0
    cfg = load_config(None, ["reward.function=reward.builtin:Combined",
                             "reward.components=reward.builtin:numeric_match=1,reward.builtin:RegexMatch=0.1",
                             # a value is read as YAML: quote one holding ": " (or it becomes a mapping)
                             "reward.format_pattern='answer: \\d+'"])
    assert parse_components(cfg.reward.components)[1] == ("reward.builtin:RegexMatch", 0.1)
    assert cfg.reward.format_pattern == "answer: \\d+"


# --------------------------------------------------------------------------- HTTP client / server (pure parts)

def test_backoff_delays():
    assert backoff_delays(0) == []
    assert backoff_delays(3) == [0.5, 1.0, 2.0]
    assert backoff_delays(6, base_s=1.0, cap_s=5.0) == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_parse_response():
    assert parse_response({"scores": [1, 0.5]}, 2) == ScoreResult((1.0, 0.5), (), {})
    res = parse_response({"total": [1.0, None], "components": {"p": [1.0, None]},
                          "failures": [{"index": 1, "reason": "nan", "detail": "score is NaN"}]}, 2)
    assert res == ScoreResult((1.0, None), (ScoreFailure(1, "nan", "remote: score is NaN"),), {"p": (1.0, None)})
    # an unknown reason from a server is kept as an exception, its detail preserved
    res = parse_response({"scores": [None], "failures": [{"index": 0, "reason": "weird", "detail": "d"}]}, 1)
    assert res.failures == (ScoreFailure(0, "exception", "remote: d"),)
    assert reasons(parse_response({"scores": [1.0]}, 2)) == {0: "length", 1: "length"}
    for bad in ([1.0], {"score": [1.0]}, {"scores": [1.0], "components": [1]}, {"scores": [1.0], "failures": [3]}):
        with pytest.raises(ScoringRequestFailed):
            parse_response(bad, 1)


def test_http_scorer_arguments():
    with pytest.raises(ValueError, match="^reward.url"):
        HttpScorer("localhost:8000")
    with pytest.raises(ValueError, match="batch_size"):
        HttpScorer("http://h", batch_size=0)


def test_server_request_and_response_format():
    ok = ScoreRequest.model_validate_json('{"prompts": ["p"], "completions": ["c"], "answers": ["a"]}')
    assert ok.completions == ["c"]
    for bad in ('{"prompts": [1], "completions": ["c"], "answers": ["a"]}',          # not a string
                '{"prompts": ["p"], "completions": ["c", "d"], "answers": ["a"]}',   # lengths differ
                '{"prompts": ["p"], "completions": ["c"]}',                          # missing field
                '{"prompts": ["p"], "completions": ["c"], "answers": ["a"], "x": 1}',  # unknown field
                'not json'):
        with pytest.raises(ValueError):
            ScoreRequest.model_validate_json(bad)
    assert result_to_json(ScoreResult((1.0, None), (ScoreFailure(1, "nan", "d"),))) == {
        "scores": [1.0, None], "failures": [{"index": 1, "reason": "nan", "detail": "d"}]}
    assert result_to_json(ScoreResult((1.0,), (), {"p": (0.5,)})) == {"total": [1.0], "components": {"p": [0.5]}}


def test_cli_reward_server_wiring(monkeypatch, capsys):
    import reward.server

    seen = []
    monkeypatch.setattr(reward.server, "serve", lambda cfg, host, port, max_body: seen.append((cfg, host, port, max_body)))
    assert cli.main(["reward-server", "--function", "reward.builtin:exact_match", "--port", "8123",
                     "--max-body-bytes", "1000", "--reward.format_pattern=x"]) == 0
    (cfg, host, port, max_body), = seen
    assert (cfg.function, cfg.format_pattern, host, port, max_body) == ("reward.builtin:exact_match", "x",
                                                                        "127.0.0.1", 8123, 1000)
    assert cli.main(["reward-server", "--function", "nomodule:f"]) == 2
    assert "config error: reward.function: cannot load" in capsys.readouterr().err
    assert cli.main(["reward-server", "--function", "reward.model:RewardModel"]) == 2
    assert "config error: reward.model_path: required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["reward-server", "--port", "70000"])
