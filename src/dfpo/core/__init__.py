"""Pure-torch algorithm core: advantage estimators, policy and value losses, KL, risk terms, masked ops.

Imports only torch and the standard library, so it can be lifted into any trainer.
"""

from dfpo.core import advantages, kl, masked, policy_losses, risk, value_losses

__all__ = ["advantages", "kl", "masked", "policy_losses", "risk", "value_losses"]
