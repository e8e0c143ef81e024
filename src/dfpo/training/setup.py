"""Building a run before its first step: the run folder and the checkpoint to resume, the policy, the critic, the
optimizers, and the prompts' length limits. Each check fails before any model loads, or names the fix."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dfpo import critics, distributed
from dfpo.generation.rollout import context_limit, prompts_over
from dfpo.generation.trunk import split_trunk
from dfpo.models import add_lora, load_adapters, load_model
from dfpo.options import ConfigError, apply_overrides, flatten
from dfpo.supervision.noise import make_noise
from dfpo.tasks.base import check_splits
from dfpo.tasks.presets import task_options_for
from dfpo.tasks.user import DataError, RewardFunctionError
from dfpo.training import checkpoint as ckpt
from dfpo.training.config import TrainConfig, config_record
from dfpo.training.control import schedule
from dfpo.training.critic_options import CRITIC_KINDS, upgrade_keys


def find_resume(config: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: ``resume=auto``'s latest in ``run_dir``, a named folder, or None."""
    if not config.resume:
        return None
    if config.resume == "auto":
        return ckpt.latest_checkpoint(run_dir)
    return Path(config.resume)


def check_resume_config(config: TrainConfig, state: dict[str, Any], run_dir: Path) -> None:
    """A resumed run's settings equal the checkpoint's, but for those that do not change what it computes."""
    # a checkpoint of the earlier flat critic layout reads into the groups that now hold its keys
    saved = apply_overrides(TrainConfig(), upgrade_keys(flatten(state["config"])))
    current = apply_overrides(TrainConfig(), flatten(config_record(config)))
    # run_dir is where the run is, not what it is: a moved or copied run folder resumes; the options of critic
    # kinds the run does not use change nothing
    unused = tuple(f"critic.{kind}." for kind in CRITIC_KINDS if kind not in ("none", config.critic.kind))
    ignore = ("steps", "resume", "run_dir", "log.", "checkpoint.", "eval.", "threads", "device", "max_bad_steps",
              *unused)  # fmt: skip
    differ = changed_keys(saved, current, ignore)
    if differ:
        raise ConfigError(
            f"resume: the config differs from the run's in {', '.join(differ[:6])}; resume with the run's "
            f"settings (in {run_dir / 'train_config.json'}) and change only steps, eval.*, log.*, checkpoint.*"
        )


def load_task(config: TrainConfig) -> tuple[Any, list[dict[str, Any]], Any]:
    """The task, its training examples and the noise model; bad task options or noise named as config errors."""
    import dfpo.tasks as tasks

    c = config
    try:
        task = tasks.get(c.task, **task_options_for(c.model, c.task, c.task_options))
        train = task.examples("train", c.train_limit or None)
    except (DataError, RewardFunctionError):
        raise
    except (TypeError, ValueError) as error:
        options = config_record(c)["task_options"]
        raise ConfigError(f"task {c.task!r} with task_options {options}: {error}") from None
    if not train:
        raise ConfigError(f"task {c.task!r} has no training examples")
    check_splits(task, c.eval.splits, "eval.splits")
    try:
        noise = make_noise(c.noise, seed=c.seed)
    except ValueError as error:
        raise ConfigError(f"noise={c.noise!r}: {error}") from None
    return task, train, noise


def load_policy(config: TrainConfig, resume_from: Path | None) -> tuple[nn.Module, Any]:
    """The policy and its tokenizer: the starting model (with new LoRA adapters under ``actor.lora_rank``), or the
    checkpoint's weights (or adapters) on a resume."""
    a = config.actor
    if a.lora_rank:  # adapters on the starting model: new ones, or the checkpoint's
        policy, tokenizer = load_model(config.model)
        if resume_from:
            return _checkpoint_policy(resume_from, lambda folder: (load_adapters(policy, folder, trainable=True),
                                                                   tokenizer))  # fmt: skip
        return add_lora(policy, a.lora_rank, a.lora_alpha, a.lora_targets), tokenizer
    if resume_from:
        return _checkpoint_policy(resume_from, lambda folder: load_model(str(folder)))
    return load_model(config.model)


def _checkpoint_policy(resume_from: Path, load: Any) -> tuple[Any, Any]:
    """``load(folder)`` of the resumed checkpoint's ``policy/``, its failures and NaN or inf weights named as a
    damaged checkpoint."""
    folder = resume_from / "policy"
    if not folder.is_dir():
        raise ckpt.CheckpointError(
            f"{folder} is missing; resume from another checkpoint (resume=<folder>) or start over in a new run_dir"
        )
    try:
        policy, tokenizer = load(folder)
    except Exception as error:  # safetensors' error, OSError, a JSON error in a config, ...
        raise ckpt.CheckpointError(
            f"{folder} is damaged or incomplete ({type(error).__name__}: {error}); resume from another checkpoint "
            "(resume=<folder>) or start over in a new run_dir"
        ) from None
    ckpt.check_finite(folder, dict(policy.named_parameters()))
    return policy, tokenizer


def build_critic(config: TrainConfig, hidden_size: int, reward_range: tuple[float, float] | None) -> nn.Module | None:
    """The critic of kind ``critic.kind`` (:mod:`dfpo.critics`), built from the ``critic.*`` options its kind
    declares; its samples and targets are clamped to the task's ``reward_range`` when the return is that reward
    alone (no KL penalty in it)."""
    c = config
    if c.critic.kind == "none":
        return None
    options = c.critic.builder_options()
    bounded = c.critic.clamp and c.kl.mode != "reward"
    options["value_range"] = reward_range if bounded else None
    return critics.build(c.critic.kind, hidden_size, **options)


