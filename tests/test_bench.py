"""``dfpo bench throughput``: per-phase times, tokens per second and MFU against a measured matmul peak."""

import json

from dfpo.bench import matmul_peak
from dfpo.cli import main


def test_matmul_peak_is_a_plausible_rate():
    peak = matmul_peak(size=256, repeats=3)
    assert 1e8 < peak < 1e14  # FLOP/s: between a slow CPU core and a large accelerator


def test_throughput_reports_every_phase_for_each_algorithm(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    args = ["bench", "throughput", "algos=grpo,dfpo", "steps=1", "prompts=2", "samples=2", "max_new_tokens=12"]
    assert main([*args, f"out={out}"]) == 0
    results = json.loads(out.read_text())
    assert results["matmul_peak_gflops"] > 0.1
    assert [r["algo"] for r in results["algos"]] == ["grpo", "dfpo"]
    for r in results["algos"]:
        for phase in ("generate", "score", "update"):
            assert r[f"{phase}_s"] > 0 and r[f"{phase}_tokens_per_s"] > 0
            assert 0 < r[f"{phase}_mfu"] < 1
        assert 0 < r["mfu"] < 1
    shown = capsys.readouterr().out
    assert "matmul peak" in shown and "x1.00 of grpo" in shown


def test_throughput_refuses_unknown_algorithms(capsys):
    assert main(["bench", "throughput", "algos=grpo,nope"]) == 2
    assert "unknown nope" in capsys.readouterr().err
    assert main(["bench", "speed"]) == 2
