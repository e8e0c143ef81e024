"""Critic heads on backbone hidden states: scalar (PPO), quantile (DVPO), value flow (DFPO)."""

from dfpo.critics.quantile import QuantileCritic
from dfpo.critics.scalar import ScalarValueHead, bootstrap_weights, pessimistic_targets
from dfpo.critics.value_flow import ValueFlowCritic, stratified_noise

__all__ = [
    "QuantileCritic",
    "ScalarValueHead",
    "ValueFlowCritic",
    "bootstrap_weights",
    "pessimistic_targets",
    "stratified_noise",
]
