"""``dfpo train``'s configuration: nested dataclasses whose fields carry their help text and defaults.

Precedence, lowest first: the defaults below, the ``algo`` preset (:mod:`dfpo.training.algos`), the ``--config``
YAML file, then ``key=value`` overrides on the command line. :func:`validate` refuses combinations that cannot
train, naming the key and the valid values.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dfpo.options import ConfigError, apply_overrides, check_mapping_types, flatten, option
from dfpo.training.critic_options import CriticOptions, one_of, upgrade_keys
from dfpo.training.ranges import check_ranges

KL_MODES = ("reward", "loss", "none")
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class RolloutOptions:
    prompts: int = option(16, "prompts per step")
    samples: int = option(4, "responses sampled per prompt (the group of group-relative estimators)")
    max_new_tokens: int = option(64, "response length limit; a response cut here has no end token")
    temperature: float = option(0.7, "sampling temperature (log-probs are those of the tempered distribution)")
    top_p: float = option(1.0, "nucleus sampling threshold")
    mask_truncated: bool = option(False, "give responses cut at max_new_tokens no weight in any loss")
    max_prompt_tokens: int = option(0, "the longest prompt in tokens (0: the model's context less max_new_tokens)")
    long_prompts: str = option(
        "refuse",
        "a prompt over max_prompt_tokens: refuse (the run stops before training, naming the example) or truncate "
        "(keep its last max_prompt_tokens tokens, as TRL does; counted in data/truncated_prompts)",
    )
    batch_size: int = option(64, "sequences per no-grad scoring forward")
    engine: str = option(
        "hf", "what samples the rollouts: hf (transformers generate) or vllm (colocated vLLM; CUDA, the vllm extra)"
    )
    vllm_memory: float = option(0.3, "rollout.engine=vllm: the share of each GPU's memory vLLM may take")
    generate_prompts: int = option(
        0,
        "prompts per generate call (0: each process's whole share in one call); each call samples from its own "
        "stream, seeded by (seed, step, call), so a step's rollouts are the same for any number of processes whose "
        "shares this divides",
    )


@dataclass(frozen=True)
class ActorOptions:
    loss: str = option("ppo_clip", "policy loss from dfpo.core.policy_losses (ppo_clip, flowrl)")
    loss_options: dict = option({}, "extra keyword options of the policy loss, e.g. actor.loss_options.beta=15")
    lr: float = option(3e-5, "peak AdamW learning rate of the policy")
    weight_decay: float = option(0.0, "AdamW weight decay of the policy")
    warmup_steps: int = option(0, "linear learning-rate warm-up steps (counted from the first actor update)")
    schedule: str = option("constant", "learning-rate schedule after warm-up: constant, linear (to 0) or cosine")
    epochs: int = option(1, "PPO epochs over each step's rollouts")
    minibatches: int = option(1, "optimizer steps per epoch; the step's sequences are split evenly")
    micro_batch: int = option(0, "sequences per forward/backward; gradients accumulate over a minibatch (0: all)")
    micro_tokens: int = option(
        0,
        "k > 0 (with micro_batch=0): micro-batches sized each step to at most k token positions (sequences x the "
        "step's padded length), whole prompts' samples where they fit: short batches run in one pass, long ones "
        "(e.g. CoQA passages) in several, with the same gradient; 0: off",
    )
    checkpoint_prompts: int = option(
        0,
        "k > 0: activation checkpointing: keep only the inputs of the policy's forward and recompute it during the "
        "backward, the rows of k prompts at a time (activation memory of k prompts' rows instead of the whole "
        "batch, for one more forward pass); 0: keep every activation",
    )
    clip_low: float = option(0.2, "PPO ratio clip below 1")
    clip_high: float = option(0.2, "PPO ratio clip above 1")
    aggregation: str = option("token-mean", "loss reduction over tokens (dfpo.core.masked.AGGREGATIONS)")
    grad_clip: float = option(1.0, "max global gradient norm (0: no clipping)")
    whiten: bool = option(True, "whiten advantages over the step's valid tokens")
    lora_rank: int = option(
        0, "r > 0: train LoRA adapters of rank r (peft) on the policy instead of all its weights; 0: full fine-tuning"
    )
    lora_alpha: float = option(0.0, "LoRA scaling alpha (0: twice the rank)")
    lora_targets: str = option(
        "all-linear", "modules that get adapters: all-linear, or comma-separated names (q_proj,v_proj)"
    )


@dataclass(frozen=True)
class KLOptions:
    coef: float = option(0.001, "KL coefficient against the frozen reference policy")
    mode: str = option("reward", "reward (per-token penalty in r_t), loss (added to the actor loss) or none")
    estimator: str = option("k1", "k1, k2 or k3 (k1 in the reward, k3 as a loss, by convention)")


@dataclass(frozen=True)
class AdvantageOptions:
    estimator: str = option("distributional_gae", "advantage estimator from dfpo.core.advantages")
    gamma: float = option(1.0, "discount")
    lam: float = option(0.95, "GAE lambda of the actor's advantages")
    critic_lam: float = option(
        1.0,
        "GAE lambda of the critic's targets, apart from the actor's (decoupled GAE, VAPO): 1 gives Monte-Carlo "
        "returns, unbiased whatever the critic's current error",
    )
    adaptive_lam: float = option(
        0.0,
        "alpha > 0: the actor's lambda per sequence, 1 - 1/(alpha * response length) (VAPO's length-adaptive GAE, "
        "alpha about 0.05), floored at 0; 0: advantage.lam for every sequence",
    )


@dataclass(frozen=True)
class EvalOptions:
    every: int = option(0, "held-out evaluation every this many steps (0: only before and after training)")
    limit: int = option(256, "examples per evaluated split")
    splits: str = option("eval", "comma-separated splits of the task to evaluate (empty: no evaluation)")
    samples: int = option(4, "k > 0 adds mean@k and maj@k (sampled at the rollout temperature; 0: greedy only)")
    max_new_tokens: int = option(0, "generation length (0: rollout.max_new_tokens)")


@dataclass(frozen=True)
class LogOptions:
    progress: bool = option(True, "show a progress bar with ETA and the key numbers")
    samples_every: int = option(10, "write sample completions to samples.jsonl every this many steps (0: never)")
    tensorboard: bool = option(False, "also write TensorBoard events to RUN_DIR/tensorboard (needs tensorboard)")
    wandb: bool = option(False, "also log to Weights & Biases, offline, in RUN_DIR/wandb (needs wandb)")


@dataclass(frozen=True)
class CheckpointOptions:
    every: int = option(0, "write a checkpoint every this many steps (0: only at the end)")
    keep: int = option(2, "checkpoints to keep (older ones are deleted after a newer one is complete)")
    final: bool = option(
        True,
        "after the last step, also write RUN_DIR/final: the policy as a plain from_pretrained folder (LoRA adapters "
        "merged, the tokenizer and its chat template included)",
    )


@dataclass(frozen=True)
class TrainConfig:
    """``dfpo train [--config FILE] [key=value ...]``: RL post-training with DFPO or a baseline."""

    algo: str = option("dfpo", "algorithm preset (dfpo list shows them); its settings come before yours")
    model: str = option(
        "tiny",
        "'tiny', 'smollm2', a Hugging Face causal-LM folder, or a hub id already in the local Hugging Face cache",
    )
    task: str = option("arithmetic", "registered task (dfpo list shows them)")
    task_options: dict = option(
        {}, "keyword options of the task: task_options.<name>=value (tiny + arithmetic: prompt_style=terse)"
    )
    train_limit: int = option(0, "use only the first N training examples (0: the task's whole train split)")
    noise: str = option(
        "auto",
        "noise on the training reward: clean, flip(p), gaussian(s), pseudo_label(n), reward_model; auto: clean for "
        "task=user (a user's rewards are used as given), reward_model for dialogue, flip(0.2) for the other built-in "
        "tasks (the noisy-supervision benchmark's default)",
    )
    steps: int = option(120, "training steps (one rollout batch each)")
    seed: int = option(0, "seed of everything: data order, sampling, noise, initialisation")
    run_dir: str = option("runs/{algo}-{task}-seed{seed}", "output folder; {algo}, {task}, {seed} are filled in")
    resume: str = option("", "'auto' continues from run_dir's latest checkpoint; or a checkpoint folder")
    max_bad_steps: int = option(3, "stop after this many steps in a row with a NaN/inf loss or gradient")
    threads: int = option(
        0,
        "torch CPU threads (0: one per core that other processes leave free when the run starts; a resume keeps "
        "the run's count, as results differ in the last bits between counts)",
    )
    parallel: str = option(
        "ddp",
        "with several processes (torchrun): ddp (each holds the whole model; gradients summed over processes) or "
        "fsdp (FSDP2: the policy's and a separate critic trunk's weights, gradients and optimizer states sharded)",
    )
    device: str = option(
        "auto", "where the models run: auto (each process's GPU when CUDA is available, else the CPU), cpu, cuda:N"
    )
    precision: str = option(
        "fp32",
        "fp32, or bf16: sampling from a bf16 copy of the policy and model forwards under bf16 autocast (weights, "
        "gradients and optimizer stay fp32); docs/performance.md measures its speed and its effect on learning",
    )
    rollout: RolloutOptions = option(RolloutOptions(), "sampling")
    actor: ActorOptions = option(ActorOptions(), "policy update")
    critic: CriticOptions = option(CriticOptions(), "critic")
    kl: KLOptions = option(KLOptions(), "KL to the reference policy")
    advantage: AdvantageOptions = option(AdvantageOptions(), "advantage estimation")
    eval: EvalOptions = option(EvalOptions(), "held-out evaluation")
    log: LogOptions = option(LogOptions(), "logging")
    checkpoint: CheckpointOptions = option(CheckpointOptions(), "checkpoints")

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir.format(algo=self.algo, task=self.task, seed=self.seed))


def load_yaml(path_or_name: str) -> dict[str, Any]:
    """A YAML config file's mapping; a bare name (``smollm2``) is looked up in the packaged ``configs/``."""
    path = Path(path_or_name)
    if not path.exists() and (CONFIG_DIR / f"{path_or_name}.yaml").exists():
        path = CONFIG_DIR / f"{path_or_name}.yaml"
    if not path.exists():
        shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"--config {path_or_name!r}: no such file (shipped configs: {shipped})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values at the top level")
    check_mapping_types(TrainConfig(), data, "", f"--config {path}")
    return data


