"""Critic heads on backbone hidden states: scalar and ensemble (PPO, robust PPO), quantile (DVPO), value flow
(DFPO), each in the :class:`~dfpo.critics.base.Critic` protocol and registered by kind (:func:`build`)."""

from dfpo.critics.base import CRITICS, Critic, CriticContext, build, names
from dfpo.critics.quantile import QuantileCritic
from dfpo.critics.scalar import ScalarCritic, ScalarValueHead, bootstrap_weights, pessimistic_targets
from dfpo.critics.value_flow import ValueFlowCritic, stratified_noise

__all__ = [
    "CRITICS",
    "Critic",
    "CriticContext",
    "QuantileCritic",
    "ScalarCritic",
    "ScalarValueHead",
    "ValueFlowCritic",
    "bootstrap_weights",
    "build",
    "names",
    "pessimistic_targets",
    "stratified_noise",
]
