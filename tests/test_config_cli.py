"""key=value configuration and the dfpo command line."""

import json
from dataclasses import dataclass

import pytest

from dfpo.cli import main
from dfpo.options import ConfigError, apply_overrides, option, parse_scalar
from dfpo.sft import SFTConfig


@dataclass(frozen=True)
class Example:
    steps: int = option(10, "steps")
    lr: float = option(1e-3, "learning rate")
    name: str = option("a", "a name")
    flag: bool = option(False, "a switch")
    limit: int | None = option(None, "optional limit")
    extra: dict = option({}, "options passed on")


def test_overrides_are_typed():
    c = apply_overrides(
        Example(), ["steps=5", "lr=3e-4", "name=b", "flag=true", "limit=7", "extra.depth=2", "extra.x=hi"]
    )
    assert (c.steps, c.lr, c.name, c.flag, c.limit) == (5, 3e-4, "b", True, 7)
    assert c.extra == {"depth": 2, "x": "hi"}
    assert apply_overrides(c, ["limit=none"]).limit is None
    assert Example().extra == {}  # defaults are not shared between instances


@pytest.mark.parametrize(
    "override,message",
    [
        ("stepz=5", "unknown key 'stepz'; valid keys: steps, lr, name, flag, limit, extra"),
        ("steps=5.5", "steps='5.5': expected int"),
        ("lr=fast", "lr='fast': expected float"),
        ("flag=maybe", "flag='maybe': expected true or false"),
        ("steps.x=1", "'steps.x': 'steps' takes no sub-keys"),
        ("steps", "overrides are key=value"),
        ("extra=3", "'extra' takes sub-keys: extra.<name>=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        apply_overrides(Example(), [override])


def test_parse_scalar():
    assert [parse_scalar(s) for s in ("1", "1.5", "true", "None", "x")] == [1, 1.5, True, None, "x"]


def test_cli_refuses_bad_input(capsys):
    assert main([]) == 2
    assert main(["sft", "stepz=1"]) == 2
    assert "unknown key 'stepz'" in capsys.readouterr().err
    assert main(["sft", "task_options.digitz=1", "steps=1"]) == 2
    assert "task_options for task 'arithmetic'" in capsys.readouterr().err
    assert main(["sft", "--help"]) == 0
    assert "task_options" in capsys.readouterr().out


def test_cli_sft_writes_a_loadable_model_and_its_record(tmp_path):
    out = tmp_path / "sft"
    args = ["sft", "steps=3", "batch_size=4", "hidden_size=32", "layers=1", "eval_limit=4", "max_new_tokens=4"]
    assert main([*args, "task_options.eval_size=20", "task_options.train_size=40", f"out={out}"]) == 0
    record = json.loads((out / "sft.json").read_text())
    assert record["command"].startswith("dfpo sft steps=3")
    assert record["config"]["steps"] == 3 and len(record["history"]) == 3
    assert 0.0 <= record["eval_accuracy"] <= 1.0
    from dfpo.models import load_model

    model, _ = load_model(str(out))
    assert model.config.hidden_size == 32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    assert SFTConfig().model == "scratch"


def test_dfpo_eval_reports_greedy_mean_and_majority_accuracy(tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", "tiny", "preset=tiny-arithmetic", "limit=12", "samples=3", f"out={out}"])
    assert code == 0
    result = json.loads(out.read_text())["splits"]["eval"]
    assert result["n"] == 12 and {"accuracy", "mean@3", "maj@3", "format_rate"} <= set(result)
    assert all(0.0 <= result[key] <= 1.0 for key in ("accuracy", "mean@3", "maj@3"))
    assert result["accuracy"] > 0  # the shipped tiny model answers about half of these
    assert "eval tiny on arithmetic/eval (n=12)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["preset=nope"], "unknown preset 'nope'; presets: tiny-arithmetic"),
        (["preset=tiny-arithmetic", "task=math"], "preset= sets task, task_options and max_new_tokens"),
        # a value the task refuses is named without a traceback, as an unknown option is
        (
            [
                "task_options.digits=1",
                "task_options.operators=*",
                "task_options.max_terms=2",
                "task_options.eval_size=1000",
            ],
            "task_options for task 'arithmetic': arithmetic: only 100 distinct problems found for 1000 requested",
        ),
        (["task_options.colour=red"], "task_options for task 'arithmetic':"),
        (["limit=-3"], "limit=-3: must be >= 1"),
        (["task=nope"], "task='nope': unknown task 'nope'; registered: arithmetic"),
        (["splits=eval,nope"], "splits='eval,nope': task 'arithmetic' has no split 'nope'; it has train, eval"),
        (["splits="], "splits= is empty: name at least one split"),
        (["out=/proc/dfpo-eval.json"], "out '/proc/dfpo-eval.json' cannot be written"),
        (["max_new_tokens=0"], "max_new_tokens=0: must be >= 1"),
        (["samples=2", "temperature=-1"], "temperature=-1.0: must be > 0"),
        (["threads=-1"], "threads=-1: must be >= 0"),
    ],
)
def test_dfpo_eval_refuses_bad_task_keys_without_a_traceback(args, message, capsys):
    assert main(["eval", *args]) == 2
    assert message in capsys.readouterr().err


def test_every_numeric_setting_has_a_range():
    """RANGES is the one place numeric settings are checked: a new int or float option needs its entry (and
    dfpo eval's own keys theirs, in EVAL_RANGES)."""
    from dfpo.cli import EVAL_RANGES, EvalConfig
    from dfpo.sft import SFT_RANGES
    from dfpo.training.config import TrainConfig
    from dfpo.training.ranges import RANGES, numeric_settings

    assert set(numeric_settings(TrainConfig())) == set(RANGES)
    assert set(numeric_settings(EvalConfig())) == set(EVAL_RANGES)
    assert set(numeric_settings(SFTConfig())) == set(SFT_RANGES)


def test_a_yaml_value_of_the_wrong_kind_names_its_key(tmp_path):
    from dfpo.options import ConfigError
    from dfpo.training.config import build_config

    for text, message in (
        ("run_dir: [a, b]\n", "run_dir takes one str value, got a list ['a', 'b']"),
        ("critic: 3\n", "critic is a group of keys: give a mapping, not 3"),
        ("critic:\n  lr: {x: 1}\n", "critic.lr takes one float value, got a mapping"),
        ("task_options: 5\n", "task_options takes a mapping of options, not 5"),
    ):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            build_config([], str(path))


def test_each_critic_kind_owns_its_option_group():
    """critic.flow.* states every option of the flow critic's loss, with the loss's own defaults and choices (so
    that the group cannot drift from the critic); each kind is built from the shared options and its group alone."""
    import inspect

    from dfpo.critics import value_flow
    from dfpo.training import critic_options
    from dfpo.training.config import build_config
    from dfpo.training.critic_options import FlowOptions

    loss = inspect.signature(value_flow.ValueFlowCritic.loss).parameters
    flow = FlowOptions()
    for name, value in flow.loss_options().items():
        assert loss[name].default == value, name
    trainer_sets = {"self", "hidden", "target_samples", "mask", "anchor_samples", "sample_steps", "generator",
                    "uniform", "risk_weight", "risk_targets"}  # fmt: skip
    assert set(loss) - trainer_sets == set(flow.loss_options())
    for name in ("COUPLINGS", "UNCERTAINTY_WEIGHTS", "ANCHORS", "CONSISTENCIES"):
        assert getattr(critic_options, name) == getattr(value_flow, name)
    assert build_config(["algo=ppo"]).critic.builder_options() == {"width": 64, "value_clip": 0.2}
    dvpo = build_config(["algo=dvpo", "critic.flow.samples=8"]).critic.builder_options()
    assert dvpo["quantiles"] == 200 and "samples" not in dvpo


def test_the_earlier_flat_critic_keys_still_read():
    """critic.samples, critic.heads, ... of configs, YAML files and checkpoints written before the option groups
    set every group that now holds the option; a checkpoint of that layout resumes."""
    import dataclasses

    from dfpo.options import flatten
    from dfpo.training.config import build_config, config_record
    from dfpo.training.setup import check_resume_config

    flat = ["critic.samples=8", "critic.heads=5", "critic.risk_weight=0.3"]  # the earlier layout's keys
    c = build_config([*flat, "critic.flow.coupling=independent"])
    assert (c.critic.flow.samples, c.critic.ensemble.heads, c.critic.quantile.heads) == (8, 5, 5)
    assert (c.critic.flow.risk_weight, c.critic.quantile.risk_weight) == (0.3, 0.3)
    # the record of such a run as the earlier layout wrote it: flat critic options, a free-form flow dict
    record = config_record(c)
    critic = {k: v for k, v in record["critic"].items() if k not in ("scalar", "ensemble", "quantile", "flow")}
    critic.update(samples=8, sample_steps=1, heads=5, quantiles=200, kappa=0.02, return_scale=1.0, risk_weight=0.3,
                  risk_targets="pooled", value_clip=0.2, pessimism=0.0, bootstrap=0.5,
                  flow={"coupling": "independent"})  # fmt: skip
    check_resume_config(c, {"config": {**record, "critic": critic}}, c.resolved_run_dir)
    changed = dataclasses.replace(
        c, critic=dataclasses.replace(c.critic, flow=dataclasses.replace(c.critic.flow, samples=16))
    )
    with pytest.raises(Exception, match=r"differs from the run's in critic\.flow\.samples"):
        check_resume_config(changed, {"config": {**record, "critic": critic}}, c.resolved_run_dir)
    assert "critic.flow.samples=8" in flatten(config_record(c))


@pytest.mark.parametrize(
    ("args", "message"),
    [(["steps=-1"], "steps=-1: must be >= 1"), (["lr=-1"], "lr=-1.0: must be > 0"),
     (["stop_at=2"], "stop_at=2.0: must be in [0,1]")],
)  # fmt: skip
def test_dfpo_sft_refuses_out_of_range_numbers(args, message, tmp_path, capsys):
    assert main(["sft", *args, f"out={tmp_path / 'sft'}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "sft").exists()


@pytest.mark.parametrize(
    "command",
    [["sft", "steps=1"], ["bench", "noisy"], ["bench", "critic", "steps=3", "window=1"],
     ["bench", "throughput", "steps=1"], ["train", "steps=1"]],
)  # fmt: skip
def test_an_output_that_cannot_be_written_is_named_before_any_work(command, capsys):
    key = "run_dir" if command[0] == "train" else "out"
    assert main([*command, f"{key}=/proc/dfpo-cannot-write/x"]) == 2
    err = capsys.readouterr().err
    assert f"{key} '/proc/dfpo-cannot-write/x" in err and "cannot be written" in err and "Traceback" not in err