def build_config(overrides: list[str], config_file: str | None = None) -> TrainConfig:
    """Defaults, then the algo preset, then ``config_file``, then ``overrides``; validated."""
    from dfpo.training.algos import algo_overrides

    file_items = flatten(load_yaml(config_file)) if config_file else []
    # the algo decides the preset, so find it first (command line over file over default)
    probe = apply_overrides(TrainConfig(), [i for i in [*file_items, *overrides] if i.split("=", 1)[0] == "algo"])
    config = apply_overrides(TrainConfig(), upgrade_keys([*algo_overrides(probe.algo), *file_items, *overrides]))
    config = resolve_auto(config)
    validate(config)
    return config


def config_record(c: TrainConfig) -> dict[str, Any]:
    """``c`` as JSON: Python objects in ``task_options`` (data, reward functions from the Python API) by a stable
    description, so that a resumed run compares equal to the one it continues."""

    def safe(value: Any) -> Any:
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        if isinstance(value, dict):
            return {str(k): safe(v) for k, v in value.items()}
        if callable(value):
            name = getattr(value, "__qualname__", type(value).__name__)
            return f"<python {getattr(value, '__module__', '?')}.{name}>"
        plain = (str, int, float, bool, type(None))
        if isinstance(value, (list, tuple)) and all(isinstance(v, plain) for v in value):
            return list(value)
        if isinstance(value, (list, tuple)) and all(callable(v) for v in value):
            return [safe(v) for v in value]
        rows = len(value) if hasattr(value, "__len__") else "?"
        fingerprint = getattr(value, "_fingerprint", None)
        suffix = f", fingerprint {fingerprint}" if fingerprint else ""
        return f"<{type(value).__name__} of {rows} rows in memory{suffix}>"

    return safe(dataclasses.asdict(c))


