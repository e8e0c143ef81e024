"""How much one busy process beside it slows a tiny-model training step and a greedy evaluation.

For each thread setting the script runs the same work twice in a fresh process, once on an idle machine and once
with a busy process beside it (one core spinning in pure Python, as an editor, a browser tab or another job does),
and prints the threads it ran (idle/busy), the median step time, the evaluation time, and their ratio busy / idle.
Run it alone::

    python benchmarks/under_load.py --out results/DATE-under-load

Settings (each an environment for the measured process):

- ``dfpo default``: ``threads=0``, one torch thread per core that other processes leave free when the run starts;
- ``torch's threads``: torch's default count (the physical cores) whatever the load: what ``dfpo`` did before;
- ``torch's threads + passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep at a barrier
  instead of spinning);
- ``1 thread``: ``threads=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "dfpo default": {},
    "torch's threads": {"DFPO_BENCH_THREADS": "torch"},
    "torch's threads + passive": {"DFPO_BENCH_THREADS": "torch", "OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"DFPO_BENCH_THREADS": "1"},
}


def measure(steps: int, eval_n: int) -> dict[str, float]:
    """In this process: ``steps`` training steps of ``dfpo train``'s default (tiny model, DFPO) and a greedy
    evaluation of ``eval_n`` held-out problems (three times)."""
    import torch

    from dfpo.evaluate import evaluate
    from dfpo.training.config import build_config
    from dfpo.training.trainer import Trainer

    threads = os.environ.get("DFPO_BENCH_THREADS", "0")
    threads = torch.get_num_threads() if threads == "torch" else int(threads)
    with tempfile.TemporaryDirectory() as tmp:
        config = build_config([f"steps={steps}", f"run_dir={tmp}/run", "eval.splits=", "log.progress=false",
                               "checkpoint.final=false", f"threads={threads}"])  # fmt: skip
        trainer = Trainer(config, signals=False)
        trainer.run()
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        seconds = []
        for _ in range(3):  # the median of three: one evaluation takes a second or two
            start = time.perf_counter()
            result = evaluate(trainer.policy, trainer.tokenizer, trainer.task, limit=eval_n, max_new_tokens=64)
            seconds.append(time.perf_counter() - start)
    return {
        "step_s": statistics.median(r["perf/step_s"] for r in rows[1:]),  # the first step warms caches up
        "eval_s": statistics.median(seconds),
        "eval_accuracy": result["accuracy"],
        "threads": torch.get_num_threads(),
    }


def _run(setting: str, busy: bool, steps: int, eval_n: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update(SETTINGS[setting])
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.5 if busy else 0.0)
        out = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(steps), "--eval", str(eval_n)],
                             env=env, capture_output=True, text=True, check=True)  # fmt: skip
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="which settings, comma-separated")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.steps, args.eval)))
        return
    rows = []
    print(f"{os.cpu_count()} CPUs; {args.steps} steps of dfpo train's default, greedy evaluation of {args.eval}")
    print(f"{'setting':<26} {'threads':>7} {'step idle':>10} {'step busy':>10} {'ratio':>6} "
          f"{'eval idle':>10} {'eval busy':>10} {'ratio':>6}")  # fmt: skip
    for setting in args.settings.split(","):
        idle, busy = _run(setting, False, args.steps, args.eval), _run(setting, True, args.steps, args.eval)
        step, evals = busy["step_s"] / idle["step_s"], busy["eval_s"] / idle["eval_s"]
        rows.append({"setting": setting, "env": SETTINGS[setting], "idle": idle, "busy": busy,
                     "step_ratio": step, "eval_ratio": evals})  # fmt: skip
        threads = f"{idle['threads']}/{busy['threads']}"
        print(f"{setting:<26} {threads:>7} {idle['step_s']:>9.2f}s {busy['step_s']:>9.2f}s {step:>5.2f}x "
              f"{idle['eval_s']:>9.2f}s {busy['eval_s']:>9.2f}s {evals:>5.2f}x", flush=True)  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"cpus": os.cpu_count(), "steps": args.steps, "eval": args.eval, "rows": rows}
        (args.out / "under_load.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
