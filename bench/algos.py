"""Every advantage estimator and KL mode on the default job, side by side.

    python -m bench.algos                 # all variants, 1 repetition each
    python -m bench.algos --only grpo ppo --repeats 3

Each variant is the default job (examples/demo.yaml: same model, task, warm start, seed, steps and
batch) with only the algorithm fields changed, run through the real `relayrl train` CLI one after
the other on the same machine. Reports held-out greedy accuracy before/after, the gain, wall time
and samples/s (median over repetitions; seeds differ per repetition). Writes bench/results/algos.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import median, relayrl_train, table, write_results

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
}

def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("+", "-")


COLUMNS = [("variant", "variant", ""), ("acc_before", "held-out before", ".3f"), ("acc_after", "held-out after", ".3f"),
           ("gain", "gain", "+.3f"), ("wall_s", "wall s", ".0f"), ("samples_per_s", "samples/s", ".0f"),
           ("repeats", "runs", "d")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=list(VARIANTS), help="Variants to run (default: all).")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--config", default="examples/demo.yaml")
    p.add_argument("--extra", nargs="*", default=[], help="More overrides for every variant, e.g. --steps=20.")
    p.add_argument("--out", default="runs/bench-algos")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--from-runs", nargs="*", default=None, metavar="DIR",
                   help="Tabulate finished runs found in these --out folders instead of running anything.")
    args = p.parse_args(argv)

    rows, raw = [], {}
    for name in args.only:
        if args.from_runs is not None:
            found = sorted(Path(d) / f"{_slug(name)}-r{rep}" / "summary.json" for d in args.from_runs
                           for rep in range(args.repeats))
            runs = [json.loads(f.read_text()) for f in found if f.exists()]
            if not runs:
                continue
        else:
            runs = []
        for rep in range(0 if args.from_runs is not None else args.repeats):
            slug = f"{_slug(name)}-r{rep}"
            t0 = time.monotonic()
            s = relayrl_train(["--config", args.config, *VARIANTS[name], f"--seed={rep}", *args.extra],
                              Path(args.out), slug, args.timeout)
            runs.append(s)
            print(f"{name} (run {rep + 1}/{args.repeats}): held-out {s['heldout_accuracy_before']:.3f} -> "
                  f"{s['heldout_accuracy_after']:.3f} in {time.monotonic() - t0:.0f}s", flush=True)
        raw[name] = [{k: v for k, v in s.items() if k != "config"} for s in runs]
        before = median([s["heldout_accuracy_before"] for s in runs])
        after = median([s["heldout_accuracy_after"] for s in runs])
        rows.append({"variant": name, "acc_before": before, "acc_after": after,
                     "gain": median([s["heldout_accuracy_after"] - s["heldout_accuracy_before"] for s in runs]),
                     "wall_s": median([s["wall_seconds"] for s in runs]),
                     "samples_per_s": median([s["samples_per_second"] for s in runs]),
                     "repeats": len(runs), "overrides": " ".join(VARIANTS[name])})
    md = table(rows, COLUMNS)
    print(md)
    out = write_results("algos", {"config": args.config, "extra": args.extra, "rows": rows, "runs": raw}, md)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
