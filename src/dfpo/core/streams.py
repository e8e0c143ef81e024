"""Seeds of independent random streams, keyed by what they are for."""

from __future__ import annotations


def stream_seed(seed: int, step: int, *key: int) -> int:
    """The seed of a random stream of its own for one use in one step (a generate call, a minibatch order, a
    loss's draws, a sequence's bootstrap mask), so that what a step draws does not depend on how its batch is split
    over processes or calls. The trainer's keys: 0 sampling, 1 minibatch orders, 2 the flow critic's draws, 3
    bootstrap masks."""
    value = seed * 1_000_003 + step
    for k in key:
        value = value * 1_000_033 + k + 1
    return value % 2**63
