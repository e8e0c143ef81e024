"""Cost of the critic heads relative to the transformer backbone they sit on.

For each critic head, measures the time and the peak memory of one forward plus backward pass per token, each as a
ratio to one forward plus backward pass of a 30-layer, d=576 Llama-style decoder stack (SmolLM2-135M's shape,
without embedding or LM head) on the same tokens, all in the same run:

- time: warm up once, then the median of several repetitions, interleaved across configurations so that drift in
  the machine's speed hits every row alike;
- peak memory: CPU torch keeps no allocator statistics, so each configuration runs once in a fresh subprocess that
  reports how much one forward plus backward raises its peak RSS (``ru_maxrss``).

Run from the repository root::

    .venv/bin/python benchmarks/critic_heads.py           # 8 x 512 tokens, takes several minutes on 2 cores
    .venv/bin/python benchmarks/critic_heads.py --quick   # 2 x 256 tokens, fewer repetitions (smoke test)
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfpo.critics import QuantileCritic, ScalarValueHead, ValueFlowCritic

HIDDEN = 576  # SmolLM2-135M
FULL_TOKENS, QUICK_TOKENS = (8, 512), (2, 256)  # (batch, sequence length)
FULL_REPS, QUICK_REPS = (3, 5), (2, 3)  # timed repetitions for (backbone, critics)
FLOW_SAMPLES, FLOW_STEPS = (16, 32, 64), (1, 4, 8)
TARGET = ("flow-sample-k32-s1", 0.10)  # the flow critic as used in training should cost < 10% of the backbone


# -- backbone: a Llama-style decoder stack in plain torch ------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rotary(seq_len: int, head_dim: int, theta: float = 100_000.0) -> tuple[Tensor, Tensor]:
    """``cos, sin`` of the rotary angles, ``[T, head_dim]`` each (the half-split layout of Llama)."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, intermediate, bias=False)
        self.up_proj = nn.Linear(dim, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, intermediate: int) -> None:
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(dim), Attention(dim, num_heads, num_kv_heads)
        self.mlp_norm, self.mlp = RMSNorm(dim), MLP(dim, intermediate)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Backbone(nn.Module):
    """SmolLM2-135M's decoder stack: hidden states ``[B, T, 576]`` in, final-normed hidden states out."""

    def __init__(
        self, dim: int = HIDDEN, layers: int = 30, num_heads: int = 9, num_kv_heads: int = 3, intermediate: int = 1536
    ) -> None:
        super().__init__()
        self.head_dim = dim // num_heads
        self.layers = nn.ModuleList(DecoderLayer(dim, num_heads, num_kv_heads, intermediate) for _ in range(layers))
        self.norm = RMSNorm(dim)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)  # Llama's init; keeps activations finite over 30 layers

    def forward(self, x: Tensor) -> Tensor:
        cos, sin = rotary(x.shape[1], self.head_dim)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


# -- configurations --------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """A module with its inputs; ``step`` runs one forward plus backward."""

    module: nn.Module
    hidden: Tensor
    step: Callable[[], None]

    def reset(self) -> None:
        # Fresh gradients each repetition, so every step allocates them as the first one did instead of accumulating.
        self.module.zero_grad(set_to_none=True)
        self.hidden.grad = None


def _hidden(batch: int, seq: int) -> Tensor:
    # requires_grad: the critics' gradients flow back into the backbone, as the backbone's flow into the embeddings.
    return torch.randn(batch, seq, HIDDEN, requires_grad=True)


def backbone_bench(batch: int, seq: int) -> Bench:
    model, hidden = Backbone(), _hidden(batch, seq)
    return Bench(model, hidden, lambda: model(hidden).sum().backward())


def scalar_bench(batch: int, seq: int) -> Bench:
    head, hidden = ScalarValueHead(HIDDEN), _hidden(batch, seq)
    return Bench(head, hidden, lambda: head.value(hidden).sum().backward())


def quantile_bench(batch: int, seq: int) -> Bench:
    critic, hidden = QuantileCritic(HIDDEN, num_quantiles=200, num_heads=3), _hidden(batch, seq)
    return Bench(critic, hidden, lambda: critic(hidden).sum().backward())


def flow_sample_bench(batch: int, seq: int, num_samples: int, steps: int) -> Bench:
    critic, hidden = ValueFlowCritic(HIDDEN), _hidden(batch, seq)
    return Bench(critic, hidden, lambda: critic.sample(hidden, num_samples=num_samples, steps=steps).sum().backward())


def flow_loss_bench(batch: int, seq: int, num_samples: int) -> Bench:
    critic, hidden = ValueFlowCritic(HIDDEN), _hidden(batch, seq)
    targets, mask = torch.randn(batch, seq, num_samples), torch.ones(batch, seq)

    def step() -> None:
        loss, _ = critic.loss(hidden, targets, mask)
        loss.backward()

    return Bench(critic, hidden, step)


