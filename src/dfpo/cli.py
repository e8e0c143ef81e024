"""The ``dfpo`` command line: ``dfpo <verb> [key=value ...]``."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfpo.config import ConfigError, apply_overrides, describe, option


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


def run_sft(config: SFTConfig, command: str) -> dict[str, Any]:
    import torch

    import dfpo.tasks as tasks
    from dfpo.models import load_model
    from dfpo.sft import train_sft
    from dfpo.tiny import build_model, build_tokenizer

    try:
        task = tasks.get(config.task, **config.task_options)
    except TypeError as error:
        raise ConfigError(f"task_options for task {config.task!r}: {error}") from None
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


VERBS = {"sft": (SFTConfig, run_sft)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: dfpo {" + ",".join(VERBS) + "} [key=value ...]   (dfpo VERB --help lists the keys)"
    if not argv or argv[0] not in VERBS:
        print(usage, file=sys.stderr)
        return 2
    config_type, run = VERBS[argv[0]]
    if "--help" in argv or "-h" in argv:
        print(f"{config_type.__doc__}\n\nkeys:\n{describe(config_type)}")
        return 0
    try:
        config = apply_overrides(config_type(), argv[1:])
        run(config, " ".join(["dfpo", *argv]))
    except ConfigError as error:
        print(f"dfpo {argv[0]}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
