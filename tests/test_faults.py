"""Fault injection: each way a run can be broken ends in a named error or in a resume equal to the uninterrupted run.

kill -9 while a checkpoint is written, a missing or broken ``latest``, each damaged checkpoint file, NaN weights,
SIGTERM and SIGINT mid-run, a torn metrics line, a moved run folder, an unwritable run folder, every out-of-range
setting (from the one table of ranges), prompts longer than the model's context, a NaN reward or log-prob, and a
reward file that does not compile. (A reward function that raises: ``tests/test_user_formats.py``; refused
settings with their exact messages: ``tests/test_train.py``.)"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
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
    uninterrupted run ends, metric for metric and weight for weight."""
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
    at = random.randint(1, 6)  # any step: the outcome must not depend on which
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= at) and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(getattr(signal, signum))
    _, err = child.communicate(timeout=300)
    assert child.returncode == 130, err
    steps = _steps(run)
    assert at <= steps[-1] < 8
    assert f"interrupted after step {steps[-1]}; the last checkpoint is {run}/checkpoints/step_{steps[-1]:06d}" in err
    assert "resume=auto" in err and "Traceback" not in err
    subprocess.run([*args, f"run_dir={run}", "resume=auto"], env=env, check=True, capture_output=True)
    assert _timing_free(run) == _timing_free(whole)
    mine, theirs = _weights(run), _weights(whole)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


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


# a run of 4 steps, checkpointed after each, killed (SIGKILL, nothing runs after it) at one point of step 3's write
KILLED = """
import os, signal, sys
from dfpo.training import checkpoint as ckpt
from dfpo.cli import main

point = sys.argv[1]
real_save, real_replace = ckpt.torch.save, ckpt.os.replace

def save(obj, path, *args, **kwargs):
    if point == "optimizers" and "step_000003" in str(path):
        with open(path, "wb") as f:
            f.write(b"half an optimizer state")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *args, **kwargs)

def replace(src, dst):
    if point == "pointer" and str(dst).endswith("latest") and "step_000003" in open(src).read():
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

ckpt.torch.save, ckpt.os.replace = save, replace
sys.exit(main(sys.argv[2:]))
"""


def _weights(run: Path) -> dict[str, torch.Tensor]:
    step = run / "checkpoints" / (run / "latest").read_text().strip()
    return {**load_file(step / "modules.safetensors"), **load_file(next((step / "policy").glob("*.safetensors")))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("whole") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "dfpo", "train", *SMALL, "algo=ppo", "steps=4", f"run_dir={run}"], env=env,
                   check=True, capture_output=True)  # fmt: skip
    return run


