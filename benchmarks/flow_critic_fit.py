"""How well the value-flow critic fits known return distributions, and what each design choice does.

Prints the figures quoted in docs/algorithms.md:

1. the test scenario of tests/test_value_flow.py (K i.i.d. target draws per token) with the default loss:
   one-step W1 / std at the K trained levels and at 1,024 levels, one-step against 8-step;
2. flow matching alone with sorted and with independent noise-target coupling (the one-step collapse);
3. the full loss with independent coupling;
4. the tail-shape risk term on and off (its bias under noisy per-token targets);
5. the across-token scenario: every token's K targets are one return draw repeated, as at the last response
   token in RL, so the distribution lives across tokens; default anchor against the quantile anchor.
The quantile anchor without risk terms is also run on the test scenario (1b).

Run: ``.venv/bin/python benchmarks/flow_critic_fit.py`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_value_flow import NAMES, TOKENS_PER_CONTEXT, K, draw, train, truth

from dfpo.critics import ValueFlowCritic


def w1_over_std(samples: torch.Tensor, truth_sample: torch.Tensor) -> float:
    """Mean |sample_k - Q(u_k)| over the stratified levels u_k = (k + 1/2) / len(samples), over the true std."""
    levels = (torch.arange(len(samples)) + 0.5) / len(samples)
    return float((samples - torch.quantile(truth_sample, levels)).abs().mean() / truth_sample.std())


def report(title: str, critic: ValueFlowCritic, contexts: torch.Tensor, fine: bool = False) -> None:
    print(f"\n{title}")
    header = "| distribution | W1/std 1 step | W1/std 8 steps | 1 vs 8 steps / std | std ratio |"
    if fine:
        header += " W1/std 1 step, 1,024 levels |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for which, name in enumerate(NAMES):
        _, sample = truth(which)
        with torch.no_grad():
            one = critic.sample(contexts[which : which + 1], num_samples=K)[0]
            eight = critic.sample(contexts[which : which + 1], num_samples=K, steps=8)[0]
        row = (
            f"| {name} | {w1_over_std(one, sample):.3f} | {w1_over_std(eight, sample):.3f} | "
            f"{float((one - eight).abs().mean() / sample.std()):.3f} | {float(one.std() / sample.std()):.2f} |"
        )
        if fine:
            with torch.no_grad():
                dense = critic.sample(contexts[which : which + 1], num_samples=1024)[0]
            row += f" {w1_over_std(dense, sample):.3f} |"
        print(row)


def across_tokens(steps: int = 800, tokens: int = 32, **options) -> tuple[ValueFlowCritic, torch.Tensor]:
    """Train where each token's K targets are one draw repeated: the distribution is across tokens."""
    torch.manual_seed(0)
    contexts = torch.randn(3, 8)
    critic = ValueFlowCritic(hidden_size=8, width=64)
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    hidden = contexts.repeat_interleave(tokens, 0)
    for _ in range(steps):
        targets = torch.cat([draw(c, tokens)[:, None].expand(tokens, K) for c in range(3)])
        loss, _ = critic.loss(hidden, targets, torch.ones(len(hidden)), **options)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return critic, contexts


def main() -> None:
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; K = {K}, {TOKENS_PER_CONTEXT} tokens/context")
    flow_matching_only = {"anchor": "none", "consistency": "none", "risk_weight": 0.0}
    quantile_anchor = {"anchor": "quantile", "anchor_weight": 5.0, "risk_weight": 0.0}
    report("1a. default loss, 1,500 steps (the test)", *train(1500), fine=True)
    report("1b. anchor='quantile', anchor_weight=5, risk_weight=0, 1,500 steps", *train(1500, **quantile_anchor))
    report("2a. flow matching alone, sorted coupling, 500 steps", *train(500, **flow_matching_only))
    report("2b. flow matching alone, independent coupling", *train(500, coupling="independent", **flow_matching_only))
    report("3. default loss with independent coupling, 1,500 steps", *train(1500, coupling="independent"))
    report("4. default loss with the tail-shape term (shape_weight=1), 1,500 steps", *train(1500, shape_weight=1.0))
    report("5a. across tokens, default loss, 800 steps", *across_tokens())
    report("5b. across tokens, anchor='quantile', 800 steps", *across_tokens(anchor="quantile"))
    report("5c. across tokens, anchor='quantile', anchor_weight=5, risk_weight=0", *across_tokens(**quantile_anchor))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
