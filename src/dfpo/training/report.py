"""Run outputs: ``metrics.jsonl`` (one JSON object per step), ``samples.jsonl``, optional TensorBoard and wandb,
and the end-of-run ``summary.md`` and ``curves.png``.

Metric names (all per step):

- ``reward/observed``, ``reward/true`` (means over the step's samples), ``reward/noise_rate``,
  ``reward/signal_share`` (the share of the observed reward's variance the true reward explains: the ceiling of
  a critic's explained variance under state-independent noise), ``reward/prompt_share`` (the share that lies
  between prompts: what knowing only the prompt could explain),
  ``reward/observed_std``, ``reward/skipped``, ``reward/pseudo_label_accuracy`` (pseudo-label noise);
- ``actor/*``: ``pg_loss`` (or ``tb_loss`` for FlowRL), ``clipfrac``, ``approx_kl``, ``ratio_mean``, ``kl_loss``,
  ``grad_norm``, ``lr``, ``active`` (0 during critic warm-up);
- ``critic/*``: ``loss`` and its terms, ``explained_var``, ``value_mean``, ``dist_std`` (spread of the return
  distribution), ``cvar``, ``grad_norm``;
- ``kl/k1``, ``kl/k2``, ``kl/k3``: the policy's KL to the reference, each estimator's mean;
- ``adv/mean``, ``adv/std`` and, for group estimators, ``adv/groups``, ``adv/degenerate_frac``;
- ``response_length/mean|max|min|clip_ratio``;
- ``perf/*``: seconds per phase (``generate_s``, ``reward_s``, ``score_s``, ``update_s``, ``step_s``) and tokens
  per second (``generate_tokens_per_s``, ``score_tokens_per_s``, ``update_tokens_per_s``);
- ``eval/<split>/<metric>`` on evaluation steps (``accuracy``, ``format_rate``, ``mean@k``, ``maj@k``, ...);
- ``train/skipped_update`` (1 when a NaN/inf loss or gradient skipped an update), ``data/epoch``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from dfpo.assets import missing_package


class MetricsLog:
    """Appends one JSON line per step to ``RUN_DIR/metrics.jsonl``; on resume, drops lines after the checkpoint's
    step so the file reads as one uninterrupted run."""

    def __init__(self, run_dir: Path, options: Any, truncate_after: int = 0) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        for path in (self.path, self.samples_path):
            if truncate_after and path.exists():
                kept = [line for line in path.read_text().splitlines() if _step_of(line) <= truncate_after]
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, path)
            elif not truncate_after and path.exists():
                path.unlink()
        self.file = self.path.open("a")
        self.tensorboard = self.wandb = None
        if options.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise missing_package(
                    "TensorBoard logging (log.tensorboard=true)", "tensorboard", extra="tensorboard"
                ) from None
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        if options.wandb:
            try:
                import wandb
            except ImportError:
                raise missing_package("wandb logging (log.wandb=true)", "wandb", extra="wandb") from None
            self.wandb = wandb.init(mode="offline", dir=str(run_dir), project="dfpo", name=run_dir.name)

    def write(self, metrics: dict[str, Any]) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        step = int(metrics["step"])
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "step"}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def samples(self, records: list[dict[str, Any]]) -> None:
        with self.samples_path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _step_of(line: str) -> float:
    """A metrics line's step; a line a kill tore mid-write (not valid JSON) counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def write_report(run_dir: Path, config: Any, evals: dict[str, Any]) -> None:
    """``summary.md`` (before/after held-out metrics, reward) and ``curves.png`` (observed and true reward,
    held-out accuracy, critic explained variance, response length)."""
    metrics = read_metrics(run_dir)
    lines = [f"# {config.algo} on {config.task} ({config.model}), noise {config.noise}, seed {config.seed}", ""]
    before, after = evals.get("before", {}), evals.get("after", {})
    lines += ["| split | metric | before | after |", "|---|---|---|---|"]
    for split in after:
        for key, value in after[split].items():
            if key == "accuracy" and "mean_reward" in after[split]:
                continue  # the same figure, under its name
            if key in ("accuracy", "format_rate", "mean_reward") or "@" in key:
                was = before.get(split, {}).get(key)
                shown = "n/a" if was is None else f"{was:.3f}"
                lines.append(f"| {split} | {key} | {shown} | {value:.3f} |")
    if metrics:
        tail = metrics[-min(10, len(metrics)) :]
        obs = sum(m["reward/observed"] for m in tail) / len(tail)
        true = sum(m["reward/true"] for m in tail) / len(tail)
        seconds = sum(m.get("perf/step_s", 0.0) for m in metrics)
        lines += [
            "",
            f"Steps: {metrics[-1]['step']}; training time {seconds:.0f} s (without evaluation).",
            f"Reward over the last {len(tail)} steps: observed {obs:.3f}, true {true:.3f}.",
        ]
    if metrics and importlib.util.find_spec("matplotlib") is None:
        lines += ["", "curves.png was not drawn: matplotlib is not installed (pip install 'dfpo[plots]')."]
    (run_dir / "summary.md").write_text("\n".join(lines) + "\n")
    if metrics and importlib.util.find_spec("matplotlib") is not None:
        _plot(run_dir / "curves.png", metrics, evals)


def _plot(path: Path, metrics: list[dict[str, Any]], evals: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax = axes[0, 0]
    ax.plot(steps, _smooth([m["reward/observed"] for m in metrics]), label="observed")
    ax.plot(steps, _smooth([m["reward/true"] for m in metrics]), label="true")
    ax.set_title("training reward (5-step mean)")
    ax.legend()
    ax = axes[0, 1]
    points = [(0, evals.get("before", {}))] + [(h["step"], h) for h in evals.get("history", [])]
    splits = sorted({s for _, r in points for s, v in r.items() if isinstance(v, dict) and "accuracy" in v})
    for split in splits:
        xs = [x for x, r in points if split in r]
        ax.plot(xs, [r[split]["accuracy"] for x, r in points if split in r], marker="o", label=split)
    ax.set_title("held-out accuracy (greedy)" if splits else "held-out accuracy (not evaluated)")
    if splits:
        ax.legend()
    ax = axes[1, 0]
    ev = [(m["step"], m["critic/explained_var"]) for m in metrics if "critic/explained_var" in m]
    if ev:
        ax.plot([s for s, _ in ev], [v for _, v in ev])
        ax.set_ylim(min(0.0, max(-1.0, min(v for _, v in ev))), 1.0)  # 0 to 1 at least: never an empty range
    ax.set_title("critic explained variance" if ev else "critic explained variance (no critic)")
    ax = axes[1, 1]
    ax.plot(steps, [m["response_length/mean"] for m in metrics])
    ax.set_title("mean response length (tokens)")
    for a in axes.flat:
        a.set_xlabel("step")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
