"""Unit tests for core/config.py and the config side of cluster/cli.py (no Ray, no vLLM).

Contract under test: every bad value fails in load/validate with a ConfigError whose message
STARTS with the dotted field name (`learner.lr: ...`), before anything expensive starts.
"""
import dataclasses
import math
import time

import pytest
import yaml

import cluster.driver
from cluster import cli
from core.config import (Config, ConfigError, apply_dict, help_text, iter_fields, load_config, set_dotted, to_dict,
                         validate)


def expect_error(field, overrides=None, path=None):
    """load_config must fail with a ConfigError whose message starts with `field:`; returns the message."""
    with pytest.raises(ConfigError) as ei:
        load_config(path, overrides)
    msg = str(ei.value)
    assert msg.startswith(field + ":"), msg
    return msg


def write_yaml(tmp_path, data, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


# --------------------------------------------------------------------------- defaults

def test_defaults_validate():
    cfg = Config()
    assert validate(cfg) is cfg
    loaded = load_config()
    assert loaded == Config()
    # spot-check a few documented defaults
    assert (loaded.steps, loaded.prompts_per_step, loaded.algo.estimator, loaded.algo.group_size) == (40, 32, "grpo", 8)
    assert loaded.learner.lr == 2e-4
    assert loaded.generator.enforce_eager is True
    # default hidden_size 128 / num_heads 4 = 32: a head size vLLM's CPU attention accepts
    assert loaded.model.hidden_size // loaded.model.num_heads == 32


def test_list_and_sections_are_not_shared_between_instances():
    a, b = Config(), Config()
    a.learner.lr = 1.0
    assert b.learner.lr == 2e-4
    assert a.learner is not b.learner


# --------------------------------------------------------------------------- YAML

def test_yaml_nested_sections(tmp_path):
    path = write_yaml(tmp_path, {
        "steps": 7,
        "run_name": "exp1",
        "learner": {"lr": 1e-5, "lr_schedule": "cosine"},
        "algo": {"estimator": "rloo", "group_size": 4, "kl_coef": 0.05},
        "generator": {"enforce_eager": False, "num_generators": 3},
        "timeouts": {"generate_s": 12},
    })
    cfg = load_config(path)
    assert cfg.steps == 7 and cfg.run_name == "exp1"
    assert cfg.learner.lr == 1e-5 and cfg.learner.lr_schedule == "cosine"
    assert cfg.algo.estimator == "rloo" and cfg.algo.group_size == 4 and cfg.algo.kl_coef == 0.05
    assert cfg.generator.enforce_eager is False and cfg.generator.num_generators == 3
    # an int in YAML for a float field becomes a float
    assert cfg.timeouts.generate_s == 12.0 and isinstance(cfg.timeouts.generate_s, float)
    # untouched fields keep their defaults
    assert cfg.learner.weight_decay == 0.0 and cfg.algo.clip_low == 0.2 and cfg.task == Config().task


def test_yaml_then_overrides_win(tmp_path):
    path = write_yaml(tmp_path, {"steps": 7, "learner": {"lr": 1e-5}})
    cfg = load_config(path, ["steps=9"])
    assert cfg.steps == 9           # override beats file
    assert cfg.learner.lr == 1e-5   # file beats default


def test_empty_yaml_is_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "")) == Config()


def test_to_dict_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["steps=3", "algo.estimator=ppo", "learner.lr=0.001", "generator.enforce_eager=false"])
    path = write_yaml(tmp_path, to_dict(cfg))
    assert load_config(path) == cfg


def test_yaml_bad_values_name_the_field(tmp_path):
    expect_error("learner.lr", path=write_yaml(tmp_path, {"learner": {"lr": -1}}, "a.yaml"))
    msg = expect_error("learner.lrr", path=write_yaml(tmp_path, {"learner": {"lrr": 1}}, "b.yaml"))
    assert "unknown field" in msg
    for f in dataclasses.fields(Config().learner):
        assert f.name in msg  # the known fields of that section are listed
    msg = expect_error("lerner", path=write_yaml(tmp_path, {"lerner": {"lr": 1}}, "c.yaml"))
    assert "learner" in msg and "algo" in msg and "steps" in msg
    expect_error("algo", path=write_yaml(tmp_path, {"algo": 3}, "d.yaml"))             # section given a scalar
    expect_error("steps", path=write_yaml(tmp_path, {"steps": {"a": 1}}, "e.yaml"))     # leaf given a mapping
    expect_error("algo.kl_kind", path=write_yaml(tmp_path, {"algo": {"kl_kind": "k9"}}, "f.yaml"))