def resolve_auto(c: TrainConfig) -> TrainConfig:
    """``c`` with the settings that depend on others filled in (``noise=auto``)."""
    if c.noise == "auto":
        noise = {"user": "clean", "dialogue": "reward_model"}.get(c.task, "flip(0.2)")
        c = dataclasses.replace(c, noise=noise)
    return c


def validate(c: TrainConfig) -> None:
    """Refuse settings that cannot train, naming the key and what would work."""
    check_ranges(c)
    try:
        _ = c.resolved_run_dir
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(
            f"run_dir={c.run_dir!r}: {error} is not a placeholder it can fill; use {{algo}}, {{task}} and {{seed}} "
            "(double a brace to keep it: {{ }})"
        ) from None
    import dfpo.tasks as tasks
    from dfpo.core import advantages, policy_losses
    from dfpo.core.kl import ESTIMATORS
    from dfpo.core.masked import AGGREGATIONS
    from dfpo.training.algos import ALGOS

    one_of("algo", c.algo, list(ALGOS))
    one_of("task", c.task, tasks.names())
    c.critic.check()
    one_of("kl.mode", c.kl.mode, KL_MODES)
    one_of("kl.estimator", c.kl.estimator, ESTIMATORS)
    one_of("actor.schedule", c.actor.schedule, SCHEDULES)
    one_of("precision", c.precision, PRECISIONS)
    one_of("actor.aggregation", c.actor.aggregation, AGGREGATIONS)
    one_of("actor.loss", c.actor.loss, policy_losses.names())
    one_of("advantage.estimator", c.advantage.estimator, advantages.names())
    one_of("parallel", c.parallel, ("ddp", "fsdp"))
    one_of("rollout.engine", c.rollout.engine, ("hf", "vllm"))
    one_of("rollout.long_prompts", c.rollout.long_prompts, ("refuse", "truncate"))
    _check_devices(c)
    _check_estimator(c)
    _check_batches(c)


