"""dfpo: robust RL post-training of language models with a distributional value-flow critic.

``from dfpo import train, TrainConfig, Callback`` (see :mod:`dfpo.api`); imported on first use, so that
``import dfpo`` stays light.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Callback", "TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dfpo import api

        return getattr(api, name)
    raise AttributeError(f"module 'dfpo' has no attribute {name!r}")
