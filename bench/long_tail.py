"""Long-tailed answers: what partial rollouts and dynamic micro-batches buy, in the same run.

    python -m bench.long_tail                  # 7 configurations, 1 repetition each (~22 min on 2 cores)
    python -m bench.long_tail --only "async 1+1" "async 1+1, partial 8" --repeats 3
    python -m bench.long_tail --from-json bench/results/long_tail.json   # re-tabulate stored runs

The default job's answers are all 6 tokens, so nothing there waits on a long sample. Here the same job
(examples/demo.yaml: model size, warm start, seed, batch, learning rate) runs on the long-tailed variant of
its task: words of 5 to 40 letters with P(L) proportional to 1/L^2 (most answers 5-10 tokens, about 1 in 7
20 or more, mean 11.2), generator.max_new_tokens 41. That is the shape of reasoning RL's answer
lengths (PEERS.md: long-tail generations leave generators idle), scaled to a CPU. Every configuration
runs through the real `relayrl train` CLI, one after the other, with only the fields below changed:

- sync: the default resources (2 generators, a 2-thread learner), rollout.mode=sync;
- async 1+1: 1 generator and a 1-thread learner, each owning a core (bench/async_sync.py's best row);
- + partial 8: rollout.partial_rollout_tokens=8: a generate call samples at most 8 tokens of any sample, so a
  request no longer runs as long as its longest sample while the rest of vLLM's batch sits finished;
  unfinished samples continue in a later call, on the newest weights;
- + dynamic micro-batches: learner.micro_batch_tokens=2048: the learner's micro-batches hold samples of
  similar length up to 2048 padded tokens, instead of 64 samples each padded to the longest in the batch;
- both;
- + in-flight updates: rollout.inflight_updates=true: a new version lands in the generator at its next
  engine step instead of after its running samples finish (PipelineRL); samples may span versions;
- in-flight updates + dynamic micro-batches.

Samples/s counts trained samples over the training loop (start-up and the first evaluation excluded
alike); "waiting for samples" is the learner-side time a step spends waiting for generation, "learner"
the update itself; held-out accuracy is greedy exact match after the same number of steps. Median over
repetitions (seed = repetition). Writes bench/results/long_tail.{json,md}.
"""

from __future__ import annotations

from bench.async_sync import compare

TASK = ["--task.max_word_length=40", "--generator.max_new_tokens=41", "--steps=30"]
SPLIT = ["--rollout.mode=async", "--generator.num_generators=1", "--learner.torch_threads=1"]
CONFIGS: dict[str, list[str]] = {
    "sync (default resources)": ["--rollout.mode=sync"],
    "async 1+1": SPLIT,
    "async 1+1, partial 8": [*SPLIT, "--rollout.partial_rollout_tokens=8"],
    "async 1+1, dynamic micro-batches": [*SPLIT, "--learner.micro_batch_tokens=2048"],
    "async 1+1, partial 8 + dynamic micro-batches": [*SPLIT, "--rollout.partial_rollout_tokens=8",
                                                     "--learner.micro_batch_tokens=2048"],
    "async 1+1, in-flight updates": [*SPLIT, "--rollout.inflight_updates=true"],
    "async 1+1, in-flight updates + dynamic micro-batches": [*SPLIT, "--rollout.inflight_updates=true",
                                                             "--learner.micro_batch_tokens=2048"],
}


def main(argv: list[str] | None = None) -> int:
    return compare(CONFIGS, argv, name="long_tail", doc=__doc__, out="runs/bench-long-tail", base=TASK)


if __name__ == "__main__":
    raise SystemExit(main())