@pytest.mark.parametrize("point", ["optimizers", "pointer"])
def test_kill_9_while_a_checkpoint_is_written_resumes_exactly(point, uninterrupted, tmp_path):
    """SIGKILL half-way through writing step 3's optimizer state, or after step 3's checkpoint is in place but
    before ``latest`` names it: resume=auto continues from step 2 and ends where the uninterrupted run ends."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", *SMALL, "algo=ppo", "steps=4", f"run_dir={run}"]
    killed = subprocess.run([sys.executable, "-c", KILLED, point, *args], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run / "latest").read_text().strip() == "step_000002"
    assert _steps(run) == [1, 2, 3]  # step 3's line was written before its checkpoint
    resumed = subprocess.run([sys.executable, "-m", "dfpo", *args, "resume=auto"], env=env, capture_output=True,
                             text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "continues from step 2" in resumed.stderr
    assert not list((run / "checkpoints").glob(".step_*"))
    assert _timing_free(run) == _timing_free(uninterrupted)
    mine, whole = _weights(run), _weights(uninterrupted)
    assert mine.keys() == whole.keys() and all(torch.equal(mine[k], whole[k]) for k in mine)


def _outside(rule: str) -> str:
    """A value just outside a RANGES rule."""
    if rule.startswith(">="):
        return str(float(rule[2:]) - 1 if "." in rule else int(rule[2:]) - 1)
    if rule.startswith(">"):
        return rule[1:]
    return str(float(rule[1:-1].split(",")[1]) + 1)  # above an interval


def test_every_out_of_range_setting_is_refused_before_loading(tmp_path, capsys):
    """Each key of the one table of ranges, just outside its range (and every float also as nan), is refused with
    a message naming the key; nothing is loaded or written."""
    from dfpo.training.config import TrainConfig
    from dfpo.training.ranges import RANGES, numeric_settings

    floats = {k for k, v in numeric_settings(TrainConfig()).items() if isinstance(v, float)}
    for key, rule in RANGES.items():
        values = [_outside(rule), *(["nan"] if key in floats else [])]
        for value in values:
            if key not in floats and "." in value:
                value = str(int(float(value)))
            assert main(["train", f"run_dir={tmp_path / 'r'}", "log.progress=false", f"{key}={value}"]) == 2, key
            err = capsys.readouterr().err
            assert f"{key}=" in err and "must" in err and "Traceback" not in err, (key, value, err)
    assert not (tmp_path / "r").exists()


LONG = [{"prompt": "What is 2 + 2? " * (60 if i % 3 == 0 else 2), "answer": "4"} for i in range(12)]
REWARD = "def right(completions, answer, **kwargs):\n    return [float(a in c) for c, a in zip(completions, answer)]\n"


def _user_task(tmp_path: Path, reward: str = REWARD) -> list[str]:
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in LONG) + "\n")
    (tmp_path / "reward.py").write_text(reward)
    reward = f"{tmp_path / 'reward.py'}:right"
    return ["model=tiny", "task=user", f"task_options.data={data}", f"task_options.reward={reward}",
            "task_options.eval_fraction=0", "eval.splits=", "rollout.prompts=4", "rollout.samples=2",
            "rollout.max_new_tokens=8", "log.progress=false", "checkpoint.final=false"]  # fmt: skip


def test_prompts_longer_than_the_context_are_refused_or_truncated_and_counted(tmp_path, capsys):
    """The tiny model's context is 512 tokens: with 8 new tokens a prompt may have 504. Four of the twelve prompts
    have about 900 (the 1 MB prompt of the report would have asked for a terabyte of attention)."""
    task = _user_task(tmp_path)
    assert main(["train", *task, "steps=1", f"run_dir={tmp_path / 'refused'}"]) == 1
    err = capsys.readouterr().err
    assert "DataError: training example " in err and "prompt ('What is 2 + 2? What is 2 + 2?" in err, err
    assert "tokens, over the limit of 504" in err
    assert "4 of the 12 training prompts are over it" in err and "rollout.long_prompts=truncate" in err
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()
    run = tmp_path / "truncated"
    assert main(["train", *task, "steps=3", "rollout.long_prompts=truncate", f"run_dir={run}"]) == 0
    cut = [json.loads(line)["data/truncated_prompts"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(cut) >= 1 and all(0 <= c <= 4 for c in cut)  # 12 prompts drawn, 4 of them long
    assert main(["train", *task, "steps=1", "rollout.max_prompt_tokens=600", f"run_dir={tmp_path / 'x'}"]) == 2
    assert "rollout.max_prompt_tokens=600: the model's context of 512 tokens holds prompts of at most 504" in (
        capsys.readouterr().err
    )


def test_a_reward_file_that_does_not_compile_is_named(tmp_path, capsys):
    task = _user_task(tmp_path, reward="def right(completions, **kwargs)\n    return [1.0]\n")
    assert main(["train", *task, "steps=1", f"run_dir={tmp_path / 'r'}"]) == 1
    err = capsys.readouterr().err
    assert "RewardFunctionError: reward" in err and "reward.py, line 1: syntax error" in err
    assert "fix the file" in err and "Traceback" not in err


def _nan_reward_from_step_2(trainer, monkeypatch):
    """The first response's observed reward is NaN from training step 2 on."""
    real = type(trainer.noise).score

    def score(self, *args, **kwargs):
        scored = real(self, *args, **kwargs)
        scored.observed[0] = float("nan") if trainer.step >= 2 else scored.observed[0]
        return scored

    monkeypatch.setattr(type(trainer.noise), "score", score)


def test_a_run_that_ends_on_skipped_steps_names_why(tmp_path, monkeypatch, capsys):
    """Skipped steps at the end of a run (fewer than max_bad_steps) are said, with what was NaN: the last
    checkpoint is older than the run's last step."""
    from dfpo.training.config import build_config
    from dfpo.training.trainer import Trainer

    trainer = Trainer(build_config([*SMALL, "algo=grpo", "steps=2", "max_bad_steps=3", "checkpoint.every=1",
                                    "eval.splits=", f"run_dir={tmp_path / 'run'}"]))  # fmt: skip
    _nan_reward_from_step_2(trainer, monkeypatch)
    trainer.run()
    err = capsys.readouterr().err
    assert "the last 1 step(s) were skipped, the last for a NaN or inf reward for 1 of 4 responses" in err
    assert "the last checkpoint is" in err and "step_000001" in err


@pytest.mark.parametrize("source", ["reward", "reference"])
def test_a_nan_reward_or_log_prob_is_named(source, tmp_path, monkeypatch):
    from dfpo.training.config import build_config
    from dfpo.training.trainer import Trainer, TrainingDiverged

    config = build_config([*SMALL, "algo=ppo", "steps=3", "max_bad_steps=2", "checkpoint.every=1", "kl.mode=reward",
                           f"run_dir={tmp_path / 'run'}"])  # fmt: skip
    trainer = Trainer(config)
    if source == "reward":
        _nan_reward_from_step_2(trainer, monkeypatch)
        named = r"the last for a NaN or inf reward for 1 of 4 responses \(task 'arithmetic'.*check the reward function"
    else:
        from dfpo.training import phases

        real = phases.score

        def scored(*args, **kwargs):
            out = real(*args, **kwargs)
            if trainer.step >= 2:
                out.ref_logp[0, 0] = float("-inf")
            return out

        monkeypatch.setattr(phases, "score", scored)
        named = r"NaN or inf in the reference model's log-probs at 1 response tokens, so in the KL to the reference"
    with pytest.raises(TrainingDiverged, match=named):
        trainer.run()
