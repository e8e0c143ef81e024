"""Reward functions the user brings, in the contracts TRL and verl users already have.

Three calling conventions (``reward_style``; ``auto`` picks by the function's signature):

- ``trl`` (TRL's ``GRPOTrainer``): one call per batch, every argument by keyword::

      def reward(prompts, completions, completion_ids, **columns) -> list[float | None]

  ``prompts`` as the dataset holds them, ``completions`` as strings, or as ``[{"role": "assistant", "content":
  ...}]`` when the prompt is a list of chat messages (TRL's conversational format), ``completion_ids`` the
  generated token ids, and every other dataset column as a list aligned with the completions. A function gets only
  the arguments it declares (all of them with ``**kwargs``). ``auto`` takes this style unless the signature is
  verl's.
- ``plain``: as ``trl``, but completions are always strings.
- ``verl`` (verl's ``compute_score``): one call per sample::

      def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict

  ``ground_truth`` from the row's ``reward_model.ground_truth`` (verl's data format) or its ``answer``; a dict
  result gives its ``score``. ``auto`` takes this style when the signature names ``solution_str`` or
  ``ground_truth``.

``None`` skips a sample (no reward, no gradient). Several functions combine as a weighted sum (``weights``, 1 each
by default) of those that score the sample; a sample none of them scores is skipped. ``async def`` functions (an
HTTP judge) run concurrently: per-sample ones on every sample at once, and several functions side by side, so a
batch waits for its slowest call, not for their sum. A function that raises, or returns something outside its
contract, stops the run with :class:`RewardFunctionError` naming the function, the sample and the problem.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STYLES = ("auto", "trl", "plain", "verl")
_VERL_NAMES = ("solution_str", "ground_truth")


class RewardFunctionError(ValueError):
    """A reward function that cannot be loaded, raises, or returns something outside its contract."""


@dataclass(frozen=True)
class RewardFunction:
    """One reward function with its logged ``name``, ``weight`` and resolved calling ``style``."""

    fn: Callable[..., Any]
    name: str
    weight: float = 1.0
    style: str = "trl"

    @property
    def is_async(self) -> bool:
        call = type(self.fn).__call__ if not inspect.isfunction(self.fn) else None  # a callable object's method
        return inspect.iscoroutinefunction(self.fn) or (call is not None and inspect.iscoroutinefunction(call))


def load_reward_function(spec: str) -> Callable[..., Any]:
    """Import ``module:function``, ``module.function`` or ``path/to/file.py:function``."""
    if spec.endswith(".py"):
        raise RewardFunctionError(f"reward {spec!r}: name the function in the file too, e.g. {spec}:my_reward")
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
    except SyntaxError as error:
        raise RewardFunctionError(
            f"reward {spec!r}: {error.filename}, line {error.lineno}: syntax error ({error.msg}); fix the file"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardFunctionError(f"reward {spec!r}: {where!r} has no function {name!r}")
    return fn


def _function_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _style(fn: Callable[..., Any], style: str) -> str:
    if style not in STYLES:
        raise RewardFunctionError(f"reward_style={style!r}: use one of {', '.join(STYLES)}")
    if style != "auto":
        return style
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: keywords are all it can get
        return "trl"
    return "verl" if any(name in parameters for name in _VERL_NAMES) else "trl"


def reward_functions(
    reward: str | Callable[..., Any] | Sequence[str | Callable[..., Any]],
    weights: str | Sequence[float] | None = None,
    style: str = "auto",
) -> list[RewardFunction]:
    """The reward functions of ``reward``: a spec (``file.py:fn``, ``module:fn``; several comma-separated), a
    callable, or a list of either; ``weights`` one number per function (comma-separated, or a list)."""
    if isinstance(reward, str):
        items: list[Any] = [s.strip() for s in reward.split(",") if s.strip()]
    elif callable(reward):
        items = [reward]
    else:
        items = list(reward)
    fns = [load_reward_function(r) if isinstance(r, str) else r for r in items]
    for fn in fns:
        if not callable(fn):
            raise RewardFunctionError(f"reward: {fn!r} is not a function")
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.split(",") if w.strip()]
        except ValueError:
            raise RewardFunctionError(f"reward_weights={weights!r}: give comma-separated numbers") from None
    weights = list(weights) if weights else [1.0] * len(fns)
    if len(weights) != len(fns):
        raise RewardFunctionError(
            f"reward_weights has {len(weights)} numbers for {len(fns)} reward functions: give one per function"
        )
    if not all(math.isfinite(w) for w in weights):
        raise RewardFunctionError(f"reward_weights={weights}: every weight must be a finite number")
    names: list[str] = []
    for fn in fns:  # two functions of one name are logged apart
        name = _function_name(fn)
        names.append(name if name not in names else f"{name}_{len(names)}")
    return [
        RewardFunction(fn, name, float(w), _style(fn, style)) for fn, name, w in zip(fns, names, weights, strict=True)
    ]


# -- calling ------------------------------------------------------------------------------------------------------


def ground_truth(row: dict[str, Any]) -> Any:
    """verl's ``reward_model.ground_truth`` of a row, else its ``answer`` (None when it has neither)."""
    spec = row.get("reward_model")
    if isinstance(spec, dict) and spec.get("ground_truth") is not None:
        return spec["ground_truth"]
    return row.get("answer")