def test_yaml_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="^config file: cannot read"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="^config file: .* is not valid YAML"):
        load_config(write_yaml(tmp_path, "steps: [1, 2\n", "broken.yaml"))
    with pytest.raises(ConfigError, match="^config: must be a mapping"):
        load_config(write_yaml(tmp_path, "- 1\n- 2\n", "list.yaml"))


# --------------------------------------------------------------------------- dotted overrides

def test_dotted_overrides():
    cfg = load_config(None, ["learner.lr=1e-4", "algo.group_size=4", "run_name=abc", "--seed=5",
                             "algo.estimator=reinforce_pp", "algo.kl_kind=k1", "reward.function=reward.builtin:exact_match"])
    # PyYAML reads "1e-4" as a string (YAML 1.1 wants a dot); the float coercion must still accept it
    assert cfg.learner.lr == 1e-4 and isinstance(cfg.learner.lr, float)
    assert cfg.algo.group_size == 4 and cfg.run_name == "abc" and cfg.seed == 5
    assert cfg.algo.estimator == "reinforce_pp" and cfg.algo.kl_kind == "k1"
    assert cfg.reward.function == "reward.builtin:exact_match"


def test_override_int_like_values():
    assert load_config(None, ["steps=2.0"]).steps == 2          # integral float is accepted
    assert load_config(None, ["run_name=123"]).run_name == "123"  # number -> str for str fields
    assert load_config(None, ["run_name="]).run_name == ""


@pytest.mark.parametrize("raw,expected", [
    ("true", True), ("True", True), ("yes", True), ("false", False), ("False", False), ("no", False),
])
def test_override_bool_parsing(raw, expected):
    cfg = load_config(None, [f"generator.enforce_eager={raw}"])
    assert cfg.generator.enforce_eager is expected


def test_set_dotted_and_apply_dict_directly():
    cfg = Config()
    set_dotted(cfg, "algo.clip_high", "0.3")
    assert cfg.algo.clip_high == 0.3
    apply_dict(cfg, {"model": {"num_layers": 2}})
    assert cfg.model.num_layers == 2


# --------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("override,field,fragment", [
    ("learner.lr=-1", "learner.lr", "must be > 0"),
    ("learner.lr=0", "learner.lr", "must be > 0"),
    ("learner.weight_decay=-0.1", "learner.weight_decay", "must be >= 0"),
    ("steps=abc", "steps", "must be an integer"),
    ("steps=1.5", "steps", "must be an integer"),
    ("steps=true", "steps", "must be an integer"),
    ("steps=0", "steps", "must be > 0"),
    ("learner.lr=abc", "learner.lr", "must be a number"),
    ("learner.lr=nan", "learner.lr", "must be finite"),
    ("learner.lr=.nan", "learner.lr", "must be finite"),
    ("learner.lr=inf", "learner.lr", "must be finite"),
    ("learner.lr=-.inf", "learner.lr", "must be finite"),
    ("timeouts.train_s=1e400", "timeouts.train_s", "must be finite"),
    ("algo.estimator=a2c", "algo.estimator", "must be one of"),
    ("algo.estimator=PPO", "algo.estimator", "must be one of"),   # choices are case-sensitive
    ("algo.loss_agg=sum", "algo.loss_agg", "must be one of"),
    ("generator.dtype=float16", "generator.dtype", "must be one of"),  # vLLM's CPU backend casts fp16 to bf16
    ("learner.compute_dtype=bf16", "learner.compute_dtype", "must be one of"),
    ("generator.enforce_eager=maybe", "generator.enforce_eager", "must be true or false"),
    ("generator.gpu_memory_utilization=1.5", "generator.gpu_memory_utilization", "must be in [0, 1]"),
    ("task.alphabet_size=27", "task.alphabet_size", "must be in [2, 26]"),
    ("reward.function=reward.builtin", "reward.function", "module:function"),
    ("run_name=[1, 2]", "run_name", "must be a string"),
    ("model=3", "model", "must be a mapping"),
    ("algo.dual_clip=0.5", "algo.dual_clip", "must be 0 (off) or > 1"),
    ("algo.dual_clip=1", "algo.dual_clip", "must be 0 (off) or > 1"),
    ("algo.dual_clip=-2", "algo.dual_clip", "must be 0 (off) or > 1"),
])
def test_bad_override_names_field(override, field, fragment):
    msg = expect_error(field, [override])
    assert fragment in msg


