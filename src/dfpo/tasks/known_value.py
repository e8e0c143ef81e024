"""Arithmetic prompts with a reward whose value function is known: a yardstick for critics.

The prompts are the ``arithmetic`` task's (``12 + 34 - 5 =`` in the terse style), so a model trained on that task
(the tiny model) answers them as usual; the reward ignores whether the answer is right. ``kind`` chooses it:

- ``"prompt"``: 1 when the expression's last operator is ``+``, else 0, whatever the response. The value of every
  state of the response is that bit, and it can be read off the end of the prompt (and off the worked step the
  model writes with it). A feature the model's own states carry: on the tiny model's 2-term problems a ridge probe
  on its last-layer states recovers it with R^2 of about 0.7 at every response token, where the last operand's
  parity, say, is not linearly readable at all (R^2 about 0).
- ``"response"``: 1 when the response's marked final answer is a number of at least 50, else 0 (no parsable
  answer: 0). The value depends on the policy until the answer is written, and is 0 or 1 from there on. (A
  first version rewarded an even last digit: no probe on the tiny model's states could read that.)
- ``"bernoulli"``: 1 with probability ``p = 0.8`` when the last operator is ``+`` and ``p = 0.2`` when it is
  ``-``, independently of the response. The value is ``p`` at every state and the return is 0 or 1: a critic
  should learn the mean ``p`` and, if it models the distribution, the two atoms with weights ``1 - p`` and ``p``
  (std 0.4, CVaR_0.1 0).

The problems default to two terms (``min_terms = max_terms = 2``): one operator, short responses; there are 20,000
two-term two-digit problems, so the train split defaults to 10,000.

:meth:`KnownValue.value` and :meth:`KnownValue.return_distribution` give the truth a critic is measured against.

The Bernoulli draw is deterministic: a hash of ``(seed, prompt, completion, occurrence)`` mapped to a uniform
number, where ``occurrence`` counts the earlier samples in the batch with the same prompt and completion. So a
resumed run sees the same rewards, and identical completions of one prompt in a batch (the tiny model often writes
the same one several times) still get independent draws. A step's samples of a prompt are scored together, by one
process, so the count does not depend on how a step is split over processes. A prompt met again in a later epoch
draws the same rewards for the same completions; the default 10,000 train prompts make that rare.
:meth:`KnownValue.score`, which evaluation calls one completion at a time, uses occurrence 0: a greedy evaluation
is reproducible, but identical replies in ``mean@k`` share one draw.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

from dfpo.tasks.answers import extract_final_answer, parse_number
from dfpo.tasks.arithmetic import Arithmetic
from dfpo.tasks.base import Task, register

KINDS = ("prompt", "response", "bernoulli")
RESPONSE_THRESHOLD = 50  # the response kind rewards a final answer of at least this


def last_operand(example: dict[str, Any]) -> int:
    """The last number of the example's expression (the one just before `` =`` in the terse prompt)."""
    return int(example["expression"].split()[-1])


def last_operator(example: dict[str, Any]) -> str:
    """The last operator of the example's expression (just before its last operand)."""
    return example["expression"].split()[-2]


def success_probability(example: dict[str, Any]) -> float:
    """The ``bernoulli`` kind's ``p``: 0.8 when the last operator is ``+``, else 0.2."""
    return 0.8 if last_operator(example) == "+" else 0.2


def uniform_draw(seed: int, prompt: Any, completion: str, occurrence: int) -> float:
    """A uniform number in [0, 1) fixed by its arguments (a 64-bit BLAKE2b hash)."""
    key = json.dumps([seed, prompt, completion, occurrence]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64


@register("known_value")
class KnownValue(Task):
    """Arithmetic prompts whose reward, chosen by ``kind``, has a known value function (see the module docstring).

    Args:
        kind: ``"prompt"`` (the last operator is ``+``), ``"response"`` (the final answer is at least 50) or
            ``"bernoulli"`` (a coin with a probability set by the last operator).
        min_terms, max_terms, digits, operators, min_digits, eval_size, train_size, seed, few_shot, prompt_style:
            as for :class:`~dfpo.tasks.arithmetic.Arithmetic`, which makes the prompts; ``seed`` also keys the
            Bernoulli draws.
    """

    name = "known_value"

    def __init__(
        self,
        kind: str = "prompt",
        min_terms: int = 2,
        max_terms: int = 2,
        digits: int = 2,
        operators: str = "+-",
        min_digits: int | None = None,
        eval_size: int = 500,
        train_size: int = 10_000,
        seed: int = 0,
        few_shot: int = 0,
        prompt_style: str = "instruct",
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"known_value kind must be one of {', '.join(KINDS)}; got {kind!r}")
        self.kind, self.seed, self.few_shot = kind, seed, few_shot
        self.arithmetic = Arithmetic(
            min_terms=min_terms, max_terms=max_terms, digits=digits, operators=operators, min_digits=min_digits,
            eval_size=eval_size, train_size=train_size, seed=seed, few_shot=few_shot, prompt_style=prompt_style,
        )  # fmt: skip

    def examples(self, split: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The arithmetic task's examples of ``split``, each with its ``last_operand`` and ``last_operator``."""
        self._check_split(split)
        return [
            {**e, "last_operand": last_operand(e), "last_operator": last_operator(e)}
            for e in self.arithmetic.examples(split, limit)
        ]

    def score(self, completion: str, example: dict[str, Any]) -> float:
        """Reward of one completion; a Bernoulli draw is the one for occurrence 0."""
        return self._reward(completion, example, occurrence=0)

    def score_batch(
        self, completions: list[str], examples: list[dict[str, Any]], completion_ids: list[list[int]] | None = None
    ) -> list[float | None]:
        """Rewards of a batch; repeated ``(prompt, completion)`` pairs get the next occurrence's Bernoulli draw."""
        seen: Counter[str] = Counter()
        rewards: list[float | None] = []
        for completion, example in zip(completions, examples, strict=True):
            key = json.dumps([example["prompt"], completion])
            rewards.append(self._reward(completion, example, occurrence=seen[key]))
            seen[key] += 1
        return rewards

    def value(self, example: dict[str, Any]) -> float | None:
        """The expected reward of ``example`` under any policy: the operator bit (``prompt``), ``p`` (``bernoulli``);
        ``None`` for ``response``, whose value depends on the policy until the answer is written."""
        if self.kind == "prompt":
            return float(last_operator(example) == "+")
        if self.kind == "bernoulli":
            return success_probability(example)
        return None

    def return_distribution(self, example: dict[str, Any]) -> list[tuple[float, float]] | None:
        """The reward's distribution as ``(reward, probability)`` pairs, for any policy; ``None`` for ``response``."""
        if self.kind == "prompt":
            return [(self.value(example), 1.0)]
        if self.kind == "bernoulli":
            p = success_probability(example)
            return [(0.0, 1.0 - p), (1.0, p)]
        return None

    def _reward(self, completion: str, example: dict[str, Any], occurrence: int) -> float:
        if self.kind == "prompt":
            return self.value(example)
        if self.kind == "bernoulli":
            draw = uniform_draw(self.seed, example["prompt"], completion, occurrence)
            return float(draw < success_probability(example))
        answer = extract_final_answer(completion)
        number = parse_number(answer) if answer is not None else None
        return float(number is not None and number >= RESPONSE_THRESHOLD)
