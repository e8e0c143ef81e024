"""``dfpo bench critic``: do the critics learn what their features allow, and the distribution they should?

Each cell trains one critic-based algorithm (PPO, robust PPO, DVPO, DFPO) with one critic backbone on one task
whose value is known (:mod:`dfpo.tasks.known_value`: decided by the prompt, by the response, or Bernoulli with a
prompt-dependent probability) or on a real task, with clean rewards, at the algorithm's defaults. Every step, an
observer keeps the critic's input features, its values or samples and the Monte-Carlo returns (lambda = 1) of the
rewards the learner saw. The cell reports:

- the critic's explained variance against those returns, per step, and its mean over the last ``window`` steps;
- the **ceiling** in the same run: a closed-form ridge probe from the same features to the same returns, fitted
  on the earlier steps' tokens and scored on the last ``window`` steps' (the critic trained on those earlier steps
  too); the share of the probe that the critic reaches;
- the values' mean bias against the returns;
- for distributional critics on tasks that declare a per-state return distribution (``task.return_distribution``:
  the prompt and Bernoulli kinds), the learned std, CVaR_0.1 and 1-Wasserstein distance at every response token
  against the known distribution, and the true std and CVaR beside them.

Results: ``cells.json`` (every figure per step) and ``summary.md`` (the tables) in ``out``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfpo.options import ConfigError, option

CRITIC_ALGOS = ("ppo", "robust_ppo", "dvpo", "dfpo")
KNOWN_KINDS = ("prompt", "response", "bernoulli")


@dataclass(frozen=True)
class CriticBenchConfig:
    """``dfpo bench critic [key=value ...]``: critic explained variance against a ridge probe's ceiling, and
    distributional critics against known per-state return distributions."""

    model: str = option("tiny", "'tiny', 'smollm2' or a model folder")
    tasks: str = option(
        "prompt,response,bernoulli",
        "comma-separated: known_value kinds (prompt, response, bernoulli) and real tasks (arithmetic: the model's "
        "arithmetic preset task)",
    )
    algos: str = option("ppo,robust_ppo,dvpo,dfpo", "comma-separated critic-based algorithms")
    backbones: str = option("frozen", "comma-separated critic backbones: frozen, shared, separate")
    steps: int = option(40, "training steps per cell")
    prompts: int = option(16, "prompts per step")
    samples: int = option(4, "responses per prompt")
    window: int = option(10, "the last this many steps are where explained variance and the probe are scored")
    seed: int = option(0, "seed of every cell")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    train: dict = option({}, "extra dfpo train settings for every cell, e.g. train.critic.updates=4")
    out: str = option("results/critic-learning", "output folder (cells.json, summary.md)")


class Recorder:
    """An observer of training steps (:class:`dfpo.training.step.StepData`) that keeps, per step, the tokens'
    features, Monte-Carlo returns, predicted values, and the known distribution's parameters."""

    def __init__(self, task: Any, gamma: float) -> None:
        self.task, self.gamma = task, gamma
        self.steps: list[dict[str, Tensor]] = []

    def __call__(self, data: Any) -> None:
        from dfpo.core.advantages import returns_to_go

        mask = data.mask.bool()
        returns = returns_to_go(data.rewards.float(), data.mask, self.gamma)
        values = data.values if data.values is not None else data.samples.mean(-1)
        record = {"features": data.features[mask].cpu(), "returns": returns[mask].cpu(),
                  "values": values[mask].float().cpu()}  # fmt: skip
        distribution = getattr(self.task, "return_distribution", None)
        dists = [distribution(e) for e in data.examples] if distribution else []
        if data.samples is not None and dists and all(d is not None for d in dists):
            # the per-state truth is the same at every response token: the reward ignores the response
            per_row = torch.tensor([sum(v * p for v, p in d if v == 1.0) for d in dists])
            record["p_one"] = per_row[:, None].expand_as(data.mask)[mask].cpu()
            record["samples"] = data.samples[mask].float().cpu()
        self.steps.append(record)


def ridge_r2(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, lam: float) -> float:
    """Held-out R^2 of a ridge regression (standardised features, an intercept) of ``y`` on ``x``."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    z_train = torch.cat([(x_train - mu) / sd, torch.ones(len(x_train), 1)], 1).double()
    z_test = torch.cat([(x_test - mu) / sd, torch.ones(len(x_test), 1)], 1).double()
    a = z_train.T @ z_train + lam * torch.eye(z_train.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(a, z_train.T @ y_train.double())
    residual = ((z_test @ w - y_test.double()) ** 2).mean()
    return float(1.0 - residual / y_test.double().var().clamp_min(1e-12))


def explained(values: Tensor, returns: Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over tokens (nan when the returns do not vary)."""
    spread = returns.var()
    return float(1.0 - (returns - values).var() / spread) if spread > 1e-8 else float("nan")


