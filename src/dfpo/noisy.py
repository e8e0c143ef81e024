"""``dfpo bench noisy``: the noisy-supervision benchmark, a grid of algorithms x supervision x seeds.

Every cell of the grid trains one algorithm (or a DFPO ablation) on one domain under one kind of supervision with
one seed, at the same budget as every other cell (steps, prompts, samples, response length, evaluation), then
evaluates the final policy greedily on the benchmarks of its domain and of the domains paired with it: the
benchmarks of the domain it trained on are in-domain (ID), the others out-of-domain (OOD), the cross-domain
protocol of DFPO's and DVPO's papers (train on math, evaluate math and science; train on science, evaluate
science and math).

Scales (:data:`SCALES`) fix the model, the domains with their benchmarks, and the shared budget:

- ``tiny``: the embedded tiny model; domains ``add`` and ``sub`` (2-4 term chains of 2-digit additions, of
  subtractions, with worked steps), each with a 2-, 3- and 4-term benchmark, so values vary widely with the
  prompt's difficulty and along the worked steps;
- ``smollm2``: SmolLM2-135M-Instruct; domains ``math`` (sums of two 1- or 2-digit numbers, three worked examples;
  evaluated on held-out sums and GSM8K), ``science`` (SciQ, ARC-Easy, ARC-Challenge, OpenBookQA)
  and ``dialogue`` (CoQA, trained on the learned reward model's scores, evaluated by F1 against the gold answers).

The grid is resumable: each finished cell is a JSON file under ``OUT/cells/``, written atomically, and is skipped
when the same command runs again; a cell interrupted mid-run continues from its last checkpoint. Each cell runs in
its own process (``workers`` at a time). ``OUT`` then holds ``grid.json`` (command, machine, versions, settings),
``cells.csv``, ``summary.md`` (per-benchmark accuracy with ID, OOD and ALL averages as mean ± 95% interval over
seeds, paired comparisons of DFPO against each baseline, the critics' explained variance against its ceiling)
and PNG plots (learning curves with seed bands, final accuracy with intervals).

Tuning is the same for every variant: none by default (the scale's shared settings), or with ``tune=a,b,..`` each
variant picks its actor learning rate from that list on its own tuning seed under clean rewards, by the true
training reward of its last steps (never by a benchmark).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfpo.config import ConfigError, option
from dfpo.stats import fixed, mean_interval, paired

# -- what the grid is made of ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    """Held-out examples of a task: ``split``, optionally only those whose field ``where[0]`` equals ``where[1]``."""

    name: str
    task: str
    options: dict[str, Any]
    split: str = "eval"
    where: tuple[str, Any] | None = None
    max_new_tokens: int = 64


@dataclass(frozen=True)
class Domain:
    """What a cell trains on (task and options) and the benchmarks that are in-domain for it."""

    name: str
    task: str
    options: dict[str, Any]
    benchmarks: tuple[Benchmark, ...]
    max_new_tokens: int = 64
    noise: tuple[str, ...] = ()  # the supervision this domain is trained under, instead of the grid's
    about: str = ""
    evaluated_on: tuple[str, ...] = ()  # the domains whose benchmarks a cell trained here runs (empty: all)
    # dfpo train settings of this domain's cells that change memory, not what is computed (e.g. micro-batches)
    settings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scale:
    """A model, its domains, and the budget every cell shares."""

    def peers(self, domain: str) -> tuple[str, ...]:
        """The domains whose benchmarks a cell trained on ``domain`` is evaluated on (ID first)."""
        chosen = self.domains[domain].evaluated_on or tuple(self.domains)
        return (domain, *(d for d in chosen if d != domain))

    model: str
    hidden_size: int
    domains: dict[str, Domain]
    train: tuple[str, ...]  # default training domains
    settings: tuple[str, ...]  # dfpo train settings shared by every cell
    steps: int
    eval_limit: int
    checkpoint_every: int
    eval_batch: int = 64  # prompts per greedy generate call when a cell is evaluated
    # held-out accuracy on the training domain's eval split every this many steps (the stability figures)
    eval_every: int = 5
    about: str = ""


def _arithmetic_domain(name: str, operator: str, about: str) -> Domain:
    # 2-4 terms: prompts of widely different difficulty whose difficulty the tiny model's features show
    # (benchmarks/value_probe.py, 400 prompts x 4 samples: between-prompt share of the reward's variance 0.57 for
    # additions, 0.32 for subtractions; a ridge probe at the first response token 0.33 and 0.16, where 2-3 terms
    # gave 0.33 / 0.08 and 0.31 / 0.02). eval_size 1000: about 330 problems of each length, never in training.
    options = {"prompt_style": "terse", "operators": operator, "min_terms": 2, "max_terms": 4, "eval_size": 1000}
    benchmarks = tuple(
        Benchmark(f"{name}-{terms}", "arithmetic", options, "eval", ("terms", terms)) for terms in (2, 3, 4)
    )
    return Domain(name, "arithmetic", options, benchmarks, 64, about=about)


# each operand has 1 or 2 digits, evenly: prompts of different difficulty for SmolLM2, 53% of its reward variance
# between prompts against 34% with 2-digit operands only (benchmarks/value_probe.py, 100 prompts x 4 samples). The
# 100 sums of two 1-digit numbers nearly all fall in the eval split (problems never repeat), so training, and the
# add-2digit benchmark, hold sums with at least one 2-digit operand.
_SMOLLM2_MATH = {
    "min_terms": 2,
    "max_terms": 2,
    "digits": 2,
    "min_digits": 1,
    "operators": "+",
    "few_shot": 3,
    "train_size": 5000,
    "eval_size": 1000,
}
_SCIENCE = ("sciq", "arc_easy", "arc_challenge", "openbookqa")

SCALES: dict[str, Scale] = {
    "tiny": Scale(
        model="tiny",
        hidden_size=128,
        domains={
            "add": _arithmetic_domain("add", "+", "2-4 term chains of 2-digit additions, worked steps"),
            "sub": _arithmetic_domain("sub", "-", "2-4 term chains of 2-digit subtractions, worked steps"),
        },
        train=("add", "sub"),
        # every critic on its own copy of the model: on the add domain a head on the policy's frozen features
        # explained 0.03 (PPO) and 0.07 (DFPO) of the return's variance over the last 10 of 40 steps, a separate
        # trunk 0.33 and 0.38, 0.95-0.97 of a ridge probe on its features; with 4 critic steps instead of the
        # default 16 it fell to 0.15 and 0.09 (results/2026-12-02-critic-learning-add)
        settings=("rollout.prompts=8", "rollout.samples=4", "critic.backbone=separate"),
        steps=40,
        eval_limit=200,
        checkpoint_every=20,
        eval_batch=200,  # one generate call per benchmark: 1.6x faster than batches of 64 on the tiny model
        about="the embedded 0.87M-parameter tiny model; the default grid is 168 cells (7 algorithms x 4 kinds of "
        "supervision x 3 seeds x 2 domains), and tune= with two rates adds 28 cells",
    ),
    "smollm2": Scale(
        model="smollm2",
        hidden_size=576,
        domains={
            "math": Domain(
                "math",
                "arithmetic",
                _SMOLLM2_MATH,
                (
                    Benchmark("add-2digit", "arithmetic", _SMOLLM2_MATH, "eval", ("digits", 2), 48),
                    Benchmark("gsm8k", "math", {"few_shot": 3}, "gsm8k", None, 160),
                ),
                48,
                about="sums of two numbers of 1 or 2 digits (at least one of 2) with three worked examples; GSM8K",
                evaluated_on=("math", "science"),
            ),
            "science": Domain(
                "science",
                "science",
                {"few_shot": 3},
                tuple(Benchmark(b, "science", {"few_shot": 3}, "eval", ("benchmark", b), 48) for b in _SCIENCE),
                48,
                about="SciQ, ARC-Easy, ARC-Challenge, OpenBookQA multiple choice, three examples in the prompt",
                evaluated_on=("science", "math"),
            ),
            "dialogue": Domain(
                "dialogue",
                "dialogue",
                {},
                (Benchmark("coqa", "dialogue", {}, "eval", None, 48),),
                48,
                noise=("reward_model",),
                about="CoQA, trained on a learned reward model, evaluated by F1",
                evaluated_on=("dialogue",),
                # CoQA prompts hold a whole passage (490 tokens on average, up to 1,170): the backward of 32 of them at
                # once keeps attention activations beyond 24 GiB, so one prompt's 4 samples go through at a time
                # (accumulated micro-batches give the same gradient)
                settings=("actor.micro_batch=4",),
            ),
        },
        train=("math", "science"),
        settings=(
            "rollout.prompts=8",
            "rollout.samples=4",
            "actor.lr=2e-6",
            "critic.samples=32",
            "critic.width=128",
        ),
        steps=20,
        eval_limit=100,
        checkpoint_every=5,
        about="SmolLM2-135M-Instruct; a reduced grid that runs in the background over a few hours",
    ),
}

MAIN_ALGOS = ("dfpo", "ppo", "grpo", "reinforce_pp", "dvpo", "flowrl", "robust_ppo")


@dataclass(frozen=True)
class Ablation:
    algo: str
    settings: tuple[str, ...]
    about: str
    # a critic kind sized to the flow head's parameter count (see equal_parameter_width), or None
    equal_width: str | None = None


ABLATIONS: dict[str, Ablation] = {
    "euler2": Ablation("dfpo", ("critic.sample_steps=2",), "2 Euler steps from noise to a return sample"),
    "euler4": Ablation("dfpo", ("critic.sample_steps=4",), "4 Euler steps"),
    "euler8": Ablation("dfpo", ("critic.sample_steps=8",), "8 Euler steps"),
    "no_risk": Ablation("dfpo", ("critic.risk_weight=0",), "without the risk terms (CVaR, upper-tail gain, shape)"),
    "no_consistency": Ablation("dfpo", ("critic.flow.consistency=none",), "without geometric consistency"),
    "uweight_off": Ablation("dfpo", ("critic.flow.uncertainty_weight=none",), "uncertainty weight off"),
    "uweight_inverse": Ablation("dfpo", ("critic.flow.uncertainty_weight=inverse",), "uncertainty weight inverted"),
    # the coupling pairs noise with targets in the flow-matching term, which DFPO's defaults leave off (on one
    # trajectory's targets a single Euler step of it lands on the mean): the coupling ablation needs it on
    "cfm": Ablation("dfpo", ("critic.flow.cfm_weight=1",), "the conditional flow-matching term on (sorted coupling)"),
    "independent": Ablation(
        "dfpo",
        ("critic.flow.cfm_weight=1", "critic.flow.coupling=independent"),
        "the flow-matching term on with independent noise-target coupling (against cfm: the coupling's effect)",
    ),
    "k8": Ablation("dfpo", ("critic.samples=8",), "K = 8 return samples"),
    "k32": Ablation("dfpo", ("critic.samples=32",), "K = 32 return samples"),
    "k64": Ablation("dfpo", ("critic.samples=64",), "K = 64 return samples"),
    "dvpo_equal": Ablation("dvpo", (), "DVPO's quantile head sized to the flow head's parameter count", "quantile"),
    "ppo_equal": Ablation(
        "ppo",
        (),
        "PPO's scalar head sized to the flow head's parameter count: a bigger head without a distribution",
        "scalar",
    ),
}


def _critic_width(settings: list[str]) -> int:
    from dfpo.training.config import CriticOptions

    widths = [s.split("=", 1)[1] for s in settings if s.startswith("critic.width=")]
    return int(widths[-1]) if widths else CriticOptions().width


def equal_parameter_width(hidden_size: int, flow_width: int, kind: str = "quantile") -> int:
    """The width at which a ``kind`` critic (``quantile``: DVPO's 3 heads x 200 quantiles; ``scalar``: PPO's
    value head) has the parameter count closest to the flow critic's at ``flow_width``."""
    from dfpo.critics.quantile import QuantileCritic
    from dfpo.critics.scalar import ScalarCritic
    from dfpo.critics.value_flow import ValueFlowCritic

    def count(module: Any) -> int:
        return sum(p.numel() for p in module.parameters())

    make = {
        "quantile": lambda w: QuantileCritic(hidden_size, 200, 3, w),
        "scalar": lambda w: ScalarCritic(hidden_size, width=w),
    }[kind]
    target = count(ValueFlowCritic(hidden_size, flow_width))
    return min(range(1, 8 * flow_width + 1), key=lambda w: abs(count(make(w)) - target))


