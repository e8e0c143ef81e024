"""Fingerprints of what ``dfpo train`` does, to prove that a change of code leaves behaviour unchanged.

For each algorithm (and pseudo-label noise) the script trains the tiny model for a few steps on one thread and
hashes the run's metrics (all but timing keys), its final weights and its optimizer states. Run it on two commits
and compare::

    python benchmarks/behaviour_fingerprint.py --out /tmp/before.json            # in a worktree of the old commit
    python benchmarks/behaviour_fingerprint.py --out /tmp/after.json --compare /tmp/before.json

One thread makes the runs independent of the machine's load (results differ in the last bits between thread
counts); the hashes are exact, so any change of a float shows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = {
    "dfpo": ["algo=dfpo"],
    "ppo": ["algo=ppo"],
    "grpo": ["algo=grpo"],
    "flowrl": ["algo=flowrl"],
    "dvpo": ["algo=dvpo"],
    "dfpo-pseudo_label": ["algo=dfpo", "noise=pseudo_label(4)"],
    # the unfused update: epochs, minibatches, micro-batches, the KL as a loss, a separate critic trunk with extra
    # critic steps, gradient checkpointing by prompt; a bootstrapped ensemble on the shared trunk
    "ppo-minibatches": [
        "algo=ppo",
        "actor.epochs=2",
        "actor.minibatches=2",
        "actor.micro_batch=4",
        "kl.mode=loss",
        "kl.estimator=k3",
    ],
    "dfpo-separate": [
        "algo=dfpo",
        "critic.backbone=separate",
        "critic.updates=3",
        "actor.micro_batch=8",
        "actor.checkpoint_prompts=2",
        "critic.warmup_steps=1",
    ],
    "robust_ppo-shared": ["algo=robust_ppo", "critic.backbone=shared", "critic.updates=2"],
    "reinforce_pp": ["algo=reinforce_pp"],
}
COMMON = ["model=tiny", "task=arithmetic", "steps=3", "rollout.prompts=4", "rollout.samples=4", "threads=1",
          "rollout.max_new_tokens=24", "eval.limit=8", "log.progress=false", "checkpoint.final=false"]  # fmt: skip


def _hash_tensors(tensors: dict) -> str:
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def fingerprint(run: Path) -> dict[str, str]:
    """Hashes of ``run``'s metrics (no ``perf/``, time or seconds keys), weights and optimizer states."""
    import torch
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timing = [k for r in rows for k in r if k.startswith(("perf/", "time")) or k.endswith("seconds")]
    kept = [{k: v for k, v in r.items() if k not in timing} for r in rows]
    step = run / "checkpoints" / (run / "latest").read_text().strip()
    weights = {**load_file(step / "modules.safetensors")}
    for path in sorted((step / "policy").glob("*.safetensors")):
        weights.update({f"policy.{k}": v for k, v in load_file(path).items()})
    states = torch.load(step / "optimizers.pt", weights_only=True)
    optim = {}
    for group, state in states.items():
        for index, values in state.get("state", {}).items():
            for key, value in values.items():
                optim[f"{group}.{index}.{key}"] = torch.as_tensor(value)
    metrics = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]
    return {"metrics": metrics, "weights": _hash_tensors(weights), "optimizers": _hash_tensors(optim)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, default=None, help="an earlier --out to compare with")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in RUNS.items():
            run = Path(tmp) / name
            subprocess.run([sys.executable, "-m", "dfpo", "train", *COMMON, *settings, f"run_dir={run}"], env=env,
                           check=True, capture_output=True)  # fmt: skip
            found[name] = fingerprint(run)
            print(name, found[name], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    args.out.write_text(json.dumps({"commit": commit, "runs": found}, indent=1) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        differ = [n for n in found if n in before["runs"] and before["runs"][n] != found[n]]
        new = [n for n in found if n not in before["runs"]]
        same = not differ
        print(f"against {before['commit']}: " + ("identical" if same else f"differ: {', '.join(differ)}")
              + (f" (no earlier fingerprint of {', '.join(new)})" if new else ""))  # fmt: skip
        raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
