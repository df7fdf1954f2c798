"""Typed messages that cross actor boundaries.

Everything that travels between the driver, generators, reward actors and the learner is one of
these frozen dataclasses. Token sequences are plain lists of ints (they pickle small and need no
torch on the receiving side); padding is added only inside the learner, on the right.

Every sample is stamped with the policy version that produced it, so the learner can measure and
bound staleness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class Prompt:
    """One prompt of the dataset, already tokenized.

    `uid` is unique within a run (dataset row index plus epoch), so accounting can say exactly
    which prompts were trained on or dropped.
    """

    uid: int
    text: str
    token_ids: tuple[int, ...]
    answer: str
    """The label the reward function checks against (dataset column `answer`)."""


@dataclass(frozen=True)
class GenerateRequest:
    prompts: tuple[Prompt, ...]
    n: int
    """Samples per prompt (the group size for group-relative estimators)."""
    temperature: float
    max_new_tokens: int
    seed: int | None = None
    """Base seed (the run's): each prompt samples from its own stream, `sample_seed(seed, prompt.uid)`, so what
    a prompt gets depends on neither the request nor the generator it lands in. None: vLLM's unseeded sampler."""
    continuations: tuple["Continuation", ...] = ()
    """Unfinished samples (partial rollouts) to extend by one more chunk, each on its own (n = 1)."""
    chunk_tokens: int = 0
    """Partial rollouts: generate at most this many tokens of any sample in this request (0 = whole samples,
    up to max_new_tokens). A sample cut short comes back with finish_reason "length" and fewer than
    max_new_tokens tokens (`Completion.unfinished`); the rollout sends it again as a `Continuation`."""
    top_p: float = 1.0
    """Nucleus sampling (1 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    env: EnvSpec | None = None
    """Multi-turn episodes: after each model turn the generator asks this environment for its reply, appends it
    (not trained on) and lets the model go on, until the environment ends the episode, `max_turns` model turns
    or `max_new_tokens` tokens (model and environment together). None: one turn."""


@dataclass(frozen=True)
class EnvSpec:
    """A multi-turn environment: `function` ('module:function') is called after each model turn as
    `function(prompt=..., completion=..., answer=..., turn=...)` and returns the text to append, or None to end
    the episode (actors/env.py)."""

    function: str
    max_turns: int
    step_timeout_s: float
    role: str = ""
    """Chat models: wrap each reply as a message of this role with the model's chat template (actors.env.chat_turn).
    Empty: the reply is appended as it is."""


_MASK64 = (1 << 64) - 1


def sample_seed(base: int, uid: int) -> int:
    """The vLLM seed for prompt UID's samples: splitmix64's output for the state (base << 32) + uid, below 2**62.

    vLLM seeds a prompt's sample i with seed + i (its parallel-sampling children) and draws that sample's
    noise from a generator seeded so. One seed shared by all prompts of a request (what relayrl did before)
    gives sample i of every prompt in it the same noise: samples correlated across prompts, and seeds that
    depend on how prompts were chunked. splitmix64 is a bijection of its state, so distinct (base, uid) get
    distinct streams, spread uniformly: seed + i never reaches another prompt's stream in practice."""
    z = ((base << 32) + uid + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 2


def continuation_seed(base: int, uid: int, index: int, done: int) -> int:
    """The vLLM seed for continuing sample INDEX of prompt UID after DONE tokens (partial rollouts): a stream of
    its own, fixed by (base, uid, index, done), so a continued sample too is the same whatever request or
    generator it lands in."""
    return sample_seed(sample_seed(base, uid) & 0xFFFFFFFF, (index << 24) + done + 1)


@dataclass(frozen=True)
class Completion:
    """One sampled completion with what the learner needs to train on it."""

    prompt: Prompt
    token_ids: tuple[int, ...]
    """Generated token ids, including the end-of-sequence token when finish_reason == "stop"."""
    logprobs: tuple[float, ...]
    """Sampler's log-prob of each generated token (same length as token_ids)."""
    text: str
    finish_reason: FinishReason
    policy_version: int
    """The version that sampled the first token: the oldest (with partial rollouts later tokens may come from
    newer versions, see token_versions). Staleness is measured from it."""
    generator: str
    token_versions: tuple[int, ...] = ()
    """Partial rollouts: the version that sampled each token (same length as token_ids). Empty: every token
    was sampled by policy_version."""
    loss_mask: tuple[int, ...] = ()
    """Multi-turn episodes: 1 for a token the model sampled (trained on), 0 for one the environment wrote (its
    log-prob is a placeholder 0.0). Same length as token_ids. Empty: every token is the model's."""
    turns: int = 1
    """Model turns in this completion (multi-turn episodes; 1 otherwise)."""
    env_failure: str = ""
    """Multi-turn: why the environment could not answer ('timeout: ...', 'exception: ...', 'type: ...'); the
    episode ended there and its group is dropped (reason env_failed), never trained on. Empty: no failure."""

    @property
    def model_tokens(self) -> int:
        """Tokens the model sampled (all of token_ids, less any the environment wrote)."""
        return sum(self.loss_mask) if self.loss_mask else len(self.token_ids)

    def unfinished(self, max_new_tokens: int) -> bool:
        """Cut short by a partial-rollout chunk: neither stopped nor at the sample's token budget."""
        return self.finish_reason == "length" and len(self.token_ids) < max_new_tokens

    @property
    def versions_spanned(self) -> int:
        """How many policy versions sampled this completion's tokens (1 without partial rollouts)."""
        return len(set(self.token_versions)) if self.token_versions else 1


@dataclass(frozen=True)
class Continuation:
    """An unfinished sample of a group (partial rollouts), sent back to a generator to be extended."""

    sample: Completion
    index: int
    """Its place in the group (0..G-1): seeds its stream (continuation_seed) and puts it back in its slot."""


@dataclass(frozen=True)
class Group:
    """All samples of one prompt, scored. The unit the learner trains on."""

    prompt: Prompt
    completions: tuple[Completion, ...]
    rewards: tuple[float, ...]

    @property
    def min_version(self) -> int:
        return min(c.policy_version for c in self.completions)


@dataclass(frozen=True)
class ScoreFailure:
    """A completion the reward source could not score, carried as data, not as a lost exception."""

    index: int
    reason: Literal["exception", "timeout", "nan", "inf", "type", "length"]
    detail: str


@dataclass(frozen=True)
class ScoreResult:
    """Scores for one batch of completions, aligned by index; failed indices hold None.

    `components` holds the named parts of a reward that returned a dict (`{"total": [...],
    "format": [...], ...}`), each aligned by index like `scores`, None where the sample failed;
    they are for logging, only `scores` is trained on. Empty when the reward returned a plain list.
    """

    scores: tuple[float | None, ...]
    failures: tuple[ScoreFailure, ...] = ()
    components: dict[str, tuple[float | None, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class WeightsHandle:
    """A published policy version.

    `blob_ref` is a Ray ObjectRef to safetensors-serialised weights (a uint8 numpy array, read
    zero-copy from the object store; core/weights.py), wrapped in a list by the sender so that Ray
    passes the reference through instead of resolving it at the call site.
    """

    version: int
    blob_ref: list
    num_bytes: int
    checksum: str
    """CRC-32 of the serialised blob ('crc32:<hex>'); generators check it so a torn transfer cannot be served."""
    lora: LoRAVersion | None = None
    """Set when the blob holds LoRA adapters alone (learner.lora_sync=adapter): each generator merges them into
    the base model itself. None: the blob is the whole model."""


@dataclass(frozen=True)
class LoRAVersion:
    """An adapter-only version: the blob holds `<module>.lora_A` / `<module>.lora_B` for every adapted layer, to be
    merged as W + scale * B A (core.weights.merge_adapters) into the weights of the model folder BASE_PATH, the
    learner's frozen base."""

    base_path: str
    scale: float


@dataclass(frozen=True)
class TrainStats:
    """What one learner update reports: scalar metrics plus the new policy version."""

    step: int
    policy_version: int
    metrics: dict[str, float]