def variant_settings(scale: Scale, variant: str, shared: list[str]) -> tuple[str, list[str]]:
    """``(algo, settings)`` of a variant: an algorithm as it is, or a DFPO ablation."""
    from dfpo.training.algos import ALGOS

    if variant in ALGOS:
        return variant, []
    if variant not in ABLATIONS:
        raise ConfigError(
            f"unknown variant {variant!r}: algorithms {', '.join(ALGOS)}; ablations {', '.join(ABLATIONS)}"
        )
    ablation = ABLATIONS[variant]
    settings = list(ablation.settings)
    if ablation.equal_width:
        width = equal_parameter_width(scale.hidden_size, _critic_width(shared), ablation.equal_width)
        settings.append(f"critic.width={width}")
    return ablation.algo, settings


# -- the command's configuration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoisyConfig:
    """``dfpo bench noisy [key=value ...]``: algorithms x supervision x seeds, trained per domain, evaluated in and
    out of domain; resumable."""

    scale: str = option("tiny", "tiny or smollm2: the model, its domains and the budget every cell shares")
    algos: str = option(",".join(MAIN_ALGOS), "comma-separated algorithms (dfpo list shows them)")
    ablations: str = option("", f"comma-separated DFPO ablations, or 'all': {', '.join(ABLATIONS)}")
    noise: str = option("clean,flip(0.2),flip(0.4),pseudo_label(8)", "comma-separated training supervision")
    seeds: str = option("0,1,2", "comma-separated seeds")
    train: str = option("", "comma-separated training domains (empty: the scale's cross-domain pair)")
    steps: int = option(0, "training steps of every cell (0: the scale's default)")
    eval_limit: int = option(0, "examples per benchmark (0: the scale's default)")
    eval_every: int = option(
        -1,
        "held-out accuracy on the training domain every this many steps, for the stability figures (-1: the "
        "scale's default, 0: none)",
    )
    settings: str = option("", "more dfpo train settings for every cell, space-separated: 'rollout.prompts=16'")
    tune: str = option("", "actor learning rates each variant picks from (on its tuning seed, clean rewards)")
    tune_seed: int = option(1000, "seed of the tuning cells (kept apart from the evaluation seeds)")
    workers: int = option(1, "cells run at once, each in its own process")
    threads: int = option(0, "torch threads per cell (0: the machine's cores shared among the workers)")
    out: str = option("", "results folder (default results/<date>-noisy-<scale>); run again to resume")
    report_only: bool = option(False, "only rebuild cells.csv, summary.md and the plots from the finished cells")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass
