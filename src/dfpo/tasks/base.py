"""The task interface and its registry.

A task loads examples (dicts with at least ``prompt`` and ``answer``), turns an example into chat messages, and
scores a completion with ``score(completion, example) -> float`` in [0, 1]. Verifier failures are counted in
``task.verifier_errors`` and logged, never folded silently into a zero.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from typing import Any

from dfpo.core.registry import Registry
from dfpo.tasks.answers import extract_final_answer, normalize_text, parse_number


class DataError(ValueError):
    """A dataset that cannot be read, or a row missing a field or holding one of the wrong type (user data,
    :mod:`dfpo.tasks.user`)."""


TASKS = Registry("task")
register = TASKS.register
names = TASKS.names

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class Task(ABC):
    """Base class: subclasses set ``name`` and ``splits`` and implement :meth:`examples` and :meth:`score`.

    ``reward_range`` is the interval every reward lies in, which a critic may clamp its values to: [0, 1] for the
    built-in tasks, ``None`` when rewards are unbounded (the user's reward function).
    """

    name: str = ""
    reward_range: tuple[float, float] | None = (0.0, 1.0)
    splits: tuple[str, ...] = ("train", "eval")
    system_prompt: str | None = None
    few_shot: int = 0  # worked train examples shown as earlier chat turns, to teach the answer format
    # completions end in a marked final answer that is scored: format rate and majority votes (maj@k) mean something
    marked_answers: bool = True

    def __init__(self) -> None:
        self.verifier_errors = 0

    @abstractmethod
    def examples(self, split: str, limit: int | None = None) -> list[dict[str, Any]]:
        """Examples of ``split`` (each with ``prompt`` and ``answer``), in a fixed order."""

    @abstractmethod
    def score(self, completion: str, example: dict[str, Any]) -> float:
        """Reward of ``completion`` for ``example``, in [0, 1]."""

    def score_batch(
        self, completions: list[str], examples: list[dict[str, Any]], completion_ids: list[list[int]] | None = None
    ) -> list[float | None]:
        """Rewards of a batch (``completion_ids``: the generated token ids, for reward functions that read them);
        ``None`` skips a sample. The default scores each completion on its own."""
        return [self.score(c, e) for c, e in zip(completions, examples, strict=True)]

    def vote_answer(self, completion: str, example: dict[str, Any]) -> str | None:
        """The marked answer of ``completion`` that takes part in a majority vote (``pseudo_label`` noise)."""
        return extract_final_answer(completion)

    def vote_key(self, answer: str) -> str:
        """Answers with the same key are the same vote: numbers by value, text normalised."""
        number = parse_number(answer)
        return str(number) if number is not None else normalize_text(answer)

    def score_answer(self, answer: str, example: dict[str, Any]) -> float:
        """The score a completion whose marked final answer is ``answer`` earns on ``example``."""
        return self.score(f"\\boxed{{{answer}}}", example)

    def extra_metrics(self, completions: list[str], examples: list[dict[str, Any]]) -> dict[str, float]:
        """Task-specific evaluation metrics, merged into (and overriding) :func:`dfpo.evaluate.evaluate`'s result."""
        return {}

    def prompt_text(self, tokenizer: Any, example: dict[str, Any]) -> str:
        """The text the model continues for ``example``: its :meth:`messages` in the tokenizer's chat template."""
        return render_prompt(tokenizer, self.messages(example))

    def messages(self, example: dict[str, Any]) -> Messages:
        """Chat messages for the example: ``few_shot`` worked train examples as earlier turns, then the example's
        prompt (a string becomes one user turn; a message list is kept)."""
        turns = [*self._few_shot_turns, *self._turns(example)]
        if self.system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        return turns

    @functools.cached_property
    def _few_shot_turns(self) -> Messages:
        """The ``few_shot`` worked examples as chat turns, built once: every prompt shows the same ones."""
        turns: Messages = []
        for shot in self.examples("train", self.few_shot) if self.few_shot else []:
            turns += [*self._turns(shot), {"role": "assistant", "content": target_text(shot)}]
        return turns

    @staticmethod
    def _turns(example: dict[str, Any]) -> Messages:
        prompt = example["prompt"]
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {split!r}; it has {', '.join(self.splits)}")

    def _verifier_failed(self, error: Exception, example: dict[str, Any]) -> float:
        self.verifier_errors += 1
        logger.warning("task %s: verifier error #%d on %r: %s", self.name, self.verifier_errors, example, error)
        return 0.0


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text the model continues: the chat template with the assistant turn opened, or the last user turn."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return messages[-1]["content"] + "\n"


def target_text(example: dict[str, Any]) -> str:
    """The reply a model is taught (by ``dfpo sft`` and few-shot turns): the example's worked ``solution`` when it
    has one, else ``"The answer is <answer>."``, the format the strict verifiers read."""
    return example.get("solution") or f"The answer is {example['answer']}."


def build_task(name: str, options: dict[str, Any]) -> Task:
    """:func:`get`, with options a task does not take, or values it refuses, reported as a
    :class:`~dfpo.options.ConfigError` (a user data or reward file's own error keeps its type: it names the row)."""
    from dfpo.options import ConfigError
    from dfpo.tasks.rewards import RewardFunctionError

    try:
        make = TASKS.get(name)
    except KeyError as error:  # an unknown task: the message lists the registered ones
        raise ConfigError(f"task={name!r}: {error.args[0]}") from None
    try:
        task = make(**options)
        _check_few_shot(task)
        return task
    except (DataError, RewardFunctionError):
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"task_options for task {name!r}: {error}") from None


def check_splits(task: Task, splits: str, key: str) -> None:
    """Refuse, as a :class:`~dfpo.options.ConfigError` naming ``key``, a comma-separated split that ``task`` lacks:
    before any model loads, rather than after training or half an evaluation."""
    from dfpo.options import ConfigError

    for split in [s for s in splits.split(",") if s]:
        try:
            task.examples(split, 1)
        except ValueError as error:
            raise ConfigError(f"{key}={splits!r}: {error}") from None


def get(name: str, **options: Any) -> Task:
    """A new instance of task ``name``; an unknown name raises ``KeyError`` listing the registered ones."""
    task = TASKS.get(name)(**options)
    _check_few_shot(task)
    return task


def _check_few_shot(task: Task) -> None:
    # a negative count would slice the train split from its end: thousands of worked examples before every prompt
    if task.few_shot < 0:
        raise ValueError(f"few_shot={task.few_shot}: must be >= 0 (worked train examples shown before each prompt)")


def majority_vote(task: Task, example: dict[str, Any], completions: list[str]) -> tuple[str | None, float]:
    """The most frequent marked answer among ``completions`` and the share of them that gave it.

    Answers are grouped by ``task.vote_key`` (numbers by value); a tie goes to the answer seen first; completions
    without a marked answer vote for nothing. ``(None, 0.0)`` when no completion has one.
    """
    votes: dict[str, list[str]] = {}
    for completion in completions:
        answer = task.vote_answer(completion, example)
        if answer is not None:
            votes.setdefault(task.vote_key(answer), []).append(answer)
    winner = max(votes.values(), key=len, default=None)  # max keeps the first of equals: insertion order
    return (winner[0], len(winner) / len(completions)) if winner else (None, 0.0)
