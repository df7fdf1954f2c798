"""Every advantage estimator and KL mode on the default job, side by side.

    python -m bench.algos                 # all variants, 1 repetition each
    python -m bench.algos --only grpo ppo --repeats 3
    python -m bench.algos --model large --only grpo "grpo whole-groups" --repeats 3   # 27M, ~6.5 min a run
    python -m bench.algos --only grpo "grpo no-skip" "grpo dynamic-sampling" --repeats 3  # learner skip, DAPO filter

Each variant is the default job (examples/demo.yaml: same model, task, warm start, seed, steps and
batch) with only the algorithm fields changed, run through the real `relayrl train` CLI one after
the other on the same machine. Reports held-out greedy accuracy before/after, the gain, wall time
and samples/s (median over repetitions; repetition r runs seed r, its own warm start, so every variant sees
the same seeds; --seeds picks them), and each run's held-out accuracy after.
Writes bench/results/algos[_large].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import LARGE_MODEL, add_seed_args, median, relayrl_train, seed_list, table, write_results

# name -> CLI overrides on top of examples/demo.yaml
VARIANTS: dict[str, list[str]] = {
    "grpo": ["--algo.estimator=grpo"],
    "dr_grpo": ["--algo.estimator=dr_grpo", "--algo.loss_agg=seq-mean-token-sum-norm"],
    "rloo": ["--algo.estimator=rloo"],
    "reinforce": ["--algo.estimator=reinforce"],
    "reinforce_pp": ["--algo.estimator=reinforce_pp", "--algo.kl_coef=0.01", "--algo.kl_mode=reward", "--algo.kl_kind=k1"],
    "ppo": ["--algo.estimator=ppo"],
    "grpo+kl k1 loss": ["--algo.kl_coef=0.05", "--algo.kl_kind=k1", "--algo.kl_mode=loss"],
    "grpo+kl k2 loss": ["--algo.kl_coef=0.05", "--algo.kl_kind=k2", "--algo.kl_mode=loss"],
    "grpo+kl k3 loss": ["--algo.kl_coef=0.05", "--algo.kl_kind=k3", "--algo.kl_mode=loss"],
    "grpo+kl k3 reward": ["--algo.kl_coef=0.05", "--algo.kl_kind=k3", "--algo.kl_mode=reward"],
    "grpo+kl adaptive": ["--algo.kl_coef=0.05", "--algo.kl_kind=k3", "--algo.kl_target=0.02"],
    # minibatches drawn from all samples (TRL's way; the default since 2026-12-02, spelled out) or whole groups
    "grpo samples-split": ["--algo.minibatch_split=samples"],
    "grpo whole-groups": ["--algo.minibatch_split=groups"],
    # the learner runs every sample, tied groups too (the same update, more compute: learner.skip_zero_advantage)
    "grpo no-skip": ["--learner.skip_zero_advantage=false"],
    # DAPO dynamic sampling: tied groups dropped and replaced by new prompts (more generation per step)
    "grpo dynamic-sampling": ["--algo.dynamic_sampling=true"],
}

def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("+", "-")


COLUMNS = [("variant", "variant", ""), ("acc_before", "held-out before", ".3f"), ("acc_after", "held-out after", ".3f"),
           ("gain", "gain", "+.3f"), ("wall_s", "wall s", ".0f"), ("samples_per_s", "samples/s", ".0f"),
           ("repeats", "runs", "d"), ("per_run", "held-out after, per seed", "")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=list(VARIANTS), help="Variants to run (default: all).")
    add_seed_args(p)
    p.add_argument("--model", choices=["tiny", "large"], default="tiny",
                   help="tiny: the default 0.67M model; large: 27M parameters, lr 3e-5 (as bench/trl_compare.py).")
    p.add_argument("--config", default="examples/demo.yaml")
    p.add_argument("--extra", nargs="*", action="extend", default=[],
                   help="More relayrl overrides for every variant, one per --extra=, e.g. --extra=--steps=20.")
    p.add_argument("--out", default=None, help="Run folders (default runs/bench-algos[-large]).")
    p.add_argument("--results-dir", default=None, help="Where algos[_large].{json,md} go (default bench/results).")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--from-runs", nargs="*", default=None, metavar="DIR",
                   help="Tabulate finished runs found in these --out folders instead of running anything.")
    args = p.parse_args(argv)
    unknown = [v for v in args.only if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    suffix = "" if args.model == "tiny" else f"_{args.model}"
    out_dir = Path(args.out or f"runs/bench-algos{suffix.replace('_', '-')}")
    model = LARGE_MODEL if args.model == "large" else []

    runs: dict[str, list[dict]] = {name: [] for name in args.only}
    seeds = seed_list(args)
    if args.from_runs is not None:
        for name in args.only:
            found = sorted(Path(d) / f"{_slug(name)}-r{seed}" / "summary.json" for d in args.from_runs
                           for seed in seeds)
            runs[name] = [json.loads(f.read_text()) for f in found if f.exists()]
    else:
        for seed in seeds:  # seed-major: a slow patch of the machine hits every variant alike
            for name in args.only:
                t0 = time.monotonic()
                s = relayrl_train(["--config", args.config, *model, *VARIANTS[name], f"--seed={seed}", *args.extra],
                                  out_dir, f"{_slug(name)}-r{seed}", args.timeout)
                runs[name].append(s)
                print(f"{name} (seed {seed}, run {len(runs[name])}/{len(seeds)}): held-out "
                      f"{s['heldout_accuracy_before']:.3f} -> {s['heldout_accuracy_after']:.3f} in "
                      f"{time.monotonic() - t0:.0f}s", flush=True)
    rows, raw = [], {}
    for name, got in runs.items():
        if not got:
            continue
        raw[name] = [{k: v for k, v in s.items() if k != "config"} for s in got]
        rows.append({"variant": name, "acc_before": median([s["heldout_accuracy_before"] for s in got]),
                     "acc_after": median([s["heldout_accuracy_after"] for s in got]),
                     "gain": median([s["heldout_accuracy_after"] - s["heldout_accuracy_before"] for s in got]),
                     "wall_s": median([s["wall_seconds"] for s in got]),
                     "samples_per_s": median([s["samples_per_second"] for s in got]),
                     "repeats": len(got), "overrides": " ".join(VARIANTS[name]),
                     "per_run": "/".join(f"{s['heldout_accuracy_after']:.3f}" for s in got)})
    md = table(rows, COLUMNS)
    print(md)
    out = write_results(f"algos{suffix}", {"model": args.model, "config": args.config, "extra": args.extra,
                                           "seeds": seeds, "rows": rows, "runs": raw}, md, args.results_dir)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