def test_literal_error_lists_choices():
    msg = expect_error("algo.kl_kind", ["algo.kl_kind=k4"])
    assert "k1" in msg and "k2" in msg and "k3" in msg and "'k4'" in msg


def test_unknown_override_lists_known_fields():
    msg = expect_error("learner.lrr", ["learner.lrr=1e-4"])
    assert "unknown field" in msg
    for f in dataclasses.fields(Config().learner):
        assert f.name in msg
    msg = expect_error("stepz", ["stepz=3"])
    assert "steps" in msg and "prompts_per_step" in msg


def test_override_without_equals():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["steps"])


def test_dual_clip_valid_values():
    assert load_config(None, ["algo.dual_clip=0"]).algo.dual_clip == 0.0
    assert load_config(None, ["algo.dual_clip=3"]).algo.dual_clip == 3.0


def test_head_size_must_be_32_or_64():
    # 128 / 8 = 16: not 32 or 64
    msg = expect_error("model.num_heads", ["model.num_heads=8"])
    assert "128/8" in msg
    expect_error("model.num_heads", ["model.num_heads=3"])                          # 128 % 3 != 0
    expect_error("model.num_heads", ["model.hidden_size=256", "model.num_heads=2"])  # 256 / 2 = 128
    assert load_config(None, ["model.num_heads=2"]).model.num_heads == 2             # 128 / 2 = 64
    assert load_config(None, ["model.hidden_size=256", "model.num_heads=4"]).model.hidden_size == 256  # 64
    # with an external model the built-in shape does not matter
    assert load_config(None, ["model.path=/some/model", "model.num_heads=8"]).model.num_heads == 8


def test_group_size_one_needs_non_group_estimator():
    for est in ("grpo", "dr_grpo", "rloo"):
        msg = expect_error("algo.group_size", [f"algo.estimator={est}", "algo.group_size=1"])
        assert est in msg
    for est in ("reinforce", "reinforce_pp", "ppo"):
        assert load_config(None, [f"algo.estimator={est}", "algo.group_size=1"]).algo.group_size == 1


def test_dynamic_sampling_needs_groups_and_a_positive_draw_limit():
    # a group of one always ties: every prompt would be dropped
    msg = expect_error("algo.dynamic_sampling", ["algo.estimator=reinforce", "algo.group_size=1",
                                                 "algo.dynamic_sampling=true"])
    assert "group_size >= 2" in msg
    expect_error("algo.dynamic_sampling_max_draws", ["algo.dynamic_sampling=true", "algo.dynamic_sampling_max_draws=0"])
    cfg = load_config(None, ["algo.dynamic_sampling=true", "algo.dynamic_sampling_max_draws=4"])
    assert cfg.algo.dynamic_sampling and cfg.algo.dynamic_sampling_max_draws == 4


def test_partial_rollout_chunk_is_shorter_than_a_sample():
    # default generator.max_new_tokens = 8: a chunk of 8 or more would never cut a sample
    msg = expect_error("rollout.partial_rollout_tokens", ["rollout.partial_rollout_tokens=8"])
    assert "max_new_tokens (8" in msg and "got 8" in msg
    expect_error("rollout.partial_rollout_tokens", ["rollout.partial_rollout_tokens=-1"])
    cfg = load_config(None, ["rollout.mode=async", "rollout.partial_rollout_tokens=7"])
    assert cfg.rollout.partial_rollout_tokens == 7 and load_config(None, []).rollout.partial_rollout_tokens == 0


