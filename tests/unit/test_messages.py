"""core.messages.sample_seed: every prompt its own vLLM random stream, fixed by (run seed, prompt uid)."""

from __future__ import annotations

from core.messages import sample_seed


def test_sample_seed_is_splitmix64_of_base_and_uid():
    # splitmix64's first output from state 0 is 0xE220A8397B1DCDAF (the published test vector); relayrl's state
    # for (base, uid) is (base << 32) + uid, one splitmix64 step on, and it keeps the top 62 bits
    assert sample_seed(0, 0) == 0xE220A8397B1DCDAF >> 2
    assert sample_seed(0, 0) == sample_seed(0, 0)  # a pure function: no hidden state between calls
    assert sample_seed(0, 1) != sample_seed(0, 0) != sample_seed(1, 0)


def test_prompt_streams_are_far_apart():
    """vLLM gives a prompt's sample i the seed + i: streams of different prompts must be more than a group
    apart, for every prompt of several runs' worth of seeds and uids."""
    seeds = sorted(sample_seed(base, uid) for base in range(4) for uid in range(20_000))
    assert len(set(seeds)) == len(seeds)
    assert min(b - a for a, b in zip(seeds, seeds[1:])) > 1 << 20  # group sizes are far below a million
    assert 0 <= seeds[0] and seeds[-1] < 1 << 62  # seed + i stays a valid int64 for torch.Generator
