"""``dfpo bench noisy``: the grid's cells, the cross-domain report with intervals and paired comparisons, equal
tuning, resuming after an interruption, and the statistics behind the tables."""

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dfpo.cli import main
from dfpo.experiments.noisy import ABLATIONS, SCALES, CellFailed, NoisyConfig
from dfpo.experiments.noisy.cell import _benchmark_examples, _benchmark_task, run_cell
from dfpo.experiments.noisy.grid import _grid_cells, equal_parameter_width, variant_settings
from dfpo.experiments.noisy.runner import _chosen_lrs
from dfpo.experiments.stats import fixed, mean_interval, paired, t_quantile
from dfpo.training.phases import prompt_share as _prompt_share
from dfpo.training.phases import signal_share as _signal_share

TINY = ["steps=2", "eval_limit=6", "seeds=0", "train=sub"]


def test_t_quantiles_and_intervals_match_the_tables():
    for df, expected in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)]:
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    assert t_quantile(0.025, 3) == pytest.approx(-3.182, abs=1e-3)
    interval = mean_interval([0.5, 0.6, 0.7])
    assert interval.mean == pytest.approx(0.6)
    assert interval.half_width == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-3)
    assert interval.show() == "60.0 ± 24.8"
    assert mean_interval([0.5]).show() == "50.0"  # one seed: no interval to show
    # equal values print equally, whatever float noise a mean carries: 0.2425 * 100 is 24.25 -> "24.2"
    starting = (0.26 + 0.25 + 0.23 + 0.23) / 4
    assert mean_interval([starting] * 3).show() == f"{fixed(100 * starting)} ± 0.0" == "24.2 ± 0.0"
    assert fixed(100 * (sum([starting] * 3) / 3), sign=True) == "+24.2" and fixed(-0.0123, 3) == "-0.012"
    result = paired([0.6, 0.7, 0.5, 0.4], [0.5, 0.7, 0.6, 0.2], tie=0.005)
    assert (result.wins, result.ties, result.losses) == (2, 1, 1)
    assert result.difference.mean == pytest.approx(0.05)
    with pytest.raises(ValueError, match="equal length"):
        paired([1.0], [1.0, 2.0])


def test_signal_share_is_the_ceiling_of_explained_variance_under_flips():
    gen = torch.Generator().manual_seed(0)
    true = (torch.rand(200_000, generator=gen) < 0.3).float()
    flips = torch.rand(200_000, generator=gen) < 0.2
    observed = torch.where(flips, 1.0 - true, true)
    expected = (1 - 2 * 0.2) ** 2 * float(true.var()) / float(observed.var())
    assert _signal_share(observed, true) == pytest.approx(expected, abs=0.01)
    assert _signal_share(true, true) == pytest.approx(1.0)
    assert _signal_share(torch.ones(8), torch.zeros(8)) == 1.0  # nothing to explain


def test_prompt_share_is_the_between_prompt_part_of_the_variance():
    group = torch.arange(8).repeat_interleave(4)
    assert _prompt_share(torch.tensor([0.0, 1.0]).repeat(16).sort().values, group) == pytest.approx(1.0)
    assert _prompt_share(torch.tensor([0.0, 1.0, 0.0, 1.0]).repeat(8), group) < 0  # all spread within prompts
    # prompts of success rate 0.2 or 0.8: between-prompt variance 0.09 of a total 0.25
    gen = torch.Generator().manual_seed(0)
    rates = torch.tensor([0.2, 0.8]).repeat(4).repeat_interleave(4)
    shares = [_prompt_share((torch.rand(32, generator=gen) < rates).float(), group) for _ in range(3000)]
    assert sum(shares) / len(shares) == pytest.approx(0.09 / 0.25, abs=0.03)
    # no difference between prompts: the mean over steps is about 0, not pushed up by a clip at 0
    flat = [_prompt_share((torch.rand(32, generator=gen) < 0.5).float(), group) for _ in range(3000)]
    assert abs(sum(flat) / len(flat)) < 0.02


