"""``dfpo train`` end to end on the embedded tiny model: every algorithm, exact resume, refused configs, NaN steps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dfpo.cli import main
from dfpo.core import advantages
from dfpo.critics.value_flow import ValueFlowCritic
from dfpo.options import ConfigError
from dfpo.training import phases
from dfpo.training import update as updates
from dfpo.training.algos import ALGOS
from dfpo.training.config import build_config
from dfpo.training.trainer import DataOrder, Trainer, TrainingDiverged, micro_rows, train

# Small enough for the test suite: 2 prompts x 2 samples, short replies, a few eval examples.
SMALL = [
    "model=tiny", "task=arithmetic", "rollout.prompts=2", "rollout.samples=2", "rollout.max_new_tokens=24",
    "eval.limit=4", "critic.warmup_steps=1", "critic.flow.samples=8", "critic.quantile.quantiles=16",
    "log.progress=false",
]  # fmt: skip


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_every_algorithm_trains_two_steps(algo, tmp_path, capsys):
    run_dir = tmp_path / algo
    assert (
        main(["train", f"algo={algo}", "model=tiny", "task=arithmetic", "steps=2", f"run_dir={run_dir}", *SMALL]) == 0
    )
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert 0.0 <= m["reward/true"] <= 1.0 and 0.0 <= m["reward/observed"] <= 1.0
        assert m["train/skipped_update"] == 0.0
    assert metrics[-1]["actor/active"] == 1.0  # past the critic warm-up, the actor learned
    assert "actor/pg_loss" in metrics[-1] or "actor/tb_loss" in metrics[-1]
    if ALGOS[algo].overrides[0] != "critic.kind=none":
        assert "critic/explained_var" in metrics[-1]
    evals = json.loads((run_dir / "eval.json").read_text())
    assert set(evals) >= {"before", "after", "history"} and "accuracy" in evals["after"]["eval"]
    assert (run_dir / "curves.png").stat().st_size > 1000
    assert "| eval | accuracy |" in (run_dir / "summary.md").read_text()
    assert (run_dir / "latest").read_text().strip() == "step_000002"
    assert "accuracy" in capsys.readouterr().out


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    final = run_dir / "checkpoints" / (run_dir / "latest").read_text().strip()
    tensors = {f"policy.{k}": v for k, v in load_file(final / "policy" / "model.safetensors").items()}
    tensors.update({f"modules.{k}": v for k, v in load_file(final / "modules.safetensors").items()})
    optim = torch.load(final / "optimizers.pt", weights_only=True)
    for group in ("actor", "critic"):
        for index, state in optim.get(group, {"state": {}})["state"].items():
            for key, value in state.items():
                tensors[f"{group}.{index}.{key}"] = torch.as_tensor(value)
    return tensors


def _comparable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(("perf/", "eval/"))} for m in metrics]


@pytest.mark.parametrize("train_limit", [4, 6], ids=["resume-at-epoch-boundary", "resume-mid-epoch"])
def test_resume_is_exact(train_limit, tmp_path):
    """steps=4 straight equals steps=2 then steps=4 resume=auto: metrics, weights and optimizer states."""
    common = [*SMALL, "algo=dfpo", f"train_limit={train_limit}", "actor.epochs=2", "actor.minibatches=2",
              "noise=flip(0.3)"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", "steps=4", f"run_dir={straight}", *common]) == 0
    assert main(["train", "steps=2", f"run_dir={resumed}", *common]) == 0
    assert main(["train", "steps=4", "resume=auto", f"run_dir={resumed}", *common]) == 0
    a, b = _metrics(straight), _metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    if train_limit == 4:
        assert [m["data/epoch"] for m in a] == [0, 1, 1, 2]  # the resume at step 2 falls on an epoch boundary
    assert _comparable(a) == _comparable(b)
    sa, sb = _state(straight), _state(resumed)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# responses of 32 to 46 tokens, those over 40 masked out: sequences of unequal length, and some with none
UNEQUAL = ("rollout.max_new_tokens=40", "rollout.mask_truncated=true")


@pytest.mark.parametrize(
    ("algo", "steps", "extra"),
    [("ppo", 2, ()), ("grpo", 2, ()), ("dfpo", 1, ()), ("flowrl", 2, UNEQUAL), ("robust_ppo", 2, ())],
)
def test_one_fused_forward_matches_scoring_then_accumulating_micro_batches(algo, steps, extra, tmp_path):
    """micro_batch=0 runs the policy forward once, with gradients, while scoring (the fused path); micro_batch=1
    scores without gradients, then runs a forward and backward per sequence. Both make the same updates: FlowRL's
    mean over the sequences with a response and robust PPO's bootstrapped members' token means add up over
    micro-batches too.

    DFPO's flow-matching loss draws fresh noise per micro-batch, so its critic (and, through it, the next step)
    legitimately differs between the two: for DFPO the policy after one step is compared."""
    params, metrics = {}, {}
    for micro in (0, 1):
        run_dir = tmp_path / f"micro{micro}"
        config = build_config([f"algo={algo}", f"steps={steps}", "critic.warmup_steps=0", f"actor.micro_batch={micro}",
                               f"run_dir={run_dir}", *[s for s in SMALL if "warmup" not in s], *extra])  # fmt: skip
        trainer = Trainer(config)
        assert trainer.fused == (micro == 0)
        trainer.run()
        # the fused forward's graph does not outlive its step: no step's tensors are kept on the trainer
        held = [
            k
            for k, v in vars(trainer).items()
            if isinstance(v, torch.Tensor) or (isinstance(v, tuple) and any(isinstance(x, torch.Tensor) for x in v))
        ]
        assert not held, held  # fmt: skip
        params[micro], metrics[micro] = _state(run_dir), _metrics(run_dir)
    compared = ("policy.",) if algo == "dfpo" else ("policy.", "modules.")
    assert any(key.startswith(compared) for key in params[0])
    for key in params[0]:
        if key.startswith(compared):
            torch.testing.assert_close(params[0][key], params[1][key], rtol=1e-4, atol=1e-6, msg=key)
    # the logged metrics are means over micro-batches, and a masked-out sequence's logs 0: FlowRL's run, with such
    # sequences, is compared through its weights
    actor_keys = () if algo == "flowrl" else ("actor/pg_loss", "actor/ratio_mean")
    for fused, split in zip(metrics[0], metrics[1], strict=True):
        for key in ("reward/observed", *actor_keys):
            assert fused[key] == pytest.approx(split[key], rel=1e-3, abs=1e-6), key


def test_dr_grpo_divides_by_the_response_limit_whatever_the_step_padded_width(tmp_path):
    trainer = Trainer(build_config(["algo=dr_grpo", "eval.splits=", f"run_dir={tmp_path / 'r'}", *SMALL]))
    gen = torch.Generator().manual_seed(0)
    logp, adv = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    lengths = torch.tensor([3, 5, 1, 4])
    losses = []
    for width in (5, 11):  # the same responses in a step whose longest response is 5 or 11 tokens
        mask = (torch.arange(width) < lengths[:, None]).float()
        logp_w, adv_w = (torch.cat([x, torch.zeros(4, width - 5)], -1) for x in (logp, adv))
        exp = SimpleNamespace(old_logp=logp_w, advantages=adv_w)
        losses.append(float(trainer.objective.loss(exp, torch.arange(4), logp_w, mask)[0]))
    # ratio 1: each sequence's -sum_t A_t over rollout.max_new_tokens=24, then a mean over sequences
    want = -float((adv * (torch.arange(5) < lengths[:, None])).sum()) / 24 / 4
    assert losses == pytest.approx([want, want], rel=1e-6)
    trainer.log.close()


def test_samples_without_reward_get_no_advantage_and_leave_their_group(tmp_path, monkeypatch):
    trainer = Trainer(build_config(["algo=grpo", "noise=clean", "eval.splits=", f"run_dir={tmp_path / 'r'}", *SMALL]))
    score = type(trainer.noise).score

    def first_skipped(self, *args, **kwargs):
        rewards = score(self, *args, **kwargs)
        return dataclasses.replace(rewards, observed=[None, *rewards.observed[1:]])

    seen = {}
    compute = advantages.compute

    def spy(name, /, **inputs):
        out = compute(name, **inputs)
        seen.update(valid=inputs.get("valid"), adv=out[0])
        return out

    monkeypatch.setattr(type(trainer.noise), "score", first_skipped)
    monkeypatch.setattr(advantages, "compute", spy)
    trainer.step = 1
    metrics = trainer.train_step()
    assert metrics["reward/skipped"] == 1.0
    assert seen["valid"].tolist() == [False, True, True, True]
    # the skipped sample's group keeps one valid sample: no comparison, no advantage
    assert torch.all(seen["adv"][:2] == 0)
    trainer.log.close()


def test_micro_rows_fit_the_token_budget_in_whole_prompts():
    assert micro_rows(16384, 681, 4) == 24  # CoQA at its mean padded length: 6 prompts' 4 samples
    assert micro_rows(16384, 1203, 4) == 12  # at its longest: 13 fit, rounded down to 3 prompts
    assert micro_rows(1000, 60, 3) == 15
    assert micro_rows(200, 60, 4) == 3  # less than a prompt's samples fit: as many sequences as fit
    assert micro_rows(10, 60, 4) == 1  # never fewer than one


@pytest.mark.parametrize("algo", ["ppo", "dfpo"])
def test_micro_tokens_size_each_step_to_its_length(algo, tmp_path):
    """A budget below one sequence's length runs one sequence per forward/backward, exactly as micro_batch=1; a
    budget above the whole batch keeps the fused single pass."""
    runs = {"micro1": "actor.micro_batch=1", "tokens1": "actor.micro_tokens=1", "fused": "actor.micro_batch=0",
            "tokens_all": "actor.micro_tokens=10000"}  # fmt: skip
    params, metrics = {}, {}
    for name, setting in runs.items():
        run_dir = tmp_path / name
        config = build_config([f"algo={algo}", "steps=2", "critic.warmup_steps=0", setting, f"run_dir={run_dir}",
                               *[s for s in SMALL if "warmup" not in s]])  # fmt: skip
        trainer = Trainer(config)
        trainer.run()
        params[name], metrics[name] = _state(run_dir), _metrics(run_dir)
    assert [m["perf/micro_batch"] for m in metrics["tokens1"]] == [1.0, 1.0]
    assert [m["perf/micro_batch"] for m in metrics["tokens_all"]] == [4.0, 4.0]  # 2 prompts x 2 samples, one pass
    for same, as_ in (("tokens1", "micro1"), ("tokens_all", "fused")):
        assert _comparable(metrics[same]) == _comparable(metrics[as_])
        for key in params[as_]:
            assert torch.equal(params[same][key], params[as_][key]), (same, key)


@pytest.mark.parametrize(("algo", "steps"), [("ppo", 2), ("dfpo", 1)])
def test_activation_checkpointing_makes_the_same_updates(algo, steps, tmp_path):
    """actor.checkpoint_prompts=1 keeps no activations and recomputes each prompt's rows during the backward.

    (After one DFPO step the weights agree to 1e-8; Adam turns the float-rounding differences of near-zero
    gradient entries into differences of up to 2e-6 by the second step, so DFPO is compared after one.)"""
    params = {}
    for k in (0, 1):
        run_dir = tmp_path / f"checkpoint{k}"
        args = [f"algo={algo}", f"steps={steps}", "critic.warmup_steps=0", f"actor.checkpoint_prompts={k}"]
        assert main(["train", *args, f"run_dir={run_dir}", *[s for s in SMALL if "warmup" not in s]]) == 0
        params[k] = _state(run_dir)
    for key in params[0]:
        if key.startswith(("policy.", "modules.")):
            torch.testing.assert_close(params[0][key], params[1][key], rtol=1e-4, atol=1e-6, msg=key)


def test_bf16_precision_samples_from_a_bf16_copy_kept_in_step_with_the_policy(tmp_path):
    config = build_config([*SMALL, "algo=dfpo", "steps=2", "precision=bf16", f"run_dir={tmp_path / 'bf16'}"])
    trainer = Trainer(config)
    assert next(trainer.rollout_policy.parameters()).dtype == torch.bfloat16
    assert next(trainer.policy.parameters()).dtype == torch.float32  # master weights stay fp32
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.run()
    moved = any(not torch.equal(a, p) for a, p in zip(before, trainer.policy.parameters(), strict=True))
    assert moved
    for low, full in zip(trainer.rollout_policy.parameters(), trainer.policy.parameters(), strict=True):
        assert torch.equal(low, full.detach().to(torch.bfloat16))  # refreshed after the last update
    metrics = _metrics(tmp_path / "bf16")
    assert all(m["train/skipped_update"] == 0.0 for m in metrics)
    assert metrics[-1]["actor/active"] == 1.0 and abs(metrics[-1]["actor/pg_loss"]) < 1e3


def test_nan_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "nan"
    config = build_config([*SMALL, "algo=grpo", "steps=5", "max_bad_steps=2", "checkpoint.every=1",
                           f"run_dir={run_dir}"])  # fmt: skip
    trainer = Trainer(config)
    real = trainer.objective.loss

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return (loss * float("nan") if trainer.step >= 2 else loss), metrics

    monkeypatch.setattr(trainer.objective, "loss", poisoned)
    diverged = r"2 steps in a row were skipped, the last for a NaN or inf in .*loss.*checkpoint.*lower actor.lr"
    with pytest.raises(TrainingDiverged, match=diverged):
        trainer.run()
    assert (run_dir / "latest").read_text().strip() == "step_000001"  # no checkpoint after a skipped step
    metrics = _metrics(run_dir)
    assert [m["train/skipped_update"] for m in metrics] == [0.0, 1.0, 1.0]
    good, after_skip = _state(run_dir), trainer.policy.state_dict()
    # the skipped steps left the policy as the last good step made it
    assert all(torch.equal(good[f"policy.{k}"], v) for k, v in after_skip.items() if f"policy.{k}" in good)
    assert "update skipped" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["algo=grpo", "rollout.samples=1"], "rollout.samples=1: grpo compares the responses to one prompt"),
        (["algo=rloo", "rollout.samples=1"], "needs rollout.samples >= 2"),
        (["critic.samples=1"], "critic.flow.samples=1: a flow critic needs K >= 2"),  # the earlier flat key
        (["critic.flow.sample_steps=0"], "critic.flow.sample_steps=0: must be >= 1"),
        (["algo=robust_ppo", "critic.ensemble.bootstrap=1.5"], "critic.ensemble.bootstrap=1.5: must be in [0,1]"),
        (["precision=fp16"], "precision='fp16': valid values are fp32, bf16"),
        (["actor.checkpoint_prompts=-1"], "actor.checkpoint_prompts=-1: must be >= 0"),
        (["actor.micro_tokens=-5"], "actor.micro_tokens=-5: must be >= 0"),
        (["actor.micro_tokens=4096", "actor.micro_batch=4"], "both size the micro-batches: set one of them"),
        (["algo=nope"], "algo='nope': valid values are dfpo, ppo"),
        (["critic.kind=bogus"], "critic.kind='bogus': valid values are none, scalar"),
        (["critic.lr=fast"], "critic.lr='fast': expected float"),
        (["critic.nope=1"], "unknown key 'critic.nope'; valid keys: critic.kind"),
        (["colour=red"], "unknown key 'colour'"),
        (["critic=1"], "'critic' is a group of keys"),
        (["actor.minibatches=3"], "actor.minibatches=3 must divide the 64 sequences"),
        (["algo=ppo", "advantage.estimator=grpo"], "critic.kind=scalar needs advantage.estimator=gae"),
        (["algo=grpo", "advantage.estimator=gae"], "needs a critic giving values"),
        (["noise=flip(2)", "steps=1"], "flip(p) needs 0 <= p <= 1"),
        (["task=dialogue", "noise=flip(0.1)"], "needs binary right/wrong rewards"),
        (["noise=reward_model"], "use it with task=dialogue"),
        (["kl.mode=sometimes"], "kl.mode='sometimes': valid values are reward, loss, none"),
        (["critic.flow.coupling=sortd"], "critic.flow.coupling='sortd': valid values are sorted, independent"),
        (["critic.flow.consistancy=none"], "unknown key 'critic.flow.consistancy'; valid keys: critic.flow.samples"),
        (["advantage.critic_lam=1.5"], "advantage.critic_lam=1.5: must be in [0,1]"),
        (["advantage.adaptive_lam=-1"], "advantage.adaptive_lam=-1.0: must be >= 0"),
        (["critic.quantile.kappa=0"], "critic.quantile.kappa=0.0: must be > 0"),
        (["actor.lr=-1"], "actor.lr=-1.0: must be > 0"),
        (["rollout.top_p=0"], "rollout.top_p=0.0: must be in (0,1]"),
        (["rollout.top_p=2"], "rollout.top_p=2.0: must be in (0,1]"),
        (["kl.coef=-5"], "kl.coef=-5.0: must be >= 0"),
        (["kl.coef=nan"], "kl.coef=nan: must be a finite number"),
        (["checkpoint.every=-1"], "checkpoint.every=-1: must be >= 0"),
        (["critic.width=-3"], "critic.width=-3: must be >= 0"),
        (["run_dir=runs/{nope}"], "run_dir='runs/{nope}': 'nope' is not a placeholder it can fill"),
        (["critic.flow.risk_targets=mine"], "critic.flow.risk_targets='mine': valid values are pooled, token"),
        (
            ["algo=dvpo", "critic.quantile.quantiles=1"],
            "critic.quantile.quantiles=1: a quantile critic needs at least 2",
        ),
        (["critic.width=0"], "critic.width=0: must be at least 1 (0, a bare linear head, only for scalar"),
        (["eval.splits=eval,nope"], "eval.splits='eval,nope': task 'arithmetic' has no split 'nope'; it has train"),
        (["task=math", "task_options.few_shot=-1"], "few_shot=-1: must be >= 0"),
    ],
)
def test_refused_configs_name_the_key(args, message, tmp_path, capsys):
    assert main(["train", f"run_dir={tmp_path / 'r'}", "log.progress=false", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "latest").exists()


def test_flow_options_none_means_off():
    # the override parser reads "none" as null; the flow critic's string options take it as the string "none"
    flow = build_config(["critic.flow.consistency=none", "critic.flow.uncertainty_weight=none",
                         "critic.flow.anchor_weight=0.5"]).critic.flow  # fmt: skip
    options = flow.loss_options()
    assert (options["consistency"], options["uncertainty_weight"], options["anchor_weight"]) == ("none", "none", 0.5)
    critic = ValueFlowCritic(8, width=16)
    loss, metrics = critic.loss(torch.randn(2, 3, 8), torch.randn(2, 3, 4), torch.ones(2, 3), **options)
    assert torch.isfinite(loss) and "critic/consistency_loss" not in metrics
    assert metrics["critic/uncertainty_weight"] == 1.0


def test_yaml_config_precedence_and_errors(tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("algo: ppo\nsteps: 7\ncritic:\n  lr: 0.01\ntask_options:\n  digits: 1\n")
    config = build_config(["steps=9"], str(config_file))
    assert (config.algo, config.steps, config.critic.lr, config.critic.kind) == ("ppo", 9, 0.01, "scalar")
    assert config.task_options == {"digits": 1}
    smollm2 = build_config([], "smollm2")  # a shipped config, by name
    assert smollm2.model == "smollm2"
    bad = tmp_path / "bad.yaml"
    bad.write_text("critic:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config([], str(bad))
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file (shipped configs: " in capsys.readouterr().err


def test_a_run_dir_is_never_overwritten_and_resume_checks_the_config(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train", "algo=grpo", "steps=1", f"run_dir={run_dir}", *SMALL]
    assert main(args) == 0
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "continue it with resume=auto" in err
    assert main([*args, "resume=auto", "actor.lr=0.1"]) == 2
    assert "the config differs from the run's in actor.lr" in capsys.readouterr().err
    assert main([*args[:2], "steps=2", *args[3:], "resume=auto"]) == 0
    assert [m["step"] for m in _metrics(run_dir)] == [1, 2]


def test_eval_and_list_commands_know_runs_and_algorithms(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "algo=rloo", "steps=1", f"run_dir={run_dir}", *SMALL]) == 0
    capsys.readouterr()
    # the run's task, options and evaluation settings, by default: its own after-training figures again
    assert main(["eval", str(run_dir), f"out={tmp_path / 'again.json'}"]) == 0
    shown = capsys.readouterr().out
    assert "the run's settings" in shown and "on arithmetic/eval (n=4)" in shown
    again = json.loads((tmp_path / "again.json").read_text())["splits"]["eval"]
    after = json.loads((run_dir / "eval.json").read_text())["after"]["eval"]
    for key in ("accuracy", "format_rate", "mean@4", "maj@4"):
        assert again[key] == after[key], key
    assert main(["eval", str(run_dir), "max_new_tokens=64"]) == 0  # a key given wins over the run's
    assert "format_rate=1.000" in capsys.readouterr().out
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ALGOS) and "pseudo_label(n)" in listing and "smollm2" in listing


def test_data_order_covers_each_epoch_once():
    order = DataOrder(5, seed=3)
    first, second = order.take(3) + order.take(2), order.take(5)
    assert sorted(first) == sorted(second) == list(range(5))
    assert first != second and order.state() == {"epoch": 2, "position": 0}


def test_smollm2_one_step_smoke(tmp_path):
    """The shipped SmolLM2 config, one short step with the actor and the critic both learning."""
    run_dir = tmp_path / "smollm2"
    args = ["train", "--config", "smollm2", "steps=1", "rollout.prompts=1", "rollout.samples=2",
            "rollout.max_new_tokens=8", "eval.limit=2", "task_options.few_shot=1", "critic.warmup_steps=0",
            f"run_dir={run_dir}", "log.progress=false"]  # fmt: skip
    assert main(args) == 0
    (metrics,) = _metrics(run_dir)
    assert metrics["actor/active"] == 1.0 and metrics["train/skipped_update"] == 0.0
    assert metrics["critic/grad_norm"] > 0.0 and metrics["actor/grad_norm"] > 0.0
    config = json.loads((run_dir / "train_config.json").read_text())["config"]
    assert config["model"] == "smollm2" and config["critic"]["backbone"] == "frozen"


def test_pseudo_label_noise_labels_with_the_starting_policy_and_resumes(tmp_path):
    run_dir = tmp_path / "pl"
    args = ["train", "algo=grpo", "noise=pseudo_label(3)", "eval.samples=2", f"run_dir={run_dir}", *SMALL]
    assert main([*args, "steps=1"]) == 0
    assert main([*args, "steps=2", "resume=auto"]) == 0
    metrics = _metrics(run_dir)
    assert all(0.0 <= m["reward/pseudo_label_accuracy"] <= 1.0 for m in metrics)
    state = json.loads((run_dir / "checkpoints" / "step_000002" / "state.json").read_text())
    assert len(state["pseudo_labels"]) == 4  # 2 prompts a step, each labelled once
    after = json.loads((run_dir / "eval.json").read_text())["after"]["eval"]
    assert {"mean@2", "maj@2", "accuracy"} <= set(after)


def test_train_on_user_data_and_reward_function(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a} + {a} =", "answer": str(2 * a)}) + "\n" for a in range(10, 30)))
    rewards = tmp_path / "rewards.py"
    rewards.write_text(
        "def has_answer(completions, answer, **_):\n"
        "    return [float(a in c) for c, a in zip(completions, answer)]\n"
        "def broken(completions, **_):\n"
        "    return [float('nan')] * len(completions)\n"
    )
    small = [a for a in SMALL if not a.startswith("task=")]
    args = ["train", "task=user", f"task_options.data={data}", "algo=rloo", "steps=1", "noise=clean", *small]
    assert main([*args, f"task_options.reward={rewards}:has_answer", f"run_dir={tmp_path / 'ok'}"]) == 0
    assert _metrics(tmp_path / "ok")[0]["step"] == 1
    assert main([*args, f"task_options.reward={rewards}:broken", f"run_dir={tmp_path / 'bad'}"]) == 1
    err = capsys.readouterr().err
    assert "RewardFunctionError" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("algo", "backbone"),
    [("ppo", "frozen"), ("dfpo", "frozen"), ("dvpo", "frozen"), ("ppo", "separate"), ("dfpo", "shared"),
     ("dfpo", "separate-top2")],
)  # fmt: skip
def test_extra_critic_steps_fit_the_step_batch(algo, backbone, tmp_path, monkeypatch):
    """critic.updates=k takes k - 1 more critic steps on the step's batch alone (from the saved features, or
    through a separate critic trunk, a micro-batch at a time): the critic's loss on that batch falls, the actor and
    the policy are untouched by them (a shared trunk too: the extra steps train the head alone), and the whole
    step stays finite."""
    from dfpo.generation.rollout import trunk_hidden

    separate = backbone.startswith("separate")  # separate-top2: only the trunk's top 2 layers train
    base = [f"algo={algo}", "steps=2", "eval.splits=", *SMALL, f"critic.backbone={backbone.split('-')[0]}"]
    extra = ["actor.micro_batch=4"] if separate else []
    extra += ["critic.trunk_layers=2"] if backbone == "separate-top2" else []
    trainer = Trainer(build_config([*base, f"run_dir={tmp_path / 'a'}", "critic.updates=6", *extra]))
    trainer.step = 1
    captured = {}
    original = updates.critic_steps

    def batch_loss(exp):  # the flow critic's loss draws noise: the same draws before and after
        rows = torch.arange(exp.mask.shape[0])
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(0)
            if trainer.trunk is None:
                hidden = exp.critic_hidden
            else:
                hidden = trunk_hidden(trainer.trunk, exp.ids, exp.attn, exp.width).float()
            return float(updates.critic_loss(trainer, hidden, exp, rows, exp.mask, 0)[0])

    def spy(t, exp, steps, key):
        before = batch_loss(exp)
        policy = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
        lower = {k: v.clone() for k, v in getattr(trainer.trunk, "lower_part", torch.nn.Module()).state_dict().items()}
        out = original(t, exp, steps, key)
        after = batch_loss(exp)
        captured.update(before=before, after=after, steps=steps, micro=exp.micro, states=exp.critic_states)
        assert all(torch.equal(v, trainer.policy.state_dict()[k]) for k, v in policy.items())
        assert all(torch.equal(v, trainer.trunk.lower_part.state_dict()[k]) for k, v in lower.items())
        return out

    monkeypatch.setattr(updates, "critic_steps", spy)
    metrics = trainer.train_step()
    assert captured["steps"] == 5 and captured["after"] < captured["before"]
    assert captured["micro"] == (4 if separate else 0)
    # a split trunk's lower layers ran once, while scoring: their states [N, L, H] serve every critic pass
    assert (captured["states"] is not None) == (backbone == "separate-top2")
    assert "critic/extra_steps_explained_var" in metrics and torch.isfinite(
        torch.tensor(metrics["critic/extra_steps_loss"])
    )
    trainer.log.close()


@pytest.mark.parametrize("algo", ["ppo", "robust_ppo", "dfpo"])
def test_critic_targets_are_monte_carlo_returns(algo, tmp_path, monkeypatch):
    """Decoupled GAE: with advantage.critic_lam=1 (the default) the critic regresses onto the returns-to-go of
    the per-token rewards (every distributional target sample equal to it), whatever the critic predicts, while
    the actor's advantages keep advantage.lam; with critic_lam=advantage.lam the targets are GAE's returns."""
    from dfpo.core.advantages import returns_to_go

    for critic_lam, monte_carlo in ((1.0, True), (0.95, False)):
        run = tmp_path / str(critic_lam)
        # a coin-flip reward: returns that vary whatever the responses
        config = build_config([f"algo={algo}", "steps=1", "eval.splits=", *SMALL, f"run_dir={run}",
                               "task=known_value", "task_options.kind=bernoulli", "noise=clean",
                               f"advantage.critic_lam={critic_lam}"])  # fmt: skip
        trainer = Trainer(config)
        trainer.step = 1
        seen = {}
        original = phases.critic_metrics

        def spy(g, targets, gamma, seen=seen, original=original):
            seen.update(g=g, targets=targets)
            return original(g, targets, gamma)

        monkeypatch.setattr(phases, "critic_metrics", spy)
        metrics = trainer.train_step()
        g, targets = seen["g"], seen["targets"]
        mc = returns_to_go(g["rewards"], g["mask"])
        goal = targets.mean(-1) if targets.dim() == 3 else targets
        assert float(mc.abs().max()) > 0.5  # some sample was rewarded
        assert torch.allclose(goal, mc, atol=1e-5) == monte_carlo
        assert {"critic/explained_var_mc", "critic/value_bias"} <= set(metrics)
        trainer.log.close()


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "robust_ppo", "dvpo", "dfpo"])
def test_each_critic_learns_a_prompt_decided_value_at_the_defaults(algo, tmp_path):
    """On a reward decided by the prompt (the known_value task: V(s_t) is a 0/1 bit the tiny model's states
    carry), each critic at its defaults explains a large share of the Monte-Carlo returns' variance within a
    CPU-sized budget, where it starts near zero."""
    run = tmp_path / algo
    args = [f"algo={algo}", "model=tiny", "task=known_value", "noise=clean", "steps=24", "rollout.prompts=8",
            "rollout.max_new_tokens=40", "eval.splits=", "log.progress=false", f"run_dir={run}"]  # fmt: skip
    train(build_config(args))
    ev = [m["critic/explained_var_mc"] for m in _metrics(run)]
    # 32 sequences a step make single steps noisy: judge the mean of the last six (measured 0.35 for DVPO, the
    # slowest, and 0.50 for DFPO; at 40 steps of 64 sequences every critic reaches 0.76-0.88, training.md)
    assert ev[0] < 0.2, ev
    assert sum(ev[-6:]) / 6 > 0.25, ev
