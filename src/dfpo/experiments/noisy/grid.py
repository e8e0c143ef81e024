"""The grid of ``dfpo bench noisy``: its domains and scales, the variants and ablations, the command's
configuration and the cells it makes."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfpo.options import ConfigError, option

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
# out-of-domain arithmetic that SmolLM2 partly does, so that training on sums can move it either way (greedy, three
# worked examples, 100 held-out problems each: subtraction of 1-2 digit numbers 11%, sums of three 1-digit numbers
# 66%, products of 1-2 digit numbers 26%, against 37% on the training family; results/2026-12-03-smollm2-ood). The
# three-example science prompts answer "C" to almost everything: they stay only as a check that nothing broke.
_SMOLLM2_OOD = {
    "sub-mixed": {"operators": "-", "digits": 2, "min_digits": 1, "min_terms": 2, "max_terms": 2},
    "add3-1digit": {"operators": "+", "digits": 1, "min_terms": 3, "max_terms": 3, "eval_size": 300, "train_size": 600},
    "mul-mixed": {"operators": "*", "digits": 2, "min_digits": 1, "min_terms": 2, "max_terms": 2},
}

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
                evaluated_on=("math", "arith", "science"),
            ),
            "arith": Domain(
                "arith",
                "arithmetic",
                {**_SMOLLM2_MATH, **_SMOLLM2_OOD["sub-mixed"]},
                tuple(
                    Benchmark(n, "arithmetic", {"few_shot": 3, **o}, "eval", None, 48) for n, o in _SMOLLM2_OOD.items()
                ),
                48,
                about="out-of-domain arithmetic: differences, sums of three 1-digit numbers, products (evaluation only "
                "by default)",
                evaluated_on=("arith", "math", "science"),
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
        # the critic head stays on the policy's frozen features: no SmolLM2 critic learned on math within the steps a
        # cell affords (frozen head -0.08 over the last 8 of 24 steps; a separate trunk training its top 4 layers
        # 0.00 over the last 15 of 60, at 1.76x the step time: results/2026-12-03-smollm2-critic-steps)
        settings=(
            "rollout.prompts=8",
            "rollout.samples=4",
            "actor.lr=2e-6",
            "critic.flow.samples=32",
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
    "euler2": Ablation("dfpo", ("critic.flow.sample_steps=2",), "2 Euler steps from noise to a return sample"),
    "euler4": Ablation("dfpo", ("critic.flow.sample_steps=4",), "4 Euler steps"),
    "euler8": Ablation("dfpo", ("critic.flow.sample_steps=8",), "8 Euler steps"),
    "no_risk": Ablation(
        "dfpo", ("critic.flow.risk_weight=0",), "without the risk terms (CVaR, upper-tail gain, shape)"
    ),
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
    "k8": Ablation("dfpo", ("critic.flow.samples=8",), "K = 8 return samples"),
    "k32": Ablation("dfpo", ("critic.flow.samples=32",), "K = 32 return samples"),
    "k64": Ablation("dfpo", ("critic.flow.samples=64",), "K = 64 return samples"),
    "dvpo_equal": Ablation("dvpo", (), "DVPO's quantile head sized to the flow head's parameter count", "quantile"),
    "ppo_equal": Ablation(
        "ppo",
        (),
        "PPO's scalar head sized to the flow head's parameter count: a bigger head without a distribution",
        "scalar",
    ),
}


def _critic_width(settings: list[str]) -> int:
    from dfpo.training.critic_options import CriticOptions

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
    from dfpo.supervision.noise import make_noise

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


def _averages(record: dict[str, Any], domain: str, scale: Scale) -> dict[str, float]:
    """ID, OOD and ALL averages of a cell's benchmark accuracies: ID the benchmarks of ``domain``, OOD those of
    the other domains it is evaluated on, and where there are several of those, each one's average apart
    (``"<domain> AVG"``, see :func:`ood_columns`): one that cannot move would otherwise flatten the others."""
    peers = scale.peers(domain)
    scores = {n: r["accuracy"] for n, r in record["benchmarks"].items() if r["domain"] in peers}

    def avg(domains: tuple[str, ...]) -> float:
        values = [v for n, v in scores.items() if record["benchmarks"][n]["domain"] in domains]
        return sum(values) / len(values) if values else float("nan")

    apart = {column: avg((other,)) for column, other in ood_columns(scale, domain).items()}
    return {"ID AVG": avg((domain,)), **apart, "OOD AVG": avg(peers[1:]), "ALL AVG": avg(peers)}


def ood_columns(scale: Scale, domain: str) -> dict[str, str]:
    """The per-domain out-of-domain average columns of cells trained on ``domain``, each with its domain: one per
    other domain they are evaluated on, when there are at least two (with one, it is the OOD average)."""
    others = scale.peers(domain)[1:]
    return {f"{d} AVG": d for d in others} if len(others) > 1 else {}


def _ordered(values: list[str], order: list[str]) -> list[str]:
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


def _code_version() -> str:
    """The git commit of the dfpo source that runs the grid ('+changes' if its tree differs), or its version."""
    from dfpo import __version__

    here = Path(__file__).resolve().parents[2]  # the dfpo package: any change to its source counts
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        changed = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."], capture_output=True,
                                 text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__} (git {commit}{'+changes' if changed else ''})"