def test_grid_cells_cover_every_combination_seed_by_seed():
    scale = SCALES["tiny"]
    config = NoisyConfig(algos="dfpo,grpo", ablations="k8", noise="clean,flip(0.4)", seeds="0,1")
    variants, cells = _grid_cells(config, scale)
    assert variants == ["dfpo", "grpo", "k8"]
    assert len(cells) == 2 * 2 * 2 * 3  # seeds x domains x noise x variants
    assert [c.seed for c in cells] == sorted(c.seed for c in cells)  # a partial grid holds whole seeds
    assert len({c.id for c in cells}) == len(cells)
    # dialogue trains only under its reward model, whatever the grid's supervision
    dialogue = _grid_cells(NoisyConfig(algos="dfpo", train="dialogue", seeds="0"), SCALES["smollm2"])[1]
    assert [c.noise for c in dialogue] == ["reward_model"]
    # cross-domain pairs: math with the out-of-domain arithmetic and science, dialogue alone, tiny's two domains
    # together
    assert SCALES["smollm2"].peers("math") == ("math", "arith", "science")
    assert SCALES["smollm2"].peers("science") == ("science", "math")
    assert SCALES["smollm2"].peers("dialogue") == ("dialogue",)
    assert scale.peers("sub") == ("sub", "add")


def test_domain_settings_change_memory_only_and_the_grid_can_override_them():
    from dfpo.experiments.noisy.grid import Cell
    from dfpo.experiments.noisy.report import _domain_settings_line
    from dfpo.experiments.noisy.runner import _budget, _cell_settings
    from dfpo.training.config import build_config

    memory_only = ("actor.micro_batch=", "actor.checkpoint_prompts=", "rollout.batch_size=")
    for scale in SCALES.values():
        for domain in scale.domains.values():
            assert all(s.startswith(memory_only) for s in domain.settings), (domain.name, domain.settings)
    scale = SCALES["smollm2"]
    # CoQA's long prompts: the backward goes one prompt's samples at a time; math keeps the fused single pass
    dialogue = _cell_settings(scale, _budget(NoisyConfig(), scale), Cell("dialogue", "dfpo", "reward_model", 0))
    assert build_config(dialogue).actor.micro_batch == 4
    math = _cell_settings(scale, _budget(NoisyConfig(), scale), Cell("math", "dfpo", "flip(0.2)", 0))
    assert build_config(math).actor.micro_batch == 0
    # a grid's own settings come later, so they win
    budget = _budget(NoisyConfig(settings="actor.micro_batch=8"), scale)
    overridden = _cell_settings(scale, budget, Cell("dialogue", "ppo", "reward_model", 0))
    assert build_config(overridden).actor.micro_batch == 8
    # summary.md says what the cells ran with, read from their records
    records = [{"domain": "math", "settings": math}, {"domain": "dialogue", "settings": dialogue}]
    assert _domain_settings_line(scale, records[:1]) == []
    assert "dialogue `actor.micro_batch=4`." in _domain_settings_line(scale, records)[0]
    records.append({"domain": "dialogue", "settings": overridden})
    assert "dialogue `actor.micro_batch=4` or `actor.micro_batch=8`." in _domain_settings_line(scale, records)[0]


RESULTS = Path(__file__).resolve().parents[1] / "results"


@pytest.mark.parametrize(
    ("folder", "dialogue"), [("2026-11-23-noisy-smollm2-dialogue", True), ("2026-11-22-noisy-smollm2", False)]
)
def test_the_report_of_real_smollm2_cells_explains_their_settings_and_the_reward_model_ceiling(
    folder, dialogue, tmp_path
):
    out = tmp_path / folder
    shutil.copytree(RESULTS / folder, out, ignore=shutil.ignore_patterns("runs", "logs", "*.png"))
    assert main(["bench", "noisy", f"out={out}", "report_only=true"]) == 0
    summary = (out / "summary.md").read_text()
    assert ("dialogue `actor.micro_batch=4`" in summary) == dialogue
    assert ("Under `reward_model` the observed reward is a learned reward model's score" in summary) == dialogue
    assert "## Critic explained variance" in summary


