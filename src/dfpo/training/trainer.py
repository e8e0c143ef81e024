"""The training loop shared by DFPO and every baseline.

One step, top to bottom (:meth:`Trainer.train_step`):

1. take the next prompts in the seeded data order; sample ``n`` responses to each (KV cache, left padding);
2. score them: the true reward against the gold answer, and the observed one through the noise model;
3. without gradients, score the rollout: the rollout policy's log-probs, the reference policy's, and the critic
   (values, ensemble values, quantiles or flow samples at the state before each response token);
4. per-token rewards: the outcome reward on the last response token, minus ``kl.coef * KL`` per token when the KL
   is in the reward;
5. advantages from the registry (:mod:`dfpo.core.advantages`), whitened for critic-based algorithms, and the
   critic's targets;
6. ``actor.epochs`` passes over ``actor.minibatches`` shuffled minibatches, gradients accumulated over
   micro-batches; the critic learns on the same minibatches, alone during its warm-up steps;
7. log, evaluate now and then, checkpoint.

With one epoch of one minibatch without micro-batches (the default), the policy is unchanged between steps 3 and
6, so its forward pass runs once, with gradients: its detached log-probs are the rollout policy's (the ratio is
exactly 1, as in a separate pass) and its detached hidden states feed the critic. With ``precision=bf16`` the
rollouts come from a bf16 copy of the policy, refreshed after every update, and the model forwards run under bf16
autocast; the weights, their gradients and the optimizer states stay fp32.

The critic backbone is ``separate`` (its own copy of the LM, initialised from the starting policy: the most
capacity and twice the compute and memory), ``shared`` (heads on the policy's trunk, the critic's loss flows into
it: cheapest, but value and policy gradients interfere) or ``frozen`` (heads on the policy's detached features:
cheap and no interference, but the features are not trained for values).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import logging as transformers_logging

from dfpo import cpu, critics, distributed
from dfpo.core import advantages as advantage_estimators
from dfpo.core import policy_losses
from dfpo.core.kl import kl_estimate, kl_metrics
from dfpo.core.masked import explained_variance, masked_mean, masked_whiten
from dfpo.core.streams import stream_seed
from dfpo.critics import CriticContext
from dfpo.evaluate import evaluate, sampled_metrics
from dfpo.generation.rollout import (
    Rollout,
    concat_rollouts,
    context_limit,
    fit_prompts,
    forward_positions,
    prompt_features,
    prompt_groups,
    prompts_over,
    response_forward,
    sample,
    trunk_hidden,
)
from dfpo.models import add_lora, load_adapters, load_model
from dfpo.options import ConfigError
from dfpo.supervision.noise import PseudoLabel, make_noise
from dfpo.tasks.presets import task_options_for
from dfpo.tasks.user import DataError, RewardFunctionError
from dfpo.training import checkpoint as ckpt
from dfpo.training.config import TrainConfig, changed_keys, config_record, critic_updates, flow_loss_options
from dfpo.training.report import MetricsLog, write_report
from dfpo.training.step import Rewarded, Sampled


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a NaN or inf loss or gradient."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; the message says what was kept and how to continue."""


class _Signals:
    """SIGINT and SIGTERM during training: the first asks the run to stop after the step in progress (which then
    writes a checkpoint); a second one, or one outside the step loop, abandons at once. Handlers are installed only
    in the main thread and restored afterwards."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.signum: int | None = None
        self.in_loop = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None or not self.in_loop:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint (again: stop now)",
              file=sys.stderr, flush=True)  # fmt: skip


class DataOrder:
    """Seeded order over ``n`` training examples, reshuffled every epoch; its state is ``(epoch, position)``."""

    def __init__(self, n: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.n, self.seed, self.epoch, self.position = n, seed, epoch, position

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._order()
            chunk = order[self.position : self.position + k - len(out)]
            out += chunk
            self.position += len(chunk)
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}


@dataclasses.dataclass(frozen=True)
class MinibatchTotals:
    """A minibatch's size over all processes: each micro-batch's losses are scaled by their share of it, so that
    the gradients accumulated over micro-batches and processes are those of the whole minibatch's losses."""

    sequences: int  # every sequence: the share of sequence-mean losses
    responses: int  # sequences with at least one token in the loss: FlowRL's mean is over them
    tokens: float  # response tokens in the loss: the share of token-mean losses
    member_tokens: Tensor | None = None  # [E] the tokens each member of a bootstrapped ensemble critic trains on


