"""The actor's objective: how a policy loss gets its inputs, its extra modules and its share of a minibatch.

Most policy losses (``ppo_clip`` and every other in :data:`dfpo.core.policy_losses.POLICY_LOSSES`) learn from
token advantages against the rollout policy's log-probs: :class:`PolicyGradient`. FlowRL (``actor.loss=flowrl``)
instead matches the policy to a reward-weighted reference distribution: it needs the reference model, a learned
log-partition ``log Z(prompt)`` on the prompt's features, each sequence's reward, and it averages over sequences.
Each such family is one :class:`Objective`, registered by loss name in :data:`OBJECTIVES`; the training step asks
the objective and never branches on the loss. A new family registers its class here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from dfpo.core import policy_losses
from dfpo.generation.rollout import prompt_features

if TYPE_CHECKING:
    from dfpo.training.config import TrainConfig
    from dfpo.training.step import Experience, MinibatchTotals

OBJECTIVES: dict[str, type[Objective]] = {}


def register(*losses: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: the objective of the policy losses ``losses``."""

    def decorate(cls: type[Objective]) -> type[Objective]:
        for loss in losses:
            OBJECTIVES[loss] = cls
        return cls

    return decorate


class Objective:
    """The default: a token-level policy-gradient loss on the step's advantages.

    ``config``: the run's :class:`TrainConfig`; ``hidden_size``: the policy's feature size ``H``."""

    needs_reference = False  # the loss reads the reference model's log-probs
    compares_group = False  # the loss compares the responses to one prompt (rollout.samples >= 2)

    def __init__(self, config: TrainConfig, hidden_size: int) -> None:
        self.config = config
        self.modules: dict[str, nn.Module] = {}  # trained with the actor, saved in checkpoints

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups of :attr:`modules`, trained by the actor's optimizer."""
        return []

    def score_inputs(self, policy: nn.Module, ids: Tensor, attn: Tensor, prompt_length: int) -> dict[str, Tensor]:
        """Per-sequence inputs computed while scoring the rollout (no grad), from rows ``ids [n, L]``."""
        return {}

    def step_inputs(self, advantages: Tensor, global_mask: Tensor, rows: slice) -> dict[str, Tensor]:
        """Per-sequence inputs from the step's whitened ``advantages [G, R]`` over the global batch, for this
        process's ``rows``."""
        return {}

    def share(self, mask: Tensor, totals: MinibatchTotals) -> float:
        """The micro-batch's share of its minibatch's loss, so that shares summed over micro-batches and processes
        give the minibatch's mean: tokens under ``token-mean``, sequences otherwise."""
        if self.config.actor.aggregation == "token-mean":
            return float(mask.sum() / totals.tokens)
        return len(mask) / totals.sequences

    def loss(self, exp: Experience, part: Tensor, log_probs: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The registered policy loss on this process's rows ``part`` of ``exp``, ``log_probs [n, R]`` with grad."""
        a = self.config.actor
        return policy_losses.POLICY_LOSSES.call(
            a.loss, log_probs=log_probs, old_log_probs=exp.old_logp[part], advantages=exp.advantages[part],
            mask=mask, clip_low=a.clip_low, clip_high=a.clip_high, aggregation=a.aggregation,
            normalizer=self.config.rollout.max_new_tokens, **a.loss_options,
        )  # fmt: skip


@register("flowrl")
class FlowRL(Objective):
    """FlowRL's trajectory balance: ``log Z`` is a small MLP on the prompt's last hidden state, trained by the
    actor's optimizer at ``critic.lr``; each sequence's reward is its mean whitened advantage."""

    needs_reference = True
    compares_group = True

    def __init__(self, config: TrainConfig, hidden_size: int) -> None:
        super().__init__(config, hidden_size)
        w = config.critic.width
        self.log_z = nn.Sequential(nn.Linear(hidden_size, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU(), nn.Linear(w, 1))
        self.modules = {"log_z": self.log_z}

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.log_z.parameters()), "lr": self.config.critic.lr, "weight_decay": 0.0}]

    def score_inputs(self, policy: nn.Module, ids: Tensor, attn: Tensor, prompt_length: int) -> dict[str, Tensor]:
        return {"prompt_features": prompt_features(policy, ids, attn, prompt_length).float()}

    def step_inputs(self, advantages: Tensor, global_mask: Tensor, rows: slice) -> dict[str, Tensor]:
        reward = (advantages * global_mask).sum(-1) / global_mask.sum(-1).clamp_min(1.0)
        return {"seq_reward": reward[rows]}

    def share(self, mask: Tensor, totals: MinibatchTotals) -> float:
        return float((mask.sum(-1) > 0).sum()) / max(totals.responses, 1)  # a mean over sequences with a token

    def loss(self, exp: Experience, part: Tensor, log_probs: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        log_z = self.log_z(exp.inputs["prompt_features"][part]).squeeze(-1)
        return policy_losses.POLICY_LOSSES.call(
            "flowrl", log_probs=log_probs, old_log_probs=exp.old_logp[part], ref_log_probs=exp.ref_logp[part],
            log_z=log_z, rewards=exp.inputs["seq_reward"][part], mask=mask, clip=self.config.actor.clip_high,
            **self.config.actor.loss_options,
        )  # fmt: skip


def objective_class(loss: str) -> type[Objective]:
    """The objective of policy loss ``loss`` (the default :class:`Objective` for every plain policy loss)."""
    return OBJECTIVES.get(loss, Objective)


__all__ = ["OBJECTIVES", "FlowRL", "Objective", "objective_class", "register"]
