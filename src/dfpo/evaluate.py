"""Task accuracy on a split: greedy (:func:`evaluate`) and sampled (``mean@k``, ``maj@k``: :func:`sampled_metrics`).

Prompts are rendered with the tokenizer's chat template when it has one (plain ``prompt + newline`` otherwise) and
generated in batches by :mod:`dfpo.generation.rollout`.
"""

from __future__ import annotations

import time
from typing import Any

from dfpo.generation.rollout import fit_prompts, generate, generate_with_ids
from dfpo.tasks.answers import extract_final_answer
from dfpo.tasks.base import Task, majority_vote, render_prompt

__all__ = ["evaluate", "generate", "render_prompt", "sampled_metrics"]


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task,
    split: str = "eval",
    limit: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    examples: list[dict[str, Any]] | None = None,
    max_prompt_tokens: int | None = None,
) -> dict[str, Any]:
    """Greedy accuracy of ``model`` on ``task``'s ``split`` (or on ``examples`` of the task, when given).

    Returns ``accuracy`` (the mean score over the scored completions: for a task scored by the user's reward
    functions, the mean reward, also given as ``mean_reward``), ``n``, ``format_rate`` (share of completions with
    a marked final answer, for tasks that score one), ``truncated_rate``, ``verifier_errors`` (during this call),
    ``seconds``, and one sample completion, plus the task's :meth:`~dfpo.tasks.base.Task.extra_metrics` (e.g.
    dialogue's ``exact_match``). The whole split is scored in one ``score_batch`` call. A prompt over
    ``max_prompt_tokens`` keeps its last ones (counted in ``truncated_prompts``).
    """
    examples = task.examples(split, limit) if examples is None else examples
    prompts, cut = fit_prompts(tokenizer, [task.prompt_text(tokenizer, e) for e in examples], max_prompt_tokens)
    errors_before, start = task.verifier_errors, time.perf_counter()
    completions, truncated, ids = generate_with_ids(model, tokenizer, prompts, max_new_tokens, batch_size)
    scored = [s for s in task.score_batch(completions, examples, ids) if s is not None]
    n = len(examples)
    result: dict[str, Any] = {"accuracy": sum(scored) / max(1, len(scored)), "n": n}
    if not task.marked_answers:
        result["mean_reward"] = result["accuracy"]
    else:
        result["format_rate"] = sum(extract_final_answer(c) is not None for c in completions) / max(1, n)
    return {
        **result,
        "truncated_rate": sum(truncated) / max(1, n),
        "truncated_prompts": cut,
        "verifier_errors": task.verifier_errors - errors_before,
        "seconds": time.perf_counter() - start,
        "sample": {"prompt": prompts[0], "completion": completions[0], "answer": examples[0].get("answer")}
        if examples
        else {},
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
    max_prompt_tokens: int | None = None,
) -> dict[str, float]:
    """``mean@k`` (mean score of ``k`` sampled replies per example) and ``maj@k`` (score of their majority answer,
    for tasks whose completions carry a marked answer).

    Draws from torch's global generator: seed it (or fork it) around the call.
    """
    from dfpo.generation.rollout import sample

    mean = majority = 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts, _ = fit_prompts(tokenizer, [task.prompt_text(tokenizer, e) for e in chunk], max_prompt_tokens)
        rollout = sample(model, tokenizer, prompts, k, max_new_tokens, temperature)
        scores = task.score_batch(rollout.completions, [e for e in chunk for _ in range(k)], rollout.completion_ids)
        for i, example in enumerate(chunk):
            mine = [s for s in scores[i * k : (i + 1) * k] if s is not None]
            mean += sum(mine) / max(1, len(mine))
            if task.marked_answers:
                answer, _ = majority_vote(task, example, rollout.completions[i * k : (i + 1) * k])
                majority += task.score_answer(answer, example) if answer is not None else 0.0
    n = max(1, len(examples))
    out = {f"mean@{k}": mean / n}
    if task.marked_answers:
        out[f"maj@{k}"] = majority / n
    return out
