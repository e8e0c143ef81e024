"""One cell of the grid, in its own process: train, evaluate on every benchmark of the domains, write its JSON."""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Any

from dfpo.experiments.noisy.grid import SCALES, Benchmark, Scale
from dfpo.options import ConfigError

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
    from dfpo.training.control import write_json as write_atomically

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
        # the run folder is the grid's own: continue from its last checkpoint, or, if the cell was stopped before
        # its first one, start over (the trainer then drops the partial metrics and evaluations)
        config = build_config([*spec["settings"], f"run_dir={run_dir}", "resume=auto"])
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


def _final_true_reward(record: dict[str, Any], last: int = 10) -> float:
    curve = [c["reward/true"] for c in record["curves"]][-last:]
    return sum(curve) / len(curve) if curve else float("nan")
