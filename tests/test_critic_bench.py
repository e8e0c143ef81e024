"""``dfpo bench critic``: the probe, the distribution figures, and a cell end to end on the tiny model."""

import json
import math

import pytest
import torch

from dfpo.cli import main
from dfpo.experiments.critic_learning import bernoulli_fit, explained, ridge_r2


def test_ridge_probe_recovers_a_linear_value_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    y = x[:, 0] + 0.5 * torch.randn(2000, generator=g)  # R^2 = 1 / 1.25 = 0.8
    assert ridge_r2(x[:1500], y[:1500], x[1500:], y[1500:], 1.0) == pytest.approx(0.8, abs=0.05)
    noise = torch.randn(2000, generator=g)
    assert ridge_r2(x[:1500], noise[:1500], x[1500:], noise[1500:], 1.0) < 0.02
    assert explained(y, y) == 1.0 and explained(torch.zeros(100), torch.randn(100, generator=g)) < 0.05
    assert math.isnan(explained(torch.rand(100, generator=g), torch.zeros(100)))  # nothing to explain


def test_smollm2_cells_train_at_smollm2_settings():
    from dfpo.experiments.critic_learning import _model_settings

    # the tiny model's actor lr (3e-5) wrecks SmolLM2's policy within 20 steps
    assert "actor.lr=2e-6" in _model_settings("smollm2") and _model_settings("tiny") == []
    assert not any(s.startswith("rollout.") for s in _model_settings("smollm2"))  # the benchmark sets the batch


def test_bernoulli_fit_against_exact_and_collapsed_quantiles():
    k, p = 20, torch.tensor([0.2, 0.5, 0.95])
    levels = (torch.arange(k) + 0.5) / k
    exact = (levels[None, :] > 1 - p[:, None]).float()
    fit = bernoulli_fit(exact, p)
    assert fit["w1"] == 0.0 and fit["std"] == pytest.approx(fit["true_std"], abs=0.02)
    assert fit["cvar"] == pytest.approx(fit["true_cvar"], abs=1e-6)  # 0, 0 and 0.5 for p = 0.95
    collapsed = bernoulli_fit(p[:, None].expand(-1, k), p)
    assert collapsed["std"] == 0.0 and collapsed["w1"] > 0.3 and collapsed["mean"] == pytest.approx(float(p.mean()))


@pytest.mark.slow
def test_bench_critic_runs_a_cell_and_keeps_it_on_resume(tmp_path, capsys):
    args = ["bench", "critic", "tasks=bernoulli", "algos=dvpo", "steps=4", "window=2", "prompts=4",
            f"out={tmp_path}", "threads=1"]  # fmt: skip
    assert main(args) == 0
    cells = json.loads((tmp_path / "cells.json").read_text())
    cell = cells["bernoulli/dvpo/frozen"]
    assert len(cell["explained_var_per_step"]) == 4
    assert {"explained_var", "probe_r2", "value_bias", "distribution"} <= set(cell)
    assert 0.0 < cell["distribution"]["true_std"] <= 0.5
    summary = (tmp_path / "summary.md").read_text()
    assert "| bernoulli | dvpo | frozen |" in summary and "CVaR_0.1" in summary
    assert main(args) == 0
    assert "done before, kept" in capsys.readouterr().out


def test_bench_critic_refuses_bad_settings(tmp_path, capsys):
    assert main(["bench", "critic", "algos=grpo", f"out={tmp_path}"]) == 2
    assert "valid: ppo, robust_ppo, dvpo, dfpo" in capsys.readouterr().err
    assert main(["bench", "critic", "steps=5", "window=5", f"out={tmp_path}"]) == 2
    assert main(["bench", "critic", "tasks=nope", f"out={tmp_path}"]) == 2
