"""What a user sees when a run is broken: each case, the command, and the last line dfpo printed.

Runs every case of the robustness checklist through the ``dfpo`` command (tiny model, a few steps) in a temporary
folder and prints one row per case: its exit code and the message. ``tests/test_faults.py`` asserts these; this
script shows them::

    python benchmarks/fault_messages.py [--out results/DATE-fault-messages.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = ["model=tiny", "task=arithmetic", "algo=ppo", "rollout.prompts=2", "rollout.samples=2",
         "rollout.max_new_tokens=12", "eval.splits=", "log.progress=false", "checkpoint.final=false"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def dfpo(*args: str, cwd: Path, pick: str = "") -> tuple[int, str]:
    """Run ``dfpo ARGS``; its exit code and the first line it printed holding ``pick`` (else its last line)."""
    done = subprocess.run([sys.executable, "-m", "dfpo", *args], cwd=cwd, env=ENV, capture_output=True, text=True)

    def kept(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.strip() and "Loading" not in line]

    picked = [line for line in kept(done.stderr + "\n" + done.stdout) if pick and pick in line]
    last = kept(done.stderr if done.returncode else done.stdout) or [""]
    return done.returncode, picked[0] if picked else last[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    rows: list[tuple[str, str, int, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = work / "base"
        dfpo("train", *SMALL, "steps=2", "checkpoint.every=1", f"run_dir={base}", cwd=work)

        def case(name: str, command: list[str], prepare=None, pick: str = "") -> None:
            run = work / name.replace(" ", "-")[:40]
            if prepare is not None:
                shutil.copytree(base, run)
                prepare(run)
            command = [c.replace("RUN", str(run)) for c in command]
            code, message = dfpo(*command, cwd=work, pick=pick)
            rows.append((name, "dfpo " + " ".join(c.replace(str(work) + "/", "") for c in command), code,
                         message.replace(str(work) + "/", "")))  # fmt: skip
            print(f"{name}: exit {code}: {rows[-1][3]}", flush=True)

        train = ["train", *SMALL, "steps=3", "checkpoint.every=1", "run_dir=RUN"]
        step2 = "checkpoints/step_000002"
        case("latest missing, fresh start", train, lambda r: (r / "latest").unlink())
        case("latest missing, resume=auto", [*train, "resume=auto"], lambda r: (r / "latest").unlink(), "latest")
        case("latest names a half-written checkpoint", [*train, "resume=auto"],
             lambda r: (r / step2 / "optimizers.pt").unlink(), "latest")  # fmt: skip
        case("latest points outside the run folder", [*train, "resume=auto"],
             lambda r: (r / "latest").write_text("../../elsewhere\n"), "latest")  # fmt: skip
        case("truncated safetensors", [*train, "resume=auto"],
             lambda r: (r / step2 / "modules.safetensors").write_bytes(b"\0" * 40))  # fmt: skip
        case("garbled optimizer file", [*train, "resume=auto"],
             lambda r: (r / step2 / "optimizers.pt").write_bytes(b"not a checkpoint"))  # fmt: skip
        case("deleted policy/ (resume from it by name)", [*train, f"resume=RUN/{step2}"],
             lambda r: shutil.rmtree(r / step2 / "policy"))  # fmt: skip
        case("torn last line of metrics.jsonl", [*train, "resume=auto"],
             lambda r: (r / "metrics.jsonl").open("a").write('{"step": 3, "rew'), "resume:")  # fmt: skip
        case("moved run folder", [*train, "resume=auto"], lambda r: None, "resume:")
        settings = (
            "rollout.top_p=-1",
            "rollout.top_p=0",
            "rollout.top_p=2",
            "algo=dfpo critic.width=0",
            "actor.lr=-1",
            "kl.coef=-5",
            "kl.coef=nan",
            "checkpoint.every=-1",
            "run_dir=runs/{nope}",
        )
        for setting in settings:
            case(f"setting {setting}", ["train", *SMALL, "steps=1", "run_dir=RUN", *setting.split()])
        yaml = work / "list.yaml"
        yaml.write_text("run_dir: [a, b]\n")
        case("YAML list for a string key", ["train", "--config", str(yaml), *SMALL, "steps=1"])
        (work / "file").write_text("")
        case("run folder that cannot be written", ["train", *SMALL, "steps=1", f"run_dir={work / 'file' / 'run'}"])
        data = work / "long.jsonl"
        data.write_text(json.dumps({"prompt": "What is 2 + 2? " * 70_000, "answer": "4"}) + "\n"
                        + "".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                                  for i in range(8)))  # fmt: skip
        (work / "rewards.py").write_text(
            "def right(completions, answer, **kwargs):\n"
            "    return [float(a in c) for c, a in zip(completions, answer)]\n"
            "def breaks(completions, **kwargs):\n    return [1 / 0 for _ in completions]\n"
        )
        (work / "broken.py").write_text("def right(completions, **kwargs)\n    return [1.0]\n")
        user = ["train", "model=tiny", "task=user", "steps=1", "rollout.prompts=2", "rollout.samples=2",
                "log.progress=false", "eval.splits=", "checkpoint.final=false", "run_dir=RUN",
                "task_options.eval_fraction=0"]  # fmt: skip
        case("a 1 MB prompt", [*user, f"task_options.data={data}", "task_options.reward=rewards.py:right"])
        case("a 1 MB prompt, long_prompts=truncate", [*user, f"task_options.data={data}", "steps=4",
             "task_options.reward=rewards.py:right", "rollout.long_prompts=truncate"])  # fmt: skip
        case("a reward file with a syntax error", [*user, f"task_options.data={data}",
             "task_options.reward=broken.py:right"])  # fmt: skip
        case("a reward that raises", [*user, f"task_options.data={data}", "rollout.long_prompts=truncate",
             "task_options.reward=rewards.py:breaks"])  # fmt: skip
        trained = work / "user-run"
        dfpo(*[u.replace("RUN", str(trained)) for u in user if "eval_fraction" not in u], f"task_options.data={data}",
             "task_options.reward=rewards.py:right", "rollout.long_prompts=truncate", cwd=work)  # fmt: skip
        case("dfpo eval of a run folder whose reward is code", ["eval", str(trained), "limit=4"])
        case("the same with trust_run_code=true", ["eval", str(trained), "limit=4", "trust_run_code=true"])

        # SIGTERM at a random step of a run with no periodic checkpoints
        run = work / "sigterm"
        command = [sys.executable, "-m", "dfpo", "train", *SMALL, "steps=50", f"run_dir={run}"]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
        child = subprocess.Popen(command, cwd=work, env=ENV, **quiet)
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate()
        lines = [line for line in err.splitlines() if line.strip()]
        rows.append(("SIGTERM mid-run (checkpoint.every=0)", f"dfpo train ... run_dir=sigterm; kill {child.pid}",
                     child.returncode, lines[-1].replace(str(work) + "/", "")))  # fmt: skip
        print(f"{rows[-1][0]}: exit {rows[-1][2]}: {rows[-1][3]}")
        case("resume after SIGTERM", ["train", *SMALL, "steps=50", f"run_dir={run}", "resume=auto"], pick="resume:")
    table = ["| case | command | exit | what dfpo printed (last line) |", "|---|---|---|---|"]
    table += [f"| {n} | `{c}` | {code} | {m.replace('|', '/')} |" for n, c, code, m in rows]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
