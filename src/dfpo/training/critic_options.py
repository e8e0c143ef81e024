"""The critic's options: what every kind shares (``critic.*``), and one group per kind with its own options and
checks: ``critic.scalar.*`` (PPO), ``critic.ensemble.*`` (robust PPO), ``critic.quantile.*`` (DVPO) and
``critic.flow.*`` (DFPO). A kind is built from the shared options and its own group alone
(:meth:`CriticOptions.builder_options`).

Keys of the earlier flat layout (``critic.samples``, ``critic.heads``, ...) are still read, each into every group
that has the option (:data:`LEGACY_KEYS`), so old configs, YAML files and checkpoints keep working.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dfpo.options import ConfigError, option

CRITIC_KINDS = ("none", "scalar", "ensemble", "quantile", "flow")
BACKBONES = ("separate", "shared", "frozen")
RISK_TARGETS = ("pooled", "token")
# the flow loss's choices (dfpo.critics.value_flow checks them too; tests/test_config_cli.py keeps them equal)
COUPLINGS = ("sorted", "independent")
UNCERTAINTY_WEIGHTS = ("valueflows", "inverse", "none")
ANCHORS = ("mean", "quantile", "td", "none")
CONSISTENCIES = ("endpoint", "velocity", "none")


def one_of(key: str, value: str, valid: tuple[str, ...] | list[str]) -> None:
    """Refuse ``value`` for ``key`` unless it is one of ``valid``, naming them."""
    if value not in valid:
        raise ConfigError(f"{key}={value!r}: valid values are {', '.join(valid)}")


_RETURN_SCALE = "typical return magnitude (1 for 0/1 rewards)"
_RISK_WEIGHT = "weight of the risk terms (CVaR, upper-tail gain, tail shape)"
_RISK_TARGETS = (
    "what the risk terms calibrate against: pooled (the return distribution pooled over trajectories, of which each "
    "token sees one) or token (each token's own targets, as DVPO writes it: collapses the distribution)"
)
_VALUE_CLIP = "PPO value clip (0: unclipped)"


@dataclass(frozen=True)
class ScalarOptions:
    value_clip: float = option(0.2, _VALUE_CLIP)

    def check(self) -> None:
        """Nothing beyond the ranges."""


@dataclass(frozen=True)
class EnsembleOptions:
    heads: int = option(3, "members of the ensemble")
    value_clip: float = option(0.2, _VALUE_CLIP)
    pessimism: float = option(0.0, "quantile of the members' targets (0: the minimum)")
    bootstrap: float = option(
        0.5,
        "the probability that a member trains on a sequence (a Bernoulli bootstrap mask per sequence and member, drawn "
        "from the seed, the step and the sequence's row), so that the members fit different resamples and their "
        "minimum is pessimistic where data is scarce (Bootstrapped DQN's masks, Osband et al. 2016; 0.5: the "
        "double-or-nothing bootstrap); 0 or 1: every member trains on every sequence",
    )

    def check(self) -> None:
        """Nothing beyond the ranges."""


@dataclass(frozen=True)
class QuantileOptions:
    heads: int = option(3, "heads, each with its own quantiles")
    quantiles: int = option(200, "M quantiles per head")
    kappa: float = option(0.02, "Huber threshold of the quantile loss in return_scale units (small: quantiles)")
    return_scale: float = option(1.0, _RETURN_SCALE)
    risk_weight: float = option(0.1, _RISK_WEIGHT)
    risk_targets: str = option("pooled", _RISK_TARGETS)

    def check(self) -> None:
        if self.quantiles < 2:
            raise ConfigError(f"critic.quantile.quantiles={self.quantiles}: a quantile critic needs at least 2")
        one_of("critic.quantile.risk_targets", self.risk_targets, RISK_TARGETS)


# the flow critic's options that its builder takes; the rest are ValueFlowCritic.loss's keyword options
_FLOW_BUILDER = ("samples", "sample_steps", "return_scale", "risk_weight", "risk_targets")


@dataclass(frozen=True)
class FlowOptions:
    samples: int = option(16, "K return samples per token")
    sample_steps: int = option(1, "Euler steps from noise to a return sample (1: DFPO's one step; more: an ablation)")
    return_scale: float = option(1.0, _RETURN_SCALE)
    risk_weight: float = option(0.1, _RISK_WEIGHT)
    risk_targets: str = option("pooled", _RISK_TARGETS)
    coupling: str = option(
        "sorted", "flow matching's pairing of noise and targets: sorted (1-D optimal transport) or independent"
    )
    noise_jitter: bool = option(True, "jitter the stratified noise within its strata")
    uncertainty_weight: str = option(
        "valueflows", "per-token weight from the samples' spread: valueflows, inverse (its mirror) or none"
    )
    uncertainty_c: float = option(0.3, "the uncertainty weight's scale c in sigmoid(-c / sigma) + 1/2")
    anchor: str = option(
        "quantile", "what fits the one-step samples: quantile (regression at their levels), mean, td or none"
    )
    anchor_weight: float = option(1.0, "weight of the anchor term")
    anchor_kappa: float = option(0.02, "Huber threshold of the quantile anchor")
    consistency: str = option(
        "velocity", "keeps the field straight: velocity (along the one-step line), endpoint (onto a k-step solve), none"
    )
    consistency_weight: float = option(0.1, "weight of the consistency term")
    consistency_steps: int = option(4, "Euler steps of the endpoint consistency's solve")
    risk_alpha: float = option(0.1, "lower-tail level of the CVaR term")
    risk_beta: float = option(0.1, "upper-tail level of the gain term")
    cvar_weight: float = option(1.0, "weight of the CVaR term within the risk terms")
    gain_weight: float = option(1.0, "weight of the upper-tail gain term within the risk terms")
    shape_weight: float = option(0.0, "weight of the tail-shape term within the risk terms")
    shift_weight: float = option(0.0, "weight of the mean-shift penalty")
    curvature_weight: float = option(0.0, "weight of the field's curvature penalty")
    cfm_weight: float = option(0.0, "weight of conditional flow matching onto the targets (0: off; see the critic)")

    def check(self) -> None:
        if self.samples < 2:
            raise ConfigError(f"critic.flow.samples={self.samples}: a flow critic needs K >= 2 return samples")
        for key, valid in (("coupling", COUPLINGS), ("uncertainty_weight", UNCERTAINTY_WEIGHTS), ("anchor", ANCHORS),
                           ("consistency", CONSISTENCIES), ("risk_targets", RISK_TARGETS)):  # fmt: skip
            one_of(f"critic.flow.{key}", getattr(self, key), valid)

    def loss_options(self) -> dict[str, Any]:
        """The keyword options of :meth:`ValueFlowCritic.loss` (all but the builder's own)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _FLOW_BUILDER}


@dataclass(frozen=True)
class CriticOptions:
    kind: str = option("flow", "none, scalar (PPO), ensemble (robust PPO), quantile (DVPO) or flow (DFPO)")
    backbone: str = option(
        "frozen", "separate (own copy of the LM), shared (heads on the policy's trunk) or frozen (detached features)"
    )
    lr: float = option(
        3e-3, "peak AdamW learning rate of the critic head (dfpo bench critic: 1e-3 left every critic near zero)"
    )
    trunk_lr: float = option(0.0, "learning rate of a separate critic trunk (0: the same as actor.lr)")
    warmup_steps: int = option(2, "steps at the start that train the critic only (the actor waits)")
    coef: float = option(0.5, "weight of the critic loss when it shares the policy's trunk")
    updates: int = option(
        0,
        "critic gradient steps per training step: the first with the actor's update, the others on the step's "
        "batch alone (frozen or shared backbone: the head only, from the features saved while scoring; separate: "
        "the critic trunk's forward and backward again). 0: auto, 16 (see critic_updates())",
    )
    grad_clip: float = option(1.0, "max gradient norm of the critic (0: no clipping)")
    width: int = option(
        64,
        "hidden width of the critic head, every kind alike (LayerNorm, then an MLP of this width); scalar and "
        "ensemble critics: 0 gives a bare linear head on unnormalised features",
    )
    clamp: bool = option(
        True,
        "clamp a distributional critic's samples and targets to the task's reward range (task.reward_range) when the "
        "return is that reward alone (kl.mode loss or none); user tasks declare none",
    )
    lora_rank: int = option(0, "r > 0: LoRA adapters of rank r on a separate critic trunk instead of all its weights")
    lora_alpha: float = option(0.0, "LoRA scaling alpha of the critic trunk (0: twice the rank)")
    trunk_layers: int = option(
        0,
        "n > 0: a separate critic trunk trains only its top n layers; the layers below (and the embeddings) stay "
        "the starting model's and run once per step, so every extra critic step runs n layers, not the whole model "
        "(0: every layer trains)",
    )
    scalar: ScalarOptions = option(ScalarOptions(), "critic.kind=scalar (PPO)")
    ensemble: EnsembleOptions = option(EnsembleOptions(), "critic.kind=ensemble (robust PPO)")
    quantile: QuantileOptions = option(QuantileOptions(), "critic.kind=quantile (DVPO)")
    flow: FlowOptions = option(FlowOptions(), "critic.kind=flow (DFPO): the value flow and its loss")

    @property
    def group(self) -> Any:
        """The options of this kind (None for ``kind=none``)."""
        return getattr(self, self.kind, None) if self.kind != "none" else None

    def check(self) -> None:
        """The shared options' choices and the kind's own checks."""
        one_of("critic.kind", self.kind, CRITIC_KINDS)
        one_of("critic.backbone", self.backbone, BACKBONES)
        if self.width == 0 and self.kind in ("quantile", "flow"):
            raise ConfigError(
                f"critic.width={self.width}: must be at least 1 (0, a bare linear head, only for scalar and ensemble)"
            )
        if self.group is not None:
            self.group.check()

    def builder_options(self) -> dict[str, Any]:
        """The keyword options of the kind's builder (:func:`dfpo.critics.build`): ``width`` and the kind's group
        (the flow critic's loss options as ``flow``)."""
        options = {"width": self.width, **dataclasses.asdict(self.group)}
        if self.kind == "flow":
            options = {"width": self.width, **{k: options[k] for k in _FLOW_BUILDER}}
            options["flow"] = self.flow.loss_options()
        return options


# the flat keys of the earlier layout, and the groups that now hold each (an old key sets every one)
LEGACY_KEYS: dict[str, tuple[str, ...]] = {
    "critic.samples": ("critic.flow.samples",),
    "critic.sample_steps": ("critic.flow.sample_steps",),
    "critic.return_scale": ("critic.quantile.return_scale", "critic.flow.return_scale"),
    "critic.risk_weight": ("critic.quantile.risk_weight", "critic.flow.risk_weight"),
    "critic.risk_targets": ("critic.quantile.risk_targets", "critic.flow.risk_targets"),
    "critic.heads": ("critic.ensemble.heads", "critic.quantile.heads"),
    "critic.quantiles": ("critic.quantile.quantiles",),
    "critic.kappa": ("critic.quantile.kappa",),
    "critic.value_clip": ("critic.scalar.value_clip", "critic.ensemble.value_clip"),
    "critic.pessimism": ("critic.ensemble.pessimism",),
    "critic.bootstrap": ("critic.ensemble.bootstrap",),
}


def upgrade_keys(overrides: list[str]) -> list[str]:
    """``key=value`` overrides with every key of the earlier flat layout replaced by the keys that now hold it."""
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        out += [f"{new}={value}" for new in LEGACY_KEYS[key.strip()]] if key.strip() in LEGACY_KEYS else [item]
    return out


AUTO_CRITIC_UPDATES = 16


def critic_updates(c: Any) -> int:
    """Critic gradient steps per training step: ``critic.updates``, or with 0 (auto) 16 on every backbone.
    ``dfpo bench critic`` measured what the critics need (docs/training.md): with one step per training step none
    learned (on a shared trunk neither, 0.06-0.09 against a ridge probe's 0.68); 16 full-batch steps at
    ``critic.lr = 3e-3`` brought every critic above its ridge probe on the prompt-decided task. On a shared trunk
    the 15 extra steps train the head alone on the saved features: the policy moves only with the actor's update."""
    return c.critic.updates or AUTO_CRITIC_UPDATES
