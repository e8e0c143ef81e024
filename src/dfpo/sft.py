"""Supervised fine-tuning on a task's gold answers: the warm-up before RL.

Each example becomes ``rendered prompt + target + end token``; the loss is the token-mean cross-entropy over the
target and end tokens only (prompt tokens are labelled -100). The target is :func:`dfpo.tasks.base.target_text`:
the worked ``solution`` when there is one, else ``"The answer is <answer>."``. Sequences are padded on the right
for training, so every sequence's positions start at 0 as they do in generation.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import torch

from dfpo.evaluate import evaluate
from dfpo.tasks.base import Task, target_text

IGNORE = -100


def sft_batch(tokenizer: Any, task: Task, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` ``[B, L]``, right-padded; labels are -100 on the prompt."""
    rows = []
    for example in examples:
        prompt = tokenizer(task.prompt_text(tokenizer, example), add_special_tokens=False)["input_ids"]
        target = tokenizer(target_text(example), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt + target, [IGNORE] * len(prompt) + target))
    length = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE] * (length - len(lab)) for _, lab in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_sft(
    model: Any,
    tokenizer: Any,
    task: Task,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup_steps: int = 20,
    weight_decay: float = 0.0,
    seed: int = 0,
    eval_every: int = 0,
    eval_limit: int = 200,
    max_new_tokens: int = 96,
    stop_at: float = 0.0,
    log: Any = print,
) -> list[dict[str, float]]:
    """Train ``model`` in place for ``steps`` AdamW steps on ``task``'s train split; returns the logged history.

    The learning rate warms up linearly, then follows a cosine to 10% of ``lr``. With ``eval_every > 0`` the
    greedy accuracy on ``eval_limit`` eval examples is measured every ``eval_every`` steps and at the end.
    ``stop_at > 0`` ends training at the first measurement that reaches it: a warm-up meant to leave room for
    RL stops at a modest accuracy instead of running on to near 100%.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    train = task.examples("train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        batch = sft_batch(tokenizer, task, rng.sample(train, min(batch_size, len(train))))
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        record = {"step": step, "loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0]}
        if eval_every and (step % eval_every == 0 or step == steps):
            model.eval()
            result = evaluate(model, tokenizer, task, "eval", eval_limit, max_new_tokens, batch_size=64)
            record["eval_accuracy"] = result["accuracy"]
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        if log and (step % 50 == 0 or "eval_accuracy" in record or step == 1):
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if stop_at > 0 and record.get("eval_accuracy", 0.0) >= stop_at:
            break
    model.eval()
    return history
