"""Asynchronous against synchronous rollouts on the default job, in the same run.

    python -m bench.async_sync                   # 3 configurations, 1 repetition each
    python -m bench.async_sync --repeats 3 --extra --steps=30
    python -m bench.async_sync --from-json bench/results/async_sync.json   # re-tabulate stored runs

Every configuration is the default job (examples/demo.yaml: same model, data, warm start, seed,
steps, batch, learning rate) run through the real `relayrl train` CLI, one after the other on the
same machine, with only the rollout mode and the split of cores between roles changed:

- sync: the default (2 generators, learner with 2 torch threads);
- async, same resources: the default with rollout.mode=async;
- async, 1+1 cores: 1 generator and a 1-thread learner, so generation and training each own a core
  instead of fighting over both (on 2 cores oversubscription costs more than overlap gains);
- sync, 1+1 cores: the same split in sync mode, so it and the row above isolate the effect of overlap;
- async, 1+1 cores, partial rollouts: requests of at most 2 tokens per sample (rollout.partial_rollout_tokens),
  unfinished samples continued on the newest weights: what chunking costs where samples are short (the
  default job's answers are 6 tokens), and how many samples span two versions.

Samples/s counts trained samples over the training loop (start-up and the first evaluation excluded
for every configuration alike); accuracy is held-out greedy exact match after the same number of
steps; sync share = weight-sync seconds / step seconds (the issue's target: under 5%). Median over
repetitions (seed = repetition). Writes bench/results/async_sync.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import median, relayrl_train, table, write_results

CONFIGS: dict[str, list[str]] = {
    "sync (default)": ["--rollout.mode=sync"],
    "async, same resources": ["--rollout.mode=async"],
    "async, 1 generator + 1-thread learner": ["--rollout.mode=async", "--generator.num_generators=1",
                                              "--learner.torch_threads=1"],
    "sync, 1 generator + 1-thread learner": ["--rollout.mode=sync", "--generator.num_generators=1",
                                             "--learner.torch_threads=1"],
    "async, 1+1, partial rollouts (2 tokens)": ["--rollout.mode=async", "--generator.num_generators=1",
                                                "--learner.torch_threads=1", "--rollout.partial_rollout_tokens=2"],
    "async, 1+1, in-flight updates": ["--rollout.mode=async", "--generator.num_generators=1",
                                      "--learner.torch_threads=1", "--rollout.inflight_updates=true"],
}


def _row(name: str, runs: list[dict]) -> dict:
    per_step = lambda s, key: s["phase_seconds"].get(key, 0.0) / max(s["steps"], 1)  # noqa: E731
    return {"config": name, "samples_per_s": median([s["samples_per_second"] for s in runs]),
            "acc_before": median([s["heldout_accuracy_before"] for s in runs]),
            "acc_after": median([s["heldout_accuracy_after"] for s in runs]),
            "loop_s": median([s["train_loop_seconds"] for s in runs]),
            "sync_share": median([s["sync_share_of_step"] for s in runs]),
            "dropped": median([sum(s["accounting"]["prompts_dropped"].values()) for s in runs]),
            "sync_land_s": median([s.get("sync_land_seconds_median") or 0.0 for s in runs]),
            "multi_version": median([s.get("samples_multi_version", 0) / max(s["samples"], 1) for s in runs]),
            "wait_s": median([per_step(s, "time/wait_s") for s in runs]),
            "train_s": median([per_step(s, "time/train_s") for s in runs]),
            "repeats": len(runs)}


COLUMNS = [("config", "configuration", ""), ("samples_per_s", "samples/s", ".0f"), ("ratio", "vs first row", ".2f"),
           ("acc_before", "held-out before", ".3f"), ("acc_after", "held-out after", ".3f"), ("loop_s", "loop s", ".0f"),
           ("wait_s", "waiting for samples s/step", ".2f"), ("train_s", "learner s/step", ".2f"),
           ("sync_share", "sync share of step", ".1%"), ("dropped", "prompts dropped (stale)", ".0f"),
           ("sync_land_s", "new version on every generator s", ".3f"),
           ("multi_version", "samples spanning versions", ".1%"), ("repeats", "runs", "d")]


def compare(configs: dict[str, list[str]], argv: list[str] | None, *, name: str, doc: str, out: str,
            base: list[str] = ()) -> int:
    """Run each of CONFIGS (name -> relayrl overrides on top of --config and BASE) through `relayrl train`, one
    after the other; tabulate against the first row; write bench/results/NAME.{json,md}."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=list(configs))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--config", default="examples/demo.yaml")
    p.add_argument("--extra", nargs="*", action="extend", default=[],
                   help="More relayrl overrides for every configuration, one per --extra=, e.g. --extra=--steps=20.")
    p.add_argument("--out", default=out)
    p.add_argument("--results-dir", default=None, help=f"Where {name}.{{json,md}} go (default bench/results).")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="Re-tabulate the runs stored in an earlier results file instead of running.")
    args = p.parse_args(argv)

    if args.from_json:
        stored = json.loads(Path(args.from_json).read_text())
        raw, args.config, args.extra = stored["runs"], stored["config"], stored["extra"]
    else:
        unknown = [c for c in args.only if c not in configs]
        if unknown:
            p.error(f"unknown configuration(s) {unknown}; choose from {list(configs)}")
        raw = {}
        for c in args.only:
            runs = [relayrl_train(["--config", args.config, *base, *configs[c], f"--seed={rep}", *args.extra],
                                  Path(args.out), f"{c.split(',')[0].split()[0]}-{list(configs).index(c)}-r{rep}",
                                  args.timeout)
                    for rep in range(args.repeats)]
            raw[c] = [{k: v for k, v in s.items() if k != "config"} for s in runs]
            print(_row(c, raw[c]), flush=True)
    rows = [_row(c, runs) for c, runs in raw.items()]
    for r in rows:
        r["ratio"] = r["samples_per_s"] / rows[0]["samples_per_s"]
    md = table(rows, [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)])
    print(md)
    payload = {"config": args.config, "base": list(base), "extra": args.extra, "rows": rows, "runs": raw}
    print(f"results: {write_results(name, payload, md, args.results_dir)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return compare(CONFIGS, argv, name="async_sync", doc=__doc__, out="runs/bench-async")


if __name__ == "__main__":
    raise SystemExit(main())
