"""dfpo: robust RL post-training of language models with a distributional value-flow critic."""

__version__ = "0.1.0"
