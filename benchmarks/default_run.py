"""The README's "default run, three seeds" table: `dfpo train seed=S` for each seed, one run at a time, and the
held-out accuracy before and after (greedy, mean@4, maj@4) with the wall time of each run.

    .venv/bin/python benchmarks/default_run.py --seeds 0,1,2 --out results/<date>-default-run

Prints the markdown table and writes ``table.md`` and ``runs.json`` (every run's eval.json figures) to ``--out``.
Run it alone: the wall times are the machine's, with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", required=True)
    parser.add_argument("settings", nargs="*", help="extra dfpo train settings (key=value)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        run_dir = out / "runs" / f"seed{seed}"
        command = [sys.executable, "-m", "dfpo", "train", f"seed={seed}", f"run_dir={run_dir}", "log.progress=false",
                   *args.settings]  # fmt: skip
        if (run_dir / "latest").exists():
            command.append("resume=auto")  # finished before: only the figures are read again
        start = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - start
        evals = json.loads((run_dir / "eval.json").read_text())
        before, after = evals["before"]["eval"], evals["after"]["eval"]
        runs.append({"seed": seed, "seconds": round(seconds, 1), "before": before, "after": after,
                     "command": " ".join(["dfpo", *command[3:]])})  # fmt: skip
        print(f"seed {seed}: {seconds:.0f} s, greedy {pct(before['accuracy'])} -> {pct(after['accuracy'])}", flush=True)
    keys = ("accuracy", "mean@4", "maj@4")
    lines = ["| seed | wall time | greedy | mean@4 | maj@4 |", "|---|---|---|---|---|"]
    for r in runs:
        cells = [f"{pct(r['before'][k])} -> {pct(r['after'][k])}" for k in keys]
        lines.append(f"| {r['seed']} | {r['seconds']:.0f} s | " + " | ".join(cells) + " |")
    n = len(runs)
    gains = [sum(100 * (r["after"][k] - r["before"][k]) for r in runs) / n for k in keys]
    lines.append(f"| mean | {sum(r['seconds'] for r in runs) / n:.0f} s | "
                 + " | ".join(f"{g:+.1f} points" for g in gains) + " |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "runs.json").write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
