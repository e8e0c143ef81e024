"""Task settings calibrated to a model, so that RL starts between about 20% and 60% held-out accuracy.

Near 0% there is no reward signal; near 100% no room to improve. Each preset names the model it is calibrated for,
the task with its difficulty options, and the generation length. ``benchmarks/start_accuracy.py --presets``
measures the starting accuracy of every preset; the figures are in ``docs/tasks.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dfpo.tasks.base import Task, get


@dataclass(frozen=True)
class Preset:
    """A model, a task with its options, and the generation length that fits the task's replies."""

    model: str
    task: str
    task_options: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 64
    about: str = ""

    def build_task(self) -> Task:
        return get(self.task, **self.task_options)


PRESETS: dict[str, Preset] = {
    "tiny-arithmetic": Preset(
        "tiny",
        "arithmetic",
        {"prompt_style": "terse"},
        max_new_tokens=64,
        about="the embedded tiny model on 2-3 term, 2-digit +- chains with worked steps (its training task)",
    ),
    "smollm2-arithmetic": Preset(
        "smollm2",
        "arithmetic",
        # 9,500 distinct 2-term 2-digit additions exist: a 5,000-problem train split
        {"min_terms": 2, "max_terms": 2, "digits": 2, "operators": "+", "few_shot": 3, "train_size": 5000},
        max_new_tokens=48,
        about="SmolLM2-135M-Instruct on 2-digit additions, three worked examples in the prompt",
    ),
}


def preset(name: str) -> Preset:
    """The preset ``name``; an unknown name raises ``KeyError`` listing the presets."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def task_options_for(model: str, task: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the settings a model needs to read a task at all: the embedded tiny model was trained on
    terse arithmetic prompts only, so arithmetic, and ``known_value`` (arithmetic prompts), for ``tiny`` default to
    ``prompt_style="terse"``."""
    if model == "tiny" and task in ("arithmetic", "known_value"):
        return {"prompt_style": "terse", **options}
    return dict(options)