class Cell:
    """One training run and its evaluation: ``domain/variant/noise/seed`` (or the untrained ``base`` model)."""

    domain: str
    variant: str
    noise: str
    seed: int
    algo: str = ""
    tuning: bool = False
    lr: str | None = None  # the actor learning rate a tuning cell tries, or the one tuning chose

    @property
    def id(self) -> str:
        if self.variant == "base":
            return "base"
        if self.tuning:
            return f"tune-{self.domain}-{self.variant}-lr{self.lr}-seed{self.seed}"
        return f"{self.domain}-{self.variant}-{self.noise}-seed{self.seed}".replace("(", "").replace(")", "")


def _grid_cells(config: NoisyConfig, scale: Scale) -> tuple[list[str], list[Cell]]:
    """The variants and the grid's cells (without tuning), ordered seed by seed so a partial grid is balanced."""
    from dfpo.training.algos import ALGOS

    algos = _split(config.algos)
    ablations = list(ABLATIONS) if config.ablations.strip() == "all" else _split(config.ablations)
    for name in algos:
        if name not in ALGOS:
            raise ConfigError(f"algos: unknown algorithm {name!r}; valid: {', '.join(ALGOS)}")
    for name in ablations:
        if name not in ABLATIONS:
            raise ConfigError(f"ablations: unknown ablation {name!r}; valid: {', '.join(ABLATIONS)} or all")
    variants = algos + ablations
    if not variants:
        raise ConfigError("give at least one algorithm (algos=) or ablation (ablations=)")
    domains = _split(config.train) or list(scale.train)
    for name in domains:
        if name not in scale.domains:
            raise ConfigError(
                f"train: scale {config.scale!r} has no domain {name!r}; it has {', '.join(scale.domains)}"
            )
    try:
        seeds = [int(s) for s in _split(config.seeds)]
    except ValueError:
        raise ConfigError(f"seeds={config.seeds!r}: give comma-separated integers, e.g. seeds=0,1,2") from None
    noises = _split(config.noise)
    if not seeds or not noises:
        raise ConfigError("give at least one seed (seeds=) and one kind of supervision (noise=)")
    from dfpo.tasks.noise import make_noise

    for spec in noises:
        try:
            make_noise(spec)
        except ValueError as error:
            raise ConfigError(f"noise: {spec!r}: {error}") from None
    cells = [
        Cell(domain, variant, noise, seed)
        for seed in seeds
        for domain in domains
        for noise in (scale.domains[domain].noise or noises)
        for variant in variants
    ]
    return variants, cells


# -- one cell, in its own process -------------------------------------------------------------------------------


def _benchmark_task(benchmark: Benchmark, model: str) -> Any:
    import dfpo.tasks as tasks
    from dfpo.tasks.presets import task_options_for

    return tasks.get(benchmark.task, **task_options_for(model, benchmark.task, benchmark.options))


def _benchmark_examples(task: Any, benchmark: Benchmark, limit: int) -> list[dict[str, Any]]:
    examples = task.examples(benchmark.split)
    if benchmark.where is not None:
        key, value = benchmark.where
        examples = [e for e in examples if e.get(key) == value]
    return examples[:limit]


def evaluate_benchmarks(
    model: Any, tokenizer: Any, scale: Scale, limit: int, domains: tuple[str, ...] | None = None
) -> dict[str, dict[str, Any]]:
    """Greedy accuracy of ``model`` on every benchmark of ``domains`` (default: every domain of ``scale``)."""
    from dfpo.evaluate import evaluate

    results: dict[str, dict[str, Any]] = {}
    model.eval()
    for name in domains or tuple(scale.domains):
        domain = scale.domains[name]
        for benchmark in domain.benchmarks:
            task = _benchmark_task(benchmark, scale.model)
            examples = _benchmark_examples(task, benchmark, limit)
            r = evaluate(
                model, tokenizer, task, benchmark.split, None, benchmark.max_new_tokens, scale.eval_batch, examples
            )
            r.pop("sample")
            results[benchmark.name] = {"domain": domain.name, **r}
    return results


CURVE_KEYS = (
    "reward/true", "reward/observed", "reward/noise_rate", "reward/signal_share", "reward/prompt_share",
    "reward/pseudo_label_accuracy",
    "critic/explained_var", "kl/k3", "response_length/mean", "perf/step_s",
)  # fmt: skip


def heldout_curve(evals: dict[str, Any]) -> list[dict[str, float]]:
    """``[{step, accuracy}]``: the trainer's held-out accuracy before training (step 0) and at each evaluation."""
    points = []
    if "eval" in evals.get("before", {}):
        points.append({"step": 0, "accuracy": evals["before"]["eval"]["accuracy"]})
    points += [{"step": h["step"], "accuracy": h["eval"]["accuracy"]} for h in evals.get("history", []) if "eval" in h]
    return points


def critic_fit(recorder: Any, steps: int) -> dict[str, Any]:
    """The critic's explained variance against the Monte-Carlo returns of the observed rewards over the last
    quarter of the steps, beside a ridge probe's held-out R^2 from the same features (fitted on the earlier steps):
    what the critic learned against what its features allow. A cell resumed late has too few steps in this
    process to say (``steps_seen`` only)."""
    from dfpo.experiments.critic_learning import analyse

    window = max(1, steps // 4)
    out: dict[str, Any] = {"steps_seen": len(recorder.steps), "window": window}
    if len(recorder.steps) > window:
        fit = analyse(recorder, window)
        out.update({k: fit[k] for k in ("explained_var", "probe_r2", "value_bias", "return_var") if k in fit})
    return out


def stability(curve: list[dict[str, float]]) -> dict[str, float]:
    """From a held-out accuracy curve: its start and end, the largest drop below the best accuracy reached so far,
    and whether it ended below its start (nan without a curve)."""
    if len(curve) < 2:
        return {"heldout_start": math.nan, "heldout_final": math.nan, "largest_drop": math.nan,
                "ended_below_start": math.nan}  # fmt: skip
    best, drop = -math.inf, 0.0
    for point in curve:
        best = max(best, point["accuracy"])
        drop = max(drop, best - point["accuracy"])
    start, final = curve[0]["accuracy"], curve[-1]["accuracy"]
    return {"heldout_start": start, "heldout_final": final, "largest_drop": drop,
            "ended_below_start": float(final < start)}  # fmt: skip


def _write_json(path: Path, data: Any) -> None:
    from dfpo.training.trainer import _write_json as write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data)