# key (for --measure-memory) -> (table label, builder taking (batch, seq)); the backbone comes first.
CONFIGS: dict[str, tuple[str, Callable[[int, int], Bench]]] = {
    "backbone": ("backbone (30-layer d=576 Llama, SmolLM2-135M shape)", backbone_bench),
    "scalar": ("scalar value head", scalar_bench),
    "quantile": ("quantile critic (3 heads x 200 quantiles)", quantile_bench),
}
for _k in FLOW_SAMPLES:
    for _s in FLOW_STEPS:
        CONFIGS[f"flow-sample-k{_k}-s{_s}"] = (
            f"flow critic sample (K={_k}, {_s} step{'s' if _s > 1 else ''})",
            partial(flow_sample_bench, num_samples=_k, steps=_s),
        )
for _k in FLOW_SAMPLES:
    CONFIGS[f"flow-loss-k{_k}"] = (f"flow critic loss (K={_k})", partial(flow_loss_bench, num_samples=_k))


# -- measurement -----------------------------------------------------------------------------------------------------


def measure_times(tokens: tuple[int, int], reps: tuple[int, int]) -> dict[str, float]:
    """Median seconds of one forward plus backward per configuration."""
    benches = {key: build(*tokens) for key, (_, build) in CONFIGS.items()}
    wanted = {key: reps[0] if key == "backbone" else reps[1] for key in benches}
    times: dict[str, list[float]] = {key: [] for key in benches}
    for bench in benches.values():  # warm-up: lazy kernel initialisation, first-touch of memory
        bench.reset()
        bench.step()
    for rep in range(max(wanted.values())):
        for key, bench in benches.items():
            if rep < wanted[key]:
                bench.reset()
                start = time.perf_counter()
                bench.step()
                times[key].append(time.perf_counter() - start)
        print(f"  timing: repetition {rep + 1}/{max(wanted.values())} done", file=sys.stderr, flush=True)
    return {key: statistics.median(values) for key, values in times.items()}


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def measure_memory_child(key: str, tokens: tuple[int, int]) -> None:
    """In a fresh process: print the growth of peak RSS (KiB) over one forward plus backward."""
    bench = CONFIGS[key][1](*tokens)
    before = peak_rss_kib()
    bench.step()
    print(peak_rss_kib() - before)


def measure_memory(key: str, quick: bool) -> float:
    """Extra peak memory (KiB) of one forward plus backward of ``key``, measured in a fresh subprocess."""
    cmd = [sys.executable, os.path.abspath(__file__), "--measure-memory", key, *(["--quick"] if quick else [])]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(result.stdout.split()[-1])


# -- report ----------------------------------------------------------------------------------------------------------


def sig(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant figures, without scientific notation."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 x 256 tokens and fewer repetitions (smoke test)")
    parser.add_argument("--measure-memory", metavar="CONFIG", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = QUICK_TOKENS if args.quick else FULL_TOKENS
    if args.measure_memory:
        measure_memory_child(args.measure_memory, tokens)
        return

    start = time.perf_counter()
    reps = QUICK_REPS if args.quick else FULL_REPS
    num_tokens = tokens[0] * tokens[1]
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"tokens: {tokens[0]} x {tokens[1]} = {num_tokens}; time: median of {reps[0]} (backbone) / {reps[1]} (critics)"
        " repetitions after one warm-up, interleaved"
    )
    print(
        "peak memory: growth of peak RSS (ru_maxrss) over one fwd+bwd in a fresh process per row "
        "(CPU torch has no allocator statistics); includes the gradients of the parameters and of the input"
    )
    # Memory first: a child inherits its parent's peak RSS as its starting ru_maxrss (Linux keeps the high-water
    # mark across fork and exec), so the parent must still be smaller than any child when they are spawned.
    memory = {}
    for key in CONFIGS:
        memory[key] = measure_memory(key, args.quick)
        print(f"  memory: {key} done", file=sys.stderr, flush=True)
    times = measure_times(tokens, reps)

    rows = [
        "| head | time per token (us) | time / backbone | peak memory (MiB) | peak memory per token (KiB) "
        "| memory / backbone |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, (label, _) in CONFIGS.items():
        rows.append(
            f"| {label} | {sig(times[key] / num_tokens * 1e6)} | {sig(times[key] / times['backbone'])} "
            f"| {sig(memory[key] / 1024)} | {sig(memory[key] / num_tokens)} "
            f"| {sig(memory[key] / memory['backbone'])} |"
        )
    print()
    print("\n".join(rows))
    print()
    key, target = TARGET
    ratio = times[key] / times["backbone"]
    verdict = "met" if ratio < target else "NOT met"
    print(f"flow critic K=32, 1 step: {ratio:.1%} of the backbone's fwd+bwd time (target < {target:.0%}): {verdict}")
    print(f"total wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
