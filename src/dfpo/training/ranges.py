"""Every numeric setting's valid values, in one table (:data:`RANGES`), checked before any model loads."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dfpo.options import ConfigError

# Every numeric setting's valid values, in one place, checked before any model loads (a test keeps this table
# complete). ">0", ">=1": bounds; "[0,1]", "(0,1]": intervals; every float must also be finite.
RANGES: dict[str, str] = {
    "train_limit": ">=0", "steps": ">=1", "seed": ">=0", "max_bad_steps": ">=1", "threads": ">=0",
    "rollout.prompts": ">=1", "rollout.samples": ">=1", "rollout.max_new_tokens": ">=1",
    "rollout.temperature": ">0", "rollout.top_p": "(0,1]", "rollout.batch_size": ">=1",
    "rollout.vllm_memory": "(0,1]", "rollout.generate_prompts": ">=0", "rollout.max_prompt_tokens": ">=0",
    "actor.lr": ">0", "actor.weight_decay": ">=0", "actor.warmup_steps": ">=0", "actor.epochs": ">=1",
    "actor.minibatches": ">=1", "actor.micro_batch": ">=0", "actor.micro_tokens": ">=0",
    "actor.checkpoint_prompts": ">=0", "actor.clip_low": "[0,1)", "actor.clip_high": ">=0", "actor.grad_clip": ">=0",
    "actor.lora_rank": ">=0", "actor.lora_alpha": ">=0",
    "critic.lr": ">0", "critic.trunk_lr": ">=0", "critic.warmup_steps": ">=0", "critic.coef": ">=0",
    "critic.updates": ">=0", "critic.grad_clip": ">=0", "critic.width": ">=0", "critic.lora_rank": ">=0",
    "critic.lora_alpha": ">=0", "critic.trunk_layers": ">=0",
    "critic.scalar.value_clip": ">=0",
    "critic.ensemble.heads": ">=1", "critic.ensemble.value_clip": ">=0", "critic.ensemble.pessimism": "[0,1]",
    "critic.ensemble.bootstrap": "[0,1]",
    "critic.quantile.heads": ">=1", "critic.quantile.quantiles": ">=1", "critic.quantile.kappa": ">0",
    "critic.quantile.return_scale": ">0", "critic.quantile.risk_weight": ">=0",
    "critic.flow.samples": ">=1", "critic.flow.sample_steps": ">=1", "critic.flow.return_scale": ">0",
    "critic.flow.risk_weight": ">=0", "critic.flow.uncertainty_c": ">0", "critic.flow.anchor_weight": ">=0",
    "critic.flow.anchor_kappa": ">0", "critic.flow.consistency_weight": ">=0", "critic.flow.consistency_steps": ">=1",
    "critic.flow.risk_alpha": "(0,1)", "critic.flow.risk_beta": "(0,1)", "critic.flow.cvar_weight": ">=0",
    "critic.flow.gain_weight": ">=0", "critic.flow.shape_weight": ">=0", "critic.flow.shift_weight": ">=0",
    "critic.flow.curvature_weight": ">=0", "critic.flow.cfm_weight": ">=0",
    "kl.coef": ">=0",
    "advantage.gamma": "[0,1]", "advantage.lam": "[0,1]", "advantage.critic_lam": "[0,1]",
    "advantage.adaptive_lam": ">=0",
    "eval.every": ">=0", "eval.limit": ">=1", "eval.samples": ">=0", "eval.max_new_tokens": ">=0",
    "log.samples_every": ">=0",
    "checkpoint.every": ">=0", "checkpoint.keep": ">=0",
}  # fmt: skip


def numeric_settings(config: Any, prefix: str = "") -> dict[str, int | float]:
    """Every int and float field of ``config`` and its groups, by dotted key (bools are not numbers here)."""
    out: dict[str, int | float] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(numeric_settings(value, f"{prefix}{f.name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{f.name}"] = value
    return out


def _within(value: float, spec: str) -> bool:
    if spec.startswith(">="):
        return value >= float(spec[2:])
    if spec.startswith(">"):
        return value > float(spec[1:])
    low, high = (float(x) for x in spec[1:-1].split(","))
    above = value >= low if spec[0] == "[" else value > low
    below = value <= high if spec[-1] == "]" else value < high
    return above and below


def check_ranges(c: Any, ranges: dict[str, str] | None = None) -> None:
    """Refuse a numeric setting of ``c`` outside its range (``ranges``, by default :data:`RANGES`) or not finite,
    naming the key and its valid values."""
    ranges = RANGES if ranges is None else ranges
    for key, value in numeric_settings(c).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value}: must be a finite number")
        spec = ranges[key]
        if not _within(value, spec):
            shown = f"in {spec}" if spec[0] in "[(" else spec.replace(">=", ">= ").replace(">0", "> 0")
            raise ConfigError(f"{key}={value}: must be {shown}")