def run_cell(spec: dict[str, Any]) -> None:
    """Train one cell (continuing from its last checkpoint if there is one), evaluate it, write its JSON."""
    import torch

    from dfpo.experiments.critic_learning import Recorder
    from dfpo.models import load_model
    from dfpo.training import checkpoint as ckpt
    from dfpo.training.config import build_config
    from dfpo.training.report import read_metrics
    from dfpo.training.trainer import Trainer

    scale, start = SCALES[spec["scale"]], time.perf_counter()
    torch.set_num_threads(spec["threads"])
    record: dict[str, Any] = {k: spec[k] for k in ("id", "domain", "variant", "algo", "noise", "seed", "tuning")}
    run_dir = Path(spec["run_dir"])
    if spec["variant"] == "base":
        model, tokenizer = load_model(scale.model)
        curves: list[dict[str, Any]] = []
        record["settings"] = []
    else:
        resume = ["resume=auto"] if (run_dir / ckpt.LATEST).exists() else []
        config = build_config([*spec["settings"], f"run_dir={run_dir}", *resume])
        if spec["threads"]:
            config = dataclasses.replace(config, threads=spec["threads"])
        # signals=False: the grid stops its cells with SIGTERM and resumes them from their own checkpoints
        trainer = Trainer(config, command=f"dfpo bench noisy cell {spec['id']}", signals=False)
        record["resumed_from_step"] = trainer.step
        if trainer.hidden_size != scale.hidden_size:
            raise ConfigError(f"scale {spec['scale']}: expected hidden size {scale.hidden_size}")
        recorder = None
        if trainer.critic is not None:  # the critic's fit against a ridge probe on the same features
            recorder = Recorder(trainer.task, config.advantage.gamma)
            trainer.observers.append(recorder)
        evals = trainer.run()
        model, tokenizer = trainer.policy, trainer.tokenizer
        curves = [{k: m[k] for k in ("step", *CURVE_KEYS) if k in m} for m in read_metrics(run_dir)]
        record["settings"] = spec["settings"]
        record["heldout"] = heldout_curve(evals)
        if recorder is not None:
            record["critic_fit"] = critic_fit(recorder, config.steps)
    peers = None if spec["variant"] == "base" else scale.peers(spec["domain"])
    record["benchmarks"] = evaluate_benchmarks(model, tokenizer, scale, spec["eval_limit"], peers)
    record["curves"] = curves
    record["seconds"] = time.perf_counter() - start
    _write_json(Path(spec["out"]), record)
    # the cell's record is complete: its weights are not kept (metrics.jsonl and the run's report are)
    (run_dir / ckpt.LATEST).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


# -- the grid ----------------------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "code": _code_version(),
    }


def _code_version() -> str:
    """The git commit of the dfpo source that runs the grid ('+changes' if its tree differs), or its version."""
    from dfpo import __version__

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        changed = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."], capture_output=True,
                                 text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__} (git {commit}{'+changes' if changed else ''})"


def _budget(config: NoisyConfig, scale: Scale) -> dict[str, Any]:
    """What every cell shares; a results folder holds one budget (a different one needs another ``out``)."""
    return {
        "scale": config.scale,
        "steps": config.steps or scale.steps,
        "eval_limit": config.eval_limit or scale.eval_limit,
        "eval_every": scale.eval_every if config.eval_every < 0 else config.eval_every,
        "settings": [*scale.settings, *config.settings.split()],
        "tune": _split(config.tune),
        "tune_seed": config.tune_seed,
    }


def _cell_settings(scale: Scale, budget: dict[str, Any], cell: Cell) -> list[str]:
    domain = scale.domains[cell.domain]
    cell.algo, extra = variant_settings(scale, cell.variant, budget["settings"])
    return [
        f"algo={cell.algo}", f"model={scale.model}", f"task={domain.task}", f"noise={cell.noise}",
        f"seed={cell.seed}", f"steps={budget['steps']}", f"rollout.max_new_tokens={domain.max_new_tokens}",
        *(f"task_options.{k}={v}" for k, v in domain.options.items()), *_curve_settings(budget),
        "log.progress=false", "log.samples_every=0",
        f"checkpoint.every={scale.checkpoint_every}", "checkpoint.keep=1", "checkpoint.final=false",
        *domain.settings, *budget["settings"], *extra, *([f"actor.lr={cell.lr}"] if cell.lr else []),
    ]  # fmt: skip


def _curve_settings(budget: dict[str, Any]) -> list[str]:
    """The trainer's own held-out evaluation, greedy, on the training domain's eval split (before training and every
    ``eval_every`` steps): the accuracy curve of the stability figures."""
    every = budget.get("eval_every", 0)
    if not every:
        return ["eval.splits="]
    return ["eval.splits=eval", f"eval.every={every}", f"eval.limit={budget['eval_limit']}", "eval.samples=0"]


def _cell_process(spec: dict[str, Any], log: str) -> None:
    """A cell's process, forked from the fork server: its own session (so the grid can stop it with everything it
    started), its output in ``log``."""
    os.setsid()
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    run_cell(spec)
    sys.stdout.flush()
    sys.stderr.flush()


