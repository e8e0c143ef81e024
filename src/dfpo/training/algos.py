"""Algorithm presets: each algorithm is a set of settings over the same trainer and core pieces.

A preset is a list of ``key=value`` overrides applied after the defaults and before the user's config file and
command line, so anything here can still be changed (``algo=ppo critic.lr=1e-4``). The defaults of
:class:`dfpo.training.config.TrainConfig` are DFPO's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Algo:
    about: str
    overrides: tuple[str, ...]


_CRITIC_FREE = ("critic.kind=none", "critic.warmup_steps=0", "actor.whiten=false")
_GROUP_KL = ("kl.mode=loss", "kl.estimator=k3")

ALGOS: dict[str, Algo] = {
    "dfpo": Algo(
        "PPO with a distributional value-flow critic: distributional GAE, flow matching, risk control",
        ("critic.kind=flow", "advantage.estimator=distributional_gae"),
    ),
    "ppo": Algo(
        "PPO with a scalar value head, clipped value loss and GAE",
        ("critic.kind=scalar", "advantage.estimator=gae"),
    ),
    "robust_ppo": Algo(
        "robust-Bellman PPO: bootstrapped ensemble value heads regressed onto the worst case of their GAE targets",
        ("critic.kind=ensemble", "critic.ensemble.heads=4", "advantage.estimator=gae"),
    ),
    "dvpo": Algo(
        "DVPO: a quantile critic (3 heads x 200 quantiles), quantile-Huber loss, distributional GAE, risk terms",
        (
            "critic.kind=quantile",
            "critic.quantile.heads=3",
            "critic.quantile.quantiles=200",
            "advantage.estimator=distributional_gae",
        ),
    ),
    "grpo": Algo(
        "GRPO: group-normalised outcome advantages, no critic, k3 KL as a loss",
        (*_CRITIC_FREE, *_GROUP_KL, "advantage.estimator=grpo", "actor.aggregation=seq-mean-token-mean"),
    ),
    "dr_grpo": Algo(
        "Dr. GRPO: group-centred advantages without std division or length normalisation",
        (*_CRITIC_FREE, *_GROUP_KL, "advantage.estimator=dr_grpo", "actor.aggregation=seq-mean-token-sum-norm"),
    ),
    "reinforce_pp": Algo(
        "REINFORCE++: returns-to-go with the KL in the reward, whitened over the batch, no critic",
        (*_CRITIC_FREE, "kl.mode=reward", "kl.estimator=k1", "advantage.estimator=reinforce_pp"),
    ),
    "rloo": Algo(
        "RLOO: leave-one-out group baseline, no critic, k3 KL as a loss",
        (*_CRITIC_FREE, *_GROUP_KL, "advantage.estimator=rloo"),
    ),
    "flowrl": Algo(
        "FlowRL: trajectory balance against exp(beta r) pi_ref with a learned log-partition of each prompt",
        (*_CRITIC_FREE, "kl.mode=none", "advantage.estimator=grpo", "actor.loss=flowrl"),
    ),
}


def algo_overrides(name: str) -> list[str]:
    """The preset's overrides; an unknown name yields none (validation then names the valid algorithms)."""
    return list(ALGOS[name].overrides) if name in ALGOS else []
