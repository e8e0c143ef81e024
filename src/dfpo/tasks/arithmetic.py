"""Generated arithmetic with worked steps: the embedded tiny model's task, with tunable difficulty.

A problem chains ``terms`` integers of up to ``digits`` digits with the given operators, evaluated left to right.
The gold ``solution`` shows one step per operation and ends with "The answer is N.", so values vary along a
response and between prompts of mixed difficulty (``min_terms`` to ``max_terms``). The eval split is a fixed set
drawn with its own seed; the train stream never yields a problem that is in it.
"""

from __future__ import annotations

import random
from typing import Any

from dfpo.tasks.answers import answers_match, extract_final_answer
from dfpo.tasks.base import Task, register

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@register("arithmetic")
class Arithmetic(Task):
    """Chained integer arithmetic, evaluated left to right.

    Args:
        min_terms, max_terms: number of operands per problem, drawn uniformly (mixed difficulty).
        digits: maximum digits per operand.
        min_digits: ``None`` (default): each operand uniform in ``0 .. 10^digits - 1``; a number: each operand first
            draws its digit count uniformly from ``min_digits .. digits``, then a number of that many digits, so that
            short and long operands (easy and hard problems) are mixed evenly. Each problem records its longest
            operand's digit count in ``digits``. Problems are distinct within and across the splits, so a small
            class is used up fast: there are only 100 sums of two 1-digit numbers, the eval split takes its share
            first, and the train split holds what is left.
        operators: characters from ``+-*``.
        eval_size: size of the held-out eval split.
        train_size: size of the train split returned by :meth:`examples` without a limit.
        seed: seed of the train stream; the eval split uses ``seed + 1``.
        few_shot: worked train examples shown as earlier chat turns (prompt, then the worked solution).
        prompt_style: ``"instruct"`` spells out the method and the answer format (for instruction-tuned models);
            ``"terse"`` is the bare expression, for a model trained on this task's format (the tiny model), which
            keeps sequences short.
    """

    name = "arithmetic"

    def __init__(
        self,
        min_terms: int = 2,
        max_terms: int = 3,
        digits: int = 2,
        operators: str = "+-",
        min_digits: int | None = None,
        eval_size: int = 500,
        train_size: int = 20_000,
        seed: int = 0,
        few_shot: int = 0,
        prompt_style: str = "instruct",
    ) -> None:
        super().__init__()
        if not 2 <= min_terms <= max_terms:
            raise ValueError(f"arithmetic needs 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
        if digits < 1 or not operators or set(operators) - set(_OPS):
            raise ValueError(f"arithmetic needs digits >= 1 and operators from '+-*', got {digits}, {operators!r}")
        if min_digits is not None and not 1 <= min_digits <= digits:
            raise ValueError(f"arithmetic needs 1 <= min_digits <= digits, got {min_digits}, {digits}")
        if prompt_style not in ("instruct", "terse"):
            raise ValueError(f"arithmetic prompt_style must be 'instruct' or 'terse', got {prompt_style!r}")
        self.prompt_style, self.few_shot = prompt_style, few_shot
        self.min_terms, self.max_terms, self.digits, self.operators = min_terms, max_terms, digits, operators
        self.min_digits = min_digits
        self.eval_size, self.train_size, self.seed = eval_size, train_size, seed
        self._eval = self._generate(seed + 1, eval_size, exclude=set())
        self._eval_keys = {e["expression"] for e in self._eval}

    def _problem(self, rng: random.Random) -> dict[str, Any]:
        terms = rng.randint(self.min_terms, self.max_terms)
        numbers = [self._operand(rng) for _ in range(terms)]
        ops = [rng.choice(self.operators) for _ in range(terms - 1)]
        value, steps = numbers[0], []
        for op, number in zip(ops, numbers[1:], strict=True):
            result = _OPS[op](value, number)
            steps.append(f"{value} {op} {number} = {result}.")
            value = result
        expression = " ".join([str(numbers[0])] + [f"{op} {n}" for op, n in zip(ops, numbers[1:], strict=True)])
        return {
            "prompt": (
                f"{expression} ="
                if self.prompt_style == "terse"
                else f"Compute {expression} from left to right. Show each step, then end with 'The answer is N.'"
            ),
            "answer": str(value),
            "solution": " ".join(steps) + f" The answer is {value}.",
            "expression": expression,
            "terms": terms,
            "digits": max(len(str(n)) for n in numbers),
        }

    def _operand(self, rng: random.Random) -> int:
        if self.min_digits is None:
            return rng.randint(0, 10**self.digits - 1)
        length = rng.randint(self.min_digits, self.digits)
        return rng.randint(0 if length == 1 else 10 ** (length - 1), 10**length - 1)

    def _generate(self, seed: int, count: int, exclude: set[str]) -> list[dict[str, Any]]:
        rng, out, seen = random.Random(seed), [], set(exclude)
        attempts = 0
        while len(out) < count:
            attempts += 1
            if attempts > 50 * count + 1000:
                raise ValueError(
                    f"arithmetic: only {len(out)} distinct problems found for {count} requested; "
                    "raise digits or max_terms, or lower the split size"
                )
            problem = self._problem(rng)
            if problem["expression"] not in seen:
                seen.add(problem["expression"])
                out.append(problem)
        return out

    def examples(self, split: str, limit: int | None = None) -> list[dict[str, Any]]:
        self._check_split(split)
        if split == "eval":
            return self._eval[:limit]
        return self._generate(self.seed, limit or self.train_size, exclude=self._eval_keys)

    def score(self, completion: str, example: dict[str, Any]) -> float:
        return float(answers_match(extract_final_answer(completion), example["answer"]))
