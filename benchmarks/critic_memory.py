"""Activation memory of each critic head's training loss, per response token, measured.

Counts the bytes of every tensor autograd saves for the backward pass of the critic's loss (the memory the loss
holds until ``backward``), for the scalar (PPO), quantile (DVPO) and flow (DFPO) heads at their default options,
on a batch of ``tokens`` response positions, and prints it per token. The trunk's own activations come on top
(they do not depend on the head). Usage::

    python benchmarks/critic_memory.py [--hidden 576] [--tokens 2048] [--samples 8,16,32,64] [--width 64,128]
"""

from __future__ import annotations

import argparse

import torch

from dfpo.critics import QuantileCritic, ScalarValueHead, ValueFlowCritic


def saved_bytes(loss_fn) -> int:
    """Bytes of the distinct tensors autograd saves while ``loss_fn()`` builds its graph."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = loss_fn()
    loss.backward()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576, help="the critic trunk's hidden size (SmolLM2: 576)")
    parser.add_argument("--tokens", type=int, default=2048, help="response positions in the measured batch")
    parser.add_argument("--samples", default="8,16,32,64", help="K return samples of the flow critic")
    parser.add_argument("--width", default="64,128", help="hidden widths of the heads")
    args = parser.parse_args()
    torch.manual_seed(0)
    n, h = args.tokens, args.hidden
    hidden = torch.randn(1, n, h, requires_grad=True)
    mask = torch.ones(1, n)
    rows = []
    returns = torch.rand(1, n)
    rows.append(("scalar (PPO)", "-", "-", saved_bytes(lambda: ScalarValueHead(h).loss(hidden, returns, mask))))
    for width in [int(w) for w in args.width.split(",")]:
        quantile = QuantileCritic(h, 200, 3, width)
        targets = torch.rand(1, n, 200)
        rows.append(("quantile (DVPO)", "200 x 3 heads", str(width),
                     saved_bytes(lambda q=quantile, t=targets: q.loss(hidden, t, mask))))  # fmt: skip
        for k in [int(x) for x in args.samples.split(",")]:
            flow = ValueFlowCritic(h, width)
            targets = torch.rand(1, n, k)
            rows.append(("flow (DFPO)", str(k), str(width),
                         saved_bytes(lambda f=flow, t=targets: f.loss(hidden, t, mask))))  # fmt: skip
    print(f"critic loss activations per response token (hidden size {h}, measured on {n} tokens)\n")
    print("| head | K | width | KiB per token | GiB per 100k tokens |")
    print("|---|---|---|---|---|")
    for name, k, width, total in rows:
        per = total / n
        print(f"| {name} | {k} | {width} | {per / 1024:.1f} | {per * 1e5 / 2**30:.2f} |")


if __name__ == "__main__":
    main()
