"""The ``dfpo`` command line: ``dfpo <verb> [key=value ...]``."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfpo.options import ConfigError, apply_overrides, check_writable, describe, option
from dfpo.sft import SFTConfig, run_sft


@dataclass(frozen=True)
class EvalConfig:
    """``dfpo eval [MODEL] [key=value ...]``: held-out accuracy of a model (greedy, and mean@k / maj@k)."""

    model: str = option("tiny", "'tiny', 'smollm2' or a model folder (also the first argument, without model=)")
    preset: str = option("", "a calibrated preset (dfpo.tasks.presets) that sets task, task_options, max_new_tokens")
    task: str = option("arithmetic", "registered task (see dfpo.tasks.names())")
    task_options: dict = option({}, "keyword options of the task, set as task_options.<name>=value")
    splits: str = option("eval", "comma-separated splits of the task to evaluate, e.g. eval,gsm8k,math500")
    limit: int | None = option(200, "examples per split (none: all)")
    max_new_tokens: int = option(64, "generation length")
    samples: int = option(0, "k > 0 also samples k replies per example: mean@k and maj@k (majority answer)")
    temperature: float = option(1.0, "sampling temperature of the k samples")
    seed: int = option(0, "seed of the sampling")
    out: str = option("", "write the results as JSON to this file (atomically); empty: print only")
    threads: int = option(0, "torch CPU threads (0: one per core that other processes leave free)")
    trust_run_code: bool = option(
        False,
        "evaluating a run folder whose task names a reward function (a .py file or module) imports and runs that "
        "code: allow it (only for run folders you trust)",
    )


# every numeric key of EvalConfig and its valid values (tests/test_config_cli.py keeps the table complete)
EVAL_RANGES = {"limit": ">=1", "max_new_tokens": ">=1", "samples": ">=0", "temperature": ">0", "seed": ">=0",
               "threads": ">=0"}  # fmt: skip


def run_eval(config: EvalConfig, command: str, given: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``given``: the keys set on the command line (they win over a run folder's own evaluation settings)."""
    import torch

    from dfpo.training.ranges import check_ranges

    check_ranges(config, EVAL_RANGES)

    from dfpo import cpu
    from dfpo.evaluate import evaluate, sampled_metrics
    from dfpo.generation.rollout import context_limit
    from dfpo.models import load_model
    from dfpo.tasks.base import build_task, check_splits
    from dfpo.tasks.presets import preset, task_options_for

    model_name, task_name, options, max_new = config.model, config.task, config.task_options, config.max_new_tokens
    if config.preset:
        defaults = EvalConfig()
        if (config.task, config.task_options, config.max_new_tokens) != (
            defaults.task, defaults.task_options, defaults.max_new_tokens
        ):  # fmt: skip
            raise ConfigError("preset= sets task, task_options and max_new_tokens: give either the preset or those")
        try:
            chosen = preset(config.preset)
        except KeyError as error:
            raise ConfigError(error.args[0]) from None
        task_name, options, max_new = chosen.task, chosen.task_options, chosen.max_new_tokens
        model_name = chosen.model if config.model == defaults.model else config.model
    run_record = Path(model_name) / "train_config.json"
    if run_record.exists() and (config.task, config.task_options) == (EvalConfig.task, {}):
        # a dfpo train run folder: by default, evaluate on the task it was trained on, read the way it was, with
        # the run's own evaluation settings (so that its summary.md figure is reproduced)
        trained = json.loads(run_record.read_text())["config"]
        task_name = trained["task"]
        options = task_options_for(trained["model"], task_name, trained["task_options"])
        in_memory = [k for k, v in options.items() if isinstance(v, str) and v.startswith("<") and v.endswith(">")]
        if in_memory:
            raise ConfigError(
                f"the run was given {', '.join(in_memory)} as Python objects ({options[in_memory[0]]}): evaluate it "
                f"from Python, or name them here, e.g. dfpo eval {model_name} task={task_name} "
                f"task_options.{in_memory[0]}=..."
            )
        if options.get("reward") and not config.trust_run_code:
            raise ConfigError(
                f"the run's task scores with the reward function {options['reward']!r}: evaluating imports and runs "
                "that code. Add trust_run_code=true if you trust this run folder, or give task= and task_options "
                "yourself"
            )
        config = _run_eval_settings(config, trained, given)
        max_new = config.max_new_tokens
    task = build_task(task_name, task_options_for(model_name, task_name, options))
    if not any(config.splits.split(",")):
        raise ConfigError("splits= is empty: name at least one split of the task to evaluate, e.g. splits=eval")
    check_splits(task, config.splits, "splits")
    if config.out:  # and a results file that cannot be written, rather than after the evaluation
        check_writable(Path(config.out), "out")
    cpu.set_threads(config.threads)
    model, tokenizer = load_model(model_name)
    model.eval()
    results: dict[str, Any] = {"command": command, "config": dataclasses.asdict(config), "splits": {}}
    limit = context_limit(model, max_new)  # a prompt the context cannot hold keeps its last tokens
    if limit is not None and limit < 1:
        raise ConfigError(f"max_new_tokens={max_new} leaves no room for a prompt in the model's context")
    for split in [s for s in config.splits.split(",") if s]:
        # the trainer's batch sizes: left padding makes batched greedy decoding depend on them, a little
        r = evaluate(model, tokenizer, task, split, config.limit, max_new, batch_size=64, max_prompt_tokens=limit)
        if r["truncated_prompts"]:
            print(f"eval: {r['truncated_prompts']} of {r['n']} prompts of {split} were longer than the model's "
                  f"context leaves beside max_new_tokens={max_new} ({limit} tokens) and kept their last {limit}",
                  file=sys.stderr)  # fmt: skip
        r.pop("sample")
        if config.samples > 0:
            torch.manual_seed(config.seed)
            examples = task.examples(split, config.limit)
            r.update(sampled_metrics(model, tokenizer, task, examples, config.samples, max_new, config.temperature,
                                     batch_size=32, max_prompt_tokens=limit))  # fmt: skip
        results["splits"][split] = r
        shown = " ".join(f"{key}={value:.3f}" for key, value in r.items() if isinstance(value, float))
        print(f"eval {model_name} on {task_name}/{split} (n={r['n']}): {shown}")
    if config.out:
        out = Path(config.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(tmp, out)
    return results


def _run_eval_settings(config: EvalConfig, trained: dict[str, Any], given: frozenset[str]) -> EvalConfig:
    """``config`` with the keys not ``given`` taken from a run's own evaluation settings."""
    default = EvalConfig()
    run = {
        "splits": trained["eval"]["splits"] or default.splits,
        "limit": trained["eval"]["limit"],
        "max_new_tokens": trained["eval"]["max_new_tokens"] or trained["rollout"]["max_new_tokens"],
        "samples": trained["eval"]["samples"],
        "temperature": trained["rollout"]["temperature"],
        "seed": trained["seed"],
    }
    chosen = {k: v for k, v in run.items() if k not in given}
    if chosen:
        print("eval: the run's settings: " + ", ".join(f"{k}={v}" for k, v in chosen.items()))
    return dataclasses.replace(config, **chosen)


def run_train(argv: list[str], command: str) -> dict[str, Any]:
    """``dfpo train [--config FILE] [key=value ...]``."""
    from dfpo.training.config import build_config
    from dfpo.training.trainer import train

    config_file = None
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ConfigError("--config needs a YAML file (or the name of a shipped config)")
        config_file, argv = argv[at + 1], argv[:at] + argv[at + 2 :]
    config = build_config(argv, config_file)
    run_dir = config.resolved_run_dir
    main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the run
    if main:
        print(f"train: {config.algo} on {config.task} with {config.model}, noise {config.noise}, "
              f"{config.steps} steps -> {run_dir}")  # fmt: skip
    evals = train(config, command)
    if not main:
        return evals
    for split, after in evals["after"].items():
        key = "mean_reward" if "mean_reward" in after else "accuracy"  # a task scored by the user's rewards
        before = evals.get("before", {}).get(split, {}).get(key)
        shown = (lambda x: f"{x:.3f}") if key == "mean_reward" else (lambda x: f"{x:.1%}")
        print(f"train: {split} {key.replace('_', ' ')} {'n/a' if before is None else shown(before)} -> "
              f"{shown(after[key])}")  # fmt: skip
    drawn = " and curves.png" if (run_dir / "curves.png").exists() else ""
    print(f"train: metrics, eval.json, summary.md{drawn} in {run_dir}")
    return evals


def run_list(argv: list[str], command: str) -> None:
    """``dfpo list``: algorithms, tasks, models, noise models, presets and shipped configs."""
    import dfpo.tasks as tasks
    from dfpo.tasks.presets import PRESETS
    from dfpo.training.algos import ALGOS
    from dfpo.training.config import CONFIG_DIR

    print("algorithms (algo=):")
    for name, algo in ALGOS.items():
        print(f"  {name:13s} {algo.about}")
    print("tasks (task=):\n  " + ", ".join(tasks.names()))
    print("models (model=):\n  tiny (embedded), smollm2 (SmolLM2-135M-Instruct), a Hugging Face model folder, or a hub "
          "id in the local Hugging Face cache")  # fmt: skip
    print("noise (noise=):\n  clean, flip(p), gaussian(sigma), pseudo_label(n), reward_model (dialogue)")
    print("task presets (dfpo eval preset=):")
    for name, chosen in PRESETS.items():
        print(f"  {name:20s} {chosen.about}")
    print("configs (dfpo train --config NAME):\n  " + ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))))


