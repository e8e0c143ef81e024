"""The grid's report: ``cells.csv``, ``summary.md`` (accuracy with intervals over seeds, paired comparisons,
stability, the critics' fit) from the cells' JSON."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from dfpo.experiments.noisy.cell import _final_true_reward, stability
from dfpo.experiments.noisy.grid import ABLATIONS, MAIN_ALGOS, SCALES, Scale, _averages, _ordered, ood_columns
from dfpo.experiments.noisy.plots import _plot_accuracy, _plot_curves
from dfpo.experiments.stats import fixed, mean_interval, paired

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
    invocations = len(grid.get("commands", []))
    if invocations > len(sessions):  # older code recorded an invocation only when it ended, not when killed
        return [f"Wall time of the grid: {wall / 3600:.2f} hours over the {len(sessions)} of its {invocations} "
                "invocations that recorded theirs (older code recorded it only when an invocation ended, so the "
                f"others, killed, left none): {parts}."]  # fmt: skip
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


def _machines_text(grid: dict[str, Any]) -> str:
    """The machine and code of the grid's first invocation, and of every later one that differed (older grids
    recorded the first only)."""

    def text(m: dict[str, Any]) -> str:
        return (f"{m['platform']}, {m['processor']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']}, "
                f"transformers {m['transformers']}; dfpo {m.get('code', 'version not recorded')}")  # fmt: skip

    machines = [grid["machine"], *(x["machine"] for x in grid.get("sessions", []) if "machine" in x)]
    distinct = list(dict.fromkeys(text(m) for m in machines))
    if len(distinct) == 1:
        return f"Machine: {distinct[0]}."
    return f"Machines and code, in the order the invocations first used them: {' | '.join(distinct)}."


def _commands(commands: list[str]) -> str:
    """Each distinct command once, in first-run order, and how often the grid was invoked when it was resumed."""
    distinct = list(dict.fromkeys(commands))
    text = "; ".join(f"`{c}`" for c in distinct)
    return text if len(commands) == len(distinct) else f"{text} ({len(commands)} invocations: resumed)"


def _summary(
    grid: dict[str, Any],
    scale: Scale,
    base: dict[str, Any] | None,
    rows: list[dict[str, Any]],
    benchmarks: list[str],
    records: list[dict[str, Any]],
) -> list[str]:
    b = grid["budget"]
    seconds = sum(r["seconds"] for r in rows)
    lines = [
        f"# Noisy-supervision benchmark: {b['scale']} ({scale.model})", "",
        f"Commands: {_commands(grid['commands'])}", "",
        f"Budget of every cell: {b['steps']} steps, settings `{' '.join(b['settings'])}`; {b['eval_limit']} "
        "examples per benchmark, greedy. Accuracy in %, mean ± half-width of the 95% Student-t interval over seeds.",
        f"{_machines_text(grid)} Wall time of the finished cells: {seconds / 3600:.2f} hours of cell "
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
            columns = [*evaluated, "ID AVG", *ood_columns(scale, domain), "OOD AVG", "ALL AVG"]
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
    lines += _paired_section(rows, variants, scale)
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


def _paired_section(rows: list[dict[str, Any]], variants: list[str], scale: Scale) -> list[str]:
    if "dfpo" not in variants:
        return []
    # per-domain out-of-domain averages, where a training domain is evaluated on several others ('-' for pairs
    # trained elsewhere)
    apart = dict.fromkeys(c for r in rows for c in ood_columns(scale, r["domain"]))
    columns = ["ID AVG", *apart, "OOD AVG", "ALL AVG"]
    lines = [
        "## DFPO against each variant, paired by domain, supervision and seed",
        "",
        "Difference DFPO - variant in points (mean ± 95% interval over the pairs), and the pairs DFPO won / "
        "tied (within 0.5 points) / lost.",
        "",
        "| variant | pairs | " + " | ".join(columns) + " | ALL AVG won / tied / lost |",
        "|---|---|" + "---|" * (len(columns) + 1),
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
        for column in columns:
            usable = [(a[column], b[column]) for a, b in pairs
                      if not (math.isnan(a.get(column, math.nan)) or math.isnan(b.get(column, math.nan)))]  # fmt: skip
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
             ]  # fmt: skip
    domains = sorted({r["domain"] for r in rows})
    # one table per training domain: a domain whose prompts say more about their value must not hide another's
    for domain in [None, *domains] if len(domains) > 1 else [None]:
        mine = rows if domain is None else [r for r in rows if r["domain"] == domain]
        if len(domains) > 1:
            lines += ["All domains:" if domain is None else f"Trained on {domain}:", ""]
        lines += ["| variant | " + " | ".join(noises) + " |", "|---|" + "---|" * len(noises)]
        for variant in with_critic:
            shown = []
            for noise in noises:
                group = [r for r in mine if r["variant"] == variant and r["noise"] == noise]
                ev = _nan_mean(group, "critic_mc_explained_var")
                if math.isnan(ev):  # cells that did not record the fit: against the critic's own targets
                    ev = _nan_mean(group, "critic_explained_var")
                means = [ev, *(_nan_mean(group, k) for k in ("probe_r2", "prompt_share", "explained_var_ceiling"))]
                shown.append(" / ".join("-" if math.isnan(m) else fixed(m, 3) for m in means) if group else "-")
            lines.append(f"| {variant} | " + " | ".join(shown) + " |")
        lines.append("")
    return lines


def _nan_mean(rows: list[dict[str, Any]], key: str) -> float:
    """Mean of ``key`` over the rows that have it (nan when none does)."""
    values = [r[key] for r in rows if not math.isnan(r[key])]
    return sum(values) / len(values) if values else math.nan
