"""Nothing lost, nothing silently restarted: damaged checkpoints and pointers, moved run folders."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dfpo.cli import main
from dfpo.training import checkpoint as ckpt

SMALL = [
    "model=tiny", "task=arithmetic", "algo=grpo", "rollout.prompts=2", "rollout.samples=2",
    "rollout.max_new_tokens=12", "eval.splits=", "log.progress=false", "checkpoint.every=1", "checkpoint.keep=3",
    "checkpoint.final=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A 2-step run with a checkpoint after each step."""
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *SMALL, "steps=2", f"run_dir={run}"]) == 0
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(run, dest)
    return dest


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_missing_pointer_is_recovered_and_a_fresh_start_is_refused(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    (run / "latest").unlink()
    assert main(["train", *SMALL, "steps=3", f"run_dir={run}"]) == 2  # no silent restart over the old run
    err = capsys.readouterr().err
    assert "already holds a run" in err and "resume=auto" in err
    assert main(["train", *SMALL, "steps=3", f"run_dir={run}", "resume=auto"]) == 0
    err = capsys.readouterr().err
    assert "latest is missing; using the newest complete checkpoint, step_000002" in err
    assert "continues from step 2" in err
    assert _steps(run) == [1, 2, 3] and (run / "latest").read_text().strip() == "step_000003"


def test_a_pointer_to_a_half_written_checkpoint_falls_back(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    (run / "checkpoints" / "step_000002" / "optimizers.pt").unlink()  # as if killed while writing
    (run / "checkpoints" / ".step_000003-abc").mkdir()  # a temporary folder a kill left behind
    assert main(["train", *SMALL, "steps=3", f"run_dir={run}", "resume=auto"]) == 0
    err = capsys.readouterr().err
    assert "names 'step_000002', which is not a complete checkpoint" in err and "step_000001" in err
    assert "continues from step 1" in err
    assert not list((run / "checkpoints").glob(".step_*"))  # stale temporary folders are removed


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate modules.safetensors", "modules.safetensors is damaged or incomplete"),
        ("garble optimizers.pt", "optimizers.pt is damaged or incomplete"),
        ("delete policy", "policy is missing"),
        ("truncate policy", "policy is damaged or incomplete"),
        ("nan weights", "holds NaN or inf weights"),
    ],
)
def test_a_damaged_checkpoint_is_a_named_error(damage, message, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    step = run / "checkpoints" / "step_000002"
    if damage == "truncate modules.safetensors":
        data = (step / "modules.safetensors").read_bytes()
        (step / "modules.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garble optimizers.pt":
        (step / "optimizers.pt").write_bytes(b"not a checkpoint")
    elif damage == "delete policy":
        shutil.rmtree(step / "policy")
    elif damage == "truncate policy":
        weights = next((step / "policy").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
    else:  # the policy's weights (GRPO has no critic modules)
        weights = next((step / "policy").glob("*.safetensors"))
        tensors = load_file(weights)
        name = next(n for n, t in tensors.items() if t.is_floating_point())
        tensors[name] = torch.full_like(tensors[name], float("nan"))
        save_file(tensors, weights, metadata={"format": "pt"})
    if damage == "delete policy":  # then the checkpoint is incomplete: resume=auto falls back to step 1
        assert main(["train", *SMALL, "steps=3", f"run_dir={run}", f"resume={step}"]) == 1
    else:
        assert main(["train", *SMALL, "steps=3", f"run_dir={run}", "resume=auto"]) == 1
    err = capsys.readouterr().err
    assert "CheckpointError" in err and message in err and "Traceback" not in err


def test_a_moved_run_folder_resumes(finished, tmp_path):
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(finished, moved)
    assert main(["train", *SMALL, "steps=3", f"run_dir={moved}", "resume=auto"]) == 0
    assert _steps(moved) == [1, 2, 3]


def test_pruning_keeps_the_newest_by_step_number(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (999_999, 1_000_000, 2):
        (root / f"step_{step:06d}").mkdir(parents=True)
    assert [p.name for p in ckpt._by_step(root)] == ["step_000002", "step_999999", "step_1000000"]


def _timing_free(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "time"))} for r in rows]


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_the_last_step_and_the_run_resumes_exactly(signum, tmp_path):
    """SIGTERM or SIGINT mid-run: the step in progress finishes, a checkpoint of it is written (with
    checkpoint.every=0, no other), the process says where and exits 130; resume=auto then ends where an
    uninterrupted run ends, metric for metric."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "dfpo", "train", *[a for a in SMALL if not a.startswith("checkpoint.every")],
            "checkpoint.every=0", "steps=8"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run([*args, f"run_dir={whole}"], env=env, check=True, capture_output=True)
    run = tmp_path / "run"
    child = subprocess.Popen([*args, f"run_dir={run}"], env=env, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(getattr(signal, signum))
    _, err = child.communicate(timeout=300)
    assert child.returncode == 130, err
    steps = _steps(run)
    assert 2 <= steps[-1] < 8
    assert f"interrupted after step {steps[-1]}; the last checkpoint is {run}/checkpoints/step_{steps[-1]:06d}" in err
    assert "resume=auto" in err and "Traceback" not in err
    subprocess.run([*args, f"run_dir={run}", "resume=auto"], env=env, check=True, capture_output=True)
    assert _timing_free(run) == _timing_free(whole)


def test_a_torn_metrics_line_is_dropped_on_resume(finished, tmp_path):
    run = _copy(finished, tmp_path)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "reward/obs')  # a kill in the middle of writing step 3's line
    assert main(["train", *SMALL, "steps=3", f"run_dir={run}", "resume=auto"]) == 0
    assert _steps(run) == [1, 2, 3]


def test_a_run_folder_that_cannot_be_written_is_refused_before_loading(tmp_path, capsys):
    """(As root, permissions do not stop writes: a folder below a plain file cannot be made by anyone.)"""
    (tmp_path / "a-file").write_text("")
    assert main(["train", *SMALL, "steps=1", f"run_dir={tmp_path / 'a-file' / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "cannot be written (Not a directory); choose another run_dir" in err and "Traceback" not in err