@dataclass(frozen=True)
class ExportConfig:
    """``dfpo export RUN_DIR OUT``: a run's policy (or any model dfpo loads) as a plain ``from_pretrained`` folder,
    LoRA adapters merged, tokenizer and chat template included."""

    model: str = option("", "a dfpo train run folder (its latest checkpoint's policy), a model folder or name")
    out: str = option("", "the folder to write (replaced atomically)")


def run_export(config: ExportConfig, command: str) -> None:
    from dfpo.models import export_model

    if not config.model or not config.out:
        raise ConfigError("usage: dfpo export RUN_DIR OUT (or model=... out=...)")
    out = export_model(config.model, config.out)
    print(f"export: {config.model} -> {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}))")


def _benches() -> dict[str, tuple[type, Any]]:
    from dfpo.experiments.critic_learning import CriticBenchConfig, run_critic_bench
    from dfpo.experiments.noisy import NoisyConfig, run_noisy
    from dfpo.experiments.throughput import ThroughputConfig, run_throughput

    return {
        "throughput": (ThroughputConfig, run_throughput),
        "noisy": (NoisyConfig, run_noisy),
        "critic": (CriticBenchConfig, run_critic_bench),
    }


def run_bench(argv: list[str], command: str) -> dict[str, Any]:
    """``dfpo bench throughput [key=value ...]``: per-phase step time, MFU and peak memory per algorithm, and TRL's
    GRPOTrainer side by side (``algos=grpo,dfpo,trl``). ``dfpo bench noisy [key=value ...]``: the noisy-supervision
    benchmark, algorithms x supervision x seeds trained per domain and evaluated in and out of domain.
    ``dfpo bench critic [key=value ...]``: each critic's explained variance against a ridge probe's ceiling on
    tasks whose value is known, and distributional critics against the known return distribution."""
    benches = _benches()
    if not argv or argv[0] not in benches:
        raise ConfigError(
            "usage: dfpo bench {throughput,noisy,critic} [key=value ...] (dfpo bench NAME --help lists the keys)"
        )
    config_type, run = benches[argv[0]]
    return run(apply_overrides(config_type(), argv[1:]), command)


