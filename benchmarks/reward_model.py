"""Train the dialogue reward model from scratch and measure it on held-out stories.

Builds gold-vs-negative pairs (:func:`dfpo.supervision.reward_model_pairs.make_pairs`) from the train stories of the
``dialogue`` task, extracts the frozen SmolLM2-135M-Instruct features once, picks the head's L2 penalty on a
story-disjoint validation fifth of the train pairs, refits on all train pairs, and reports the held-out pair
accuracy (share of eval-story pairs with score(gold) > score(negative)), per negative kind, and the scoring cost.
With ``--out`` the head and a JSON of settings and measurements are written there; the shipped head was made by::

    .venv/bin/python benchmarks/reward_model.py --out src/dfpo/supervision/reward_models/coqa-smollm2

(about 7 minutes on one CPU thread, the other core busy). ``--load FOLDER`` measures a saved head instead of
training one, and ``--generated N`` also scores SmolLM2's own sampled answers to N eval turns (4 each, temperature
1) and reports how the reward model's scores agree with their true F1 (several more minutes); the numbers in
:mod:`dfpo.supervision.reward_model` came from
``--load src/dfpo/supervision/reward_models/coqa-smollm2 --generated 32``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from collections import defaultdict
from typing import Any

import torch

import dfpo.tasks as tasks
from dfpo.models import load_model
from dfpo.supervision.reward_model import RewardModel
from dfpo.supervision.reward_model_pairs import fit_head, make_pairs, pair_accuracy

WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0)
SAMPLES_PER_TURN = 4


def _pearson(x: list[float], y: list[float]) -> float:
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def seconds_per_batch(reward_model: RewardModel, examples: list[dict[str, Any]], completions: list[str]) -> float:
    """Wall-clock seconds of one ``score_batch`` call on ``completions`` (after a warm-up on two samples)."""
    reward_model.score_batch(examples[:2], completions[:2])
    start = time.perf_counter()
    reward_model.score_batch(examples, completions)
    return time.perf_counter() - start


def generated_agreement(reward_model: RewardModel, task: Any, examples: list[dict[str, Any]], seed: int) -> dict:
    """Reward-model scores against true F1 on SmolLM2's sampled answers to ``examples``."""
    from dfpo.evaluate import generate, render_prompt

    model, tokenizer = reward_model.model, reward_model.tokenizer
    prompts = [render_prompt(tokenizer, task.messages(e)) for e in examples for _ in range(SAMPLES_PER_TURN)]
    repeated = [e for e in examples for _ in range(SAMPLES_PER_TURN)]
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # about 3x faster on CPU; these samples only probe the scores
        completions, _ = generate(model, tokenizer, prompts, max_new_tokens=32, batch_size=16, temperature=1.0)
    generation_seconds = time.perf_counter() - start
    true = task.score_batch(completions, repeated)
    scores = reward_model.score_batch(repeated, completions)
    # GRPO compares samples of one prompt: count ordered pairs within a prompt whose true F1 differs
    agree = total = 0
    for g in range(len(examples)):
        idx = range(g * SAMPLES_PER_TURN, (g + 1) * SAMPLES_PER_TURN)
        for i in idx:
            for j in idx:
                if true[i] > true[j]:
                    total += 1
                    agree += scores[i] > scores[j]
    return {
        "samples": len(completions),
        "mean_true_f1": sum(true) / len(true),
        "mean_score": sum(scores) / len(scores),
        "pearson": _pearson(scores, true),
        "spearman": _pearson(_ranks(scores), _ranks(true)),
        "within_prompt_pairs": total,
        "within_prompt_agreement": agree / total if total else None,
        "mean_abs_difference": sum(abs(s - t) for s, t in zip(scores, true, strict=True)) / len(true),
        "generation_seconds": generation_seconds,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-pairs", type=int, default=1000)
    parser.add_argument("--eval-pairs", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0, help="seed of the negatives and of the sampled answers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the cost is measured with them)")
    parser.add_argument("--fp32", action="store_true", help="run the backbone in fp32 (default: bf16 autocast)")
    parser.add_argument("--out", help="folder to write the trained head and its JSON to")
    parser.add_argument("--load", help="measure the head saved in this folder instead of training one")
    parser.add_argument("--generated", type=int, default=0, help="also score SmolLM2's answers to N eval turns")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    task = tasks.get("dialogue")
    model, tokenizer = load_model("smollm2")
    if args.load:
        reward_model = RewardModel.load(args.load, model, tokenizer)
    else:
        reward_model = RewardModel(model, tokenizer, bf16=not args.fp32)
    eval_pairs = make_pairs(task.examples("eval"), seed=args.seed)[: args.eval_pairs]
    report: dict[str, Any] = {"settings": reward_model.settings()}

    def features(pairs: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        examples = [p[0] for p in pairs]
        return reward_model.features(examples, [p[1] for p in pairs]), reward_model.features(
            examples, [p[2] for p in pairs]
        )

    if not args.load:
        train_pairs = make_pairs(task.examples("train"), seed=args.seed)[: args.train_pairs]
        start = time.perf_counter()
        train_pos, train_neg = features(train_pairs)
        report["train_feature_seconds"] = time.perf_counter() - start
        # the L2 penalty is chosen on a story-disjoint fifth of the train pairs; eval stories are never looked at
        held = torch.tensor([zlib.crc32(p[0]["story_id"].encode()) % 5 == 0 for p in train_pairs])
        validation = {}
        for weight_decay in WEIGHT_DECAYS:
            head = fit_head(train_pos[~held], train_neg[~held], weight_decay=weight_decay)
            validation[weight_decay] = pair_accuracy(head, train_pos[held], train_neg[held])
        best = max(WEIGHT_DECAYS, key=lambda wd: (validation[wd], wd))
        reward_model.head = fit_head(train_pos, train_neg, weight_decay=best)
        report.update(
            weight_decay=best,
            validation_pair_accuracy={str(k): v for k, v in validation.items()},
            validation_pairs=int(held.sum()),
            train_pairs=len(train_pairs),
            train_stories=len({p[0]["story_id"] for p in train_pairs}),
            train_pair_accuracy=pair_accuracy(reward_model.head, train_pos, train_neg),
        )

    start = time.perf_counter()
    eval_pos, eval_neg = features(eval_pairs)
    report["eval_feature_seconds"] = time.perf_counter() - start
    better = (reward_model.head.logits(eval_pos) > reward_model.head.logits(eval_neg)).tolist()
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for pair, right in zip(eval_pairs, better, strict=True):
        by_kind[pair[3]].append(right)
    report.update(
        eval_pairs=len(eval_pairs),
        eval_stories=len({p[0]["story_id"] for p in eval_pairs}),
        pair_accuracy=sum(better) / len(better),
        pair_accuracy_by_kind={k: {"pairs": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(by_kind.items())},
    )

    examples = [p[0] for p in eval_pairs[:64]]
    completions = [p[1] if i % 2 == 0 else p[2] for i, p in enumerate(eval_pairs[:64])]
    report["cost"] = {
        "tokens_per_sample": reward_model.tokens_per_sample(
            [p[0] for p in eval_pairs] * 2, [p[1] for p in eval_pairs] + [p[2] for p in eval_pairs]
        ),
        "seconds_per_64_samples": seconds_per_batch(reward_model, examples, completions),
        "threads": args.threads,
    }
    if args.generated:
        report["generated"] = generated_agreement(reward_model, task, task.examples("eval", args.generated), args.seed)
    report["seconds"] = time.perf_counter() - started
    if args.out:
        command = ".venv/bin/python benchmarks/reward_model.py " + " ".join(argv if argv is not None else sys.argv[1:])
        reward_model.save(args.out, {"command": command.strip(), **report})
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
