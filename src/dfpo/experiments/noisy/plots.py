"""The grid's plots: learning curves with seed bands, and final accuracy with intervals."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from dfpo.experiments.noisy.grid import ABLATIONS, MAIN_ALGOS, Scale, _averages, _ordered
from dfpo.experiments.stats import mean_interval


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