VERBS = {
    "sft": (SFTConfig, run_sft),
    "eval": (EvalConfig, run_eval),
    "train": (None, run_train),
    "list": (None, run_list),
    "bench": (None, run_bench),
    "export": (ExportConfig, run_export),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv  # errors in the user's input or code keep their traceback
    argv = [a for a in argv if a != "--debug"]
    usage = "usage: dfpo {" + ",".join(VERBS) + "} [key=value ...] [--debug]   (dfpo VERB --help lists the keys)"
    if not argv or argv[0] not in VERBS:
        print(usage, file=sys.stderr)
        return 2
    config_type, run = VERBS[argv[0]]
    if argv[0] == "train":
        from dfpo.training.config import TrainConfig

        config_type = TrainConfig
    elif argv[0] == "bench" and len(argv) > 1 and argv[1] in _benches():
        config_type = _benches()[argv[1]][0]
    if "--help" in argv or "-h" in argv:
        if config_type is not None:
            print(f"{config_type.__doc__}\n\nkeys:\n{describe(config_type)}")
        else:
            print(run.__doc__)
        return 0
    overrides = argv[1:]
    if argv[0] in ("eval", "export") and overrides and "=" not in overrides[0]:
        overrides = [f"model={overrides[0]}", *overrides[1:]]  # dfpo eval MODEL_OR_RUN key=value ...
        if argv[0] == "export" and len(overrides) > 1 and "=" not in overrides[1]:
            overrides = [overrides[0], f"out={overrides[1]}", *overrides[2:]]  # dfpo export RUN_DIR OUT
    command = " ".join(["dfpo", *argv])
    try:
        if argv[0] in ("train", "list", "bench"):
            run(overrides, command)
        elif argv[0] == "eval":
            given = frozenset(o.split("=", 1)[0].strip() for o in overrides if "=" in o)
            run_eval(apply_overrides(EvalConfig(), overrides), command, given)
        else:
            run(apply_overrides(config_type(), overrides), command)
    except ConfigError as error:
        print(f"dfpo {argv[0]}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        print(f"dfpo {argv[0]}: {error or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as error:
        if debug or not isinstance(error, _user_errors()):
            raise
        print(f"dfpo {argv[0]}: {type(error).__name__}: {error} (--debug shows the traceback)", file=sys.stderr)
        return 1
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that name a problem with the user's input or environment and its fix: shown without a traceback."""
    from dfpo.assets import MissingAssetError
    from dfpo.experiments.noisy import CellFailed
    from dfpo.supervision.noise import NoiseError
    from dfpo.tasks.user import DataError, RewardFunctionError
    from dfpo.training.checkpoint import CheckpointError
    from dfpo.training.trainer import TrainingDiverged

    return MissingAssetError, DataError, RewardFunctionError, NoiseError, CheckpointError, TrainingDiverged, CellFailed


if __name__ == "__main__":
    sys.exit(main())
