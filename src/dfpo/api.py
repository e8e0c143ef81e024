"""The Python API: ``from dfpo import train, TrainConfig``.

``train`` builds its configuration the way ``dfpo train`` does (defaults, then the algorithm's preset, then your
settings, validated), so ``train(algo="grpo")`` runs GRPO's settings. Settings are given as keywords (nested
groups as dicts, or dotted keys in a dict), as a :class:`TrainConfig` (its fields that differ from the defaults
count as yours), or both. ``task_options`` may hold Python objects: ``data`` as a list of dicts or a
``datasets.Dataset``, ``reward`` as a callable or a list of callables::

    from dfpo import train

    def correct(prompts, completions, answer, **kwargs):
        return [float(a in c) for c, a in zip(completions, answer)]

    rows = [{"prompt": f"What is {a} + {a}?", "answer": str(2 * a)} for a in range(50)]
    result = train(algo="grpo", model="tiny", task="user", task_options={"data": rows, "reward": correct},
                   steps=4, run_dir="runs/api")
    print(result["after"]["eval"]["mean_reward"])

Callbacks (:class:`Callback`) see every step's metrics and every evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from dfpo.options import ConfigError, flatten
from dfpo.training.config import TrainConfig, build_config

__all__ = ["Callback", "TrainConfig", "train"]


class Callback:
    """Hooks into a training run; override the ones you need. ``trainer`` is the running
    :class:`dfpo.training.trainer.Trainer` (its ``policy``, ``critic``, ``step``, ``run_dir``)."""

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        """After each training step, with the step's metrics (the line written to ``metrics.jsonl``)."""

    def on_evaluate(self, trainer: Any, step: int, results: dict[str, dict[str, Any]]) -> None:
        """After each held-out evaluation (``step`` 0: before training), with its results per split."""


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _overrides(mapping: dict[str, Any], prefix: str = "") -> list[str]:
    """Keyword settings as ``key=value`` overrides; a dotted key or a nested dict reaches into a group."""
    items: list[str] = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            items += _overrides(value, f"{prefix}{key}.")
        elif _is_plain(value):
            items.append(f"{prefix}{key}={'none' if value is None else value}")
        else:
            raise ConfigError(f"{prefix}{key}={value!r}: give a string, number or bool (objects go in task_options)")
    return items


def train(
    config: TrainConfig | None = None, /, *, callbacks: Sequence[Callback] = (), **settings: Any
) -> dict[str, Any]:
    """Train as ``dfpo train`` does; returns the evaluation record (``before``, ``after``, ``history``).

    ``settings``: :class:`TrainConfig` fields by name (``steps=10``, ``actor={"lr": 1e-5}``); ``task_options``
    may hold objects (data, reward callables), passed to the task as they are.
    """
    from dfpo.training.trainer import Trainer

    options: dict[str, Any] = {}
    overrides: list[str] = []
    if config is not None:
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"train() takes a TrainConfig or keyword settings, not {type(config).__name__}")
        default = set(flatten(_without_options(dataclasses.asdict(TrainConfig()))))
        overrides += [i for i in flatten(_without_options(dataclasses.asdict(config))) if i not in default]
        options.update(config.task_options)
    options.update(settings.pop("task_options", None) or {})
    overrides += _overrides(settings)
    plain = {k: v for k, v in options.items() if _is_plain(v)}
    built = build_config([*overrides, *_overrides(plain, "task_options.")])
    built = dataclasses.replace(built, task_options={**built.task_options, **options})
    return Trainer(built, "dfpo.train (Python)", callbacks=list(callbacks)).run()


def _without_options(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "task_options"}