def _schedule(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def micro_rows(budget: int, length: int, samples: int) -> int:
    """Sequences per forward/backward under a budget of ``budget`` token positions, for sequences padded to
    ``length``: as many as fit (at least one), and a whole number of prompts' ``samples`` when one prompt's fit,
    so that a prompt's rows run their shared prompt once."""
    fit = max(1, budget // length)
    return fit - fit % samples if fit >= samples else fit


class _NoLog:
    """What a process other than rank 0 logs: nothing (rank 0 writes the run's files)."""

    def write(self, metrics: dict[str, Any]) -> None:
        pass

    def samples(self, records: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


def _signal_share(observed: Tensor, true: Tensor) -> float:
    """The share of the observed reward's variance that the true reward explains, ``corr(observed, true)^2``
    over a step's samples: the ceiling of a critic's explained variance at the last token when the noise is
    independent of the state (flips at rate ``p``: ``(1 - 2p)^2 Var(true) / Var(observed)``). 1 when there is no
    variance to explain."""
    if observed.numel() < 2 or float(observed.std()) == 0.0:
        return 1.0
    if float(true.std()) == 0.0:
        return 0.0
    return float(torch.corrcoef(torch.stack([observed, true]))[0, 1] ** 2)


def _prompt_share(observed: Tensor, group: Tensor) -> float:
    """The share of the observed reward's variance that lies between prompts, ``1 - within / total`` (pooled
    within-prompt variance over the total): what a critic that knew each prompt's success rate, and nothing about
    its response, could explain at the first response token. Not clipped at 0, so that its mean over steps is not
    biased upwards: a step with no variance between prompts gives a small negative value as often as a positive
    one."""
    groups = [observed[group == g] for g in group.unique()]
    groups = [g for g in groups if g.numel() > 1]
    count = sum(g.numel() for g in groups)
    if observed.numel() < 2 or float(observed.var()) == 0.0 or count <= len(groups):
        return 0.0
    within = sum(float(((g - g.mean()) ** 2).sum()) for g in groups) / (count - len(groups))
    return 1.0 - within / float(observed.var())


def _device(setting: str, world: distributed.World) -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    if setting == "auto":
        return torch.device(f"cuda:{world.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(setting)


def _trainable(module: nn.Module) -> list[Tensor]:
    """The parameters an optimizer steps: all of them, or the LoRA adapters' when the rest is frozen."""
    return [p for p in module.parameters() if p.requires_grad]


def _mean_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in records for k in r}
    return {k: float(np.mean([r[k] for r in records if k in r])) for k in sorted(keys)}


@dataclasses.dataclass(frozen=True)
class StepData:
    """What an observer of a training step sees (this process's rows, before the update), for measurements such
    as the critic-learning benchmark. ``N`` sequences, ``R`` response tokens, ``H`` critic feature size.

    Attributes:
        step: the training step.
        examples: ``N`` task examples, one per sequence.
        mask: ``[N, R]`` tokens that count.
        rewards: ``[N, R]`` per-token rewards as the learner saw them.
        values: ``[N, R]`` scalar critics' values, or None.
        samples: ``[N, R, K]`` distributional critics' samples (sorted), or None.
        features: ``[N, R, H]`` the critic's input features (detached), or None without a critic.
    """

    step: int
    examples: list[dict[str, Any]]
    mask: Tensor
    rewards: Tensor
    values: Tensor | None
    samples: Tensor | None
    features: Tensor | None


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig` and runs it (:meth:`run`).

    ``observers``: callables that get a :class:`StepData` every step (append before :meth:`run`)."""

    def __init__(
        self, config: TrainConfig, command: str = "dfpo train", callbacks: Sequence[Any] = (), signals: bool = True
    ) -> None:
        self.config, self.command = config, command
        self.signals = signals  # SIGINT/SIGTERM checkpoint the step in progress (the noisy grid's cells: off)
        self.observers: list[Any] = []
        self.callbacks = list(callbacks)  # dfpo.api.Callback: on_step_end, on_evaluate
        c = config
        self.world = distributed.setup()
        try:
            self.world.shard(c.rollout.prompts)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        transformers_logging.disable_progress_bar()  # per-load bars would bury the training's own
        self.run_dir = c.resolved_run_dir
        self._check_writable(self.run_dir)
        self.resume_from = self._find_resume()
        if self.resume_from is None and not c.resume and ckpt.holds_a_run(self.run_dir):
            raise ConfigError(
                f"run_dir {self.run_dir} already holds a run (its checkpoints or metrics.jsonl): continue it with "
                "resume=auto, or start over in another run_dir (or delete this one)"
            )
        state = ckpt.load_state(self.resume_from) if self.resume_from else None
        if state is not None:
            self._check_resume_config(state)
            if self.world.main:
                print(f"resume: {self.run_dir} continues from step {state['step']} ({self.resume_from})",
                      file=sys.stderr)  # fmt: skip
        # the count the run started with, on a resume: a result's last bits depend on it
        self.threads = cpu.set_threads(c.threads, state and state.get("threads"), self.world.main)
        self._seed(c.seed)

        import dfpo.tasks as tasks

        try:
            self.task = tasks.get(c.task, **task_options_for(c.model, c.task, c.task_options))
            self.train = self.task.examples("train", c.train_limit or None)
        except (DataError, RewardFunctionError):
            raise
        except (TypeError, ValueError) as error:
            options = config_record(c)["task_options"]
            raise ConfigError(f"task {c.task!r} with task_options {options}: {error}") from None
        if not self.train:
            raise ConfigError(f"task {c.task!r} has no training examples")
        try:
            self.noise = make_noise(c.noise, seed=c.seed)
        except ValueError as error:
            raise ConfigError(f"noise={c.noise!r}: {error}") from None

        if c.actor.lora_rank:  # adapters on the starting model: new ones, or the checkpoint's
            self.policy, self.tokenizer = load_model(c.model)
            if self.resume_from:
                self.policy = self._checkpoint_policy(
                    lambda folder: (load_adapters(self.policy, folder, trainable=True), self.tokenizer)
                )[0]
            else:
                self.policy = add_lora(self.policy, c.actor.lora_rank, c.actor.lora_alpha, c.actor.lora_targets)
        elif self.resume_from:
            self.policy, self.tokenizer = self._checkpoint_policy(lambda folder: load_model(str(folder)))
        else:
            self.policy, self.tokenizer = load_model(c.model)
        self.hidden_size = self.policy.config.hidden_size
        self.prompt_limit = self._prompt_limit(c.rollout.max_new_tokens)
        self.eval_prompt_limit = self._prompt_limit(c.eval.max_new_tokens or c.rollout.max_new_tokens)
        if c.rollout.long_prompts == "refuse":
            self._refuse_long_prompts()
        needs_ref = c.kl.mode != "none" or c.actor.loss == "flowrl" or isinstance(self.noise, PseudoLabel)
        self.ref = self._frozen(load_model(c.model)[0]) if needs_ref else None

        self.modules: dict[str, nn.Module] = {}
        self.critic = self._build_critic()
        self.critic_updates = critic_updates(c)
        if self.critic is not None:
            self.modules["critic"] = self.critic
        self.trunk = None
        if self.critic is not None and c.critic.backbone == "separate":
            self.trunk = load_model(c.model)[0].base_model  # the critic starts from the starting policy's trunk
            if c.critic.lora_rank:
                self.trunk = add_lora(self.trunk, c.critic.lora_rank, c.critic.lora_alpha, causal=False)
            self.modules["critic_trunk"] = self.trunk
        self.log_z = None
        if c.actor.loss == "flowrl":
            w = c.critic.width
            self.log_z = nn.Sequential(nn.Linear(self.hidden_size, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU(),
                                       nn.Linear(w, 1))  # fmt: skip
            self.modules["log_z"] = self.log_z
        if state is not None:  # whole weights, before the models are moved and sharded
            ckpt.load_modules(self.resume_from, self.modules)
        self.device = _device(c.device, self.world)
        for model in (self.policy, self.ref, *self.modules.values()):
            if model is not None:
                model.to(self.device)
        distributed.broadcast_parameters([self.policy, *self.modules.values()], self.world)
        # FSDP2 shards the policy and a separate critic trunk; the heads and the frozen reference stay whole
        self.sharded = c.parallel == "fsdp" and self.world.active
        if self.sharded:
            distributed.shard(self.policy, bf16=self.bf16)
            if self.trunk is not None:
                distributed.shard(self.trunk, bf16=self.bf16)
        self._build_optimizers()

        self.data = DataOrder(len(self.train), c.seed)
        self.step = 0
        self.bad_steps = 0
        self._fault: tuple[str, str] | None = None  # why the last skipped update was skipped, and what to do
        self.pseudo_labels: dict[str, Any] = {}
        if state is not None:
            ckpt.load_optimizers(self.resume_from, self.optimizers)
            if self.sharded:
                for optimizer in (self.actor_opt, self.critic_opt):
                    if optimizer is not None:
                        distributed.shard_optimizer_state(optimizer)
            self.step, self.bad_steps = state["step"], state["bad_steps"]
            self.data.epoch, self.data.position = state["data"]["epoch"], state["data"]["position"]
            self.pseudo_labels = state.get("pseudo_labels", {})
        truncate = self.step if state else 0
        self.log = MetricsLog(self.run_dir, c.log, truncate_after=truncate) if self.world.main else _NoLog()
        self._last_samples: list[dict[str, Any]] = []
        # a bf16 copy of the policy samples the rollouts (refreshed after every update); a sharded policy samples
        # in bf16 itself (FSDP2's mixed precision)
        bf16_copy = self.bf16 and not self.sharded and c.rollout.engine == "hf"
        self.rollout_policy = self._frozen(copy.deepcopy(self.policy).to(torch.bfloat16)) if bf16_copy else None
        self.engine = None
        if c.rollout.engine == "vllm":  # vLLM samples from the starting weights, then from each update's
            from dfpo.generation.vllm_engine import VLLMEngine
            from dfpo.models import resolve_model

            self.engine = VLLMEngine(str(resolve_model(c.model)), self.tokenizer, c.rollout.vllm_memory,
                                     self.world.active, c.seed)  # fmt: skip
            if self.resume_from is not None:
                self._sync_engine()
        batch = c.rollout.prompts * c.rollout.samples
        self.fused = c.actor.epochs == 1 and c.actor.minibatches == 1 and c.actor.micro_batch in (0, batch)
        self._policy_out: tuple[Tensor, Tensor | None] | None = None
        # the step's global batch shape [N, R], this rank's rows, and the key of the critic loss's draws
        self._global_shape, self._local_rows, self._draw_key = (0, 0), 0, 0

    # -- construction ----------------------------------------------------------------------------------------

    @property
    def bf16(self) -> bool:
        return self.config.precision == "bf16"

    def _precision(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around model forwards with ``precision=bf16``; nothing otherwise."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(next(self.policy.parameters()).device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def _sync_engine(self) -> None:
        weights = distributed.full_state_dict(self.policy) if self.sharded else self.policy.state_dict()
        self.engine.sync(weights.items())

    @torch.no_grad()
    def _refresh_rollout_policy(self) -> None:
        if self.engine is not None:
            self._sync_engine()
        if self.rollout_policy is not None:
            for low, full in zip(self.rollout_policy.parameters(), self.policy.parameters(), strict=True):
                low.copy_(full)

    @staticmethod
    def _check_writable(run_dir: Path) -> None:
        """Refuse a run folder that cannot be written before any model loads, not after minutes of loading."""
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise ConfigError(
                f"run_dir {run_dir} cannot be written ({error.strerror}); choose another run_dir"
            ) from None

    def _checkpoint_policy(self, load: Any) -> tuple[Any, Any]:
        """``load(folder)`` of the resumed checkpoint's ``policy/``, its failures and NaN or inf weights named as a
        damaged checkpoint."""
        folder = self.resume_from / "policy"
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

    def _find_resume(self) -> Path | None:
        if not self.config.resume:
            return None
        if self.config.resume == "auto":
            return ckpt.latest_checkpoint(self.run_dir)
        return Path(self.config.resume)

    def _check_resume_config(self, state: dict[str, Any]) -> None:
        from dfpo.options import apply_overrides, flatten

        saved = apply_overrides(TrainConfig(), flatten(state["config"]))
        current = apply_overrides(TrainConfig(), flatten(config_record(self.config)))
        # run_dir is where the run is, not what it is: a moved or copied run folder resumes
        ignore = ("steps", "resume", "run_dir", "log.", "checkpoint.", "eval.", "threads", "device", "max_bad_steps")
        differ = changed_keys(saved, current, ignore)
        if differ:
            raise ConfigError(
                f"resume: the config differs from the run's in {', '.join(differ[:6])}; resume with the run's "
                f"settings (in {self.run_dir / 'train_config.json'}) and change only steps, eval.*, log.*, checkpoint.*"
            )

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    @staticmethod
    def _frozen(model: nn.Module) -> nn.Module:
        model.eval()
        model.requires_grad_(False)
        return model

    def _build_critic(self) -> nn.Module | None:
        """The critic of kind ``critic.kind`` (:mod:`dfpo.critics`), built from the ``critic.*`` options its kind
        declares; its samples and targets are clamped to the task's reward range when the return is that reward
        alone (no KL penalty in it)."""
        c = self.config
        if c.critic.kind == "none":
            return None
        options = {k: v for k, v in dataclasses.asdict(c.critic).items() if k != "kind"}
        options["flow"] = flow_loss_options(c.critic.flow)
        bounded = c.critic.clamp and c.kl.mode != "reward"
        options["value_range"] = getattr(self.task, "reward_range", None) if bounded else None
        return critics.build(c.critic.kind, self.hidden_size, **options)

    def _build_optimizers(self) -> None:
        c = self.config
        actor_groups = [{"params": _trainable(self.policy), "lr": c.actor.lr, "weight_decay": c.actor.weight_decay}]
        if self.log_z is not None:
            actor_groups.append({"params": list(self.log_z.parameters()), "lr": c.critic.lr, "weight_decay": 0.0})
        critic_groups = []
        if self.critic is not None:
            # the head has its own optimizer on every backbone (on a shared trunk the critic loss's gradient into
            # the trunk goes to the actor's), so that extra critic steps can train it alone
            critic_groups.append({"params": list(self.critic.parameters()), "lr": c.critic.lr, "weight_decay": 0.0})
        if self.trunk is not None:
            trunk_lr = c.critic.trunk_lr or c.actor.lr
            critic_groups.append({"params": _trainable(self.trunk), "lr": trunk_lr, "weight_decay": 0.0})
        warm = c.critic.warmup_steps if self.critic is not None else 0
        actor_updates = max(1, (c.steps - warm) * c.actor.epochs * c.actor.minibatches)
        self.actor_opt = torch.optim.AdamW(actor_groups)
        self.optimizers: dict[str, Any] = {
            "actor": self.actor_opt,
            "actor_schedule": torch.optim.lr_scheduler.LambdaLR(
                self.actor_opt, _schedule(c.actor.schedule, c.actor.warmup_steps, actor_updates)
            ),
        }
        self.critic_opt = torch.optim.AdamW(critic_groups) if critic_groups else None
        if self.critic_opt is not None:
            self.optimizers["critic"] = self.critic_opt

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to ``config.steps``, evaluating before (on a fresh run) and after; returns the run summary."""
        from tqdm import tqdm

        c, main = self.config, self.world.main
        # rank 0 evaluates; with a sharded policy every process takes part in its forwards
        evaluating = main or self.sharded
        self.run_dir.mkdir(parents=True, exist_ok=True)
        eval_path = self.run_dir / "eval.json"
        evals = json.loads(eval_path.read_text()) if self.resume_from and eval_path.exists() else {}
        if self.resume_from is None and main:
            record = {"command": self.command, "config": config_record(c), "seed": c.seed,
                      "processes": self.world.size}  # fmt: skip
            _write_json(self.run_dir / "train_config.json", record)
        if self.resume_from is None and evaluating:
            evals = {"before": self.evaluate()}
            self._callback("on_evaluate", 0, evals["before"])
        # a resumed run forgets evaluations made after its checkpoint, as metrics.jsonl does
        evals["history"] = [h for h in evals.get("history", []) if h["step"] <= self.step]
        if main:
            _write_json(eval_path, evals)
        start = time.perf_counter()
        bar = tqdm(total=c.steps, initial=self.step, disable=not (c.log.progress and main), file=sys.stderr,
                   desc=c.algo, dynamic_ncols=True)  # fmt: skip
        with _Signals(self.signals) as signals:
            self._loop(bar, evals, eval_path, evaluating, signals)
        bar.close()
        self.log.close()
        if self.bad_steps and main:  # no checkpoint follows a skipped step: say so rather than end as if all went well
            print(f"train: the last {self.bad_steps} step(s) had a NaN or inf loss or gradient and were skipped; the "
                  f"last checkpoint is {ckpt.latest_checkpoint(self.run_dir)}", file=sys.stderr)  # fmt: skip
        if main and c.checkpoint.final:
            self._write_final()
        if not evaluating:
            return evals
        last = evals["history"][-1] if evals["history"] else {"step": self.step, **self.evaluate()}
        if not main:
            return evals
        evals["after"] = {k: v for k, v in last.items() if k != "step"}
        evals["seconds"] = evals.get("seconds", 0.0) + time.perf_counter() - start
        _write_json(eval_path, evals)
        write_report(self.run_dir, c, evals)
        return evals

    def _loop(self, bar: Any, evals: dict[str, Any], eval_path: Path, evaluating: bool, signals: _Signals) -> None:
        """Steps until ``config.steps``, or until a signal asks to stop (every process stops at the same step)."""
        c, main = self.config, self.world.main
        signals.in_loop = True  # from here a signal lets the step in progress finish and be checkpointed
        while self.step < c.steps:
            self.step += 1
            metrics = self.train_step()
            # evaluation runs on a forked random stream; other processes go on to the next step's collectives
            if evaluating and ((c.eval.every and self.step % c.eval.every == 0) or self.step == c.steps):
                result = self.evaluate()
                evals["history"].append({"step": self.step, **result})
                if main:
                    _write_json(eval_path, evals)
                metrics.update({f"eval/{s}/{k}": v for s, r in result.items() for k, v in r.items()})
                self._callback("on_evaluate", self.step, result)
            self.log.write(metrics)
            self._callback("on_step_end", self.step, metrics)
            bar.update(1)
            bar.set_postfix({
                "obs": f"{metrics['reward/observed']:.2f}", "true": f"{metrics['reward/true']:.2f}",
                "ev": f"{metrics.get('critic/explained_var', float('nan')):.2f}",
                "len": f"{metrics['response_length/mean']:.0f}",
            })  # fmt: skip
            if c.log.samples_every and self.step % c.log.samples_every == 0 and self._last_samples:
                bar.write(f"step {self.step} sample: {self._last_samples[0]['completion']!r}")
            if self.bad_steps >= c.max_bad_steps:
                bar.close()
                self.log.close()
                what, fix = self._fault or ("a NaN or inf loss or gradient", "lower actor.lr or critic.lr")
                raise TrainingDiverged(
                    f"step {self.step}: {self.bad_steps} steps in a row were skipped, the last for {what}; the last "
                    f"good checkpoint is {ckpt.latest_checkpoint(self.run_dir)}. To go on: {fix}"
                )
            stop = distributed.max_scalar(float(signals.signum is not None), self.world) > 0
            due = self.step == c.steps or (c.checkpoint.every and self.step % c.checkpoint.every == 0) or stop
            if due and not self.bad_steps:  # a checkpoint is only ever written after a good step
                self.save()
            if stop:
                bar.close()
                self.log.close()
                kept = ckpt.latest_checkpoint(self.run_dir) if main else None
                where = f"the last checkpoint is {kept}" if kept else "no checkpoint was written"
                raise Interrupted(
                    f"interrupted after step {self.step}; {where}: continue with the same command and resume=auto"
                )
        signals.in_loop = False

    def _callback(self, hook: str, step: int, data: dict[str, Any]) -> None:
        if self.world.main:
            for callback in self.callbacks:
                method = getattr(callback, hook, None)
                if method is not None:
                    method(self, step, data)

    def _write_final(self) -> None:
        """``RUN_DIR/final``: the last checkpoint's policy as a plain ``from_pretrained`` folder."""
        from dfpo.models import export_model

        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is not None and ckpt.load_state(latest)["step"] == self.step:
            export_model(str(self.run_dir), self.run_dir / "final")

    def save(self) -> Path:
        """Rank 0 writes the checkpoint (every rank holds the same weights, optimizer states and random stream);
        the others wait for it, so that a checkpoint is complete before any rank goes on."""
        path = self.run_dir / "checkpoints" / f"step_{self.step:06d}"
        whole = None
        if self.sharded:  # every process takes part in gathering the sharded states
            whole = {
                "policy": distributed.full_state_dict(self.policy),
                "modules": {k: distributed.full_state_dict(m) for k, m in self.modules.items()},
                "optimizers": {
                    k: distributed.full_optimizer_state(o) if isinstance(o, torch.optim.Optimizer) else o.state_dict()
                    for k, o in self.optimizers.items()
                },
            }
        if self.world.main:
            path = self._save(whole)
        distributed.barrier(self.world)
        return path

    def _save(self, whole: dict[str, Any] | None = None) -> Path:
        state = {
            "config": config_record(self.config),
            "data": self.data.state(),
            "bad_steps": self.bad_steps,
            "threads": self.threads,
            "pseudo_labels": self.pseudo_labels,
        }
        return ckpt.save_checkpoint(
            self.run_dir, self.step, self.policy, self.tokenizer, self.modules, self.optimizers, state,
            self.config.checkpoint.keep, whole,
        )  # fmt: skip

    def _prompt_limit(self, max_new_tokens: int) -> int | None:
        """The longest prompt: ``rollout.max_prompt_tokens``, or what the model's context leaves beside
        ``max_new_tokens`` (None: a model that names no context, and no limit set)."""
        c = self.config
        room = context_limit(self.policy, max_new_tokens)
        context = self.policy.config.max_position_embeddings if room is not None else None
        if room is not None and room < 1:
            raise ConfigError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of {context} "
                "tokens: lower rollout.max_new_tokens (or eval.max_new_tokens)"
            )
        if c.rollout.max_prompt_tokens and room is not None and c.rollout.max_prompt_tokens > room:
            raise ConfigError(
                f"rollout.max_prompt_tokens={c.rollout.max_prompt_tokens}: the model's context of {context} tokens "
                f"holds prompts of at most {room} beside max_new_tokens={max_new_tokens}"
            )
        return c.rollout.max_prompt_tokens or room

    def _refuse_long_prompts(self) -> None:
        """Before training: every training prompt and every evaluation split's prompt within its limit, else a
        :class:`DataError` naming the first one over, how many are, and the ways out."""
        c = self.config
        sets = [("training", self.train, self.prompt_limit)]
        sets += [(f"eval split {s!r}", self.task.examples(s, c.eval.limit), self.eval_prompt_limit)
                 for s in c.eval.splits.split(",") if s]  # fmt: skip
        for name, examples, limit in sets:
            if limit is None:
                continue
            over: list[tuple[int, int]] = []
            for start in range(0, len(examples), 1024):
                chunk = [examples[i] for i in range(start, min(start + 1024, len(examples)))]
                texts = [self.task.prompt_text(self.tokenizer, e) for e in chunk]
                over += [(start + i, n) for i, n in prompts_over(self.tokenizer, texts, limit)]
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

    def _nonfinite_inputs(
        self, scores: Tensor, kept: Tensor, batch: dict[str, Tensor], mask: Tensor
    ) -> tuple[str, str] | None:
        """What upstream of the losses is NaN or inf this step, and what to do about it: the rewards, or the
        policy's or the reference model's log-probs (from which the KL comes); None when all are finite."""
        c = self.config
        bad = kept & ~torch.isfinite(scores)
        if bad.any():
            return (f"a NaN or inf reward for {int(bad.sum())} of {len(scores)} responses (task {c.task!r}, "
                    f"noise={c.noise})", "check the reward function or reward model")  # fmt: skip
        on = mask.bool()
        for key, who in (("old_logp", "the policy"), ("ref_logp", "the reference model")):
            if key in batch and (bad := on & ~torch.isfinite(batch[key])).any():
                kl = f", so in the KL to the reference (kl.mode={c.kl.mode})" if self.ref is not None else ""
                return (f"a NaN or inf in {who}'s log-probs at {int(bad.sum())} response tokens{kl}",
                        f"check {who}'s weights and precision={c.precision}, or lower actor.lr")  # fmt: skip
        return None

    def _fit_prompts(self, prompts: list[str]) -> tuple[list[str], int]:
        """The step's prompts within the limit: with ``rollout.long_prompts=truncate`` the long ones cut to their
        last tokens (returns how many were)."""
        if self.config.rollout.long_prompts == "truncate":
            return fit_prompts(self.tokenizer, prompts, self.prompt_limit)
        return prompts, 0  # refused before training, if any was over

    # -- one step --------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        c, step, world = self.config, self.step, self.world
        times: dict[str, float] = {}
        t = time.perf_counter()
        sampled = self.sample_phase()
        times["generate"] = time.perf_counter() - t
        t = time.perf_counter()
        rewarded = self.reward_phase(sampled)
        times["reward"] = time.perf_counter() - t
        first, prompts, cut = sampled.first, sampled.prompts, sampled.truncated_prompts
        rollout, per_seq, group = sampled.rollout, sampled.per_sequence, sampled.rollout.prompt_index
        noisy, components, kept = rewarded.noisy, rewarded.components, rewarded.kept
        scores, true, mask = rewarded.scores, rewarded.true, rewarded.mask

        # score the rollout without gradients
        t = time.perf_counter()
        ids, attn, width = rollout.input_ids, rollout.attention_mask, mask.shape[1]
        micro = self._micro_batch(ids.shape[1])  # sequences per forward/backward in the update (0: a minibatch)
        if self.fused and (not micro or micro >= len(ids)):
            # the update's forward, run now: its detached outputs are the rollout policy's
            self.policy.train()
            self._policy_out = self._policy_forward(ids, attn, width, self._policy_needs_grad())
        batch = self._score_rollout(ids, attn, width, rollout.prompt_length)
        times["score"] = time.perf_counter() - t

        # per-token rewards and advantages, over the global batch: with several processes, every rank gathers
        # the per-token tensors of all ranks, computes what one process would, and keeps its own rows
        last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()
        rewards = scores[:, None] * last
        if self.ref is not None and c.kl.mode == "reward":
            rewards = rewards - c.kl.coef * kl_estimate(batch["old_logp"], batch["ref_logp"], c.kl.estimator) * mask
        lengths = rollout.response_mask.sum(-1).float()
        local = {"rewards": rewards, "mask": mask, "scores": scores, "true": true, "kept": kept.float(),
                 "group": group + first, "lengths": lengths, "truncated": rollout.truncated.float()}  # fmt: skip
        local.update({k: batch[k] for k in ("old_logp", "ref_logp", *self._output_keys) if k in batch})
        g = {k: distributed.gather_rows(v, world) for k, v in local.items()}
        g_mask = g["mask"]
        metrics: dict[str, float] = {}
        if self.ref is not None:
            metrics.update(kl_metrics(g["old_logp"], g["ref_logp"], g_mask))
        lam: float | Tensor = c.advantage.lam
        if c.advantage.adaptive_lam:
            lam = advantage_estimators.adaptive_lambda(g_mask.sum(-1), c.advantage.adaptive_lam)
        inputs = {"rewards": g["rewards"], "values": g.get("values"), "samples": g.get("samples"),
                  "scores": g["scores"], "mask": g_mask, "group": g["group"], "valid": g["kept"].bool(),
                  "gamma": c.advantage.gamma}  # fmt: skip
        adv, returns, adv_metrics = advantage_estimators.compute(c.advantage.estimator, **inputs, lam=lam)
        metrics.update(adv_metrics)
        if adv.dim() == 3:  # distributional: per-sample advantages; the actor uses their mean
            adv = adv.mean(-1)
        # the critic's targets with their own lambda (decoupled GAE): 1 gives Monte-Carlo returns
        targets = returns
        if self.critic is not None:
            outputs = {k: g[k] for k in self.critic.output_keys}
            targets = self.critic.targets(g["rewards"], outputs, g_mask, c.advantage.gamma, c.advantage.critic_lam)
        if c.actor.whiten:
            adv = masked_whiten(adv, g_mask)
        if self.critic is not None:
            metrics.update(self._critic_metrics(g, targets))
        for observe in self.observers:
            observe(StepData(step, per_seq, mask, local["rewards"], batch.get("values"), batch.get("samples"),
                             batch.get("critic_hidden")))  # fmt: skip
        rows = slice(world.rank * len(mask), (world.rank + 1) * len(mask))
        self._global_shape, self._local_rows, self._draw_key = tuple(g_mask.shape), len(mask), 0
        batch.update(ids=ids, attn=attn, mask=mask, adv=adv[rows, :width], targets=targets[rows, :width],
                     global_mask=g_mask)  # fmt: skip
        if c.actor.loss == "flowrl":
            batch["seq_reward"] = ((adv * g_mask).sum(-1) / g_mask.sum(-1).clamp_min(1.0))[rows]

        self._fault = self._nonfinite_inputs(scores, kept, batch, mask)
        t = time.perf_counter()
        update_metrics, skipped = self._update(batch, width, micro)
        if self.critic_updates > 1 and self.critic is not None:
            update_metrics.update(self._critic_steps(batch, self.critic_updates - 1, micro, width))
        self._policy_out = None
        self._refresh_rollout_policy()
        times["update"] = time.perf_counter() - t
        self.bad_steps = self.bad_steps + 1 if skipped else 0
        metrics.update(update_metrics)

        # rank 0's times, for the global batch (every rank works on its share at the same time)
        tokens = distributed.sum_scalar(float(attn.sum()), world)
        kept, scores, true, lengths = g["kept"].bool(), g["scores"], g["true"], g["lengths"]
        noise_rate = distributed.mean_metrics({"rate": noisy.rate}, world)["rate"]
        metrics.update({
            "step": step,
            "data/epoch": self.data.epoch,
            "data/truncated_prompts": distributed.sum_scalar(float(cut), world),
            "reward/observed": float(scores[kept].mean()) if kept.any() else 0.0,
            "reward/true": float(true[kept].mean()) if kept.any() else 0.0,
            "reward/observed_std": float(scores[kept].std()) if kept.sum() > 1 else 0.0,
            "reward/noise_rate": noise_rate,
            "reward/signal_share": _signal_share(scores[kept], true[kept]),
            "reward/prompt_share": _prompt_share(scores[kept], g["group"][kept]),
            "reward/skipped": float((~kept).sum()),
            "response_length/mean": float(lengths.mean()),
            "response_length/max": float(lengths.max()),
            "response_length/min": float(lengths.min()),
            "response_length/clip_ratio": float(g["truncated"].mean()),
            "train/skipped_update": float(skipped),
            "perf/generate_tokens_per_s": float(lengths.sum()) / max(times["generate"], 1e-9),
            "perf/score_tokens_per_s": tokens / max(times["score"], 1e-9),
            "perf/update_tokens_per_s": tokens * c.actor.epochs / max(times["update"], 1e-9),
            "perf/micro_batch": float(min(micro or len(mask), len(mask) // c.actor.minibatches)),
            "perf/forward_positions": distributed.sum_scalar(float(forward_positions(ids, attn, width)), world),
            "perf/step_s": sum(times.values()),
            "perf/threads": float(self.threads),
            **{f"perf/{k}_s": v for k, v in times.items()},
        })  # fmt: skip
        if components:
            metrics.update(distributed.mean_metrics({f"reward/{k}": v for k, v in components.items()}, world))
        if isinstance(self.noise, PseudoLabel) and self.pseudo_labels:
            right = [v["right"] for v in self.pseudo_labels.values()]
            metrics["reward/pseudo_label_accuracy"] = sum(right) / len(right)
        self._last_samples = [
            {"step": step, "prompt": prompts[int(group[i])], "completion": rollout.completions[i],
             "observed": noisy.observed[i], "true": noisy.true[i]}
            for i in range(min(2, len(rollout.completions)))
        ]  # fmt: skip
        if c.log.samples_every and step % c.log.samples_every == 0:
            self.log.samples(self._last_samples)
        return metrics

    def sample_phase(self) -> Sampled:
        """Draw the step's prompts (every rank the same global draw, each answering its contiguous share), attach
        pseudo-labels when the noise asks for them, fit the prompts to the context, and sample the responses."""
        c = self.config
        first, stop = self.world.shard(c.rollout.prompts)
        examples = [self.train[i] for i in self.data.take(c.rollout.prompts)][first:stop]
        if isinstance(self.noise, PseudoLabel):
            examples = self._pseudo_label(examples)
        prompts, cut = self._fit_prompts([self.task.prompt_text(self.tokenizer, e) for e in examples])
        self.policy.eval()
        rollout = self._sample(prompts, first)
        per_sequence = [examples[i] for i in rollout.prompt_index.tolist()]
        return Sampled(first, examples, prompts, cut, rollout, per_sequence)

    def reward_phase(self, sampled: Sampled) -> Rewarded:
        """Score the responses: the learner sees the noise model's observed reward, the true one is kept beside
        it for the logs."""
        c, rollout = self.config, sampled.rollout
        noisy = self.noise.score(self.task, rollout.completions, sampled.per_sequence, self.step,
                                 sampled.first * c.rollout.samples, rollout.completion_ids)  # fmt: skip
        components = dict(getattr(self.task, "last_components", {}))  # each user reward function's mean
        on = {"device": self.device}
        kept = torch.tensor([o is not None for o in noisy.observed], **on)
        scores = torch.tensor([o if o is not None else 0.0 for o in noisy.observed], dtype=torch.float32, **on)
        true = torch.tensor([r if r is not None else 0.0 for r in noisy.true], dtype=torch.float32, **on)
        mask = rollout.response_mask.float() * kept[:, None]
        if c.rollout.mask_truncated:
            mask = mask * (~rollout.truncated)[:, None]
        return Rewarded(noisy, components, kept, scores, true, mask)

    def _critic_metrics(self, g: dict[str, Tensor], targets: Tensor) -> dict[str, float]:
        """How well the values the advantages used predict, over the step's whole batch: explained variance against
        the critic's targets and against the Monte-Carlo returns (lambda = 1, what a value should equal), and the
        values' mean bias against those returns."""
        mask = g["mask"]
        values = g["values"] if "values" in g else g["samples"].mean(-1)
        goal = targets.mean(-1) if targets.dim() == 3 else targets
        mc = advantage_estimators.returns_to_go(g["rewards"], mask, self.config.advantage.gamma)
        return {
            "critic/explained_var": float(explained_variance(values, goal, mask)),
            "critic/explained_var_mc": float(explained_variance(values, mc, mask)),
            "critic/value_bias": float(masked_mean(values - mc, mask)),
        }

    def _sample(self, prompts: list[str], first: int) -> Rollout:
        """``rollout.samples`` responses to each of ``prompts`` (the step's prompts ``first``, ``first + 1``, ...),
        ``rollout.generate_prompts`` prompts per generate call, each call on its own stream seeded by the seed, the
        step and the position of its first prompt in the step: the main random stream is left as it was."""
        c = self.config
        chunk = c.rollout.generate_prompts or len(prompts)
        model = self.rollout_policy or self.policy
        device = next(model.parameters()).device
        parts = []
        for start in range(0, len(prompts), chunk):
            seed = stream_seed(c.seed, self.step, 0, first + start)
            if self.engine is not None:
                parts.append(self.engine.sample(prompts[start : start + chunk], c.rollout.samples,
                                                c.rollout.max_new_tokens, c.rollout.temperature, c.rollout.top_p,
                                                seed % 2**31))  # fmt: skip
                continue
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                parts.append(sample(model, self.tokenizer, prompts[start : start + chunk], c.rollout.samples,
                                    c.rollout.max_new_tokens, c.rollout.temperature, c.rollout.top_p))  # fmt: skip
        return concat_rollouts(parts, self.tokenizer.pad_token_id)

    def _pseudo_label(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Examples with their pseudo-label: the majority vote of the *starting* policy (the reference model),
        computed the first time an example is drawn, kept in checkpoints, and drawn from a forked generator so
        that labelling never moves the training's random stream."""
        keys = [json.dumps(e["prompt"], sort_keys=True) for e in examples]
        todo = [e for e, k in zip(examples, keys, strict=True) if k not in self.pseudo_labels]
        new: dict[str, Any] = {}
        if todo:
            with torch.random.fork_rng():
                labelled, _ = self.noise.label(self.ref, self.tokenizer, self.task, todo,
                                               self.config.rollout.temperature, self.config.rollout.top_p,
                                               self.config.rollout.max_new_tokens)  # fmt: skip
            for e in labelled:
                right = e["pseudo_answer"] is not None and self.task.score_answer(e["pseudo_answer"], e) > 0.5
                new[json.dumps(e["prompt"], sort_keys=True)] = {"answer": e["pseudo_answer"], "right": bool(right)}
        # every rank keeps every label: any rank may draw the example later, and rank 0 saves them
        for labels in distributed.gather_objects(new, self.world):
            self.pseudo_labels.update(labels)
        return [{**e, "pseudo_answer": self.pseudo_labels[k]["answer"]} for e, k in zip(examples, keys, strict=True)]

    @property
    def _output_keys(self) -> tuple[str, ...]:
        return () if self.critic is None else self.critic.output_keys

    @property
    def _critic_on_policy(self) -> bool:
        return self.critic is not None and self.config.critic.backbone != "separate"

    def _policy_needs_grad(self) -> bool:
        actor_active = self.critic is None or self.step > self.config.critic.warmup_steps
        return actor_active or (self.critic is not None and self.config.critic.backbone == "shared")

    def _policy_forward(self, ids: Tensor, attn: Tensor, width: int, grad: bool) -> tuple[Tensor, Tensor | None]:
        """The policy's response log-probs ``[N, R]`` (and hidden states ``[N, R, H]`` for a critic on its trunk);
        with ``actor.checkpoint_prompts = k``, run ``k`` prompts' rows at a time, recomputed during the backward."""
        c = self.config

        def forward(i: Tensor, a: Tensor) -> tuple[Tensor, Tensor | None]:
            return response_forward(self.policy, i, a, width, c.rollout.temperature, self._critic_on_policy)

        with torch.set_grad_enabled(grad), self._precision():
            if not (grad and c.actor.checkpoint_prompts):
                return forward(ids, attn)
            per = prompt_groups(ids, attn, width)
            k = c.actor.checkpoint_prompts
            groups = [torch.cat(per[j : j + k]) for j in range(0, len(per), k)]
            outs = [checkpoint(forward, ids[g], attn[g], use_reentrant=False) for g in groups]
        back = torch.empty(len(ids), dtype=torch.long)
        back[torch.cat(groups)] = torch.arange(len(ids))  # rows back in their order
        logp = torch.cat([o[0] for o in outs])[back]
        return logp, torch.cat([o[1] for o in outs])[back] if self._critic_on_policy else None

    @torch.no_grad()
    def _score_rollout(self, ids: Tensor, attn: Tensor, width: int, prompt_length: int) -> dict[str, Tensor]:
        c = self.config
        parts: dict[str, list[Tensor]] = {}
        for rows in torch.arange(ids.shape[0]).split(c.rollout.batch_size):
            i, a = ids[rows], attn[rows]
            with self._precision():
                if self._policy_out is None:
                    logp, hidden = response_forward(self.policy, i, a, width, c.rollout.temperature,
                                                    self._critic_on_policy)  # fmt: skip
                else:
                    logp, hidden = (None if x is None else x[rows].detach() for x in self._policy_out)
                if self.ref is not None:
                    parts.setdefault("ref_logp", []).append(
                        response_forward(self.ref, i, a, width, c.rollout.temperature)[0]
                    )
                if self.trunk is not None:
                    hidden = trunk_hidden(self.trunk, i, a, width)
                if self.log_z is not None:
                    features = prompt_features(self.policy, i, a, prompt_length)
                    parts.setdefault("prompt_features", []).append(features.float())
            parts.setdefault("old_logp", []).append(logp)
            if self.critic is not None:
                for key, value in self.critic.outputs(hidden.float()).items():
                    parts.setdefault(key, []).append(value)
                if (self.critic_updates > 1 and self.trunk is None) or self.observers:  # extra steps, observers
                    parts.setdefault("critic_hidden", []).append(hidden.detach().float())
        return {k: torch.cat(v) for k, v in parts.items()}

    # -- the update ------------------------------------------------------------------------------------------

    def _micro_batch(self, length: int) -> int:
        """Sequences per forward/backward in this step's update (0: a whole minibatch): ``actor.micro_batch``, or
        under ``actor.micro_tokens`` as many as fit at the step's padded ``length``, the longest over all
        processes so that every process runs the same number of passes."""
        c = self.config
        if not c.actor.micro_tokens:
            return c.actor.micro_batch
        length = int(distributed.max_scalar(float(length), self.world))
        return micro_rows(c.actor.micro_tokens, length, c.rollout.samples)

    def _update(self, batch: dict[str, Tensor], width: int, micro: int) -> tuple[dict[str, float], bool]:
        """PPO epochs over minibatches of ``micro`` sequences per forward/backward (0: a whole minibatch); returns
        the mean metrics and whether any minibatch was skipped."""
        c = self.config
        actor_active = self.critic is None or self.step > c.critic.warmup_steps
        local = batch["ids"].shape[0]
        offset, n = self.world.rank * local, self.world.size * local
        size = n // c.actor.minibatches
        micro = micro or size
        records: list[dict[str, float]] = []
        skipped = False
        self.policy.train()
        for epoch in range(c.actor.epochs):
            # the same permutation of the global batch on every rank; each rank runs its own rows of each minibatch
            stream = torch.Generator().manual_seed(stream_seed(c.seed, self.step, 1, epoch))
            if self.sharded:
                # sharded forwards are collectives: every process runs the same number of rows per minibatch, its
                # own rows in one order shared by all (with one minibatch, the same as the global order)
                mine = torch.randperm(local, generator=stream)
                order = torch.stack([mine + r * local for r in range(self.world.size)], 1).reshape(-1)
            else:
                order = torch.randperm(n, generator=stream)
            for rows in order.split(size):
                # in row order, micro-batches hold the answers to one prompt together (it then runs once); the
                # minibatch's gradient is the same whatever its micro-batches
                rows = rows.sort().values
                mine = rows[(rows >= offset) & (rows < offset + local)] - offset
                self._draw_key += 1  # the critic loss's draws in this minibatch
                record, ok = self._minibatch(batch, mine, self._totals(batch, rows), micro, width, actor_active)
                records.append(record)
                skipped |= not ok
        self.policy.eval()
        out = distributed.mean_metrics(_mean_metrics(records), self.world)
        out["actor/lr"] = self.optimizers["actor_schedule"].get_last_lr()[0]
        out["actor/active"] = float(actor_active)
        return out, skipped

    def _totals(self, batch: dict[str, Tensor], rows: Tensor) -> MinibatchTotals:
        """The size of the minibatch of the step's global ``rows``."""
        lengths = batch["global_mask"][rows].sum(-1)
        weights = self._bootstrap(rows)
        return MinibatchTotals(
            sequences=len(rows), responses=int((lengths > 0).sum()), tokens=max(float(lengths.sum()), 1.0),
            member_tokens=None if weights is None else (weights.to(lengths.device) * lengths[:, None]).sum(0),
        )  # fmt: skip

    def _bootstrap(self, rows: Tensor) -> Tensor | None:
        """``[len(rows), E]`` per-member weights of a bootstrapped ensemble critic on the step's global ``rows``;
        None for every other critic (every member on every sequence)."""
        return None if self.critic is None else self.critic.member_weights(rows, self.config.seed, self.step)

    def _minibatch(
        self, batch: dict[str, Tensor], rows: Tensor, totals: MinibatchTotals, micro: int, width: int,
        actor_active: bool,
    ) -> tuple[dict[str, float], bool]:  # fmt: skip
        """One optimizer step on a minibatch of ``totals`` (over all ranks), of which this rank holds ``rows``:
        each micro-batch's loss is scaled by its share of the minibatch, so the gradients summed over micro-batches
        and ranks are those of the whole minibatch's loss."""
        c = self.config
        self.actor_opt.zero_grad(set_to_none=True)
        if self.critic_opt is not None:
            self.critic_opt.zero_grad(set_to_none=True)
        records = []
        total_loss = 0.0
        for part in rows.split(micro):
            loss, record = self._losses(batch, part, width, actor_active, totals)
            if loss.requires_grad:
                loss.backward()
            total_loss += float(loss.detach())
            records.append(record)
        record = _mean_metrics(records)
        actor_params = [p for g in self.actor_opt.param_groups for p in g["params"]]
        critic_params = [p for g in self.critic_opt.param_groups for p in g["params"]] if self.critic_opt else []
        distributed.sum_gradients(actor_params + critic_params, self.world)
        total_loss = distributed.sum_scalar(total_loss, self.world)
        norms = {"actor/grad_norm": self._clip(actor_params, c.actor.grad_clip)}
        if self.critic_opt is not None:
            norms["critic/grad_norm"] = self._clip(critic_params, c.critic.grad_clip)
        record.update(norms)
        if not math.isfinite(total_loss) or not all(math.isfinite(v) for v in norms.values()):
            if self._fault is None:  # nothing upstream was: name the losses and gradients that are not finite
                parts = {k: v for k, v in {**record, "loss": total_loss}.items() if not math.isfinite(v)}
                self._fault = ("a NaN or inf in " + ", ".join(f"{k}={v}" for k, v in parts.items()),
                               "lower actor.lr or critic.lr")  # fmt: skip
            print(f"step {self.step}: {self._fault[0]}; update skipped", file=sys.stderr)
            return record, False
        if actor_active or (self.critic is not None and c.critic.backbone == "shared"):
            self.actor_opt.step()
            if actor_active:
                self.optimizers["actor_schedule"].step()
        if self.critic_opt is not None:
            self.critic_opt.step()
        return record, True

    def _critic_steps(self, batch: dict[str, Tensor], steps: int, micro: int, width: int) -> dict[str, float]:
        """``steps`` more critic gradient steps on the whole batch (the critic's targets stay those of this step):
        a head on the policy's features (frozen or shared) trains alone from the features saved while scoring, so
        the policy never moves in them; a separate critic trunk runs its forward and backward again, ``micro``
        sequences at a time (0: all at once). Returns the loss and explained variance after them."""
        rows = torch.arange(batch["mask"].shape[0])
        totals = self._totals(batch, torch.arange(batch["global_mask"].shape[0]))
        share = float(batch["mask"].sum() / totals.tokens)  # of the global batch
        parts = rows.split(micro) if micro and self.trunk is not None else [rows]
        local_tokens = batch["mask"].sum().clamp_min(1.0)
        record: dict[str, float] = {}
        params = [p for g in self.critic_opt.param_groups for p in g["params"]]
        for _ in range(steps):
            self._draw_key += 1
            self.critic_opt.zero_grad(set_to_none=True)
            total = 0.0
            for part in parts:
                mask = batch["mask"][part]
                frac = share * float(mask.sum() / local_tokens)
                if self.trunk is None:
                    hidden = batch["critic_hidden"][part]
                else:
                    with self._precision():
                        hidden = trunk_hidden(self.trunk, batch["ids"][part], batch["attn"][part], width).float()
                member_tokens = None if totals.member_tokens is None else totals.member_tokens * frac
                loss, record = self._critic_loss(hidden, batch, part, mask, member_tokens)
                (loss * frac).backward()
                total += float(loss.detach()) * frac
            distributed.sum_gradients(params, self.world)
            total = distributed.sum_scalar(total, self.world)
            norm = self._clip(params, self.config.critic.grad_clip)
            if not (math.isfinite(total) and math.isfinite(norm)):
                break  # a non-finite step is not taken; the next training step tries again
            self.critic_opt.step()
        return distributed.mean_metrics({
            "critic/extra_steps_loss": record.get("critic/loss", record.get("critic/vf_loss", float("nan"))),
            "critic/extra_steps_explained_var": record.get("critic/explained_var", float("nan")),
        }, self.world)  # fmt: skip

    @staticmethod
    def _clip(params: list[Tensor], max_norm: float) -> float:
        if any(distributed.is_sharded(p) for p in params):
            return distributed.clip_grad_norm(params, max_norm)
        grads = [p for p in params if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"))
        return float(norm)

    def _losses(
        self, batch: dict[str, Tensor], part: Tensor, width: int, actor_active: bool, totals: MinibatchTotals
    ) -> tuple[Tensor, dict[str, float]]:
        """The micro-batch's share of the minibatch loss (actor + KL loss + critic), scaled so that the gradients
        accumulated over micro-batches equal the gradient of the whole minibatch's loss."""
        c = self.config
        ids, attn, mask = batch["ids"][part], batch["attn"][part], batch["mask"][part]
        token_frac = float(mask.sum() / totals.tokens)
        policy_grad = self._policy_needs_grad()
        loss = torch.zeros(())
        record: dict[str, float] = {}
        hidden = None
        if self._policy_out is not None:  # the forward already ran, with gradients, while scoring
            logp, hidden = (None if x is None else x[part] for x in self._policy_out)
        elif policy_grad or self._critic_on_policy:
            logp, hidden = self._policy_forward(ids, attn, width, policy_grad)
        if actor_active:  # (then the policy forward ran, with gradients)
            actor_loss, m = self._actor_loss(batch, part, logp, mask)
            if c.actor.loss == "flowrl":  # a mean over the sequences with a token in the loss
                frac = float((mask.sum(-1) > 0).sum()) / max(totals.responses, 1)
            elif c.actor.aggregation == "token-mean":
                frac = token_frac
            else:
                frac = len(part) / totals.sequences
            loss = loss + actor_loss * frac
            record.update(m)
            if c.kl.mode == "loss":
                kl = masked_mean(kl_estimate(logp, batch["ref_logp"][part], c.kl.estimator), mask)
                loss = loss + c.kl.coef * kl * token_frac
                record["actor/kl_loss"] = float(kl.detach())
        if self.critic is not None:
            if self.trunk is not None:
                with self._precision():
                    hidden = trunk_hidden(self.trunk, ids, attn, width)
            elif c.critic.backbone == "frozen":
                hidden = hidden.detach()
            # an ensemble member's mean is over its tokens in the whole minibatch, in units of this part's share
            member_tokens = None if totals.member_tokens is None else totals.member_tokens * token_frac
            critic_loss, m = self._critic_loss(hidden.float(), batch, part, mask, member_tokens)
            weight = c.critic.coef if c.critic.backbone == "shared" else 1.0
            loss = loss + weight * critic_loss * token_frac
            record.update(m)
        return loss, record

    def _actor_loss(
        self, batch: dict[str, Tensor], part: Tensor, logp: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        c = self.config
        if c.actor.loss == "flowrl":
            log_z = self.log_z(batch["prompt_features"][part]).squeeze(-1)
            return policy_losses.POLICY_LOSSES.call(
                "flowrl", log_probs=logp, old_log_probs=batch["old_logp"][part], ref_log_probs=batch["ref_logp"][part],
                log_z=log_z, rewards=batch["seq_reward"][part], mask=mask, clip=c.actor.clip_high,
                **c.actor.loss_options,
            )  # fmt: skip
        return policy_losses.POLICY_LOSSES.call(
            c.actor.loss, log_probs=logp, old_log_probs=batch["old_logp"][part], advantages=batch["adv"][part],
            mask=mask, clip_low=c.actor.clip_low, clip_high=c.actor.clip_high, aggregation=c.actor.aggregation,
            normalizer=c.rollout.max_new_tokens, **c.actor.loss_options,
        )  # fmt: skip

    def _critic_loss(
        self, hidden: Tensor, batch: dict[str, Tensor], part: Tensor, mask: Tensor, member_tokens: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """The critic's loss on this rank's rows ``part``; ``member_tokens [E]``: what a bootstrapped ensemble's
        members divide their token sums by (default: their tokens in ``part``)."""
        context = CriticContext(
            rows=part + self.world.rank * self._local_rows, seed=self.config.seed, step=self.step,
            uniform=self._keyed_uniform(part), member_tokens=member_tokens,
        )  # fmt: skip
        old = {k: batch[k][part] for k in self.critic.output_keys}
        return self.critic.training_loss(hidden, batch["targets"][part], mask, old, context)

    def _keyed_uniform(self, part: Tensor) -> Any:
        """U(0, 1) draws for the flow critic's loss on this rank's rows ``part``: each draw is made for the whole
        global batch ``[N, R, ...]`` from a stream of its own (step, minibatch, draw) and this rank's rows and
        response width are kept, so the loss is the same however the batch is split over processes."""
        n, width = self._global_shape
        rows = part + self.world.rank * self._local_rows
        key, calls = self._draw_key, itertools.count()

        def uniform(shape: tuple[int, ...]) -> Tensor:
            g = torch.Generator().manual_seed(stream_seed(self.config.seed, self.step, 2, key, next(calls)))
            return torch.rand((n, width, *shape[2:]), generator=g)[rows, : shape[1]]

        return uniform

    # -- evaluation ------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, dict[str, Any]]:
        """Held-out accuracy on each of ``eval.splits`` (greedy; with ``eval.samples = k`` also mean@k, maj@k).

        Runs on a forked random stream, so evaluating never changes what training does next."""
        c = self.config
        max_new = c.eval.max_new_tokens or c.rollout.max_new_tokens
        results: dict[str, dict[str, Any]] = {}
        was_training = self.policy.training
        self.policy.eval()
        with torch.random.fork_rng():
            for split in [s for s in c.eval.splits.split(",") if s]:
                r = evaluate(self.policy, self.tokenizer, self.task, split, c.eval.limit, max_new, batch_size=64,
                             max_prompt_tokens=self.eval_prompt_limit)  # fmt: skip
                r.pop("sample")
                if c.eval.samples > 0:
                    torch.manual_seed(c.seed)
                    examples = self.task.examples(split, c.eval.limit)
                    r.update(sampled_metrics(self.policy, self.tokenizer, self.task, examples, c.eval.samples,
                                             max_new, c.rollout.temperature, batch_size=32,
                                             max_prompt_tokens=self.eval_prompt_limit))  # fmt: skip
                results[split] = r
        self.policy.train(was_training)
        return results


def train(config: TrainConfig, command: str = "dfpo train") -> dict[str, Any]:
    """Run ``config`` to completion; returns the evaluation record (``before``, ``after``, ``history``)."""
    return Trainer(config, command).run()