def build_critic_trunk(config: TrainConfig) -> nn.Module:
    """A separate critic's own copy of the starting policy's trunk (with LoRA adapters under
    ``critic.lora_rank``, or only its top ``critic.trunk_layers`` layers trainable)."""
    trunk = load_model(config.model)[0].base_model
    if config.critic.lora_rank:
        trunk = add_lora(trunk, config.critic.lora_rank, config.critic.lora_alpha, causal=False)
    if config.critic.trunk_layers:
        try:
            trunk = split_trunk(trunk, config.critic.trunk_layers)
        except ValueError as error:
            raise ConfigError(f"critic.trunk_layers={config.critic.trunk_layers}: {error}") from None
    return trunk


def build_optimizers(
    config: TrainConfig, policy: nn.Module, critic: nn.Module | None, trunk: nn.Module | None,
    objective_groups: list[dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    """``actor`` (the policy and the objective's modules), its ``actor_schedule``, and ``critic`` (head and
    separate trunk) when there is a critic."""
    c = config
    actor_groups = [{"params": trainable(policy), "lr": c.actor.lr, "weight_decay": c.actor.weight_decay}]
    actor_groups += objective_groups
    critic_groups = []
    if critic is not None:
        # the head has its own optimizer on every backbone (on a shared trunk the critic loss's gradient into
        # the trunk goes to the actor's), so that extra critic steps can train it alone
        critic_groups.append({"params": list(critic.parameters()), "lr": c.critic.lr, "weight_decay": 0.0})
    if trunk is not None:
        trunk_lr = c.critic.trunk_lr or c.actor.lr
        critic_groups.append({"params": trainable(trunk), "lr": trunk_lr, "weight_decay": 0.0})
    warm = c.critic.warmup_steps if critic is not None else 0
    actor_updates = max(1, (c.steps - warm) * c.actor.epochs * c.actor.minibatches)
    actor = torch.optim.AdamW(actor_groups)
    optimizers: dict[str, Any] = {
        "actor": actor,
        "actor_schedule": torch.optim.lr_scheduler.LambdaLR(
            actor, schedule(c.actor.schedule, c.actor.warmup_steps, actor_updates)
        ),
    }
    if critic_groups:
        optimizers["critic"] = torch.optim.AdamW(critic_groups)
    return optimizers


def prompt_limit(config: TrainConfig, policy: nn.Module, max_new_tokens: int) -> int | None:
    """The longest prompt: ``rollout.max_prompt_tokens``, or what the model's context leaves beside
    ``max_new_tokens`` (None: a model that names no context, and no limit set)."""
    limit = config.rollout.max_prompt_tokens
    room = context_limit(policy, max_new_tokens)
    context = policy.config.max_position_embeddings if room is not None else None
    if room is not None and room < 1:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of {context} "
            "tokens: lower rollout.max_new_tokens (or eval.max_new_tokens)"
        )
    if limit and room is not None and limit > room:
        raise ConfigError(
            f"rollout.max_prompt_tokens={limit}: the model's context of {context} tokens holds prompts of at most "
            f"{room} beside max_new_tokens={max_new_tokens}"
        )
    return limit or room


def refuse_long_prompts(sets: list[tuple[str, list[dict[str, Any]], int | None]], task: Any, tokenizer: Any) -> None:
    """Before training: every prompt of each ``(name, examples, limit)`` set within its limit, else a
    :class:`DataError` naming the first one over, how many are, and the ways out."""
    for name, examples, limit in sets:
        if limit is None:
            continue
        over: list[tuple[int, int]] = []
        for start in range(0, len(examples), 1024):
            chunk = [examples[i] for i in range(start, min(start + 1024, len(examples)))]
            texts = [task.prompt_text(tokenizer, e) for e in chunk]
            over += [(start + i, n) for i, n in prompts_over(tokenizer, texts, limit)]
        if over:
            index, n = over[0]
            start = str(examples[index].get("prompt", ""))[:60]
            raise DataError(
                f"{name} example {index}'s prompt ({start!r}...) is {n} tokens, over the limit of {limit} "
                "(rollout.max_prompt_tokens, or the model's context less max_new_tokens); "
                f"{len(over)} of the {len(examples)} "
                f"{name} prompts are over it. Shorten or drop them, or set rollout.long_prompts=truncate to keep "
                "each one's last tokens"
            )


def device(setting: str, world: distributed.World) -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    if setting == "auto":
        return torch.device(f"cuda:{world.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(setting)


def trainable(module: nn.Module) -> list[Tensor]:
    """The parameters an optimizer steps: all of them, or the LoRA adapters' when the rest is frozen."""
    return [p for p in module.parameters() if p.requires_grad]


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode without gradients (the reference policy, the bf16 rollout copy)."""
    model.eval()
    model.requires_grad_(False)
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def changed_keys(a: TrainConfig, b: TrainConfig, ignore: tuple[str, ...]) -> list[str]:
    """Dotted keys whose values differ between two configs, except those under ``ignore`` prefixes."""
    flat_a = dict(i.split("=", 1) for i in flatten(dataclasses.asdict(a)))
    flat_b = dict(i.split("=", 1) for i in flatten(dataclasses.asdict(b)))
    keys = sorted(set(flat_a) | set(flat_b))
    return [k for k in keys if flat_a.get(k) != flat_b.get(k) and not k.startswith(ignore)]
