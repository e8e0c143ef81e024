"""Supervised fine-tuning on a task's gold answers: the warm-up before RL.

Each example becomes ``rendered prompt + target + end token``; the loss is the token-mean cross-entropy over the
target and end tokens only (prompt tokens are labelled -100). The target is :func:`dfpo.tasks.base.target_text`:
the worked ``solution`` when there is one, else ``"The answer is <answer>."``. Sequences are padded on the right
for training, so every sequence's positions start at 0 as they do in generation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfpo.options import check_writable, option

if TYPE_CHECKING:  # the command's config imports light; the loop imports torch when it runs
    import torch

    from dfpo.tasks.base import Task

IGNORE = -100


def sft_batch(tokenizer: Any, task: Task, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` ``[B, L]``, right-padded; labels are -100 on the prompt."""
    import torch

    from dfpo.tasks.base import target_text

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
    import torch

    from dfpo.evaluate import evaluate

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


@dataclass(frozen=True)
class SFTConfig:
    """``dfpo sft``: supervised fine-tuning on a task's gold answers (the warm-up before RL)."""

    model: str = option("scratch", "'scratch' (a new character-level tiny Llama), 'smollm2' or a model folder")
    task: str = option("arithmetic", "registered task whose train split is used (see dfpo.tasks.names())")
    task_options: dict = option({}, "keyword options of the task, set as task_options.<name>=value")
    steps: int = option(600, "optimizer steps")
    batch_size: int = option(64, "examples per step")
    lr: float = option(1e-3, "peak AdamW learning rate (linear warm-up, cosine to 10%)")
    warmup_steps: int = option(20, "linear warm-up steps")
    seed: int = option(0, "seed of initialisation and batch order")
    hidden_size: int = option(128, "hidden size of a 'scratch' model")
    layers: int = option(4, "layers of a 'scratch' model")
    eval_every: int = option(200, "measure greedy eval accuracy every this many steps (0: only at the end)")
    eval_limit: int = option(200, "eval examples per measurement")
    max_new_tokens: int = option(96, "generation length for the eval")
    stop_at: float = option(0.0, "stop at the first eval whose accuracy reaches this (0: run all steps)")
    out: str = option("runs/sft", "output folder: model, tokenizer and sft.json (written atomically)")


# every numeric key of SFTConfig and its valid values (tests/test_config_cli.py keeps the table complete)
SFT_RANGES = {
    "steps": ">=1", "batch_size": ">=1", "lr": ">0", "warmup_steps": ">=0", "seed": ">=0", "hidden_size": ">=1",
    "layers": ">=1", "eval_every": ">=0", "eval_limit": ">=1", "max_new_tokens": ">=1", "stop_at": "[0,1]",
}  # fmt: skip


def run_sft(config: SFTConfig, command: str) -> dict[str, Any]:
    import torch

    from dfpo.models import load_model
    from dfpo.tasks.base import build_task
    from dfpo.tiny import build_model, build_tokenizer
    from dfpo.training.ranges import check_ranges

    check_ranges(config, SFT_RANGES)
    check_writable(Path(config.out), "out")  # its folder: the model is written beside it, then moved in
    task = build_task(config.task, config.task_options)
    torch.manual_seed(config.seed)
    if config.model == "scratch":
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, config.hidden_size, config.layers, seed=config.seed)
    else:
        model, tokenizer = load_model(config.model)
    params = sum(p.numel() for p in model.parameters())
    print(f"sft: {config.model} ({params / 1e6:.2f}M parameters) on {config.task} for {config.steps} steps")
    start = time.perf_counter()
    history = train_sft(
        model, tokenizer, task, config.steps, config.batch_size, config.lr, config.warmup_steps,
        seed=config.seed, eval_every=config.eval_every or config.steps, eval_limit=config.eval_limit,
        max_new_tokens=config.max_new_tokens, stop_at=config.stop_at,
    )  # fmt: skip
    summary = {
        "command": command,
        "config": dataclasses.asdict(config),
        "parameters": params,
        "seconds": round(time.perf_counter() - start, 1),
        "steps_run": history[-1]["step"],
        "eval_accuracy": history[-1]["eval_accuracy"],
        "history": history,
    }
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "sft.json").write_text(json.dumps(summary, indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"sft: eval accuracy {summary['eval_accuracy']:.1%} after {summary['seconds']:.0f} s; saved to {out}")
    return summary
