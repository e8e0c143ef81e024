"""A learned reward model for the dialogue task (CoQA), and the ``reward_model`` noise that rewards with it.

The reward model is a frozen causal-LM backbone (SmolLM2-135M-Instruct by default; any ``(model, tokenizer)``
works) and a small logistic-regression head on its features. It scores ``(example, completion)`` in [0, 1]: the
estimated probability that the completion's answer is right.

What the backbone sees (bounded, since the RL loop scores every sample)::

    Passage: <window>
    Q: <previous question>
    A: <previous answer>
    Q: <question>
    A: <answer text>

- ``window``: the passage sentence that shares the most content words with the question and the previous turn,
  grown with its neighbours up to ``window_chars`` characters (default 300); CoQA rationales are usually one
  sentence, and the previous turn resolves pronouns ("What did *she* do?").
- one previous turn only; the context is cut on the left to ``max_context_tokens`` (default 128);
- the answer text is the task's (:func:`dfpo.tasks.dialogue.answer_text`: the marked answer, else the first
  line), cut to ``max_answer_tokens`` (default 24). An empty answer scores 0 without a forward pass.

Cost: about 94 backbone tokens per scored sample, and about 10-11 s per 64 samples on one CPU thread with bf16
autocast while the other core was busy (``cost`` in the head's JSON file). Scoring a handful of samples with more
threads than free cores is much slower (about 14 s for 4 samples with 2 threads on a busy 2-core machine, against
under 1 s with one thread): set ``torch.set_num_threads`` to the free cores.

Features, per sample (``F = 2 d + 4``, ``d`` the backbone width): the last-layer hidden state at the last answer
token and the mean over the answer tokens (``[d]`` each), and four scalars: the mean, first and minimum
log-probability of the answer tokens given the context under the backbone's own LM head, and ``log(1 + answer
tokens)``. The head standardises them and applies ``sigmoid(w . f + b)``.

Training (:mod:`dfpo.supervision.reward_model_pairs`, run by ``benchmarks/reward_model.py``) uses train stories only:
each turn gives its gold answer (label 1) and one plausible wrong answer (label 0):

- ``yesno``: for a yes/no gold answer, the opposite one;
- ``turn``: the gold answer of another turn of the same story, preferring a question with the same first word
  ("who" against "who"): the right passage and the right kind of answer, but to another question;
- ``span``: a clause of the passage window (text between punctuation and conjunctions) of about the gold answer's
  word count: the right place, but not the answer.

Other turns alternate ``turn`` and ``span``. A negative that overlaps the gold answers (token F1 >= 0.5) is
redrawn, and turns whose gold answer is "unknown" are not used. Held-out pair accuracy is measured on pairs built
the same way from the eval stories.

Measured for the shipped head (SmolLM2 backbone, 1,000 train pairs from 368 train stories): held-out pair accuracy
80.0% on 400 pairs from 98 eval stories (span 89.7% of 165, turn 75.3% of 158, yes/no 68.8% of 77). On SmolLM2's own
sampled answers (32 eval turns, 4 samples each at temperature 1, mean true F1 0.10) its scores correlate only weakly
with the true F1 (Pearson 0.30, Spearman 0.18) and order 57 of the 98 within-turn pairs of different F1 the same way
(58%): it judges whether the answer is right, not how concise it is, and it never saw long or rambling answers in
training, so it is a noisier reward on policy samples than its pair accuracy suggests.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dfpo.assets import MissingAssetError
from dfpo.supervision.base import NoiseHooks, NoisyRewards
from dfpo.tasks.dialogue import answer_text

if TYPE_CHECKING:
    from dfpo.tasks.base import Task

HEAD_DIR = Path(__file__).parent / "reward_models" / "coqa-smollm2"
HEAD_FILE, META_FILE = "head.safetensors", "reward_model.json"
REBUILD = "`.venv/bin/python benchmarks/reward_model.py --out src/dfpo/supervision/reward_models/coqa-smollm2`"
NEGATIVE_F1 = 0.5  # a candidate negative at least this close to a gold answer is not a negative

SENTENCE = re.compile(r"(?<=[.!?\"'])\s+|\n+")
_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset(
    re.findall(
        r"\w+",
        "a an the and or but of to in on at for with by from as is was were are be been being do did does done have "
        "has had what who whom whose which when where why how that this these those it its he she they them his her "
        "their him i you we us our your my me not no yes so if then than there here into out up down about after "
        "before",
    )
)


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


def passage_window(story: str, query: str, max_chars: int = 300) -> str:
    """The sentence of ``story`` sharing the most content words with ``query`` (the first on a tie), grown with
    the following and preceding sentences while the window stays within ``max_chars`` (a lone longer sentence is
    cut to ``max_chars``)."""
    sentences = [s.strip() for s in SENTENCE.split(story) if s.strip()]
    if not sentences:
        return ""
    wanted = _content_words(query)
    best = max(range(len(sentences)), key=lambda i: (len(wanted & _content_words(sentences[i])), -i))
    start, end, size = best, best + 1, len(sentences[best])
    grew = True
    while grew:
        grew = False
        for side in ("after", "before"):
            i = end if side == "after" else start - 1
            if 0 <= i < len(sentences) and size + 1 + len(sentences[i]) <= max_chars:
                size += 1 + len(sentences[i])
                start, end = (start, end + 1) if side == "after" else (start - 1, end)
                grew = True
    return " ".join(sentences[start:end])[:max_chars]


def context_text(example: dict[str, Any], window_chars: int = 300) -> str:
    """What the backbone reads before the answer (module docstring): passage window, previous turn, question."""
    history = example.get("history") or []
    last = history[-1] if history else None
    query = example["question"] + (f" {last['question']} {last['answer']}" if last else "")
    lines = [f"Passage: {passage_window(example['story'], query, window_chars)}"]
    if last:
        lines += [f"Q: {last['question']}", f"A: {last['answer']}"]
    lines += [f"Q: {example['question']}", "A:"]
    return "\n".join(lines)


@dataclass
class Head:
    """Logistic regression on standardised features: ``sigmoid(((f - mean) / std) . weight + bias)``.

    ``mean``, ``std``, ``weight``: ``[F]``; ``bias``: ``[]``.
    """

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor

    def logits(self, features: Tensor) -> Tensor:
        """``[N, F]`` features -> ``[N]`` logits."""
        return ((features - self.mean) / self.std) @ self.weight + self.bias

    def tensors(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}


class RewardModel:
    """Frozen backbone + :class:`Head`; see the module docstring for what the backbone sees and the features.

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer; the model is put in eval mode, never trained.
        head: the trained head; ``None`` gives a model that can only compute :meth:`features` (for training).
        window_chars, max_context_tokens, max_answer_tokens: the bounds on what the backbone reads.
        bf16: run the backbone under bfloat16 autocast (about 3x faster on CPU); features are returned in fp32.
        batch_size: sequences per forward pass.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        head: Head | None = None,
        window_chars: int = 300,
        max_context_tokens: int = 128,
        max_answer_tokens: int = 24,
        bf16: bool = True,
        batch_size: int = 32,
        backbone: str = "smollm2",
    ) -> None:
        self.model, self.tokenizer, self.head = model.eval(), tokenizer, head
        self.window_chars, self.max_context_tokens, self.max_answer_tokens = (
            window_chars,
            max_context_tokens,
            max_answer_tokens,
        )
        self.bf16, self.batch_size, self.backbone = bf16, batch_size, backbone

    @property
    def num_features(self) -> int:
        return 2 * self.model.config.hidden_size + 4

    def _ids(self, example: dict[str, Any], answer: str) -> tuple[list[int], list[int]]:
        """Token ids of the context (cut on the left) and of the answer (cut on the right)."""
        context = self.tokenizer(context_text(example, self.window_chars), add_special_tokens=False)["input_ids"]
        answer_ids = self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
        return context[-self.max_context_tokens :], answer_ids[: self.max_answer_tokens]

    def tokens_per_sample(self, examples: Sequence[dict[str, Any]], answers: Sequence[str]) -> float:
        """Mean number of tokens the backbone reads per scored answer."""
        sizes = [sum(map(len, self._ids(e, a))) for e, a in zip(examples, answers, strict=True)]
        return sum(sizes) / max(1, len(sizes))

    @torch.no_grad()
    def features(self, examples: Sequence[dict[str, Any]], answers: Sequence[str]) -> Tensor:
        """``[N, 2 d + 4]`` fp32 features of answer texts (non-empty) to their examples (module docstring)."""
        pieces = [self._ids(e, a) for e, a in zip(examples, answers, strict=True)]
        empty = [i for i, (_, answer_ids) in enumerate(pieces) if not answer_ids]
        if empty:
            raise ValueError(
                f"reward model: answer {empty[0]} has no tokens; empty answers are scored 0 by score_batch"
            )
        out = torch.zeros(len(pieces), self.num_features)
        base, lm_head = self.model.base_model, self.model.get_output_embeddings()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(pieces)), key=lambda i: -sum(map(len, pieces[i])))  # similar lengths together
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            seqs = [pieces[i][0] + pieces[i][1] for i in rows]
            width = max(map(len, seqs))
            # right padding: causal attention keeps the real tokens blind to the pads after them
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, d]
                for b, i in enumerate(rows):
                    c, a = len(pieces[i][0]), len(pieces[i][1])
                    states = hidden[b, c : c + a].float()  # [a, d]
                    # the states before each answer token predict it
                    logp = torch.log_softmax(lm_head(hidden[b, c - 1 : c + a - 1]).float(), dim=-1)  # [a, V]
                    token_logp = logp.gather(1, ids[b, c : c + a, None]).squeeze(1)  # [a]
                    scalars = torch.stack(
                        [token_logp.mean(), token_logp[0], token_logp.min(), torch.tensor(math.log1p(a))]
                    )
                    out[i] = torch.cat([states[-1], states.mean(0), scalars])
        return out

    def score_answers(self, examples: Sequence[dict[str, Any]], answers: Sequence[str]) -> list[float]:
        """Scores in [0, 1] of answer texts (already extracted from completions); an empty answer scores 0."""
        if self.head is None:
            raise ValueError("reward model has no head: train one with fit_head, or use RewardModel.load(folder)")
        scores = [0.0] * len(answers)
        kept = [i for i, a in enumerate(answers) if a.strip()]
        if kept:
            features = self.features([examples[i] for i in kept], [answers[i] for i in kept])
            for i, p in zip(kept, torch.sigmoid(self.head.logits(features)).tolist(), strict=True):
                scores[i] = p
        return scores

    def score_batch(self, examples: Sequence[dict[str, Any]], completions: Sequence[str]) -> list[float]:
        """Scores in [0, 1] of ``completions`` (one per example), batched, without gradients."""
        return self.score_answers(examples, [answer_text(c) for c in completions])

    def settings(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "window_chars": self.window_chars,
            "max_context_tokens": self.max_context_tokens,
            "max_answer_tokens": self.max_answer_tokens,
            "bf16": self.bf16,
            "hidden_size": self.model.config.hidden_size,
        }

    def save(self, folder: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """Writes ``head.safetensors`` and ``reward_model.json`` (settings plus ``metadata``) to ``folder``."""
        from safetensors.torch import save_file

        if self.head is None:
            raise ValueError("reward model has no head to save: train one with fit_head first")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # each file is written beside its final name and renamed into place: a crash never leaves half a file
        save_file({k: v.contiguous() for k, v in self.head.tensors().items()}, folder / f".{HEAD_FILE}.tmp")
        meta = {"settings": self.settings(), **(metadata or {})}
        (folder / f".{META_FILE}.tmp").write_text(json.dumps(meta, indent=2) + "\n")
        for name in (HEAD_FILE, META_FILE):
            os.replace(folder / f".{name}.tmp", folder / name)

    @classmethod
    def load(cls, folder: str | Path = HEAD_DIR, model: Any = None, tokenizer: Any = None) -> RewardModel:
        """The reward model saved in ``folder``; the backbone named in its settings is loaded unless given."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / HEAD_FILE).exists() or not (folder / META_FILE).exists():
            raise MissingAssetError(
                f"reward model head {folder / HEAD_FILE} (or its {META_FILE}) is missing; rebuild it with {REBUILD} "
                "(a few minutes on CPU), or reinstall dfpo, which ships it"
            )
        settings = json.loads((folder / META_FILE).read_text())["settings"]
        if model is None:
            from dfpo.models import load_model

            model, tokenizer = load_model(settings["backbone"])
        if model.config.hidden_size != settings["hidden_size"]:
            raise ValueError(
                f"reward model head in {folder} was trained on a backbone of width {settings['hidden_size']}, "
                f"got one of width {model.config.hidden_size}; pass the backbone it was trained on "
                f"({settings['backbone']!r})"
            )
        head = Head(**load_file(folder / HEAD_FILE))
        options = {k: settings[k] for k in ("window_chars", "max_context_tokens", "max_answer_tokens", "bf16")}
        return cls(model, tokenizer, head, backbone=settings["backbone"], **options)


# -- noise ------------------------------------------------------------------------------------------------------------


@dataclass
class RewardModelNoise(NoiseHooks):
    """Dialogue supervision by the shipped reward model: ``observed`` is its score, ``true`` the task's F1.

    The realised ``rate`` is the mean absolute difference between observed and true rewards over the scored
    samples. The reward model (shipped head + SmolLM2 backbone, or the one in ``folder``) loads on first use. It is
    deterministic: ``seed`` is kept for the common noise interface.
    """

    seed: int = 0
    name: str = "reward_model"
    folder: Path = HEAD_DIR
    _model: RewardModel | None = field(default=None, init=False, repr=False, compare=False)

    def reward_model(self) -> RewardModel:
        if self._model is None:
            self._model = RewardModel.load(self.folder)
        return self._model

    def score(
        self,
        task: Task,
        completions: list[str],
        examples: list[dict[str, Any]],
        step: int,
        first: int = 0,
        completion_ids: list[list[int]] | None = None,
    ) -> NoisyRewards:
        true = task.score_batch(completions, examples, completion_ids)
        kept = [i for i, t in enumerate(true) if t is not None]
        scores = self.reward_model().score_batch([examples[i] for i in kept], [completions[i] for i in kept])
        observed: list[float | None] = [None] * len(true)
        for i, value in zip(kept, scores, strict=True):
            observed[i] = value
        rate = sum(abs(observed[i] - true[i]) for i in kept) / len(kept) if kept else 0.0
        return NoisyRewards(observed, true, rate)