def test_a_grid_resumed_on_another_machine_names_each_machine_and_commit():
    from dfpo.experiments.noisy.report import _machines_text

    first = {"platform": "Linux", "processor": "x86_64", "cores": 2, "python": "3.11.7", "torch": "2.13.0+cpu",
             "transformers": "5.23.0", "code": "0.1.0 (git aaaaaaa)"}  # fmt: skip
    later = {**first, "code": "0.1.0 (git bbbbbbb)"}
    assert _machines_text({"machine": first}) == _machines_text({"machine": first, "sessions": [{"machine": first}]})
    assert _machines_text({"machine": first}).startswith("Machine: Linux, x86_64, 2 cores")
    # a grid recorded before sessions kept their machine, then resumed twice from a later commit
    grid = {"machine": first, "sessions": [{}, {"machine": later}, {"machine": later}]}
    text = _machines_text(grid)
    assert text.startswith("Machines and code, in the order")
    assert text.index("git aaaaaaa") < text.index("git bbbbbbb") and text.count("git bbbbbbb") == 1


def test_the_wall_time_of_a_grid_says_how_many_invocations_recorded_it():
    from dfpo.experiments.noisy.report import _sessions_line

    session = {"started": 0.0, "finished": 3600.0, "cells_before": 0, "cells_after": 4, "workers": 1}
    (line,) = _sessions_line({"commands": ["c"], "sessions": [session]})
    assert line == "Wall time of the grid: 1.00 hours over 1 invocation(s): 4 cells in 60 min (1 at a time)."
    # three invocations, of which an older version of the code recorded only the one that ended
    (line,) = _sessions_line({"commands": ["c", "c", "c"], "sessions": [session]})
    assert "1.00 hours over the 1 of its 3 invocations that recorded theirs" in line


def test_each_out_of_domain_side_is_averaged_apart_when_there_are_several(tmp_path):
    # SmolLM2 math is evaluated on out-of-domain arithmetic and on science: science cannot move at this scale, so
    # the OOD average alone would flatten what arithmetic shows
    out = tmp_path / "grid"
    shutil.copytree(RESULTS / "2026-11-22-noisy-smollm2", out, ignore=shutil.ignore_patterns("*.png", "*.csv", "*.md"))
    arith = {"base": 0.10, "dfpo": 0.40, "ppo": 0.20}
    for path in (out / "cells").glob("*.json"):
        record = json.loads(path.read_text())
        if record["domain"] == "science" or record["variant"] == "grpo":
            path.unlink()
            continue
        for name in ("sub-mixed", "add3-1digit", "mul-mixed"):
            record["benchmarks"][name] = {"domain": "arith", "accuracy": arith[record["variant"]], "n": 100}
        path.write_text(json.dumps(record))
    assert main(["bench", "noisy", f"out={out}", "report_only=true"]) == 0
    summary = (out / "summary.md").read_text()
    table = summary[summary.index("## Trained on math") :]
    assert "| ID AVG | arith AVG | science AVG | OOD AVG | ALL AVG |" in table
    assert re.search(r"\| starting model \| - \|( [\d.]+ \|){10} 10\.0 \| 24\.2 \|", table)
    paired_table = summary[summary.index("## DFPO against each variant") :]
    assert "| variant | pairs | ID AVG | arith AVG | science AVG | OOD AVG | ALL AVG |" in paired_table
    # DFPO's arithmetic is 20 points above PPO's on every seed; science is the same for both
    assert re.search(r"\| ppo \| 3 \| [^|]+ \| 20\.0 ± 0\.0 \| 0\.0 ± 0\.0 \|", paired_table)
    rows = list(csv.DictReader((out / "cells.csv").open()))
    assert {round(float(r["arith AVG"]), 6) for r in rows} == {0.4, 0.2}


