"""One learner update, the way relayrl does it against the plain way, on the same batch in one process.

    .venv/bin/python -m bench.learner_step                 # 27M parameters, 32 prompts x 8 samples (~3 min)
    .venv/bin/python -m bench.learner_step --model tiny
    .venv/bin/python -m bench.learner_step --estimator ppo  # PPO: policy + critic, GAE (~6 min)

Each variant is a real `Learner` on the same randomly initialised Llama (timing does not depend on the
weights), fed the same groups shaped like the default job's (7-token prompts, 6-token completions):
- plain: one forward per row (learner.shared_prefix=false), old log-probs by a full no-grad pass
  (the first minibatch's rows included) and the per-tensor AdamW loop; what TRL's GRPOTrainer also does;
- shared prefix: each group's prompt once (learner.shared_prefix, the default);
- + reuse: shared prefix, fused AdamW, the first minibatch's old log-probs from its own forward
  (algo.old_logprobs=recompute: the default on GPU);
- + sampler: the same with vLLM's log-probs as old log-probs, no no-grad policy pass (algo.old_logprobs=sampler;
  what the default, auto, does on CPU for fresh samples).
With `--estimator ppo` the critic (a second copy of the body, learner/forward.ValueModel) runs the same way
as the policy in each variant: once per row in plain, each group's prompt once from shared prefix on.
Variants run interleaved, one warm-up update each; the median seconds per update is reported.
`--bf16` compares instead "+ reuse" (float32) with learner.compute_dtype=bfloat16 (bf16 autocast, float32 weights,
old log-probs recomputed as algo.old_logprobs=auto does for bf16), run with torch's SDPA attention and with the
eager attention the learner picks for bf16 on CPU. It pays only on CPUs with AMX (the result file's machine.cpu_isa).
`--compile` compares instead the CPU default ("+ sampler"; with --bf16, "bf16") with the same learner whose policy
is torch.compile'd (`policy.compile(dynamic=True)`, not a relayrl option); the first update, which compiles, is
reported apart.
`--lora R` compares instead the CPU default ("+ sampler") with the same learner training LoRA adapters of rank R on
every linear layer (learner.lora_rank=R, lora_alpha=2R): frozen base, no weight gradients for it, AdamW over the
adapters only. The table adds trained parameters and AdamW state (its two moments; the step counters are left
out).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch

from bench.common import median, table, write_results

SHAPES = {"tiny": dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256),
          "large": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536)}


def _model(shape: str) -> tuple[str, int]:
    from cluster.world import build_model
    from core.config import ModelConfig

    path = tempfile.mkdtemp(prefix="relayrl-bench-learner-")
    model = build_model(ModelConfig(**SHAPES[shape]), vocab_size=12, max_len=64, seed=0)
    model.save_pretrained(path, safe_serialization=True)
    return path, sum(p.numel() for p in model.parameters())


def _groups(prompts: int, group: int, seed: int):
    from core.messages import Completion, Group, Prompt

    rng = random.Random(seed)
    out = []
    for i in range(prompts):
        p = Prompt(i, "", (1, *(rng.randint(3, 10) for _ in range(6))), "")
        comps = tuple(Completion(p, tuple(rng.randint(3, 10) for _ in range(6)), (-1.5,) * 6, "", "stop", 0, "g")
                      for _ in range(group))
        out.append(Group(p, comps, tuple(rng.random() for _ in range(group))))
    return out


def _learner(path: str, variant: str, threads: int, estimator: str, gpu: bool = False):
    from core.config import AlgoConfig, LearnerConfig
    from learner.actor import Learner

    compiled = variant.endswith(", compiled")
    variant = variant.removesuffix(", compiled")
    lora = int(variant.split("LoRA r=")[1]) if "LoRA r=" in variant else 0
    variant = variant.split(", LoRA")[0]
    algo = AlgoConfig(estimator=estimator, old_logprobs="sampler" if variant == "+ sampler" else "recompute")
    # (random rewards never tie, so skip_zero_advantage has nothing to skip here; plain runs every row regardless)
    dtype = "bfloat16" if variant.startswith("bf16") else "float32"
    learner = Learner(path, algo, LearnerConfig(torch_threads=threads, shared_prefix=variant != "plain",
                                                skip_zero_advantage=variant != "plain", compute_dtype=dtype,
                                                lora_rank=lora, lora_alpha=2.0 * max(lora, 1),
                                                num_gpus=1.0 if gpu else 0.0), 100, 0)
    if variant == "bf16, SDPA attention":  # what the learner would run without its eager-attention choice
        for model in (learner.policy, learner.critic and learner.critic.body):
            if model is not None:
                model.set_attn_implementation("sdpa")
    if variant in ("plain", "shared prefix"):  # undo the two other savings: per-tensor AdamW, full no-grad pass
        learner.opt = torch.optim.AdamW(learner.policy.parameters(), lr=learner.cfg.lr, fused=False)
        if learner.critic is not None:
            learner.critic_opt = torch.optim.AdamW(learner.critic.parameters(), lr=algo.critic_lr, fused=False)
        full_pass = learner._no_grad_pass
        learner._no_grad_pass = lambda b, old_rows=None, **kw: full_pass(b, None, **kw)
    if compiled:  # in place: parameter names (and so published weights) unchanged; shapes vary with the batch
        learner.policy.compile(dynamic=True)
    return learner


VARIANTS = ("plain", "shared prefix", "+ reuse", "+ sampler")
# --bf16: learner.compute_dtype=bfloat16 (old log-probs recomputed, as auto does with bf16) against "+ reuse", the
# float32 learner on the same old-log-prob path; with torch's SDPA attention and with the eager attention the
# learner picks for bf16 on CPU
BF16_VARIANTS = ("+ reuse", "bf16, SDPA attention", "bf16")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(SHAPES), default="large")
    p.add_argument("--estimator", choices=["grpo", "ppo"], default="grpo",
                   help="ppo: with the critic (its values, GAE, the value loss) in every update.")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads (learner.torch_threads).")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bf16", action="store_true", help="float32 against learner.compute_dtype=bfloat16 (pays on "
                   "CPUs with AMX; GPUs autocast to bf16 by default).")
    p.add_argument("--compile", action="store_true", help="The default CPU path against the same with its policy "
                   "torch.compile'd (with --bf16: the bf16 learner); the compiling first update is reported apart.")
    p.add_argument("--lora", type=int, default=0, metavar="R", help="The CPU default against the same with LoRA "
                   "adapters of rank R (learner.lora_rank) on every linear layer.")
    p.add_argument("--gpu", action="store_true", help="Run the learner on CUDA (learner.num_gpus=1). Needs neither "
                   "Ray nor vLLM, so it runs where only torch and transformers are installed.")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu: torch sees no CUDA device")

    if args.compile:
        base = "bf16" if args.bf16 else "+ sampler"
        variants = (base, f"{base}, compiled")
    elif args.lora:
        variants = ("+ sampler", f"+ sampler, LoRA r={args.lora}")
    else:
        variants = BF16_VARIANTS if args.bf16 else VARIANTS
    path, params = _model(args.model)
    learners = {v: _learner(path, v, args.threads, args.estimator, args.gpu) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    first: dict[str, float] = {}
    for rep in range(args.repeats + 1):
        for v, learner in learners.items():
            groups = _groups(args.prompts, args.group, seed=rep)
            t0 = time.perf_counter()
            learner.train_step(groups)
            if args.gpu:  # the optimizer step's kernels may still be queued
                torch.cuda.synchronize()
            if rep:  # the first round is warm-up
                times[v].append(time.perf_counter() - t0)
            else:
                first[v] = time.perf_counter() - t0
    base = median(times[variants[0]])
    rows = [{"variant": v, "s": median(times[v]), "speedup": base / median(times[v]), "runs": len(times[v]),
             "first_s": first[v], "trainable_m": sum(p.numel() for p in learners[v]._params()) / 1e6,
             "adam_mb": sum(t.numel() * t.element_size() for o in (learners[v].opt, learners[v].critic_opt) if o
                            for st in o.state.values() for k, t in st.items() if k != "step") / 2**20} for v in variants]
    cols = [("variant", "variant", ""), ("s", "s per update (median)", ".2f"), ("speedup", f"vs {variants[0]}", ".2f"),
            ("first_s", "first update s (warm-up)", ".1f"), ("runs", "runs", "d")]
    if args.lora:
        cols += [("trainable_m", "trained params (M)", ".2f"), ("adam_mb", "AdamW state MiB", ".1f")]
    md = table(rows, cols)
    md += (f"\n\nEstimator: {args.estimator}. Model: {args.model} ({params / 1e6:.2f}M parameters), {args.prompts} prompts x {args.group} samples, "
           f"7-token prompts, 6-token completions, 2 minibatches, micro-batch 64, "
           + ("on CUDA." if args.gpu else f"{args.threads} torch threads."))
    print(md)
    suffix = (("" if args.model == "large" else f"_{args.model}") + ("" if args.estimator == "grpo" else f"_{args.estimator}")
              + ("_bf16" if args.bf16 else "") + ("_compile" if args.compile else "")
              + (f"_lora{args.lora}" if args.lora else "") + ("_gpu" if args.gpu else ""))
    out = write_results(f"learner_step{suffix}", {"args": vars(args), "params": params, "rows": rows,
                                                  "times": times}, md, args.results_dir)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
