"""Threads on a shared CPU: a run starts with one torch thread per core that other processes leave free."""

import json
import subprocess
import sys

import pytest
import torch

from dfpo import cpu
from dfpo.cli import main

SMALL = ["model=tiny", "task=arithmetic", "algo=grpo", "rollout.prompts=2", "rollout.samples=2",
         "rollout.max_new_tokens=8", "eval.splits=", "log.progress=false", "checkpoint.final=false"]  # fmt: skip


@pytest.mark.real_cpu
def test_a_busy_process_is_measured():
    if cpu.busy_elsewhere(0.05) is None:
        pytest.skip("no /proc/stat on this system: threads stay torch's default")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = cpu.busy_elsewhere(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.6  # one spinning core's worth (less whatever the scheduler lent others)


def test_a_run_on_a_busy_machine_takes_the_free_cores_and_a_resume_keeps_its_count(tmp_path, monkeypatch, capsys):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(cpu, "default_threads", lambda: 2)
        monkeypatch.setattr(cpu, "_cpus", lambda: [0, 1])
        monkeypatch.setattr(cpu, "busy_elsewhere", lambda window=0.3: 1.0)
        run = tmp_path / "run"
        assert main(["train", *SMALL, "steps=1", "checkpoint.every=1", f"run_dir={run}"]) == 0
        assert "threads: 1 torch threads, not 2: other processes keep 1.0" in capsys.readouterr().err
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(cpu, "busy_elsewhere", lambda window=0.3: 0.0)  # idle now: the resume keeps 1
        assert main(["train", *SMALL, "steps=2", "checkpoint.every=1", f"run_dir={run}", "resume=auto"]) == 0
        assert torch.get_num_threads() == 1
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["perf/threads"] for r in rows] == [1.0, 1.0]
        assert main(["train", *SMALL, "steps=1", f"run_dir={tmp_path / 'idle'}"]) == 0  # idle: torch's default
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