@pytest.mark.parametrize("scale", ["tiny", "smollm2"])
def test_arithmetic_benchmarks_hold_their_full_budget_of_the_right_problems(scale):
    # a benchmark filtered by a field must still have eval_limit examples, all of that kind
    config = SCALES[scale]
    for domain in config.domains.values():
        for benchmark in domain.benchmarks:
            if benchmark.task != "arithmetic":
                continue
            examples = _benchmark_examples(_benchmark_task(benchmark, config.model), benchmark, config.eval_limit)
            assert len(examples) == config.eval_limit, benchmark.name
            if benchmark.where is not None:
                key, value = benchmark.where
                assert {e[key] for e in examples} == {value}, benchmark.name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algos=dfpo,nope", "unknown algorithm 'nope'"),
        ("ablations=nope", "unknown ablation 'nope'"),
        ("train=science", "scale 'tiny' has no domain 'science'"),
        ("seeds=a", "comma-separated integers"),
        ("noise=flip(2)", "flip(p) needs 0 <= p <= 1"),
        ("scale=huge", "valid scales are tiny, smollm2"),
        ("settings=actor.nope=1", "unknown key 'actor.nope'"),
        ("workers=0", "workers=0"),
    ],
)
def test_bad_grids_are_refused_before_any_cell_runs(tmp_path, capsys, override, message):
    assert main(["bench", "noisy", override, f"out={tmp_path / 'g'}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "g" / "cells").exists()


def test_ablations_change_what_they_name():
    scale = SCALES["tiny"]
    assert variant_settings(scale, "euler4", []) == ("dfpo", ["critic.flow.sample_steps=4"])
    assert variant_settings(scale, "independent", []) == (
        "dfpo",
        ["critic.flow.cfm_weight=1", "critic.flow.coupling=independent"],
    )
    assert variant_settings(scale, "ppo", []) == ("ppo", [])
    algo, settings = variant_settings(scale, "dvpo_equal", ["critic.width=64"])
    assert algo == "dvpo" and settings[0].startswith("critic.width=")
    algo, settings = variant_settings(scale, "ppo_equal", ["critic.width=64"])
    assert algo == "ppo" and settings == [f"critic.width={equal_parameter_width(128, 64, 'scalar')}"]
    assert set(ABLATIONS) >= {"euler2", "euler8", "no_risk", "no_consistency", "uweight_off", "k64"}


def test_equal_parameter_width_matches_the_flow_head():
    from dfpo.critics.quantile import QuantileCritic
    from dfpo.critics.scalar import ScalarCritic
    from dfpo.critics.value_flow import ValueFlowCritic

    def count(module):
        return sum(p.numel() for p in module.parameters())

    flow = count(ValueFlowCritic(128, 64))
    assert abs(count(QuantileCritic(128, 200, 3, equal_parameter_width(128, 64))) - flow) / flow < 0.02
    scalar_width = equal_parameter_width(128, 64, "scalar")
    assert abs(count(ScalarCritic(128, width=scalar_width)) - flow) / flow < 0.02
    assert count(ScalarCritic(128)) < flow / 2  # PPO's default head is much smaller: the ablation is not a no-op


def test_stability_of_a_heldout_curve():
    from dfpo.experiments.noisy.cell import stability

    curve = [{"step": s, "accuracy": a} for s, a in enumerate([0.40, 0.50, 0.30, 0.45, 0.35])]
    result = stability(curve)
    assert result["largest_drop"] == pytest.approx(0.20)  # from the best so far (0.50) to 0.30
    assert result["ended_below_start"] == 1.0 and result["heldout_start"] == 0.40
    rising = stability([{"step": 0, "accuracy": 0.3}, {"step": 5, "accuracy": 0.5}])
    assert rising["largest_drop"] == 0.0 and rising["ended_below_start"] == 0.0
    assert math.isnan(stability([])["largest_drop"])


def test_the_critic_table_shows_each_training_domain_apart():
    from dfpo.experiments.noisy.report import _critic_section

    def row(domain, ev, probe):
        return {"variant": "ppo", "noise": "clean", "domain": domain, "critic_mc_explained_var": ev,
                "critic_explained_var": ev, "probe_r2": probe, "prompt_share": 0.5,
                "explained_var_ceiling": 1.0}  # fmt: skip

    lines = _critic_section([row("add", 0.4, 0.5), row("sub", 0.0, 0.1)], ["ppo"], ["clean"])
    text = "\n".join(lines)
    both, add, sub = (text.index(h) for h in ("All domains:", "Trained on add:", "Trained on sub:"))
    assert "| ppo | 0.200 / 0.300 / 0.500 / 1.000 |" in text[both:add]
    assert "| ppo | 0.400 / 0.500 / 0.500 / 1.000 |" in text[add:sub]
    assert "| ppo | 0.000 / 0.100 / 0.500 / 1.000 |" in text[sub:]
    single = "\n".join(_critic_section([row("add", 0.4, 0.5)], ["ppo"], ["clean"]))
    assert "Trained on" not in single and "| ppo | 0.400 / 0.500 / 0.500 / 1.000 |" in single


def test_tuning_picks_the_rate_with_the_best_final_true_reward(tmp_path):
    specs = []
    for lr, reward in [("1e-5", 0.4), ("3e-5", 0.6), ("1e-4", 0.1)]:
        out = tmp_path / f"{lr}.json"
        out.write_text(json.dumps({"curves": [{"reward/true": reward}] * 12}))
        specs.append({"id": lr, "variant": "grpo", "domain": "sub", "lr": lr, "out": str(out)})
    assert _chosen_lrs(specs) == {("grpo", "sub"): "3e-5"}
    missing = [{**specs[0], "out": str(tmp_path / "missing.json")}]
    with pytest.raises(CellFailed, match="did not finish"):
        _chosen_lrs(missing)


@pytest.mark.slow
def test_grid_trains_evaluates_reports_and_resumes(tmp_path, capsys):
    out = tmp_path / "grid"
    # 3 critic updates a step, not the default 16: the grid's plumbing is under test here, not the critic
    args = ["bench", "noisy", "algos=dfpo,grpo", "noise=flip(0.2)", "tune=1e-5,3e-5", "workers=2",
            "settings=critic.updates=3", *TINY]  # fmt: skip
    assert main([*args, f"out={out}"]) == 0
    cells = sorted(p.name for p in (out / "cells").glob("*.json"))
    assert cells == [
        "base.json", "sub-dfpo-flip0.2-seed0.json", "sub-grpo-flip0.2-seed0.json",
        "tune-sub-dfpo-lr1e-5-seed1000.json", "tune-sub-dfpo-lr3e-5-seed1000.json",
        "tune-sub-grpo-lr1e-5-seed1000.json", "tune-sub-grpo-lr3e-5-seed1000.json",
    ]  # fmt: skip
    tuning = json.loads((out / "tuning.json").read_text())
    for variant in ("dfpo", "grpo"):
        record = json.loads((out / "cells" / f"sub-{variant}-flip0.2-seed0.json").read_text())
        assert f"actor.lr={tuning[f'{variant}/sub']}" in record["settings"]  # the tuned rate is the one used
        assert [c["step"] for c in record["curves"]] == [1, 2]
        assert set(record["benchmarks"]) == {f"{d}-{t}" for d in ("add", "sub") for t in (2, 3, 4)}
        assert all(b["n"] == 6 for b in record["benchmarks"].values())
        # the trainer's held-out accuracy before training and at the last step (eval_every 5 > steps)
        assert [p["step"] for p in record["heldout"]] == [0, 2]
        assert all(0 <= p["accuracy"] <= 1 for p in record["heldout"])
        # a critic's fit beside the ridge probe on its features; none without a critic
        assert ("critic_fit" in record) == (variant == "dfpo")
        run_dir = out / "runs" / record["id"]
        assert (run_dir / "metrics.jsonl").exists()
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "latest").exists()  # weights not kept
    rows = list(csv.DictReader((out / "cells.csv").open()))
    assert [r["variant"] for r in rows] == ["dfpo", "grpo"]  # tuning cells are not results
    for row in rows:
        ids = [float(row[f"sub-{t}"]) for t in (2, 3, 4)]
        assert float(row["ID AVG"]) == pytest.approx(sum(ids) / 3)
        assert float(row["ALL AVG"]) == pytest.approx(
            sum(float(row[f"{d}-{t}"]) for d in ("add", "sub") for t in (2, 3, 4)) / 6
        )
        assert 0 <= float(row["largest_drop"]) <= 1 and row["ended_below_start"] in ("0.0", "1.0")
    summary = (out / "summary.md").read_text()
    assert "## Trained on sub, supervision flip(0.2)" in summary
    assert "| grpo | 1 |" in summary and "DFPO against each variant" in summary
    assert "under each supervision" in summary
    assert "actor lr from 1e-5, 3e-5" in summary
    assert "| starting model | - |" in summary and "## Stability" in summary
    assert "## Critic explained variance" in summary  # dfpo has a critic; grpo has none
    critic_rows = [line for line in summary.splitlines() if line.startswith(("| dfpo | ", "| grpo | "))]
    assert any(line.count(" / ") == 3 for line in critic_rows)  # explained variance / probe / prompt share / ceiling
    assert "the largest drop below the best accuracy" in summary and "Spread of the final true" in summary
    for plot in ("curves-sub.png", "accuracy-sub.png"):
        assert (out / plot).stat().st_size > 1000
    grid = json.loads((out / "grid.json").read_text())
    assert grid["machine"]["cores"] and grid["budget"]["steps"] == 2
    (session,) = grid["sessions"]  # the invocation's wall time is on record
    assert session["finished"] > session["started"] and (session["cells_before"], session["cells_after"]) == (0, 7)
    assert session["machine"] == grid["machine"] and "Machine: " in summary  # one machine: named once
    assert "Wall time of the grid: " in summary and "7 cells in " in summary

    # the same command again: every cell is finished, nothing runs
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    capsys.readouterr()
    assert main([*args, f"out={out}"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == stamps
    summary = (out / "summary.md").read_text()
    assert summary.count("`dfpo bench noisy algos=dfpo,grpo") == 1 and "(2 invocations: resumed)" in summary
    # another budget in the same folder is refused
    assert main(["bench", "noisy", "algos=dfpo", "steps=3", "eval_limit=6", "seeds=0", f"out={out}"]) == 2
    assert "another budget" in capsys.readouterr().err
    assert main(["bench", "noisy", f"out={out}", "report_only=true"]) == 0


@pytest.mark.slow
def test_an_interrupted_cell_continues_from_its_checkpoint_exactly(tmp_path):
    from dfpo.experiments.noisy.grid import Cell
    from dfpo.experiments.noisy.runner import _budget, _cell_settings
    from dfpo.training.config import build_config
    from dfpo.training.trainer import Trainer

    scale = SCALES["tiny"]
    budget = _budget(NoisyConfig(steps=4, eval_limit=4), scale)
    budget["settings"] += ["checkpoint.every=2", "threads=1", "critic.updates=3"]  # extra critic steps, fewer
    records = {}
    for name in ("whole", "resumed", "early"):
        cell = Cell("sub", "dfpo", "flip(0.2)", 0)
        settings = _cell_settings(scale, budget, cell)
        run_dir = tmp_path / name
        if name == "resumed":  # the first two steps, then the process "dies" after its checkpoint
            Trainer(build_config([*settings, f"run_dir={run_dir}", "steps=2"])).run()
        if name == "early":  # the process died after its first step, before any checkpoint: it starts over
            run_dir.mkdir()
            (run_dir / "metrics.jsonl").write_text('{"step": 1, "reward/true": 0.0}\n')
            (run_dir / "eval.json").write_text('{"before": {}, "history": [{"step": 1}]}')
        spec = {"id": cell.id, "scale": "tiny", "domain": "sub", "variant": "dfpo", "algo": "dfpo",
                "noise": "flip(0.2)", "seed": 0, "tuning": False, "settings": settings, "threads": 1,
                "eval_limit": 4, "run_dir": str(run_dir), "out": str(tmp_path / f"{name}.json")}  # fmt: skip
        run_cell(spec)
        records[name] = json.loads((tmp_path / f"{name}.json").read_text())
    whole, resumed, early = records["whole"], records["resumed"], records["early"]

    def measured(curves):  # all but the timings
        return [{k: v for k, v in c.items() if not k.startswith("perf/")} for c in curves]

    assert early["resumed_from_step"] == 0 and measured(early["curves"]) == measured(whole["curves"])
    assert early["heldout"] == whole["heldout"]
    assert [c["step"] for c in resumed["curves"]] == [1, 2, 3, 4]
    for a, b in zip(whole["curves"], resumed["curves"], strict=True):
        assert a["reward/true"] == b["reward/true"]
        assert a["critic/explained_var"] == pytest.approx(b["critic/explained_var"], abs=1e-6)
    assert resumed["resumed_from_step"] == 2 and whole["resumed_from_step"] == 0
    # the accuracy curve survives the interruption (plus the point the short run took at its own last step)
    assert [p for p in resumed["heldout"] if p["step"] != 2] == whole["heldout"]
    assert (whole["critic_fit"]["steps_seen"], resumed["critic_fit"]["steps_seen"]) == (4, 2)
    for record in (whole, resumed, early):
        for result in record["benchmarks"].values():
            result.pop("seconds")
    assert whole["benchmarks"] == resumed["benchmarks"] == early["benchmarks"]


@pytest.mark.slow
def test_interrupting_the_grid_keeps_finished_cells_and_resumes(tmp_path):
    out = tmp_path / "grid"
    command = [sys.executable, "-m", "dfpo.cli", "bench", "noisy", "algos=grpo", "noise=clean", "seeds=0,1",
               "train=sub", "steps=30", "eval_limit=4", "workers=1", "threads=1", f"out={out}"]  # fmt: skip
    parent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "runs" / "sub-grpo-clean-seed0" / "latest").exists() and time.time() < deadline:
        time.sleep(0.5)
    assert (out / "cells" / "base.json").exists()
    # the invocation's record is kept as its cells finish, not only when it ends: a SIGKILL loses no finished cell
    (session,) = json.loads((out / "grid.json").read_text())["sessions"]
    assert (session["cells_before"], session["cells_after"]) == (0, 1) and session["finished"] > session["started"]
    parent.send_signal(signal.SIGTERM)  # `kill`, as Ctrl-C (SIGINT) would
    _, err = parent.communicate(timeout=60)
    assert parent.returncode != 0
    assert "interrupted; finished cells are kept" in err
    assert not (out / "cells" / "sub-grpo-clean-seed0.json").exists()
    base_stamp = (out / "cells" / "base.json").stat().st_mtime_ns
    # the cell's process was stopped with the grid: nothing is still writing to its run folder
    size = (out / "runs" / "sub-grpo-clean-seed0" / "metrics.jsonl").stat().st_size
    time.sleep(3)
    assert (out / "runs" / "sub-grpo-clean-seed0" / "metrics.jsonl").stat().st_size == size
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "cells" / "base.json").stat().st_mtime_ns == base_stamp  # finished: skipped
    record = json.loads((out / "cells" / "sub-grpo-clean-seed0.json").read_text())
    assert [c["step"] for c in record["curves"]] == list(range(1, 31))  # continued, not restarted
    assert record["resumed_from_step"] == 20  # its checkpoint at step 20
    assert json.loads((out / "cells" / "sub-grpo-clean-seed1.json").read_text())["resumed_from_step"] == 0
    grid = json.loads((out / "grid.json").read_text())
    assert [(x["cells_before"], x["cells_after"]) for x in grid["sessions"]] == [(0, 1), (1, 3)]


def test_noisy_help_lists_its_keys(capsys):
    assert main(["bench", "noisy", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "algos" in shown and "ablations" in shown and "workers" in shown
    assert main(["bench", "nope"]) == 2
    assert "dfpo bench {throughput,noisy,critic}" in capsys.readouterr().err


@pytest.mark.parametrize("variant", sorted(ABLATIONS))
def test_no_ablation_is_a_no_op(variant):
    """Each ablation changes its critic's loss (or its parameter count) at the defaults: a setting that the
    defaults never read (e.g. a coupling when flow matching is off) would make the ablation silently equal DFPO."""

    import dfpo.critics as critics
    from dfpo.critics.base import CriticContext
    from dfpo.training.config import build_config

    scale = SCALES["tiny"]

    def loss_and_size(algo: str, settings: list[str]) -> tuple[float, int]:
        c = build_config([f"algo={algo}", "model=tiny", *settings])
        options = c.critic.builder_options()
        torch.manual_seed(0)
        critic = critics.build(c.critic.kind, scale.hidden_size, **options)
        with torch.no_grad():  # a field away from its initialisation (a zero last layer makes every path agree)
            for p in critic.parameters():
                p.add_(0.1 * torch.randn_like(p))
        g = torch.Generator().manual_seed(1)
        hidden, mask = torch.randn(4, 6, scale.hidden_size, generator=g), torch.ones(4, 6)
        rewards = torch.zeros(4, 6)
        rewards[:, -1] = (torch.rand(4, generator=g) < 0.5).float()
        torch.manual_seed(2)
        with torch.no_grad():
            old = critic.outputs(hidden)
        targets = critic.targets(rewards, old, mask, 1.0, 1.0)
        torch.manual_seed(3)
        loss, _ = critic.training_loss(hidden, targets, mask, old, CriticContext())
        return float(loss.detach()), sum(p.numel() for p in critic.parameters())

    algo, settings = variant_settings(scale, variant, [])
    assert loss_and_size(algo, settings) != loss_and_size(algo, [])
    if variant == "independent":  # and the coupling itself matters, against flow matching with sorted pairs
        assert loss_and_size(algo, settings) != loss_and_size(*variant_settings(scale, "cfm", []))
