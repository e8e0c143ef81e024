"""The user's own data and reward function.

Data: JSONL (one object per line) or Parquet, with a ``prompt`` column (a string, or chat messages: a list of
``{"role", "content"}`` dicts) and the answer columns the reward needs. Every row is checked before training
starts; problems are reported together, by row number (1-based: the line number for JSONL).

Reward: a function given by dotted path (``package.module:function`` or ``package.module.function``) or by file
(``path/to/rewards.py:function``) with the contract::

    def reward(completions: list[str], **columns) -> list[float | None]

``columns`` holds each dataset column as a list aligned with ``completions``; ``None`` skips a sample (it gets no
reward and no gradient). For example::

    >>> def exact(completions, answer, **_):
    ...     return [float(c.strip() == a) for c, a in zip(completions, answer)]
    >>> exact(["4", "5"], answer=["4", "4"])
    [1.0, 0.0]
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfpo.tasks.answers import answers_match, extract_final_answer
from dfpo.tasks.base import Task, register

MAX_REPORTED = 20


class DataError(ValueError):
    """A dataset row is missing a field or has one of the wrong type."""


class RewardFunctionError(ValueError):
    """A reward function cannot be loaded, or returned something outside its contract."""


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` or ``.parquet`` file, as dicts."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"data file {str(path)!r}: use JSONL (.jsonl) or Parquet (.parquet)")
    rows, problems = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"row {number}: not valid JSON ({error.msg} at column {error.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"row {number}: expected a JSON object, got {type(row).__name__}")
            continue
        rows.append({**row, "_row": number})
    _raise_if(problems, path)
    return rows


def _prompt_problem(prompt: Any) -> str | None:
    if isinstance(prompt, str):
        return None if prompt.strip() else "'prompt' is empty"
    if isinstance(prompt, list) and prompt:
        for i, turn in enumerate(prompt):
            if not (
                isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)
            ):
                return f"'prompt' message {i} needs string 'role' and 'content' fields"
        return None
    return f"'prompt' must be a string or a non-empty list of chat messages, got {type(prompt).__name__}"


def validate_rows(rows: list[dict[str, Any]], required: tuple[str, ...] = ("answer",), source: str = "data") -> None:
    """Check every row has a valid ``prompt`` and the ``required`` columns (not null); report all problems."""
    problems = []
    for index, row in enumerate(rows, start=1):
        number = row.get("_row", index)
        if "prompt" not in row or row["prompt"] is None:
            problems.append(f"row {number}: 'prompt' is missing")
        elif (problem := _prompt_problem(row["prompt"])) is not None:
            problems.append(f"row {number}: {problem}")
        for column in required:
            if row.get(column) is None:
                problems.append(f"row {number}: {column!r} is missing")
    _raise_if(problems, source)


def _raise_if(problems: list[str], source: str | Path) -> None:
    if problems:
        shown = "\n  ".join(problems[:MAX_REPORTED])
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(f"{source}: {len(problems)} problem(s); fix these rows:\n  {shown}{more}")


def load_reward_function(spec: str) -> Callable[..., list[float | None]]:
    """Import ``module:function``, ``module.function`` or ``path/to/file.py:function``."""
    if ":" in spec:
        where, _, name = spec.rpartition(":")
    else:
        where, _, name = spec.rpartition(".")
    if not where or not name:
        raise RewardFunctionError(f"reward {spec!r}: use 'package.module:function' or 'path/to/file.py:function'")
    try:
        if where.endswith(".py"):
            file = Path(where)
            if not file.exists():
                raise RewardFunctionError(f"reward {spec!r}: file {where!r} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"dfpo_user_reward_{file.stem}", file)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as error:
        raise RewardFunctionError(f"reward {spec!r}: cannot import {where!r}: {error}") from error
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardFunctionError(f"reward {spec!r}: {where!r} has no function {name!r}")
    return fn


def call_reward(fn: Callable[..., Any], completions: list[str], rows: list[dict[str, Any]]) -> list[float | None]:
    """Call a reward function with the rows' columns as keyword lists and check what it returns."""
    keys = dict.fromkeys(key for row in rows for key in row if key != "_row")
    columns = {key: [row.get(key) for row in rows] for key in keys}
    name = getattr(fn, "__name__", repr(fn))
    out = fn(completions, **columns)
    if not isinstance(out, (list, tuple)) or len(out) != len(completions):
        got = f"{type(out).__name__} of length {len(out)}" if hasattr(out, "__len__") else type(out).__name__
        raise RewardFunctionError(f"reward {name} must return a list of {len(completions)} floats or None, got {got}")
    for i, value in enumerate(out):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RewardFunctionError(
                f"reward {name} returned {value!r} for sample {i}; expected a finite float or None"
            )
    return [None if v is None else float(v) for v in out]


@register("user")
class UserTask(Task):
    """A task from the user's data file and, optionally, reward function.

    Without ``reward``, a completion scores 1 when its marked final answer matches the ``answer`` column (the same
    strict extraction as the built-in tasks). ``eval_data`` gives a separate eval file; otherwise ``eval_fraction``
    of the rows (a seeded shuffle) is held out.
    """

    name = "user"
    reward_range = None  # a reward function may return any finite float

    def __init__(
        self,
        data: str,
        reward: str | None = None,
        eval_data: str | None = None,
        eval_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.reward_fn = load_reward_function(reward) if reward else None
        required = () if self.reward_fn else ("answer",)
        rows = load_rows(data)
        validate_rows(rows, required, source=data)
        if eval_data:
            eval_rows = load_rows(eval_data)
            validate_rows(eval_rows, required, source=eval_data)
            self._splits = {"train": rows, "eval": eval_rows}
        else:
            order = list(range(len(rows)))
            random.Random(seed).shuffle(order)
            held = round(len(rows) * eval_fraction)
            self._splits = {"train": [rows[i] for i in order[held:]], "eval": [rows[i] for i in order[:held]]}

    def examples(self, split: str, limit: int | None = None) -> list[dict[str, Any]]:
        self._check_split(split)
        return self._splits[split][:limit]

    def score_batch(self, completions: list[str], examples: list[dict[str, Any]]) -> list[float | None]:
        if self.reward_fn is None:
            return [self.score(c, e) for c, e in zip(completions, examples, strict=True)]
        return call_reward(self.reward_fn, completions, examples)

    def score(self, completion: str, example: dict[str, Any]) -> float:
        if self.reward_fn is not None:
            value = call_reward(self.reward_fn, [completion], [example])[0]
            return 0.0 if value is None else value
        return float(answers_match(extract_final_answer(completion), str(example["answer"])))
