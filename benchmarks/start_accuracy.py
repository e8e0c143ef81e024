"""Starting accuracy of a model on each task, greedy: where RL would start from.

RL needs a start between about 20% and 60%: near 0 there is no reward signal, near 100% no room. This prints
accuracy, the share of completions with a marked final answer, and the share cut at the length limit, for a set of
task settings (difficulty, few-shot examples) or for the calibrated presets of ``dfpo.tasks.presets``.

Run: ``.venv/bin/python benchmarks/start_accuracy.py [--model smollm2|tiny|FOLDER] [--n 64] [--presets]``.
"""

from __future__ import annotations

import argparse
import time

import torch

import dfpo.tasks as tasks
from dfpo.evaluate import evaluate
from dfpo.models import load_model
from dfpo.tasks.presets import PRESETS

EASY = {"min_terms": 2, "max_terms": 2}
ONE_DIGIT = {**EASY, "digits": 1, "eval_size": 100}  # only 200 distinct 1-digit problems exist
# (label, task name, task options, split, max new tokens)
SETTINGS = [
    ("arithmetic: 2 terms, 1 digit, +-", "arithmetic", ONE_DIGIT, "eval", 48),
    ("arithmetic: 2 terms, 1 digit, +-, 3-shot", "arithmetic", {**ONE_DIGIT, "few_shot": 3}, "eval", 48),
    ("arithmetic: 2 terms, 2 digits, +, 3-shot", "arithmetic", {**EASY, "operators": "+", "few_shot": 3}, "eval", 48),
    ("arithmetic: 2 terms, 2 digits, +-, 3-shot", "arithmetic", {**EASY, "few_shot": 3}, "eval", 48),
    ("arithmetic: 2-3 terms, 2 digits, +- (default)", "arithmetic", {}, "eval", 64),
    ("arithmetic: 2-3 terms, 2 digits, +-, 3-shot", "arithmetic", {"few_shot": 3}, "eval", 64),
    ("math: generated eval, 0-shot", "math", {"train_size": 50}, "eval", 96),
    ("math: generated eval, 3-shot", "math", {"train_size": 50, "few_shot": 3}, "eval", 96),
    ("math: GSM8K test, 3-shot", "math", {"train_size": 50, "few_shot": 3}, "gsm8k", 160),
    ("science: SciQ/ARC/OBQA eval", "science", {}, "eval", 48),
    ("science: SciQ/ARC/OBQA eval, 3-shot", "science", {"few_shot": 3}, "eval", 48),
    ("dialogue: CoQA eval (token F1)", "dialogue", {}, "eval", 32),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="model of the settings table (not used with --presets)")
    parser.add_argument("--n", type=int, default=64, help="examples per setting")
    parser.add_argument("--presets", action="store_true", help="measure every calibrated preset with its model")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.presets:
        rows = [
            (f"preset {name}", p.model, p.task, p.task_options, "eval", p.max_new_tokens) for name, p in PRESETS.items()
        ]
    else:
        rows = [(label, args.model, *rest) for label, *rest in SETTINGS]
    print(f"greedy, {args.n} examples per setting, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| setting | model | accuracy | marked answer | truncated | seconds |")
    print("|---|---|---:|---:|---:|---:|")
    start, loaded = time.perf_counter(), {}
    for label, model_name, name, options, split, max_new in rows:
        if model_name not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[model_name] = load_model(model_name)
        model, tokenizer = loaded[model_name]
        model.eval()
        task = tasks.get(name, **options)
        r = evaluate(model, tokenizer, task, split, limit=args.n, max_new_tokens=max_new, batch_size=16)
        print(
            f"| {label} ({max_new} new tokens) | {model_name} | {r['accuracy']:.1%} | {r['format_rate']:.0%} | "
            f"{r['truncated_rate']:.0%} | {r['seconds']:.0f} |",
            flush=True,
        )
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