def _accepts(fn: Callable[..., Any], arguments: dict[str, Any]) -> dict[str, Any]:
    """The ``arguments`` ``fn`` declares (all of them when it takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return arguments
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return arguments
    return {k: v for k, v in arguments.items() if k in parameters}


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    keys = dict.fromkeys(k for row in rows for k in row if not k.startswith("_"))
    return {k: [row.get(k) for row in rows] for k in keys}


def _batch_arguments(
    reward: RewardFunction, completions: list[str], rows: list[dict[str, Any]], completion_ids: list[list[int]] | None
) -> dict[str, Any]:
    prompts = [row.get("prompt") for row in rows]
    if reward.style == "trl":  # TRL's conversational completions where the prompt is a message list
        shown: list[Any] = [
            [{"role": "assistant", "content": c}] if isinstance(p, list) else c
            for c, p in zip(completions, prompts, strict=True)
        ]
    else:
        shown = list(completions)
    columns = _columns(rows)
    columns.pop("prompt", None)
    return {"prompts": prompts, "completions": shown, "completion_ids": completion_ids, **columns}


def _sample_arguments(completion: str, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "data_source": row.get("data_source", ""),
        "solution_str": completion,
        "ground_truth": ground_truth(row),
        "extra_info": row.get("extra_info"),
    }


def _error(reward: RewardFunction, where: str, problem: str) -> RewardFunctionError:
    return RewardFunctionError(
        f"reward function {reward.name!r} {problem} {where}; fix the function (return None for a sample it cannot "
        "score)"
    )


def _sample_text(i: int, completion: str, row: dict[str, Any]) -> str:
    prompt = row.get("prompt")
    shown = prompt if isinstance(prompt, str) else (prompt[-1].get("content", "") if prompt else "")
    return f"on sample {i} (row {row.get('_row', '?')}, prompt {shown[:60]!r}, completion {completion[:60]!r})"


def _value(reward: RewardFunction, value: Any, where: str) -> float | None:
    if isinstance(value, dict) and "score" in value:  # verl's compute_score may return a dict
        value = value["score"]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _error(reward, where, f"returned {value!r} (expected a finite number or None)")
    return float(value)


def _check_batch(
    reward: RewardFunction, out: Any, completions: list[str], rows: list[dict[str, Any]]
) -> list[float | None]:
    if not isinstance(out, (list, tuple)) or len(out) != len(completions):
        got = f"{type(out).__name__} of length {len(out)}" if hasattr(out, "__len__") else type(out).__name__
        raise _error(reward, f"for a batch of {len(completions)}", f"returned {got}, not a list of one number each")
    return [_value(reward, v, _sample_text(i, completions[i], rows[i])) for i, v in enumerate(out)]


def _locate(reward: RewardFunction, completions: list[str], rows: list[dict[str, Any]], ids: Any, error: Exception):
    """The error of a synchronous batch function that raised, named at the first sample that raises alone."""
    for i in range(len(completions)):
        try:
            reward.fn(**_accepts(reward.fn, _batch_arguments(reward, completions[i : i + 1], rows[i : i + 1],
                                                              None if ids is None else ids[i : i + 1])))  # fmt: skip
        except Exception as single:
            return _error(reward, _sample_text(i, completions[i], rows[i]), f"raised {type(single).__name__}: {single}")
    where = f"on a batch of {len(completions)} samples (no sample raises alone)"
    return _error(reward, where, f"raised {type(error).__name__}: {error}")


def _call_sync(
    reward: RewardFunction, completions: list[str], rows: list[dict[str, Any]], ids: list[list[int]] | None
) -> list[float | None]:
    if reward.style == "verl":
        out = []
        for i, (completion, row) in enumerate(zip(completions, rows, strict=True)):
            where = _sample_text(i, completion, row)
            try:
                value = reward.fn(**_accepts(reward.fn, _sample_arguments(completion, row)))
            except Exception as error:
                raise _error(reward, where, f"raised {type(error).__name__}: {error}") from error
            out.append(_value(reward, value, where))
        return out
    try:
        result = reward.fn(**_accepts(reward.fn, _batch_arguments(reward, completions, rows, ids)))
    except Exception as error:
        raise _locate(reward, completions, rows, ids, error) from error
    return _check_batch(reward, result, completions, rows)


async def _call_async(
    reward: RewardFunction, completions: list[str], rows: list[dict[str, Any]], ids: list[list[int]] | None
) -> list[float | None]:
    if not reward.is_async:  # a synchronous function beside async ones: in a thread, side by side
        return await asyncio.to_thread(_call_sync, reward, completions, rows, ids)
    if reward.style == "verl":

        async def one(i: int) -> float | None:
            where = _sample_text(i, completions[i], rows[i])
            try:
                value = await reward.fn(**_accepts(reward.fn, _sample_arguments(completions[i], rows[i])))
            except Exception as error:
                raise _error(reward, where, f"raised {type(error).__name__}: {error}") from error
            return _value(reward, value, where)

        return list(await asyncio.gather(*(one(i) for i in range(len(completions)))))
    try:
        result = await reward.fn(**_accepts(reward.fn, _batch_arguments(reward, completions, rows, ids)))
    except Exception as error:
        where = f"on a batch of {len(completions)} samples"
        raise _error(reward, where, f"raised {type(error).__name__}: {error}") from error
    return _check_batch(reward, result, completions, rows)


def _run(coroutine: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:  # called from inside an event loop (a notebook): a loop of its own
        return pool.submit(asyncio.run, coroutine).result()


def score_components(
    rewards: Sequence[RewardFunction],
    completions: list[str],
    rows: list[dict[str, Any]],
    completion_ids: list[list[int]] | None = None,
) -> dict[str, list[float | None]]:
    """Each function's rewards of ``completions`` (one row each), by name, unweighted."""
    if any(r.is_async for r in rewards):

        async def every() -> list[list[float | None]]:
            return list(await asyncio.gather(*(_call_async(r, completions, rows, completion_ids) for r in rewards)))

        results = _run(every())
    else:
        results = [_call_sync(r, completions, rows, completion_ids) for r in rewards]
    return {r.name: out for r, out in zip(rewards, results, strict=True)}


def combine(rewards: Sequence[RewardFunction], components: dict[str, list[float | None]]) -> list[float | None]:
    """The weighted sum of the functions that score each sample; None where none does."""
    n = len(next(iter(components.values()))) if components else 0
    out: list[float | None] = []
    for i in range(n):
        scored = [(r.weight, components[r.name][i]) for r in rewards if components[r.name][i] is not None]
        out.append(sum(w * v for w, v in scored) if scored else None)
    return out
