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
    generator: str


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


@dataclass(frozen=True)
class TrainStats:
    """What one learner update reports: scalar metrics plus the new policy version."""

    step: int
    policy_version: int
    metrics: dict[str, float]
