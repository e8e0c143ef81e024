"""The values a training step's phases hand each other (this process's share of the step's batch).

``P`` prompts, ``N = P x rollout.samples`` sequences, ``R`` response tokens (the longest response).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from dfpo.generation.rollout import Rollout
from dfpo.supervision.base import NoisyRewards


@dataclass
class Sampled:
    """The step's prompts and the responses sampled to them.

    Attributes:
        first: the index of this process's first prompt among the step's prompts.
        examples: ``P`` task examples drawn for the step (with their pseudo-labels under that noise).
        prompts: ``P`` rendered prompts, fitted to the model's context.
        truncated_prompts: how many of them were cut to fit (``rollout.long_prompts=truncate``).
        rollout: the responses: ``input_ids [N, P_len + R]``, ``response_mask [N, R]``, ``prompt_index [N]``.
        per_sequence: ``N`` examples, the one each sequence answers.
    """

    first: int
    examples: list[dict[str, Any]]
    prompts: list[str]
    truncated_prompts: int
    rollout: Rollout
    per_sequence: list[dict[str, Any]]


@dataclass
class Rewarded:
    """The responses' rewards: what the learner observes and the true ones beside them.

    Attributes:
        noisy: the noise model's lists (``observed`` and ``true``, ``None`` for a skipped response) and its rate.
        components: each user reward function's mean this step (empty for built-in verifiers).
        kept: ``[N]`` bool, responses with a reward.
        scores: ``[N]`` observed rewards (0 where not kept).
        true: ``[N]`` true rewards (0 where not kept).
        mask: ``[N, R]`` float, the response tokens that count in the losses (kept, and not truncated when
            ``rollout.mask_truncated``).
    """

    noisy: NoisyRewards
    components: dict[str, float]
    kept: Tensor
    scores: Tensor
    true: Tensor
    mask: Tensor