def bernoulli_fit(samples: Tensor, p_one: Tensor, alpha: float = 0.1) -> dict[str, float]:
    """Learned against true std, CVaR_alpha and W1 of per-token Bernoulli(p) returns (p = 0 or 1 is a point mass).

    ``samples [N, K]`` sorted quantiles at levels ``(k + 1/2) / K``, ``p_one [N]``; means over tokens."""
    k = samples.shape[-1]
    levels = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    true_quantiles = (levels[None, :] > (1.0 - p_one[:, None])).float()
    tail = max(1, math.floor(alpha * k + 1e-9))
    true_cvar = ((p_one - (1.0 - alpha)).clamp_min(0.0) / alpha).clamp_max(1.0)
    return {
        "std": float(samples.std(-1, unbiased=False).mean()),
        "true_std": float((p_one * (1 - p_one)).sqrt().mean()),
        "cvar": float(samples[:, :tail].mean(-1).mean()),
        "true_cvar": float(true_cvar.mean()),
        "w1": float((samples - true_quantiles).abs().mean()),
        "mean": float(samples.mean(-1).mean()),
        "true_mean": float(p_one.mean()),
    }


def analyse(recorder: Recorder, window: int) -> dict[str, Any]:
    """The cell's figures from its recorded steps (see the module docstring)."""
    steps = recorder.steps
    per_step = [explained(s["values"], s["returns"]) for s in steps]
    late, early = steps[-window:], steps[:-window]
    cat = lambda key, part: torch.cat([s[key] for s in part])  # noqa: E731
    out: dict[str, Any] = {"explained_var_per_step": per_step}
    values, returns = cat("values", late), cat("returns", late)
    out["explained_var"] = explained(values, returns)
    out["value_bias"] = float((values - returns).mean())
    out["return_var"] = float(returns.var())
    if early:
        x_train, y_train, x_test = cat("features", early), cat("returns", early), cat("features", late)
        out["probe_r2"] = max(ridge_r2(x_train, y_train, x_test, returns, lam) for lam in (1.0, 10.0, 100.0))
        out["share_of_probe"] = out["explained_var"] / out["probe_r2"] if out["probe_r2"] > 0 else float("nan")
    if all("samples" in s for s in late):
        out["distribution"] = bernoulli_fit(cat("samples", late), cat("p_one", late))
    return out


def _model_settings(model: str) -> list[str]:
    """The noisy grid's training settings for a model it has a scale for (SmolLM2's actor lr 2e-6, flow critic
    K and width), less its batch shape and critic backbone, which this benchmark sets: the tiny model's defaults
    would wreck SmolLM2."""
    from dfpo.experiments.noisy.grid import SCALES

    scale = SCALES.get(model)
    return [s for s in scale.settings if not s.startswith(("rollout.", "critic.backbone="))] if scale else []