def test_multi_turn_environment_settings():
    assert "module:function" in expect_error("rollout.env", ["rollout.env=nocolon"])
    assert "at least 2 turns" in expect_error("rollout.max_turns", ["rollout.env=envs.builtin:reverse_rest",
                                                                    "rollout.max_turns=1"])
    assert "multi-turn" in expect_error("rollout.partial_rollout_tokens", [
        "rollout.env=envs.builtin:reverse_rest", "rollout.partial_rollout_tokens=4", "generator.max_new_tokens=32"])
    expect_error("timeouts.env_step_s", ["timeouts.env_step_s=0"])
    assert "rollout.env" in expect_error("rollout.env_role", ["rollout.env_role=user"])
    # whole episodes run inside one generate call: their environment steps must fit its deadline
    assert "timeouts.generate_s=300.0" in expect_error("timeouts.env_step_s", [
        "rollout.env=envs.builtin:reverse_rest", "rollout.max_turns=4", "timeouts.env_step_s=100"])
    cfg = load_config(None, ["rollout.env=envs.builtin:reverse_rest", "rollout.max_turns=2"])
    assert (cfg.rollout.env, cfg.rollout.max_turns, cfg.timeouts.env_step_s) == ("envs.builtin:reverse_rest", 2, 10.0)
    assert load_config(None, []).rollout.env == ""  # one turn by default


def test_top_p_and_top_k():
    expect_error("generator.top_p", ["generator.top_p=0"])
    expect_error("generator.top_p", ["generator.top_p=1.5"])
    expect_error("generator.top_k", ["generator.top_k=-1"])
    from cluster.driver import sampling_is_plain

    assert sampling_is_plain(load_config(None, []).generator)
    for o in ("generator.top_p=0.9", "generator.top_k=20", "generator.temperature=0.7"):
        assert not sampling_is_plain(load_config(None, [o]).generator), o


def test_long_tailed_task_lengths_and_answer_budget():
    msg = expect_error("task.max_word_length", ["task.max_word_length=5"])  # default word_length = 5
    assert "> task.word_length (5" in msg and "got 5" in msg
    expect_error("task.max_word_length", ["task.max_word_length=-1"])
    # default generator.max_new_tokens = 8: a 5..24-letter task needs 25 (24 letters + end of sequence)
    msg = expect_error("generator.max_new_tokens", ["task.max_word_length=24"])
    assert "at least 25" in msg and "got 8" in msg
    expect_error("generator.max_new_tokens", ["task.word_length=8"])
    cfg = load_config(None, ["task.max_word_length=24", "generator.max_new_tokens=25"])
    assert cfg.task.max_word_length == 24 and load_config(None, []).task.max_word_length == 0


def test_micro_batch_tokens_is_non_negative():
    expect_error("learner.micro_batch_tokens", ["learner.micro_batch_tokens=-1"])
    assert load_config(None, ["learner.micro_batch_tokens=4096"]).learner.micro_batch_tokens == 4096
    assert load_config(None, []).learner.micro_batch_tokens == 0


def test_minibatches_not_more_than_prompts():
    # default prompts_per_step = 32
    msg = expect_error("algo.minibatches", ["algo.minibatches=33"])
    assert "32" in msg and "33" in msg
    expect_error("algo.minibatches", ["prompts_per_step=4", "algo.minibatches=5"])
    assert load_config(None, ["prompts_per_step=4", "algo.minibatches=4"]).algo.minibatches == 4


def test_validate_catches_values_set_in_python():
    cfg = Config()
    cfg.steps = 1.5
    with pytest.raises(ConfigError, match=r"^steps: must be an integer"):
        validate(cfg)
    cfg = Config()
    cfg.learner.lr = float("nan")
    with pytest.raises(ConfigError, match=r"^learner\.lr: must be finite"):
        validate(cfg)
    cfg = Config()
    cfg.algo.estimator = "nope"
    with pytest.raises(ConfigError, match=r"^algo\.estimator:"):
        validate(cfg)
    cfg = Config()
    cfg.timeouts.sync_s = 0.0
    with pytest.raises(ConfigError, match=r"^timeouts\.sync_s: must be > 0"):
        validate(cfg)


# --------------------------------------------------------------------------- help

def test_help_text_mentions_every_leaf_field():
    text = help_text()
    names = [name for name, *_ in iter_fields(Config())]
    # independent enumeration: top-level scalars plus each section's fields
    expected = []
    for f in dataclasses.fields(Config):
        sub = getattr(Config(), f.name)
        if dataclasses.is_dataclass(sub):
            expected += [f"{f.name}.{g.name}" for g in dataclasses.fields(sub)]
        else:
            expected.append(f.name)
    assert sorted(names) == sorted(expected)
    assert {"steps", "learner.lr", "algo.dual_clip", "model.num_heads", "timeouts.sync_s"} <= set(names)
    for name in names:
        assert f"--{name}=" in text, name
    for section in ("job", "task", "model", "generator", "reward", "algo", "learner", "timeouts"):
        assert f"[{section}]" in text
    assert "Policy learning rate." in text  # field documentation is included


