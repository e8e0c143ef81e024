"""Starting accuracy of a model on each task, greedy: where RL would start from.

RL needs a start between about 20% and 60%: near 0 there is no reward signal, near 100% no room. This prints
accuracy, the share of completions with a marked final answer, and the share cut at the length limit, for a set of
task settings (difficulty, few-shot examples).

Run: ``.venv/bin/python benchmarks/start_accuracy.py [--model smollm2] [--n 64]``.
"""

from __future__ import annotations

import argparse
import time

import torch

import dfpo.tasks as tasks
from dfpo.evaluate import evaluate
from dfpo.models import load_model

# (label, task name, task options, split, max new tokens)
SETTINGS = [
    (
        "arithmetic: 2 terms, 1 digit, +-",
        "arithmetic",
        {"min_terms": 2, "max_terms": 2, "digits": 1, "eval_size": 100},
        "eval",
        48,
    ),
    ("arithmetic: 2-3 terms, 2 digits, +- (default)", "arithmetic", {}, "eval", 64),
    ("math: generated eval, 0-shot", "math", {"train_size": 50}, "eval", 96),
    ("math: generated eval, 3-shot", "math", {"train_size": 50, "few_shot": 3}, "eval", 96),
    ("math: GSM8K test, 3-shot", "math", {"train_size": 50, "few_shot": 3}, "gsm8k", 160),
    ("science: SciQ/ARC/OBQA eval", "science", {}, "eval", 48),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n", type=int, default=64, help="examples per setting")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    model.eval()
    print(f"model {args.model}, greedy, {args.n} examples per setting, torch {torch.__version__}")
    print("| setting | accuracy | marked answer | truncated | seconds |")
    print("|---|---:|---:|---:|---:|")
    start = time.perf_counter()
    for label, name, options, split, max_new in SETTINGS:
        task = tasks.get(name, **options)
        r = evaluate(model, tokenizer, task, split, limit=args.n, max_new_tokens=max_new, batch_size=16)
        print(
            f"| {label} | {r['accuracy']:.1%} | {r['format_rate']:.0%} | {r['truncated_rate']:.0%} | "
            f"{r['seconds']:.0f} |",
            flush=True,
        )
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
