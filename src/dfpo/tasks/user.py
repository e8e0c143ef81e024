"""The user's own data and reward functions.

Data (:func:`load_rows`): a file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``), a folder written by
``datasets``' ``save_to_disk`` or holding data files, a dataset in the local Hugging Face cache by name
(``owner/name``, offline), a list of dicts or a ``datasets.Dataset``. Each row has a ``prompt`` (a string, or chat
messages: a list of ``{"role", "content"}`` dicts), or an SFT-style ``messages`` column whose last assistant turn
becomes the ``answer`` and whose earlier turns the prompt; verl's rows (``prompt`` messages, ``reward_model:
{"ground_truth": ...}``) work as they are. Every row is checked before training starts; problems are reported
together, by row number (1-based: the line number for JSONL).

Rewards: one or more functions in TRL's or verl's contract (:mod:`dfpo.tasks.rewards`); without one, a completion
scores 1 when its marked final answer matches the row's ``answer`` (or verl's ``reward_model.ground_truth``). For
example::

    >>> def exact(completions, answer, **_):
    ...     return [float(c.strip() == a) for c, a in zip(completions, answer)]
    >>> exact(["4", "5"], answer=["4", "4"])
    [1.0, 0.0]
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dfpo.tasks.answers import answers_match, extract_final_answer
from dfpo.tasks.base import DataError, Task, register, render_prompt
from dfpo.tasks.rewards import RewardFunctionError, combine, ground_truth, reward_functions, score_components

__all__ = ["DataError", "RewardFunctionError", "UserTask", "load_rows", "validate_rows"]

MAX_REPORTED = 20
_FILES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(source: Any, split: str = "train") -> list[dict[str, Any]]:
    """Rows of ``source`` as dicts (see the module docstring for what it may be); ``split`` picks the split of a
    dataset that has several."""
    if isinstance(source, (list, tuple)):
        rows = [dict(r) if isinstance(r, dict) else r for r in source]
        bad = [i for i, r in enumerate(rows, start=1) if not isinstance(r, dict)]
        if bad:
            raise DataError(f"data: row {bad[0]} is a {type(rows[bad[0] - 1]).__name__}; give a list of dicts")
        return [{**r, "_row": i} for i, r in enumerate(rows, start=1)]
    if not isinstance(source, (str, Path)):  # a datasets.Dataset or DatasetDict
        return _numbered(_pick_split(source, split, repr(type(source).__name__)).to_list())
    path = Path(source)
    if path.is_file():
        if path.suffix not in _FILES:
            raise DataError(f"data file {str(path)!r}: use .jsonl, .json, .csv or .parquet")
        if path.suffix == ".jsonl" or (path.suffix == ".json" and _json_lines(path)):
            return _jsonl(path)  # read here: a bad line is reported by its number
        return _numbered(_load_dataset(_FILES[path.suffix], str(path), data_files=str(path), split="train"))
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            import datasets

            try:
                loaded = datasets.load_from_disk(str(path))
            except (OSError, ValueError) as error:
                raise DataError(f"data folder {str(path)!r}: cannot load it with load_from_disk ({error})") from None
            return _numbered(_pick_split(loaded, split, str(path)).to_list())
        return _numbered(_load_dataset(str(path), str(path), split=split))
    if _looks_like_path(str(source)):
        raise DataError(f"data {str(source)!r} does not exist")
    return _numbered(_load_dataset(_cached_snapshot(str(source)), str(source), split=split))


def _numbered(rows: Any) -> list[dict[str, Any]]:
    return [{**row, "_row": i} for i, row in enumerate(rows, start=1)]


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or Path(text).suffix in _FILES or text.count("/") > 1


def _json_lines(path: Path) -> bool:
    with path.open() as f:
        first = next((line for line in f if line.strip()), "")
    return not first.lstrip().startswith("[")


def _jsonl(path: Path) -> list[dict[str, Any]]:
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


def _pick_split(loaded: Any, split: str, source: str) -> Any:
    if isinstance(loaded, dict):  # a DatasetDict is a dict of splits
        if split not in loaded:
            raise DataError(f"data {source}: no split {split!r}; it has {', '.join(loaded)} (set task_options.split)")
        return loaded[split]
    return loaded


def _load_dataset(path: str, source: str, **kwargs: Any) -> Any:
    import datasets

    try:
        return datasets.load_dataset(path, **kwargs)
    except ValueError as error:
        if "split" in kwargs and "Unknown split" in str(error):
            raise DataError(f"data {source}: no split {kwargs['split']!r} ({error}); set task_options.split") from None
        raise DataError(f"data {source}: cannot read it ({error})") from None
    except (OSError, datasets.exceptions.DatasetNotFoundError) as error:
        raise DataError(f"data {source}: cannot read it ({type(error).__name__}: {error})") from None


def _cached_snapshot(name: str) -> str:
    """The local folder of Hugging Face dataset ``name`` in the hub cache, offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(name, repo_type="dataset", local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        raise DataError(
            f"data {name!r}: not a file or folder, nor a dataset in the local Hugging Face cache; give a path, or "
            f"download it first (huggingface-cli download --repo-type dataset {name})"
        ) from None


def normalise_row(row: dict[str, Any]) -> dict[str, Any]:
    """An SFT-style ``messages`` row as ``prompt`` (the turns before the last assistant turn) and ``answer`` (that
    turn's content), unless the row has its own; other rows unchanged."""
    messages = row.get("messages")
    if "prompt" in row or not isinstance(messages, list):
        return row
    turns = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    last = turns[-1] if turns else None
    if last is None:
        return {**row, "prompt": messages}
    out = {**row, "prompt": messages[:last] or None}
    if out.get("answer") is None:
        out["answer"] = messages[last].get("content")
    return out


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
            if (ground_truth(row) if column == "answer" else row.get(column)) is None:
                problems.append(f"row {number}: {column!r} is missing")
    _raise_if(problems, source)


def _raise_if(problems: list[str], source: str | Path) -> None:
    if problems:
        shown = "\n  ".join(problems[:MAX_REPORTED])
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(f"{source}: {len(problems)} problem(s); fix these rows:\n  {shown}{more}")


@register("user")
class UserTask(Task):
    """A task from the user's data and, optionally, reward functions.

    ``reward``: a spec (``file.py:function``, ``module:function``, several comma-separated), a callable or a list
    of either, in ``reward_style`` (:mod:`dfpo.tasks.rewards`), combined with ``reward_weights``. Without one, a
    completion scores 1 when its marked final answer matches the row's answer. ``eval_data`` gives separate
    evaluation data; otherwise ``eval_fraction`` of the rows (a seeded shuffle) is held out. ``templated``: string
    prompts already hold the chat template (they are used as they are).
    """

    name = "user"
    reward_range = None  # a reward function may return any finite float

    def __init__(
        self,
        data: Any,
        reward: str | Callable[..., Any] | Sequence[Any] | None = None,
        reward_weights: str | Sequence[float] | None = None,
        reward_style: str = "auto",
        eval_data: Any = None,
        eval_fraction: float = 0.1,
        split: str = "train",
        eval_split: str = "",
        templated: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.rewards = reward_functions(reward, reward_weights, reward_style) if reward else []
        if reward_weights and not self.rewards:
            raise RewardFunctionError("reward_weights weigh reward functions: give them with reward=")
        self.marked_answers = not self.rewards
        self.templated = templated
        self.last_components: dict[str, float] = {}
        required = () if self.rewards else ("answer",)
        source = data if isinstance(data, (str, Path)) else "data"
        rows = [normalise_row(r) for r in load_rows(data, split)]
        validate_rows(rows, required, source=str(source))
        if eval_data is not None and eval_data != "":
            eval_rows = [normalise_row(r) for r in load_rows(eval_data, eval_split or split)]
            validate_rows(eval_rows, required, source=str(eval_data if isinstance(eval_data, (str, Path)) else "eval"))
            self._splits = {"train": rows, "eval": eval_rows}
        else:
            if eval_split:
                raise DataError("eval_split picks a split of eval_data: give eval_data too")
            order = list(range(len(rows)))
            random.Random(seed).shuffle(order)
            held = round(len(rows) * eval_fraction)
            self._splits = {"train": [rows[i] for i in order[held:]], "eval": [rows[i] for i in order[:held]]}
        if not self._splits["train"]:
            raise DataError(f"data {source}: no training rows (after holding out eval_fraction={eval_fraction})")

    def examples(self, split: str, limit: int | None = None) -> list[dict[str, Any]]:
        self._check_split(split)
        return self._splits[split][:limit]

    def prompt_text(self, tokenizer: Any, example: dict[str, Any]) -> str:
        if self.templated and isinstance(example["prompt"], str):
            return example["prompt"]
        return render_prompt(tokenizer, self.messages(example))

    def score_batch(
        self, completions: list[str], examples: list[dict[str, Any]], completion_ids: list[list[int]] | None = None
    ) -> list[float | None]:
        if not self.rewards:
            return [self.score(c, e) for c, e in zip(completions, examples, strict=True)]
        components = score_components(self.rewards, completions, examples, completion_ids)
        self.last_components = {}
        for name, values in components.items():
            scored = [v for v in values if v is not None]
            self.last_components[name] = sum(scored) / len(scored) if scored else float("nan")
        return combine(self.rewards, components)

    def score(self, completion: str, example: dict[str, Any]) -> float:
        if self.rewards:
            value = self.score_batch([completion], [example])[0]
            return 0.0 if value is None else value
        return float(answers_match(extract_final_answer(completion), str(ground_truth(example))))