# --------------------------------------------------------------------------- CLI

@pytest.fixture
def no_driver(monkeypatch):
    """Make sure no test here can start a real job (Ray/vLLM)."""
    def fail(cfg, log=print):
        raise AssertionError("cluster.driver.run must not be called")
    monkeypatch.setattr(cluster.driver, "run", fail)


def test_cli_train_bad_value_exits_2(capsys, no_driver):
    t0 = time.monotonic()
    rc = cli.main(["train", "--learner.lr=-1"])
    elapsed = time.monotonic() - t0
    assert rc == 2
    assert elapsed < 5.0  # validation only: nothing is started
    out, err = capsys.readouterr()
    assert "config error: learner.lr: must be > 0" in err
    assert out == ""


def test_cli_space_separated_negative_value(capsys, no_driver):
    # argparse must hand "-1" through as the value, not swallow it
    assert cli.main(["train", "--learner.lr", "-1"]) == 2
    assert "learner.lr:" in capsys.readouterr().err


def test_cli_config_prints_yaml(capsys):
    assert cli.main(["config", "--steps=3"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out.splitlines()  # a top-level line, not warmup_steps/warmstart_steps
    data = yaml.safe_load(out)
    assert data["steps"] == 3 and data["learner"]["lr"] == 2e-4


def test_cli_space_separated_overrides(capsys):
    assert cli.main(["config", "--learner.lr", "1e-4", "--algo.estimator", "rloo", "--steps=5"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["learner"]["lr"] == 1e-4
    assert data["algo"]["estimator"] == "rloo"
    assert data["steps"] == 5


def test_cli_config_file_and_override(tmp_path, capsys):
    path = write_yaml(tmp_path, {"steps": 7, "algo": {"group_size": 4}})
    assert cli.main(["config", "--config", path, "--steps", "11"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["steps"] == 11 and data["algo"]["group_size"] == 4


def test_cli_malformed_arguments(capsys, no_driver):
    assert cli.main(["train", "--steps"]) == 2
    assert "steps: missing value" in capsys.readouterr().err
    assert cli.main(["train", "stray"]) == 2
    assert "unexpected argument 'stray'" in capsys.readouterr().err
    assert cli.main(["train", "--learner.lrr=1"]) == 2
    assert "learner.lrr: unknown field" in capsys.readouterr().err


def test_cli_train_valid_config_calls_driver(monkeypatch):
    seen = []

    def fake_run(cfg, log=print, resume=False):
        seen.append(cfg)
        return {"ok": True}

    monkeypatch.setattr(cluster.driver, "run", fake_run)
    assert cli.main(["train", "--steps=2", "--learner.lr=0.01"]) == 0
    assert len(seen) == 1 and seen[0].steps == 2 and math.isclose(seen[0].learner.lr, 0.01)
    monkeypatch.setattr(cluster.driver, "run", lambda cfg, log=print, resume=False: {})
    assert cli.main(["train"]) == 1  # an empty summary is a failed run


def test_resume_refuses_a_changed_lora_shape_naming_the_field(tmp_path):
    """A checkpoint's trained tensors are the adapters of one shape (or the whole model): --resume with another
    learner.lora_* fails before anything starts; other overrides still apply."""
    import yaml

    from cluster.driver import resume_config
    from core.config import Config, ConfigError, to_dict

    run = tmp_path / "run"
    run.mkdir()
    cfg = Config()
    cfg.learner.lora_rank = 8
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    assert resume_config(str(run), ["--steps=99"]).steps == 99
    with pytest.raises(ConfigError, match=r"learner.lora_rank: the run in .* was trained with 8; .* cannot continue "
                                          r"with 0"):
        resume_config(str(run), ["--learner.lora_rank=0"])
    with pytest.raises(ConfigError, match="learner.lora_targets"):
        resume_config(str(run), ["--learner.lora_targets=q_proj"])
