"""DVPO's quantile-Huber loss: the sorted prefix-sum form against the direct sum over all pairs, side by side.

Both compute the same loss and gradient (``tests/test_core_misc.py`` checks it); this measures their time for one
forward plus backward at DVPO's size, 3 heads x 200 quantiles against 200 target samples per token, interleaved
over repetitions after a warm-up call, and prints the ratio and the largest difference between them.

    .venv/bin/python benchmarks/quantile_huber.py                  # 4,096 tokens (a tiny-model step of 64 x 64)
    .venv/bin/python benchmarks/quantile_huber.py --tokens 512 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dfpo.core.value_losses import quantile_huber, quantile_huber_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--quantiles", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    quantiles = torch.randn(args.tokens, args.heads, args.quantiles, generator=gen).requires_grad_()
    targets = torch.randn(args.tokens, 1, args.quantiles, generator=gen)
    mask = torch.ones(args.tokens, 1)
    times: dict[str, list[float]] = {"pairs": [], "sorted": []}
    results = {}
    for loss_fn in (quantile_huber_pairs, quantile_huber):  # warm-up: first calls pay one-off costs
        loss_fn(quantiles[:8], targets[:8], mask[:8])[0].backward()
    for _ in range(args.repeats):
        for name, loss_fn in (("pairs", quantile_huber_pairs), ("sorted", quantile_huber)):
            quantiles.grad = None
            start = time.perf_counter()
            loss, _ = loss_fn(quantiles, targets, mask)
            loss.backward()
            times[name].append(time.perf_counter() - start)
            results[name] = (float(loss.detach()), quantiles.grad.clone())
    pairs, fast = statistics.median(times["pairs"]), statistics.median(times["sorted"])
    print(f"{args.tokens} tokens x {args.heads} heads x {args.quantiles} quantiles x {args.quantiles} targets, "
          f"forward + backward, median of {args.repeats} ({torch.get_num_threads()} threads)")  # fmt: skip
    print(f"all pairs: {pairs:.3f} s   sorted prefix sums: {fast:.3f} s   ratio {pairs / fast:.1f}x")
    loss_gap = abs(results["pairs"][0] - results["sorted"][0])
    grad_gap = float((results["pairs"][1] - results["sorted"][1]).abs().max())
    print(f"largest difference: loss {loss_gap:.2e}, gradient {grad_gap:.2e}")


if __name__ == "__main__":
    main()
