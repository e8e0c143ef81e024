"""Batched generation with a Hugging Face causal LM, and task accuracy on a split.

Prompts are rendered with the tokenizer's chat template when it has one (plain ``prompt + newline`` otherwise),
left-padded, and generated with the KV cache; greedy unless a temperature is given.
"""

from __future__ import annotations

import time
from typing import Any

from dfpo.rollout import generate_batch
from dfpo.tasks.answers import extract_final_answer
from dfpo.tasks.base import Task


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text the model continues: the chat template with the assistant turn opened, or the last user turn."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return messages[-1]["content"] + "\n"


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> tuple[list[str], list[bool]]:
    """Completions of ``prompts`` and, for each, whether it was cut at ``max_new_tokens`` (no end token)."""
    texts, truncated = [], []
    for start in range(0, len(prompts), batch_size):
        rollout = generate_batch(
            model, tokenizer, prompts[start : start + batch_size], max_new_tokens, temperature, top_p
        )
        texts += rollout.completions
        truncated += rollout.truncated.tolist()
    return texts, truncated


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task,
    split: str = "eval",
    limit: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    examples: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Greedy accuracy of ``model`` on ``task``'s ``split`` (or on ``examples`` of the task, when given).

    Returns ``accuracy``, ``n``, ``format_rate`` (share of completions with a marked final answer),
    ``truncated_rate``, ``verifier_errors`` (during this call), ``seconds``, and one sample completion, plus the
    task's :meth:`~dfpo.tasks.base.Task.extra_metrics` (e.g. dialogue's ``exact_match``).
    """
    examples = task.examples(split, limit) if examples is None else examples
    prompts = [render_prompt(tokenizer, task.messages(e)) for e in examples]
    errors_before, start = task.verifier_errors, time.perf_counter()
    completions, truncated = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    scores = [task.score(c, e) for c, e in zip(completions, examples, strict=True)]
    n = len(examples)
    return {
        "accuracy": sum(scores) / n,
        "n": n,
        "format_rate": sum(extract_final_answer(c) is not None for c in completions) / n,
        "truncated_rate": sum(truncated) / n,
        "verifier_errors": task.verifier_errors - errors_before,
        "seconds": time.perf_counter() - start,
        "sample": {"prompt": prompts[0], "completion": completions[0], "answer": examples[0]["answer"]},
        **task.extra_metrics(completions, examples),
    }


def sampled_metrics(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: list[dict[str, Any]],
    k: int,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    batch_size: int = 16,
) -> dict[str, float]:
    """``mean@k`` (mean score of ``k`` sampled replies per example) and ``maj@k`` (score of their majority answer).

    Draws from torch's global generator: seed it (or fork it) around the call.
    """
    from dfpo.rollout import sample
    from dfpo.tasks.noise import majority_vote

    mean = majority = 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [render_prompt(tokenizer, task.messages(e)) for e in chunk]
        rollout = sample(model, tokenizer, prompts, k, max_new_tokens, temperature)
        for i, example in enumerate(chunk):
            replies = rollout.completions[i * k : (i + 1) * k]
            mean += sum(task.score(c, example) for c in replies) / k
            answer, _ = majority_vote(task, example, replies)
            majority += task.score_answer(answer, example) if answer is not None else 0.0
    n = max(1, len(examples))
    return {f"mean@{k}": mean / n, f"maj@{k}": majority / n}
