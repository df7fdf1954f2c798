"""`make bench`: every benchmark, one after the other (each writes bench/results/<name>.{json,md})."""

from __future__ import annotations

from bench import algos, async_sync, data_parallel, generation, learner_step, long_tail, weight_sync


def main() -> int:
    for bench, argv in ((learner_step, []), (learner_step, ["--estimator", "ppo"]), (learner_step, ["--lora", "8"]),
                        (data_parallel, []),
                        (weight_sync, []), (weight_sync, ["--sizes", "medium", "--lora", "8"]),
                        (generation, []), (async_sync, []), (long_tail, []), (algos, [])):
        rc = bench.main(argv)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