def _cell_context() -> Any:
    """Cells start from a fork server that has imported :mod:`dfpo.preload` (torch, transformers, the trainer):
    a fresh process per cell, without the seconds of imports each (about 9 s of a tiny cell's 80)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["dfpo.preload"])
    return context


class _Runner:
    """Runs cells in child processes, ``workers`` at a time, with a progress bar and ETA."""

    def __init__(self, out: Path, workers: int, total: int, done: int) -> None:
        from tqdm import tqdm

        self.out, self.workers = out, workers
        self.bar = tqdm(total=total, initial=done, desc="cells", unit="cell", file=sys.stderr, dynamic_ncols=True)
        self.running: dict[str, Any] = {}
        self.failed: list[str] = []
        self.lock = threading.Lock()
        self.stopping = False
        self.context = _cell_context()

    def _run(self, spec: dict[str, Any]) -> None:
        if self.stopping:
            return
        log = self.out / "logs" / f"{spec['id']}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        child = self.context.Process(target=_cell_process, args=(spec, str(log)), name=spec["id"])
        with self.lock:
            if self.stopping:
                return
            child.start()
            self.running[spec["id"]] = child
            self.bar.set_postfix_str(", ".join(self.running), refresh=True)
        child.join()
        code = child.exitcode
        with self.lock:
            self.running.pop(spec["id"], None)
            if code != 0 and not self.stopping:
                self.failed.append(f"{spec['id']} (exit {code}; log: {log})")
                self.bar.write(f"cell {spec['id']} failed (exit {code}); its log: {log}")
            elif code == 0:
                self.bar.update(1)
                log.unlink(missing_ok=True)  # the cell's record holds its results; logs are kept for failures
            self.bar.set_postfix_str(", ".join(self.running), refresh=True)

    def run(self, specs: list[dict[str, Any]]) -> None:
        pool = ThreadPoolExecutor(max_workers=self.workers)
        try:
            for future in [pool.submit(self._run, s) for s in specs]:
                while not future.done():
                    time.sleep(0.2)
                future.result()
        except KeyboardInterrupt:
            self.stopping = True
            with self.lock:
                for child in self.running.values():
                    try:
                        os.killpg(child.pid, signal.SIGTERM)
                    except ProcessLookupError:  # ended, or not yet in its own session
                        child.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            self.bar.close()
            raise
        pool.shutdown(wait=True)

    def close(self) -> None:
        self.bar.close()


def run_noisy(config: NoisyConfig, command: str) -> dict[str, Any]:
    if config.scale not in SCALES:
        raise ConfigError(f"scale={config.scale!r}: valid scales are {', '.join(SCALES)}")
    scale = SCALES[config.scale]
    out = Path(config.out or f"results/{datetime.date.today().isoformat()}-noisy-{config.scale}")
    if config.report_only:
        if not (out / "grid.json").exists():
            raise ConfigError(f"out={out}: no grid.json there (run the grid first, or point out= at its folder)")
        return write_report(out)
    if config.workers < 1:
        raise ConfigError(f"workers={config.workers}: must be at least 1")
    variants, cells = _grid_cells(config, scale)
    budget = _budget(config, scale)
    threads = config.threads or max(1, (os.cpu_count() or 1) // config.workers)

    def spec(cell: Cell) -> dict[str, Any]:
        settings = [] if cell.variant == "base" else _cell_settings(scale, budget, cell)
        return {
            "id": cell.id, "scale": config.scale, "domain": cell.domain, "variant": cell.variant, "algo": cell.algo,
            "noise": cell.noise, "seed": cell.seed, "tuning": cell.tuning, "lr": cell.lr, "settings": settings,
            "threads": threads, "eval_limit": budget["eval_limit"], "run_dir": str(out / "runs" / cell.id),
            "out": str(out / "cells" / f"{cell.id}.json"),
        }  # fmt: skip

    def pending(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s for s in specs if not Path(s["out"]).exists()]

    # tuning first: each variant's actor learning rate, picked by the true training reward of its last steps
    domains = sorted({c.domain for c in cells})
    tune_specs = [
        spec(Cell(domain, variant, "clean", config.tune_seed, tuning=True, lr=lr))
        for variant in variants
        for domain in domains
        for lr in budget["tune"]
    ]
    first = [spec(Cell("", "base", "", 0)), *tune_specs]
    _check_settings([*first[1:], *(spec(c) for c in cells)])

    grid_path = out / "grid.json"
    if grid_path.exists():
        grid = json.loads(grid_path.read_text())
        if grid["budget"] != budget:
            raise ConfigError(
                f"out={out} holds a grid with another budget ({grid['budget']}); give the same scale, steps, "
                "eval_limit, settings and tune to resume it, or choose another out"
            )
        grid["commands"] = [*grid.get("commands", []), command]
    else:
        grid = {"commands": [command], "budget": budget, "machine": _machine(), "started": time.time()}
    grid["variants"] = sorted(set(grid.get("variants", [])) | set(variants))
    _write_json(grid_path, grid)
    main_ids = [out / "cells" / f"{c.id}.json" for c in cells]
    total = len(first) + len(cells)
    done = total - len(pending(first)) - sum(not p.exists() for p in main_ids)
    runner = _Runner(out, config.workers, total, done)
    session = {"command": command, "workers": config.workers, "started": time.time(), "cells_before": done}
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the grid as Ctrl-C does: cells are kept
    try:
        runner.run(pending(first))
        if budget["tune"]:
            chosen = _chosen_lrs(tune_specs)
            _write_json(out / "tuning.json", {f"{v}/{d}": lr for (v, d), lr in chosen.items()})
            for c in cells:
                c.lr = chosen[(c.variant, c.domain)]
        runner.run(pending([spec(c) for c in cells]))
    except KeyboardInterrupt:
        print(f"\nnoisy: interrupted; finished cells are kept in {out}/cells: run the same command to resume",
              file=sys.stderr)  # fmt: skip
        raise
    finally:
        runner.close()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
        # each invocation's wall time, so that the grid's is on record however many times it was resumed
        session.update(finished=time.time(), cells_after=runner.bar.n)
        grid["sessions"] = [*grid.get("sessions", []), session]
        _write_json(grid_path, grid)
    report = write_report(out)
    if runner.failed:
        raise CellFailed(
            f"{len(runner.failed)} cell(s) failed: {'; '.join(runner.failed)}. The other cells' results are in {out}; "
            "fix the cause shown in the log and run the same command again to run only what is missing"
        )
    return report


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class CellFailed(RuntimeError):
    """A grid cell's process ended with an error (its log names it)."""


def _check_settings(specs: list[dict[str, Any]]) -> None:
    """Every cell's ``dfpo train`` settings, checked before any cell runs."""
    from dfpo.training.config import build_config

    seen = set()
    for s in specs:
        key = tuple(x for x in s["settings"] if not x.startswith(("seed=", "noise=")))
        if key in seen:
            continue
        seen.add(key)
        try:
            build_config(s["settings"])
        except ConfigError as error:
            raise ConfigError(f"cell {s['id']}: {error}") from None


