"""Data-parallel learner ranks against one rank on the same cores: one update on the same batch, in one run.

    .venv/bin/python -m bench.data_parallel                  # 27M parameters, 1 rank x 2 threads vs 2 ranks x 1 (~4 min)
    .venv/bin/python -m bench.data_parallel --model tiny --ranks 1 2 3 --cores 3

Every variant is `learner.data_parallel` = R real learner actors (Ray, torch.distributed over gloo on CPU), each
with CORES / R torch threads, so every variant uses the same cores: what the option costs or buys on one machine
before it buys more cores (or GPUs). Same randomly initialised Llama and the same groups as bench/learner_step.py
(32 prompts x 8 samples, 7-token prompts, 6-token completions; its "+ sampler" path, the CPU default for fresh
samples). Variants run interleaved, one warm-up update each; seconds per update are the driver's wall time of
`train_step` on every rank (what a job's step waits for), median over repeats. "all-reduce s" is rank 0's time
inside all-reduces (the gradient sum and, when there is one, the no-grad pass's), waiting for slower ranks included.
Writes bench/results/data_parallel[_tiny].{json,md}.
"""

from __future__ import annotations

import argparse
import os
import time

from bench.common import median, table, write_results
from bench.learner_step import SHAPES, _groups, _model


def _ranks(path: str, ranks: int, threads: int):
    import ray

    from core.config import AlgoConfig, LearnerConfig
    from learner.actor import Learner

    cfg = LearnerConfig(torch_threads=threads, data_parallel=ranks)
    actors = [ray.remote(Learner).options(num_cpus=0).remote(path, AlgoConfig(old_logprobs="sampler"), cfg, 100, 0,
                                                             rank=r) for r in range(ranks)]
    if ranks > 1:
        address = ray.get(actors[0].rendezvous_address.remote(), timeout=300)
        ray.get([a.join.remote(address, 600) for a in actors], timeout=300)
    return actors


def main(argv: list[str] | None = None) -> int:
    import ray

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(SHAPES), default="large")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="Variants: learner.data_parallel values.")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="Cores shared out: each rank gets cores / ranks torch threads.")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    bad = [r for r in args.ranks if r < 1 or args.cores % r]
    if bad:
        p.error(f"--ranks {bad}: each must divide --cores {args.cores}")

    path, params = _model(args.model)
    ray.init(address="local", num_cpus=args.cores, include_dashboard=False, log_to_driver=False)
    variants = {f"{r} rank{'s' if r > 1 else ''} x {args.cores // r} thread{'s' if args.cores // r > 1 else ''}": r
                for r in args.ranks}
    try:
        actors = {v: _ranks(path, r, args.cores // r) for v, r in variants.items()}
        times: dict[str, list[float]] = {v: [] for v in variants}
        comm: dict[str, list[float]] = {v: [] for v in variants}
        for rep in range(args.repeats + 1):
            for v, ranks in actors.items():
                groups = ray.put(_groups(args.prompts, args.group, seed=rep))
                t0 = time.perf_counter()
                stats = ray.get([a.train_step.remote(groups) for a in ranks], timeout=1800)
                if rep:  # the first round is warm-up
                    times[v].append(time.perf_counter() - t0)
                    comm[v].append(stats[0].metrics["allreduce_seconds"])
    finally:
        ray.shutdown()
    base = median(times[next(iter(variants))])
    rows = [{"variant": v, "ranks": variants[v], "s": median(times[v]), "speedup": base / median(times[v]),
             "allreduce_s": median(comm[v]), "runs": len(times[v])} for v in variants]
    md = table(rows, [("variant", "variant", ""), ("s", "s per update (median)", ".2f"),
                      ("speedup", f"vs {next(iter(variants))}", ".2f"), ("allreduce_s", "all-reduce s (rank 0)", ".3f"),
                      ("runs", "runs", "d")])
    md += (f"\n\nModel: {args.model} ({params / 1e6:.2f}M parameters), {args.prompts} prompts x {args.group} samples, "
           f"7-token prompts, 6-token completions, 2 minibatches, micro-batch 64 per rank, {args.cores} cores shared "
           f"out; gloo all-reduce.")
    print(md)
    out = write_results("data_parallel" + ("" if args.model == "large" else f"_{args.model}"),
                        {"args": vars(args), "params": params, "rows": rows, "times": times, "allreduce": comm},
                        md, args.results_dir)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
