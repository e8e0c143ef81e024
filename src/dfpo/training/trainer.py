"""The trainer shared by DFPO and every baseline: it builds a run from a :class:`TrainConfig` and runs its steps.

:meth:`Trainer.run` evaluates, then runs :func:`dfpo.training.phases.train_step` until ``config.steps`` (sample ->
reward -> score -> advantages -> update -> metrics, each phase a function over typed values), evaluating now and
then and writing checkpoints; a signal stops it after the step in progress, with a checkpoint.

With one epoch of one minibatch without micro-batches (the default), the policy is unchanged between scoring and
the update, so its forward pass runs once, with gradients (``fused``). With ``precision=bf16`` the rollouts come
from a bf16 copy of the policy, refreshed after every update, and the model forwards run under bf16 autocast; the
weights, their gradients and the optimizer states stay fp32.

The critic backbone is ``separate`` (its own copy of the LM, initialised from the starting policy: the most
capacity and twice the compute and memory), ``shared`` (heads on the policy's trunk, the critic's loss flows into
it: cheapest, but value and policy gradients interfere) or ``frozen`` (heads on the policy's detached features:
cheap and no interference, but the features are not trained for values).
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging as transformers_logging

from dfpo import cpu, distributed
from dfpo.evaluate import evaluate, sampled_metrics
from dfpo.models import load_model
from dfpo.options import ConfigError, check_writable
from dfpo.training import checkpoint as ckpt
from dfpo.training import phases, setup
from dfpo.training.config import TrainConfig, config_record
from dfpo.training.control import DataOrder, Interrupted, NoLog, Signals, TrainingDiverged, write_json
from dfpo.training.critic_options import critic_updates
from dfpo.training.objectives import objective_class
from dfpo.training.report import MetricsLog, write_report
from dfpo.training.step import StepData
from dfpo.training.update import micro_rows

__all__ = ["DataOrder", "Interrupted", "StepData", "Trainer", "TrainingDiverged", "micro_rows", "train"]


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
        check_writable(self.run_dir, "run_dir", folder=True)  # before minutes of loading
        self.resume_from = setup.find_resume(c, self.run_dir)
        if self.resume_from is None and not c.resume and ckpt.holds_a_run(self.run_dir):
            raise ConfigError(
                f"run_dir {self.run_dir} already holds a run (its checkpoints or metrics.jsonl): continue it with "
                "resume=auto, or start over in another run_dir (or delete this one)"
            )
        state = ckpt.load_state(self.resume_from) if self.resume_from else None
        if state is not None:
            setup.check_resume_config(c, state, self.run_dir)
            if self.world.main:
                print(f"resume: {self.run_dir} continues from step {state['step']} ({self.resume_from})",
                      file=sys.stderr)  # fmt: skip
        # the count the run started with, on a resume: a result's last bits depend on it
        self.threads = cpu.set_threads(c.threads, state and state.get("threads"), self.world.main)
        setup.seed_everything(c.seed)
        self.task, self.train, self.noise = setup.load_task(c)
        self._load_models()
        self._place_models(state)
        self.data = DataOrder(len(self.train), c.seed)
        self.step = 0
        self.bad_steps = 0
        self._fault: tuple[str, str] | None = None  # why the last skipped update was skipped, and what to do
        if state is not None:
            self._restore(state)
        truncate = self.step if state else 0
        self.log = MetricsLog(self.run_dir, c.log, truncate_after=truncate) if self.world.main else NoLog()
        self._last_samples: list[dict[str, Any]] = []
        self._rollout_engines()
        batch = c.rollout.prompts * c.rollout.samples
        self.fused = c.actor.epochs == 1 and c.actor.minibatches == 1 and c.actor.micro_batch in (0, batch)

    # -- construction ----------------------------------------------------------------------------------------

    def _load_models(self) -> None:
        """Policy, reference, critic (and its separate trunk) and the objective's modules, on the CPU; the prompt
        limits checked against the model's context."""
        c = self.config
        self.policy, self.tokenizer = setup.load_policy(c, self.resume_from)
        self.hidden_size = self.policy.config.hidden_size
        self.prompt_limit = setup.prompt_limit(c, self.policy, c.rollout.max_new_tokens)
        self.eval_prompt_limit = setup.prompt_limit(c, self.policy, c.eval.max_new_tokens or c.rollout.max_new_tokens)
        if c.rollout.long_prompts == "refuse":
            sets = [("training", self.train, self.prompt_limit)]
            sets += [(f"eval split {s!r}", self.task.examples(s, c.eval.limit), self.eval_prompt_limit)
                     for s in c.eval.splits.split(",") if s]  # fmt: skip
            setup.refuse_long_prompts(sets, self.task, self.tokenizer)
        objective = objective_class(c.actor.loss)
        needs_ref = c.kl.mode != "none" or objective.needs_reference or self.noise.needs_reference
        self.ref = setup.frozen(load_model(c.model)[0]) if needs_ref else None
        self.modules: dict[str, nn.Module] = {}
        self.critic = setup.build_critic(c, self.hidden_size, getattr(self.task, "reward_range", None))
        self.critic_updates = critic_updates(c)
        if self.critic is not None:
            self.modules["critic"] = self.critic
        self.trunk = None
        if self.critic is not None and c.critic.backbone == "separate":
            self.trunk = setup.build_critic_trunk(c)  # the critic starts from the starting policy's trunk
            self.modules["critic_trunk"] = self.trunk
        self.objective = objective(c, self.hidden_size)
        self.modules.update(self.objective.modules)

    def _place_models(self, state: dict[str, Any] | None) -> None:
        """A checkpoint's module weights, the models on the device, the same weights on every process, FSDP2
        sharding, and the optimizers."""
        c = self.config
        if state is not None:  # whole weights, before the models are moved and sharded
            ckpt.load_modules(self.resume_from, self.modules)
        self.device = setup.device(c.device, self.world)
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
        self.optimizers = setup.build_optimizers(c, self.policy, self.critic, self.trunk, self.objective.param_groups())
        self.actor_opt, self.critic_opt = self.optimizers["actor"], self.optimizers.get("critic")

    def _restore(self, state: dict[str, Any]) -> None:
        """Optimizer states, step, data order and the noise model's state from the checkpoint being resumed."""
        ckpt.load_optimizers(self.resume_from, self.optimizers)
        if self.sharded:
            for optimizer in (self.actor_opt, self.critic_opt):
                if optimizer is not None:
                    distributed.shard_optimizer_state(optimizer)
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        self.data.epoch, self.data.position = state["data"]["epoch"], state["data"]["position"]
        self.noise.load_state(state.get("pseudo_labels", {}))

    def _rollout_engines(self) -> None:
        """What samples the rollouts besides the policy itself: a bf16 copy (refreshed after every update; a
        sharded policy samples in bf16 itself, FSDP2's mixed precision), or vLLM."""
        c = self.config
        bf16_copy = self.bf16 and not self.sharded and c.rollout.engine == "hf"
        self.rollout_policy = setup.frozen(copy.deepcopy(self.policy).to(torch.bfloat16)) if bf16_copy else None
        self.engine = None
        if c.rollout.engine == "vllm":  # vLLM samples from the starting weights, then from each update's
            from dfpo.generation.vllm_engine import VLLMEngine
            from dfpo.models import resolve_model

            self.engine = VLLMEngine(str(resolve_model(c.model)), self.tokenizer, c.rollout.vllm_memory,
                                     self.world.active, c.seed)  # fmt: skip
            if self.resume_from is not None:
                self._sync_engine()

    # -- what the phases ask -----------------------------------------------------------------------------------

    @property
    def bf16(self) -> bool:
        return self.config.precision == "bf16"

    def precision(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around model forwards with ``precision=bf16``; nothing otherwise."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(next(self.policy.parameters()).device.type, dtype=torch.bfloat16)

    @property
    def actor_active(self) -> bool:
        """Whether this step updates the policy (not during the critic's warm-up steps)."""
        return self.critic is None or self.step > self.config.critic.warmup_steps

    @property
    def critic_on_policy(self) -> bool:
        """Whether the critic reads the policy's hidden states (a shared or frozen backbone)."""
        return self.critic is not None and self.config.critic.backbone != "separate"

    def policy_needs_grad(self) -> bool:
        """Whether this step's policy forward needs gradients: the actor learns, or a critic shares its trunk."""
        return self.actor_active or (self.critic is not None and self.config.critic.backbone == "shared")

    @torch.no_grad()
    def _sync_engine(self) -> None:
        weights = distributed.full_state_dict(self.policy) if self.sharded else self.policy.state_dict()
        self.engine.sync(weights.items())

    @torch.no_grad()
    def refresh_rollout_policy(self) -> None:
        """After an update: the vLLM engine's and the bf16 copy's weights from the policy's."""
        if self.engine is not None:
            self._sync_engine()
        if self.rollout_policy is not None:
            for low, full in zip(self.rollout_policy.parameters(), self.policy.parameters(), strict=True):
                low.copy_(full)

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
            write_json(self.run_dir / "train_config.json", record)
        if self.resume_from is None and evaluating:
            evals = {"before": self.evaluate()}
            self._callback("on_evaluate", 0, evals["before"])
        # a resumed run forgets evaluations made after its checkpoint, as metrics.jsonl does
        evals["history"] = [h for h in evals.get("history", []) if h["step"] <= self.step]
        if main:
            write_json(eval_path, evals)
        start = time.perf_counter()
        bar = tqdm(total=c.steps, initial=self.step, disable=not (c.log.progress and main), file=sys.stderr,
                   desc=c.algo, dynamic_ncols=True)  # fmt: skip
        with Signals(self.signals) as signals:
            self._loop(bar, evals, eval_path, evaluating, signals)
        bar.close()
        self.log.close()
        if self.bad_steps and main:  # no checkpoint follows a skipped step: say so rather than end as if all went well
            what = self._fault[0] if self._fault else "a NaN or inf loss or gradient"
            print(f"train: the last {self.bad_steps} step(s) were skipped, the last for {what}; the last checkpoint "
                  f"is {ckpt.latest_checkpoint(self.run_dir)}", file=sys.stderr)  # fmt: skip
        if main and c.checkpoint.final:
            self._write_final()
        if not evaluating:
            return evals
        last = evals["history"][-1] if evals["history"] else {"step": self.step, **self.evaluate()}
        if not main:
            return evals
        evals["after"] = {k: v for k, v in last.items() if k != "step"}
        evals["seconds"] = evals.get("seconds", 0.0) + time.perf_counter() - start
        write_json(eval_path, evals)
        write_report(self.run_dir, c, evals)
        return evals

    def _loop(self, bar: Any, evals: dict[str, Any], eval_path: Path, evaluating: bool, signals: Signals) -> None:
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
                    write_json(eval_path, evals)
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
            "pseudo_labels": self.noise.state(),  # the noise model's state (its name from the first that had one)
        }
        return ckpt.save_checkpoint(
            self.run_dir, self.step, self.policy, self.tokenizer, self.modules, self.optimizers, state,
            self.config.checkpoint.keep, whole,
        )  # fmt: skip

    def train_step(self) -> dict[str, float]:
        """One training step at ``self.step`` (:func:`dfpo.training.phases.train_step`); returns its metrics."""
        metrics, updated, self._last_samples = phases.train_step(self)
        self._fault = updated.fault
        self.bad_steps = self.bad_steps + 1 if updated.skipped else 0
        if self.config.log.samples_every and self.step % self.config.log.samples_every == 0:
            self.log.samples(self._last_samples)
        return metrics

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