def _chosen_lrs(tune_specs: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """Per (variant, domain), the learning rate whose tuning run ended with the highest true training reward."""
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for s in tune_specs:
        path = Path(s["out"])
        if not path.exists():
            raise CellFailed(f"tuning cell {s['id']} did not finish: run the same command again")
        score = _final_true_reward(json.loads(path.read_text()))
        key = (s["variant"], s["domain"])
        if key not in best or score > best[key][0]:
            best[key] = (score, s["lr"])
    return {k: lr for k, (_, lr) in best.items()}


def _final_true_reward(record: dict[str, Any], last: int = 10) -> float:
    curve = [c["reward/true"] for c in record["curves"]][-last:]
    return sum(curve) / len(curve) if curve else float("nan")


# -- the report ----------------------------------------------------------------------------------------------------


def _load_cells(out: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    base, cells = None, []
    for path in sorted((out / "cells").glob("*.json")):
        record = json.loads(path.read_text())
        if record["variant"] == "base":
            base = record
        elif not record.get("tuning"):
            cells.append(record)
    return base, cells


def _averages(record: dict[str, Any], domain: str, scale: Scale) -> dict[str, float]:
    """ID, OOD and ALL averages of a cell's benchmark accuracies: ID the benchmarks of ``domain``, OOD those of
    the other domains it is evaluated on."""
    peers = scale.peers(domain)
    scores = {n: r["accuracy"] for n, r in record["benchmarks"].items() if r["domain"] in peers}
    in_domain = [v for n, v in scores.items() if record["benchmarks"][n]["domain"] == domain]
    out_domain = [v for n, v in scores.items() if record["benchmarks"][n]["domain"] != domain]

    def avg(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    return {"ID AVG": avg(in_domain), "OOD AVG": avg(out_domain), "ALL AVG": avg(list(scores.values()))}


def _tail_means(record: dict[str, Any], keys: tuple[str, ...], fraction: float = 0.25) -> list[float]:
    """Means of curve ``keys`` over the last ``fraction`` of the steps (nan when a key was never logged)."""
    curve = record["curves"]
    tail = curve[-max(1, int(len(curve) * fraction)) :]
    out = []
    for key in keys:
        values = [c[key] for c in tail if key in c]
        out.append(sum(values) / len(values) if values else float("nan"))
    return out


EV_KEYS = ("critic/explained_var", "reward/prompt_share", "reward/signal_share")


def write_report(out: Path) -> dict[str, Any]:
    """``cells.csv``, ``summary.md`` and the plots from the finished cells in ``out``."""
    grid = json.loads((out / "grid.json").read_text())
    scale = SCALES[grid["budget"]["scale"]]
    base, cells = _load_cells(out)
    benchmarks = [b.name for d in scale.domains.values() for b in d.benchmarks]
    rows = []
    for r in cells:
        ev, prompt_share, ceiling = _tail_means(r, EV_KEYS)
        fit = r.get("critic_fit", {})
        rows.append({
            "domain": r["domain"], "variant": r["variant"], "algo": r["algo"], "noise": r["noise"], "seed": r["seed"],
            **{b: r["benchmarks"][b]["accuracy"] for b in benchmarks if b in r["benchmarks"]},
            **_averages(r, r["domain"], scale), "final_true_reward": _final_true_reward(r),
            "critic_explained_var": ev, "prompt_share": prompt_share, "explained_var_ceiling": ceiling,
            # against the Monte-Carlo returns, beside a ridge probe on the critic's features (cells that record it)
            "critic_mc_explained_var": fit.get("explained_var", math.nan), "probe_r2": fit.get("probe_r2", math.nan),
            **stability(r.get("heldout", [])), "seconds": r["seconds"],
        })  # fmt: skip
    _write_csv(out / "cells.csv", rows)
    lines = _summary(grid, scale, base, rows, benchmarks, cells)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    if rows:
        _plot_curves(out, cells)
        _plot_accuracy(out, rows, base, scale)
    return {"cells": len(rows), "out": str(out)}


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _sessions_line(grid: dict[str, Any]) -> list[str]:
    sessions = grid.get("sessions", [])
    if not sessions:
        return []
    wall = sum(x["finished"] - x["started"] for x in sessions)
    parts = ", ".join(f"{x['cells_after'] - x['cells_before']} cells in {(x['finished'] - x['started']) / 60:.0f} min "
                      f"({x['workers']} at a time)" for x in sessions)  # fmt: skip
    return [f"Wall time of the grid: {wall / 3600:.2f} hours over {len(sessions)} invocation(s): {parts}."]


def _domain_settings_line(scale: Scale, records: list[dict[str, Any]]) -> list[str]:
    """The memory settings of each trained domain as its cells ran them (the last value of a key wins, as in
    ``dfpo train``); nothing when no trained domain has any."""
    parts = []
    for domain in dict.fromkeys(r["domain"] for r in records):
        keys = [s.split("=", 1)[0] + "=" for s in scale.domains[domain].settings]
        ran = set()
        for r in (r for r in records if r["domain"] == domain):
            last = {key: s for s in r["settings"] for key in keys if s.startswith(key)}
            ran.add(" ".join(last[key] for key in keys if key in last))
        ran.discard("")
        if ran:
            parts.append(f"{domain} `{'` or `'.join(sorted(ran))}`")
    if not parts:
        return []
    return [f"Memory settings of a domain's cells (the same gradient in less memory): {'; '.join(parts)}."]


def _commands(commands: list[str]) -> str:
    """Each distinct command once, in first-run order, and how often the grid was invoked when it was resumed."""
    distinct = list(dict.fromkeys(commands))
    text = "; ".join(f"`{c}`" for c in distinct)
    return text if len(commands) == len(distinct) else f"{text} ({len(commands)} invocations: resumed)"


def _ordered(values: list[str], order: list[str]) -> list[str]:
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


def _summary(
    grid: dict[str, Any],
    scale: Scale,
    base: dict[str, Any] | None,
    rows: list[dict[str, Any]],
    benchmarks: list[str],
    records: list[dict[str, Any]],
) -> list[str]:
    b, m = grid["budget"], grid["machine"]
    seconds = sum(r["seconds"] for r in rows)
    lines = [
        f"# Noisy-supervision benchmark: {b['scale']} ({scale.model})", "",
        f"Commands: {_commands(grid['commands'])}", "",
        f"Budget of every cell: {b['steps']} steps, settings `{' '.join(b['settings'])}`; {b['eval_limit']} "
        "examples per benchmark, greedy. Accuracy in %, mean ± half-width of the 95% Student-t interval over seeds.",
        f"Machine: {m['platform']}, {m['processor']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}; dfpo {m.get('code', 'version not recorded')}. "
        f"Wall time of the finished cells: {seconds / 3600:.2f} hours of cell "
        f"processes ({len(rows)} cell{'' if len(rows) == 1 else 's'}, base and tuning cells not counted).",
        *_sessions_line(grid),
        *_domain_settings_line(scale, records),
        "",
    ]  # fmt: skip
    if b["tune"]:
        lines += [
            f"Tuning: each variant's actor lr from {', '.join(b['tune'])} on seed {b['tune_seed']}, clean "
            "rewards, by the true training reward of the last 10 steps (tuning.json has the picks).",
            "",
        ]
    else:
        lines += ["Tuning: none; every variant runs with the same shared settings and its own published defaults.", ""]
    variants = _ordered(sorted({r["variant"] for r in rows}), [*MAIN_ALGOS, *ABLATIONS])
    noises = _ordered(sorted({r["noise"] for r in rows}), ["clean", "flip(0.2)", "flip(0.4)", "pseudo_label(8)"])
    if base is not None:
        start = {n: base["benchmarks"][n]["accuracy"] for n in benchmarks if n in base["benchmarks"]}
        lines += ["Starting model: " + ", ".join(f"{n} {fixed(100 * v)}" for n, v in start.items()), ""]
    for domain in _ordered(sorted({r["domain"] for r in rows}), list(scale.domains)):
        for noise in noises:
            group = [r for r in rows if r["domain"] == domain and r["noise"] == noise]
            if not group:
                continue
            evaluated = [b.name for d in scale.peers(domain) for b in scale.domains[d].benchmarks]
            columns = [*evaluated, "ID AVG", "OOD AVG", "ALL AVG"]
            lines += [f"## Trained on {domain}, supervision {noise}", "",
                      "| variant | seeds | " + " | ".join(columns) + " | final true reward |",
                      "|---|---|" + "---|" * (len(columns) + 1)]  # fmt: skip
            if base is not None:
                start_row = {
                    **{n: v["accuracy"] for n, v in base["benchmarks"].items()},
                    **_averages(base, domain, scale),
                }
                shown = [fixed(100 * start_row[c]) if not math.isnan(start_row.get(c, math.nan)) else "-"
                         for c in columns]  # fmt: skip
                lines.append("| starting model | - | " + " | ".join(shown) + " | - |")
            for variant in variants:
                chosen = [r for r in group if r["variant"] == variant]
                if chosen:
                    cells = [mean_interval([r[c] for r in chosen if not math.isnan(r.get(c, math.nan))]).show()
                             for c in [*columns, "final_true_reward"]]  # fmt: skip
                    lines.append(f"| {variant} | {len(chosen)} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += _paired_section(rows, variants)
    if base is not None:
        lines += _stability_section(base, scale, rows, variants, noises)
    lines += _critic_section(rows, variants, noises)
    return lines


def _stability_section(
    base: dict[str, Any],
    scale: Scale,
    rows: list[dict[str, Any]],
    variants: list[str],
    noises: list[str],
    drop: float = 0.05,
) -> list[str]:
    """Change of the in-domain average from the starting model, and how many cells fell by more than ``drop``."""
    lines = ["## Stability: in-domain average against the starting model", "",
             f"Each entry: mean change of ID AVG from the starting model in points, over seeds and domains, and the "
             f"cells that fell by more than {drop * 100:.0f} points (collapses) out of all.", "",
             "| variant | " + " | ".join(noises) + " |", "|---|" + "---|" * len(noises)]  # fmt: skip
    start = {d: _averages(base, d, scale)["ID AVG"] for d in {r["domain"] for r in rows}}
    for variant in variants:
        shown = []
        for noise in noises:
            changes = [
                r["ID AVG"] - start[r["domain"]] for r in rows if r["variant"] == variant and r["noise"] == noise
            ]
            if not changes:
                shown.append("-")
                continue
            fell = sum(c < -drop for c in changes)
            shown.append(f"{fixed(100 * sum(changes) / len(changes), sign=True)} ({fell}/{len(changes)})")
        lines.append(f"| {variant} | " + " | ".join(shown) + " |")
    lines.append("")
    if any(not math.isnan(r["largest_drop"]) for r in rows):
        lines += ["During training (the trainer's greedy held-out accuracy on the training domain, before training "
                  "and every few steps): the largest drop below the best accuracy reached so far, in points (mean "
                  "over cells), and the cells that ended below their start, out of all.", "",
                  "| variant | " + " | ".join(noises) + " |", "|---|" + "---|" * len(noises)]  # fmt: skip
        for variant in variants:
            shown = []
            for noise in noises:
                group = [r for r in rows if r["variant"] == variant and r["noise"] == noise
                         and not math.isnan(r["largest_drop"])]  # fmt: skip
                if not group:
                    shown.append("-")
                    continue
                drop_mean = 100 * sum(r["largest_drop"] for r in group) / len(group)
                below = sum(int(r["ended_below_start"]) for r in group)
                shown.append(f"{fixed(drop_mean)} ({below}/{len(group)})")
            lines.append(f"| {variant} | " + " | ".join(shown) + " |")
        lines.append("")
    lines += ["Spread of the final true training reward (mean of the last 10 steps) across seeds: the standard "
              "deviation over seeds in points, averaged over the training domains.", "",
              "| variant | " + " | ".join(noises) + " |", "|---|" + "---|" * len(noises)]  # fmt: skip
    for variant in variants:
        shown = []
        for noise in noises:
            spreads = []
            for domain in sorted({r["domain"] for r in rows}):
                finals = [r["final_true_reward"] for r in rows
                          if (r["variant"], r["noise"], r["domain"]) == (variant, noise, domain)]  # fmt: skip
                if len(finals) >= 2:
                    spreads.append(statistics.stdev(finals))
            shown.append(fixed(100 * sum(spreads) / len(spreads)) if spreads else "-")
        lines.append(f"| {variant} | " + " | ".join(shown) + " |")
    return [*lines, ""]


def _paired_section(rows: list[dict[str, Any]], variants: list[str]) -> list[str]:
    if "dfpo" not in variants:
        return []
    lines = [
        "## DFPO against each variant, paired by domain, supervision and seed",
        "",
        "Difference DFPO - variant in points (mean ± 95% interval over the pairs), and the pairs DFPO won / "
        "tied (within 0.5 points) / lost.",
        "",
        "| variant | pairs | ID AVG | OOD AVG | ALL AVG | ALL AVG won / tied / lost |",
        "|---|---|---|---|---|---|",
    ]
    key = lambda r: (r["domain"], r["noise"], r["seed"])  # noqa: E731
    dfpo = {key(r): r for r in rows if r["variant"] == "dfpo"}
    for variant in variants:
        if variant == "dfpo":
            continue
        pairs = [(dfpo[key(r)], r) for r in rows if r["variant"] == variant and key(r) in dfpo]
        if not pairs:
            continue
        shown = []
        for column in ("ID AVG", "OOD AVG", "ALL AVG"):
            usable = [(a[column], b[column]) for a, b in pairs if not (math.isnan(a[column]) or math.isnan(b[column]))]
            result = paired([a for a, _ in usable], [b for _, b in usable], tie=0.005)
            shown.append(result.difference.show() if usable else "-")
        overall = paired([a["ALL AVG"] for a, _ in pairs], [b["ALL AVG"] for _, b in pairs], tie=0.005)
        lines.append(f"| {variant} | {len(pairs)} | " + " | ".join(shown)
                     + f" | {overall.wins} / {overall.ties} / {overall.losses} |")  # fmt: skip
    noises = _ordered(sorted({r["noise"] for r in rows}), ["clean", "flip(0.2)", "flip(0.4)", "pseudo_label(8)"])
    lines += ["", "The same difference on ALL AVG under each supervision (pairs over domains and seeds):", "",
              "| variant | " + " | ".join(noises) + " |", "|---|" + "---|" * len(noises)]  # fmt: skip
    for variant in variants:
        if variant == "dfpo":
            continue
        shown = []
        for noise in noises:
            pairs = [(dfpo[key(r)], r) for r in rows if r["variant"] == variant and r["noise"] == noise
                     and key(r) in dfpo]  # fmt: skip
            result = paired([a["ALL AVG"] for a, _ in pairs], [b["ALL AVG"] for _, b in pairs], tie=0.005)
            shown.append(f"{result.difference.show()} ({len(pairs)})" if pairs else "-")
        if any(x != "-" for x in shown):
            lines.append(f"| {variant} | " + " | ".join(shown) + " |")
    return [*lines, ""]


def _critic_section(rows: list[dict[str, Any]], variants: list[str], noises: list[str]) -> list[str]:
    with_critic = [v for v in variants if any(not math.isnan(r["critic_explained_var"]) for r in rows
                                              if r["variant"] == v)]  # fmt: skip
    if not with_critic:
        return []
    lines = ["## Critic explained variance against what there is to explain", "",
             "Each entry: the critic's explained variance / a ridge probe's R^2 / the prompt share / the ceiling, "
             "means over the last quarter of the steps, the seeds and the domains. The explained variance is "
             "against the Monte-Carlo returns of the observed rewards (against the critic's own targets in cells "
             "that did not record it); the probe is a ridge regression from the critic's own features to the same "
             "returns, fitted on the earlier steps of the same cell: what those features allow ('-' where not "
             "recorded). The ceiling is the share of the observed reward's "
             "variance that the true reward explains (`reward/signal_share`; for flips at rate p, "
             "(1 - 2p)^2 Var(true) / Var(observed)): what a critic that knew whether each response is right could "
             "explain at its last token. The prompt share is the part between prompts (`reward/prompt_share`): what "
             "knowing only the prompt's success rate could explain at the first token.", "",
             *(["Under `reward_model` the observed reward is a learned reward model's score, a deterministic "
                "function of the prompt and response: a critic could explain all of it at the last token; the ceiling "
                "column there is how much of it the true score explains (how closely the reward model tracks it), "
                "not a bound.", ""]
               if "reward_model" in noises else []),
             "| variant | " + " | ".join(noises) + " |", "|---|" + "---|" * len(noises)]  # fmt: skip
    for variant in with_critic:
        shown = []
        for noise in noises:
            group = [r for r in rows if r["variant"] == variant and r["noise"] == noise]
            ev = _nan_mean(group, "critic_mc_explained_var")
            if math.isnan(ev):  # cells that did not record the fit: against the critic's own targets
                ev = _nan_mean(group, "critic_explained_var")
            means = [ev, *(_nan_mean(group, k) for k in ("probe_r2", "prompt_share", "explained_var_ceiling"))]
            shown.append(" / ".join("-" if math.isnan(m) else fixed(m, 3) for m in means) if group else "-")
        lines.append(f"| {variant} | " + " | ".join(shown) + " |")
    return [*lines, ""]


def _nan_mean(rows: list[dict[str, Any]], key: str) -> float:
    """Mean of ``key`` over the rows that have it (nan when none does)."""
    values = [r[key] for r in rows if not math.isnan(r[key])]
    return sum(values) / len(values) if values else math.nan


def _colors(variants: list[str]) -> dict[str, Any]:
    """One distinct colour per variant (matplotlib's 10-colour cycle repeats beyond ten)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(variants) <= 10 else "tab20"]
    return {v: cmap(i % cmap.N) for i, v in enumerate(variants)}


def _legend_beside(ax: Any) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90, bbox_inches="tight")  # "tight" keeps a legend placed beside the axes
    plt.close(fig)
    os.replace(tmp, path)


def _plot_curves(out: Path, cells: list[dict[str, Any]]) -> None:
    """Per training domain: the true training reward against the step, per supervision, mean and min-max band
    over seeds (5-step moving mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dfpo.training.report import _smooth

    for domain in sorted({c["domain"] for c in cells}):
        mine = [c for c in cells if c["domain"] == domain and c["curves"]]
        noises = _ordered(sorted({c["noise"] for c in mine}), ["clean", "flip(0.2)", "flip(0.4)", "pseudo_label(8)"])
        if not noises:
            continue
        fig, axes = plt.subplots(1, len(noises), figsize=(4.2 * len(noises), 3.6), squeeze=False, sharey=True)
        variants = _ordered(sorted({c["variant"] for c in mine}), [*MAIN_ALGOS, *ABLATIONS])
        colors = _colors(variants)
        for ax, noise in zip(axes[0], noises, strict=True):
            for variant in variants:
                runs = [c for c in mine if c["noise"] == noise and c["variant"] == variant]
                if not runs:
                    continue
                length = min(len(c["curves"]) for c in runs)
                steps = [p["step"] for p in runs[0]["curves"][:length]]
                series = [_smooth([p["reward/true"] for p in c["curves"][:length]]) for c in runs]
                mean = [sum(v) / len(v) for v in zip(*series, strict=True)]
                ax.plot(steps, mean, label=variant, color=colors[variant], lw=1.6 if variant == "dfpo" else 1.0)
                ax.fill_between(
                    steps,
                    [min(v) for v in zip(*series, strict=True)],
                    [max(v) for v in zip(*series, strict=True)],
                    color=colors[variant],
                    alpha=0.12,
                )
            ax.set_title(f"trained on {domain}, {noise}")
            ax.set_xlabel("step")
        axes[0][0].set_ylabel("true training reward (5-step mean)")
        _legend_beside(axes[0][-1])
        fig.tight_layout()
        _save(fig, out / f"curves-{domain}.png")


def _plot_accuracy(out: Path, rows: list[dict[str, Any]], base: dict[str, Any] | None, scale: Scale) -> None:
    """Per training domain: ID and OOD average accuracy per supervision and variant, with 95% intervals, and the
    starting model's as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for domain in sorted({r["domain"] for r in rows}):
        mine = [r for r in rows if r["domain"] == domain]
        noises = _ordered(sorted({r["noise"] for r in mine}), ["clean", "flip(0.2)", "flip(0.4)", "pseudo_label(8)"])
        variants = _ordered(sorted({r["variant"] for r in mine}), [*MAIN_ALGOS, *ABLATIONS])
        columns = [c for c in ("ID AVG", "OOD AVG") if any(not math.isnan(r[c]) for r in mine)]
        per_axis = max(4.5, 0.2 * len(noises) * len(variants) + 1.0)
        fig, axes = plt.subplots(1, len(columns), figsize=(per_axis * len(columns), 3.8), squeeze=False)
        width, colors = 0.8 / len(variants), _colors(variants)
        for ax, column in zip(axes[0], columns, strict=True):
            for j, variant in enumerate(variants):
                xs, means, errors = [], [], []
                for i, noise in enumerate(noises):
                    values = [r[column] for r in mine if r["noise"] == noise and r["variant"] == variant]
                    if values:
                        interval = mean_interval(values)
                        xs.append(i + (j - (len(variants) - 1) / 2) * width)
                        means.append(100 * interval.mean)
                        errors.append(0.0 if math.isnan(interval.half_width) else 100 * interval.half_width)
                ax.bar(xs, means, width, yerr=errors, capsize=2, label=variant, color=colors[variant])
            ax.set_xticks(range(len(noises)), noises, fontsize=8)
            ax.set_title(f"trained on {domain}: {column} (%)")
            lows = [100 * r[column] for r in mine if not math.isnan(r[column])]
            if base is not None:
                start = 100 * _averages(base, domain, scale)[column]
                ax.axhline(start, color="black", linestyle="--", linewidth=1, label="starting model")
                lows.append(start)
            if lows:
                ax.set_ylim(max(0.0, min(lows) - 10), min(100.0, max(lows) + 10))
        _legend_beside(axes[0][-1])
        fig.tight_layout()
        _save(fig, out / f"accuracy-{domain}.png")


if __name__ == "__main__":  # a cell's child process: python -m dfpo.noisy '<json spec>'
    run_cell(json.loads(sys.argv[1]))
