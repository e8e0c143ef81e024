"""``dfpo bench throughput``: per-phase times, MFU against a measured matmul peak, peak memory per system, and
TRL's GRPOTrainer side by side (each system in its own process, interleaved over rounds)."""

import json

import pytest

from dfpo.cli import main
from dfpo.experiments.throughput import matmul_peak

SMALL = ["steps=1", "prompts=2", "samples=2", "max_new_tokens=12"]


def test_matmul_peak_is_a_plausible_rate():
    peak = matmul_peak(size=256, repeats=3)
    assert 1e8 < peak < 1e14  # FLOP/s: between a slow CPU core and a large accelerator


def test_throughput_reports_every_phase_and_memory_beside_trl(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    assert main(["bench", "throughput", "algos=grpo,dfpo,trl", "rounds=2", *SMALL, f"out={out}"]) == 0
    results = json.loads(out.read_text())
    assert results["matmul_peak_gflops"] > 0.1
    assert [r["algo"] for r in results["algos"]] == ["grpo", "dfpo", "trl"]
    for r in results["algos"]:
        # two rounds of one measured step each (each run's first step discarded)
        assert r["runs"] == 2 and r["measured_steps"] == 2 and len(r["step_s_all"]) == 2
        assert r["step_s"] > 0 and 0.05 < r["peak_rss_gib"] < 64
    for r in results["algos"][:2]:
        for phase in ("generate", "score", "update"):
            assert r[f"{phase}_s"] > 0
            assert 0 < r[f"{phase}_mfu"] < 1
        assert 0 < r["mfu"] < 1
        # 2 prompts answered twice: each prompt runs once, so fewer positions than rows x width
        assert r["forward_positions"] > 0
    shown = capsys.readouterr().out
    assert "matmul peak" in shown and "x1.00" in shown
    assert "grpo: TRL's GRPO step takes" in shown and "against TRL's" in shown


def test_throughput_systems_carry_their_own_settings(tmp_path):
    """'algo+key=value' runs that algorithm with its own settings: here DFPO with one critic step, and DFPO whose
    measured steps all train the critic alone (value pretraining), whose update counts no model pass."""
    out = tmp_path / "throughput.json"
    systems = "dfpo,dfpo+critic.updates=1,dfpo+critic.warmup_steps=9"
    assert main(["bench", "throughput", f"algos={systems}", *SMALL, f"out={out}"]) == 0
    full, one, warm = json.loads(out.read_text())["algos"]
    assert [full["algo"], one["algo"], warm["algo"]] == systems.split(",")
    assert full["critic_only_steps"] == one["critic_only_steps"] == 0 and warm["critic_only_steps"] == 1
    # a frozen head's critic-only update runs no model pass (its features came while scoring; heads not counted)
    assert warm["update_mfu"] == 0 < full["update_mfu"]


def test_update_passes_count_what_each_step_runs():
    """Forward-equivalents of the update: the policy's forward and backward (3) plus its recomputation under
    activation checkpointing; a critic-only step runs the policy forward for a frozen head's features only, or
    its forward and backward on a shared trunk; a separate trunk adds 3 per critic step (its top layers' share
    of them when only those train)."""
    from types import SimpleNamespace

    from dfpo.experiments.throughput import _update_passes

    def trainer(backbone, updates=1, fused=False, checkpoint=0, top=0):
        config = SimpleNamespace(actor=SimpleNamespace(epochs=1, checkpoint_prompts=checkpoint),
                                 critic=SimpleNamespace(backbone=backbone))  # fmt: skip
        trunk = object() if backbone == "separate" else None
        if top:  # a 30-layer trunk that trains its top `top` layers
            trunk = SimpleNamespace(cut=30 - top, upper=SimpleNamespace(layers=[None] * top))
        return SimpleNamespace(config=config, critic=object(), fused=fused, critic_updates=updates, trunk=trunk,
                               critic_on_policy=backbone != "separate")  # fmt: skip

    assert _update_passes(trainer("frozen"), True) == 3
    assert _update_passes(trainer("frozen", fused=True, checkpoint=4), True) == 3
    assert _update_passes(trainer("frozen"), False) == 1  # features for the head, no backward
    assert _update_passes(trainer("frozen", fused=True), False) == 0  # those features came while scoring
    assert _update_passes(trainer("shared"), False) == 3
    assert _update_passes(trainer("separate", updates=16), True) == 3 + 3 * 16
    assert _update_passes(trainer("separate", updates=16), False) == 3 * 16
    assert _update_passes(trainer("separate", updates=16, top=6), True) == pytest.approx(3 + 3 * 16 * 6 / 30)


def test_throughput_refuses_unknown_systems_and_bad_sizes(capsys):
    assert main(["bench", "throughput", "algos=grpo,nope"]) == 2
    assert "unknown nope" in capsys.readouterr().err
    assert main(["bench", "throughput", "algos=nope+critic.updates=1"]) == 2
    assert "unknown nope+critic.updates=1" in capsys.readouterr().err
    assert main(["bench", "throughput", "algos=dfpo+critic.nope=1"]) == 2  # refused before any run starts
    assert "unknown key 'critic.nope'" in capsys.readouterr().err
    assert main(["bench", "throughput", "algos=grpo", "samples=1"]) == 2
    assert "samples >= 2" in capsys.readouterr().err
    assert main(["bench", "throughput", "precision=fp16"]) == 2
    assert "precision='fp16'" in capsys.readouterr().err
    assert main(["bench", "throughput", "train=actor.nope=1"]) == 2  # refused before any run starts
    assert "unknown key 'actor.nope'" in capsys.readouterr().err
    assert main(["bench", "speed"]) == 2


def test_levers_benchmark_times_every_lever_off_and_on(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "levers.json"
    script = Path(__file__).parents[1] / "benchmarks" / "levers.py"
    args = [sys.executable, str(script), "--model", "tiny", "--quick", "--no-compile", "--out", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["greedy_tokens_equal"] is True
    seconds = record["seconds"]
    levers = [
        "generate: whole rows, fp32", "generate: shared prefill, fp32", "generate: shared prefill, bf16 weights",
        "update: whole rows, fp32", "update: shared prompt, fp32", "update: shared prompt, bf16 autocast",
        "update: shared prompt, fp32, 1 thread",
    ]  # fmt: skip
    for name in levers:
        assert seconds[name] > 0, name
    assert "x1.00 speed of whole rows" in done.stdout