def _task_settings(name: str, model: str) -> list[str]:
    if name in KNOWN_KINDS:
        return ["task=known_value", f"task_options.kind={name}"]
    if name == "arithmetic":
        from dfpo.tasks.presets import PRESETS

        chosen = PRESETS.get(f"{model}-arithmetic")
        if chosen is None:
            return ["task=arithmetic"]
        return ["task=arithmetic", f"rollout.max_new_tokens={chosen.max_new_tokens}"] + [
            f"task_options.{k}={v}" for k, v in chosen.task_options.items()
        ]
    raise ConfigError(f"tasks: {name!r} is not one of {', '.join(KNOWN_KINDS)}, arithmetic")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def run_critic_bench(config: CriticBenchConfig, command: str) -> dict[str, Any]:
    from dfpo.experiments.noisy.grid import _code_version
    from dfpo.options import check_writable, flatten
    from dfpo.training.config import build_config
    from dfpo.training.critic_options import BACKBONES
    from dfpo.training.trainer import Trainer

    algos, backbones, tasks = _split(config.algos), _split(config.backbones), _split(config.tasks)
    for name, chosen, valid in (("algos", algos, CRITIC_ALGOS), ("backbones", backbones, BACKBONES)):
        bad = [a for a in chosen if a not in valid]
        if bad or not chosen:
            raise ConfigError(f"{name}: {', '.join(bad) or 'none given'}; valid: {', '.join(valid)}")
    if config.window < 1 or config.steps <= config.window:
        raise ConfigError(f"window={config.window}: must be at least 1 and below steps={config.steps}")
    out = Path(config.out)
    check_writable(out, "out", folder=True)
    extra = flatten(config.train)
    cells_path = out / "cells.json"
    cells: dict[str, Any] = json.loads(cells_path.read_text()) if cells_path.exists() else {}
    code_version = _code_version()  # per cell: a resumed folder can hold cells of several versions
    plan = [(t, a, b) for t in tasks for a in algos for b in backbones]
    configs = {}
    for task, algo, backbone in plan:  # every setting is checked before the first cell trains
        overrides = [
            f"algo={algo}", f"model={config.model}", *_model_settings(config.model),
            *_task_settings(task, config.model), "noise=clean", f"steps={config.steps}", f"seed={config.seed}",
            f"rollout.prompts={config.prompts}", f"rollout.samples={config.samples}", f"critic.backbone={backbone}",
            "eval.splits=", "log.progress=false", "log.samples_every=0", f"threads={config.threads}",
            f"run_dir={out / 'runs' / f'{task}-{algo}-{backbone}'}", *extra,
        ]  # fmt: skip
        configs[(task, algo, backbone)] = build_config(overrides)
    for key, train_config in configs.items():
        name = "/".join(key)
        if name in cells:
            print(f"bench critic: {name} done before, kept")
            continue
        run_dir = train_config.resolved_run_dir
        if run_dir.exists():  # an interrupted cell starts again
            import shutil

            shutil.rmtree(run_dir)
        start = time.perf_counter()
        trainer = Trainer(train_config, command)
        recorder = Recorder(trainer.task, train_config.advantage.gamma)
        trainer.observers.append(recorder)
        trainer.run()
        cell = analyse(recorder, config.window)
        cell["seconds"] = round(time.perf_counter() - start, 1)
        cell["code"] = code_version
        cells[name] = cell
        tmp = cells_path.with_name(".cells.json.tmp")
        tmp.write_text(json.dumps(cells, indent=1) + "\n")
        os.replace(tmp, cells_path)
        print(f"bench critic: {name}: explained variance {cell['explained_var']:.3f}, probe "
              f"{cell.get('probe_r2', float('nan')):.3f}, {cell['seconds']:.0f} s", flush=True)  # fmt: skip
    summary = write_summary(out, config, command, {"/".join(k): cells["/".join(k)] for k in configs})
    return {"cells": cells, "summary": summary}


def _f(x: Any, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_summary(out: Path, config: CriticBenchConfig, command: str, cells: dict[str, Any]) -> str:
    """``summary.md``: the explained-variance table against the probe, and the distribution table."""
    from dfpo.experiments.noisy.grid import _code_version

    current = _code_version()
    versions = Counter(cell.get("code", "not recorded") for cell in cells.values())
    measured = (
        f" Cells measured at: {', '.join(f'{v} ({n} cells)' for v, n in versions.items())}."
        if set(versions) != {current} else ""
    )  # fmt: skip
    lines = [
        "# Critic learning", "", f"Command: `{command}`", "",
        f"Code: dfpo {current}. Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}; "
        f"{config.steps} steps of {config.prompts} x {config.samples}, seed {config.seed}, clean rewards; figures "
        f"over the last {config.window} steps.{measured}", "",
        "Explained variance of the critic's values against the Monte-Carlo returns (lambda = 1) of the rewards the "
        "learner saw, beside the ceiling: a ridge probe from the same features to the same returns, fitted on the "
        "earlier steps and scored on the same last steps.", "",
        "| task | algorithm | backbone | explained variance | probe R^2 | share of probe | value bias | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, cell in cells.items():
        task, algo, backbone = name.split("/")
        lines.append(
            f"| {task} | {algo} | {backbone} | {_f(cell['explained_var'])} | {_f(cell.get('probe_r2'))} | "
            f"{_f(cell.get('share_of_probe'))} | {_f(cell['value_bias'], 3)} | {cell['seconds']:.0f} |"
        )
    dist = {n: c["distribution"] for n, c in cells.items() if "distribution" in c}
    if dist:
        lines += [
            "", "Distributional critics against the known per-state return distribution (every response token; "
            "Bernoulli(p) with p from the prompt, a point mass for the prompt-decided task): learned / true.", "",
            "| task | algorithm | backbone | mean | std | CVaR_0.1 | W1 |", "|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for name, d in dist.items():
            task, algo, backbone = name.split("/")
            lines.append(
                f"| {task} | {algo} | {backbone} | {_f(d['mean'])} / {_f(d['true_mean'])} | {_f(d['std'])} / "
                f"{_f(d['true_std'])} | {_f(d['cvar'])} / {_f(d['true_cvar'])} | {_f(d['w1'], 3)} |"
            )
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")
    return text
