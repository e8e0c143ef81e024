"""Pseudo-label quality: how often the majority vote of n samples of the starting policy is the right answer.

``pseudo_label(n)`` noise (test-time-RL style) rewards agreement with that vote instead of the gold answer, so its
accuracy sets how noisy the supervision is. For each calibrated preset this samples n completions per training
prompt (temperature 1) and prints the pseudo-label accuracy, the share of prompts with no marked answer among
the n samples, the mean share of votes the winner got, and the policy's own greedy accuracy on the same prompts.

Run: ``.venv/bin/python benchmarks/pseudo_labels.py [--n 8] [--prompts 128] [--presets tiny-arithmetic ...]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from dfpo.evaluate import generate, render_prompt
from dfpo.models import load_model
from dfpo.supervision.noise import PseudoLabel
from dfpo.tasks.presets import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--prompts", type=int, default=128, help="training prompts labelled per preset")
    parser.add_argument("--presets", nargs="*", default=list(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"pseudo_label({args.n}), temperature 1, {args.prompts} train prompts, torch {torch.__version__}")
    print("| preset | pseudo-label accuracy | no answer | winner's vote share | greedy accuracy | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.presets:
        preset = PRESETS[name]
        model, tokenizer = load_model(preset.model)
        model.eval()
        task = preset.build_task()
        examples = task.examples("train", args.prompts)
        start = time.perf_counter()
        _, stats = PseudoLabel(args.n, seed=args.seed).label(
            model, tokenizer, task, examples, max_new_tokens=preset.max_new_tokens, batch_size=64
        )
        seconds = time.perf_counter() - start
        prompts = [render_prompt(tokenizer, task.messages(e)) for e in examples]
        greedy, _ = generate(model, tokenizer, prompts, preset.max_new_tokens, batch_size=64)
        accuracy = sum(task.score(c, e) for c, e in zip(greedy, examples, strict=True)) / len(examples)
        print(
            f"| {name} | {stats['accuracy']:.1%} | {stats['abstain_rate']:.1%} | {stats['agreement']:.2f} | "
            f"{accuracy:.1%} | {seconds:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