def _check_devices(c: TrainConfig) -> None:
    """vLLM, FSDP with LoRA, the device, LoRA on the critic, and the checkpoint to resume."""
    if c.rollout.engine == "vllm":
        import importlib.util

        import torch

        if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
            raise ConfigError(
                "rollout.engine=vllm needs a CUDA GPU and vLLM (pip install '.[vllm]'); use rollout.engine=hf here"
            )
        if c.actor.lora_rank:
            raise ConfigError("rollout.engine=vllm with actor.lora_rank is not supported: use rollout.engine=hf")
    if c.parallel == "fsdp" and (c.actor.lora_rank or c.critic.lora_rank):
        raise ConfigError(
            "parallel=fsdp with LoRA adapters is not supported: LoRA already keeps the optimizer states small; use "
            "parallel=ddp with actor.lora_rank, or fsdp without LoRA"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", c.device):
        raise ConfigError(f"device={c.device!r}: use auto, cpu, cuda or cuda:N")
    import torch

    if c.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={c.device}: this machine has no CUDA GPU that torch can use; use device=cpu")
    if c.critic.lora_rank and not (c.critic.kind != "none" and c.critic.backbone == "separate"):
        raise ConfigError(
            f"critic.lora_rank={c.critic.lora_rank} puts adapters on a separate critic trunk: set "
            "critic.backbone=separate (a shared trunk is the policy's: use actor.lora_rank)"
        )
    if c.critic.trunk_layers and not (c.critic.kind != "none" and c.critic.backbone == "separate"):
        raise ConfigError(
            f"critic.trunk_layers={c.critic.trunk_layers} trains the top layers of a separate critic trunk: set "
            "critic.backbone=separate"
        )
    if c.critic.trunk_layers and (c.critic.lora_rank or c.parallel == "fsdp"):
        raise ConfigError(
            f"critic.trunk_layers={c.critic.trunk_layers} with "
            f"{'critic.lora_rank' if c.critic.lora_rank else 'parallel=fsdp'} is not supported: choose one way to "
            "make the critic trunk cheaper (trunk_layers with parallel=ddp or none, or LoRA)"
        )
    if c.resume not in ("", "auto") and not Path(c.resume).is_dir():
        raise ConfigError(f"resume={c.resume!r}: use 'auto' (run_dir's latest checkpoint) or a checkpoint folder")


def _check_estimator(c: TrainConfig) -> None:
    """The advantage estimator against the critic kind and the group size."""
    from dfpo.core import advantages
    from dfpo.training.objectives import objective_class

    estimator_inputs = advantages.ADVANTAGES.inputs(c.advantage.estimator)[0]
    grouped = "group" in estimator_inputs or objective_class(c.actor.loss).compares_group
    if grouped and c.rollout.samples < 2:
        raise ConfigError(
            f"rollout.samples={c.rollout.samples}: {c.algo} compares the responses to one prompt "
            f"({c.advantage.estimator} advantages), so it needs rollout.samples >= 2"
        )
    needs = {"values": ("scalar", "ensemble"), "samples": ("quantile", "flow")}
    for name, kinds in needs.items():
        if name in estimator_inputs and c.critic.kind not in kinds:
            raise ConfigError(
                f"advantage.estimator={c.advantage.estimator} needs a critic giving {name}: "
                f"critic.kind one of {', '.join(kinds)} (got {c.critic.kind})"
            )
    if c.critic.kind in ("quantile", "flow") and "samples" not in estimator_inputs:
        raise ConfigError(
            f"critic.kind={c.critic.kind} is distributional: use advantage.estimator=distributional_gae "
            f"(got {c.advantage.estimator})"
        )
    if c.critic.kind in ("scalar", "ensemble") and "values" not in estimator_inputs:
        raise ConfigError(f"critic.kind={c.critic.kind} needs advantage.estimator=gae (got {c.advantage.estimator})")


def _check_batches(c: TrainConfig) -> None:
    """Minibatches and micro-batches that divide the step's sequences, and noise that fits the task."""
    batch = c.rollout.prompts * c.rollout.samples
    if batch % c.actor.minibatches:
        raise ConfigError(
            f"actor.minibatches={c.actor.minibatches} must divide the {batch} sequences of a step "
            f"(rollout.prompts x rollout.samples)"
        )
    minibatch = batch // c.actor.minibatches
    if c.actor.micro_batch and minibatch % c.actor.micro_batch:
        raise ConfigError(
            f"actor.micro_batch={c.actor.micro_batch} must divide the minibatch of {minibatch} sequences (or be 0)"
        )
    if c.actor.micro_tokens and c.actor.micro_batch:
        raise ConfigError(
            f"actor.micro_batch={c.actor.micro_batch} and actor.micro_tokens={c.actor.micro_tokens} both size the "
            "micro-batches: set one of them (micro_tokens adapts to each step's length; micro_batch is fixed)"
        )
    if c.noise.startswith("reward_model") and c.task != "dialogue":
        raise ConfigError(f"noise=reward_model scores CoQA answers: use it with task=dialogue (got task={c.task})")
    if c.noise.startswith(("flip", "pseudo_label")) and c.task == "dialogue":
        raise ConfigError(f"noise={c.noise} needs binary right/wrong rewards; dialogue's F1 is graded: "
                          "use noise=reward_model, gaussian(s) or clean")  # fmt: skip
