"""Training the dialogue reward model's head (:mod:`dfpo.supervision.reward_model`): gold-vs-negative answer
pairs from the train stories (:func:`make_pairs`; the kinds of negative are described there), a logistic fit of
the head on their features (:func:`fit_head`), and held-out pair accuracy (:func:`pair_accuracy`). Run by
``benchmarks/reward_model.py``."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dfpo.supervision.reward_model import NEGATIVE_F1, SENTENCE, Head, context_text
from dfpo.tasks.dialogue import normalize_answer, references, token_f1

_CLAUSE = re.compile(r"[,;:()\"]|\s(?:and|but|or|because|when|while|so|that|which|who|after|before|then)\s", re.I)


def _span_negative(example: dict[str, Any], rng: random.Random, window_chars: int) -> str | None:
    """A clause of the passage window (text between punctuation and conjunctions) that does not overlap the gold
    answers, of a word count as close as possible to the gold answer's (ties broken at random)."""
    window = context_text(example, window_chars).split("\n", 1)[0].removeprefix("Passage: ")
    size = len(example["answer"].split())
    clauses = {c.strip(" .!?'") for sentence in SENTENCE.split(window) for c in _CLAUSE.split(sentence)}
    candidates = [
        c
        for c in sorted(clauses)
        if normalize_answer(c) and max(token_f1(c, g) for g in references(example)) < NEGATIVE_F1
    ]
    rng.shuffle(candidates)
    candidates.sort(key=lambda c: abs(len(c.split()) - size))
    return candidates[0] if candidates else None


def _question_word(question: str) -> str:
    words = question.lower().split()
    return words[0] if words else ""


def _turn_negative(example: dict[str, Any], turns: list[dict[str, str]], rng: random.Random) -> str | None:
    """The gold answer of another turn of the same story (preferring a question with the same first word: "who"
    against "who") that does not overlap this turn's gold answers."""
    others = [t for i, t in enumerate(turns) if i != example["turn"]]
    rng.shuffle(others)
    wanted = _question_word(example["question"])
    others.sort(key=lambda t: _question_word(t["question"]) != wanted)  # stable: random within each group
    for other in others:
        answer = other["answer"]
        if normalize_answer(answer) and max(token_f1(answer, g) for g in references(example)) < NEGATIVE_F1:
            return answer
    return None


def make_pairs(
    examples: Sequence[dict[str, Any]], seed: int = 0, window_chars: int = 300
) -> list[tuple[dict[str, Any], str, str, str]]:
    """``(example, gold answer, negative answer, negative kind)`` pairs, one per usable turn (the kinds are in
    :mod:`dfpo.supervision.reward_model`'s docstring).

    ``examples`` are dialogue examples; the turns of their stories (as far as the latest turn seen shows them)
    give the other-turn negatives. A yes/no gold answer gets the opposite answer (``"yesno"``) unless an annotator
    gave it; the other turns alternate ``"turn"`` / ``"span"``, falling back to the other kind when a turn has no
    valid negative of its kind.
    """
    stories: dict[str, list[dict[str, str]]] = {}
    for e in examples:
        turns = [*e["history"], {"question": e["question"], "answer": e["answer"]}]
        if len(turns) > len(stories.get(e["story_id"], [])):
            stories[e["story_id"]] = turns
    rng = random.Random(seed)
    pairs = []
    for e in examples:
        gold = normalize_answer(e["answer"])
        if gold == "unknown":
            continue
        opposite = {"yes": "no", "no": "yes"}.get(gold)
        # annotators sometimes disagree on yes/no: then the opposite is not a wrong answer
        if opposite and max(token_f1(opposite, g) for g in references(e)) < NEGATIVE_F1:
            pairs.append((e, e["answer"], opposite, "yesno"))
            continue
        kinds = ("turn", "span") if len(pairs) % 2 == 0 else ("span", "turn")
        for kind in kinds:
            if kind == "turn":
                negative = _turn_negative(e, stories[e["story_id"]], rng)
            else:
                negative = _span_negative(e, rng, window_chars)
            if negative is not None:
                pairs.append((e, e["answer"], negative, kind))
                break
    return pairs


def fit_head(
    positives: Tensor, negatives: Tensor, weight_decay: float = 1e-2, steps: int = 300, lr: float = 0.05
) -> Head:
    """Logistic regression (gold 1, negative 0) on ``[N, F]`` positive and ``[M, F]`` negative features, by
    full-batch Adam with an L2 penalty ``weight_decay * |w|^2``; deterministic."""
    features = torch.cat([positives, negatives])
    labels = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))])
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, labels)
        (loss + weight_decay * weight.pow(2).sum()).backward()
        optimizer.step()
    return Head(mean, std, weight.detach().clone(), bias.detach().clone())


def pair_accuracy(head: Head, positives: Tensor, negatives: Tensor) -> float:
    """Share of pairs (row ``i`` of ``[N, F]`` positives against row ``i`` of negatives) scored gold-first."""
    return float((head.logits(positives) > head.logits(negatives)).float().mean())
