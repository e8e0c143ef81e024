"""``dfpo bench throughput``: where a training step's time goes, per algorithm, against this machine's own peak.

For each algorithm the trainer runs ``steps + 1`` steps on a calibrated task preset (the first is discarded: it
pays one-off allocation and warm-up costs) and reports the median wall time of each phase (generation, scoring =
rollout-policy and reference log-probs and the critic, update) and its tokens per second. Model FLOP utilisation
(MFU) divides the model's matrix FLOPs by the time and by a matrix-product peak measured on the same machine in
the same run: ``2 x non-embedding parameters`` per token for a forward pass, three times that for forward and
backward; attention's sequence-length term is left out, as are the critic heads, so MFU is a lower bound.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dfpo.config import ConfigError, option


@dataclass(frozen=True)
class ThroughputConfig:
    """``dfpo bench throughput [key=value ...]``: per-phase step time and MFU of each algorithm."""

    model: str = option("tiny", "'tiny' or 'smollm2' (each uses its calibrated arithmetic preset)")
    algos: str = option("grpo,ppo,dfpo", "comma-separated algorithms (dfpo list shows them)")
    steps: int = option(3, "measured steps per algorithm (one more is run first and discarded)")
    prompts: int = option(8, "prompts per step")
    samples: int = option(4, "responses per prompt")
    max_new_tokens: int = option(64, "response length limit")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    out: str = option("", "also write the results as JSON to this file")


def matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 10) -> float:
    """Measured FLOP/s of a square matrix product on this machine: the best of ``repeats`` timed products."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _non_embedding_parameters(model: Any) -> int:
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def measure_algo(config: ThroughputConfig, algo: str, peak: float) -> dict[str, Any]:
    """Median per-phase seconds, tokens per second and MFU of ``algo`` (see the module docstring)."""
    from dfpo.tasks.presets import preset
    from dfpo.training.config import build_config
    from dfpo.training.trainer import Trainer

    chosen = preset(f"{config.model}-arithmetic")
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [
            f"algo={algo}", f"model={chosen.model}", f"task={chosen.task}", f"run_dir={run_dir}",
            f"rollout.prompts={config.prompts}", f"rollout.samples={config.samples}",
            f"rollout.max_new_tokens={config.max_new_tokens}", f"threads={config.threads}", "critic.warmup_steps=0",
            "log.progress=false", *(f"task_options.{k}={v}" for k, v in chosen.task_options.items()),
        ]  # fmt: skip
        trainer = Trainer(build_config(overrides))
        params = _non_embedding_parameters(trainer.policy)
        records = []
        for _ in range(config.steps + 1):
            trainer.step += 1
            records.append(trainer.train_step())
        trainer.log.close()
    records = records[1:]
    scored_models = 1 + (trainer.ref is not None) + (trainer.trunk is not None)
    trained_models = 1 + (trainer.trunk is not None)
    out: dict[str, Any] = {"algo": algo, "non_embedding_parameters": params}
    flops = {}
    for phase in ("generate", "score", "update"):
        seconds = statistics.median(r[f"perf/{phase}_s"] for r in records)
        # tokens the phase processed (for the update: counted once per PPO epoch, as the trainer logs them)
        tokens = statistics.median(r[f"perf/{phase}_tokens_per_s"] * r[f"perf/{phase}_s"] for r in records)
        per_token = {"generate": 2, "score": 2 * scored_models, "update": 6 * trained_models}[phase]
        flops[phase] = per_token * params * tokens
        out[f"{phase}_s"] = seconds
        out[f"{phase}_tokens_per_s"] = tokens / seconds
        out[f"{phase}_mfu"] = flops[phase] / seconds / peak
    out["step_s"] = statistics.median(r["perf/step_s"] for r in records)
    out["mfu"] = sum(flops.values()) / out["step_s"] / peak
    return out


def run_throughput(config: ThroughputConfig, command: str) -> dict[str, Any]:
    from dfpo.training.algos import ALGOS

    algos = [a.strip() for a in config.algos.split(",") if a.strip()]
    unknown = [a for a in algos if a not in ALGOS]
    if unknown:
        raise ConfigError(f"algos: unknown {', '.join(unknown)}; valid: {', '.join(ALGOS)}")
    if config.model not in ("tiny", "smollm2"):
        raise ConfigError(f"model={config.model!r}: valid values are tiny, smollm2")
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    peak = matmul_peak()
    results = {
        "command": command,
        "config": dataclasses.asdict(config),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_peak_gflops": peak / 1e9,
        "algos": [measure_algo(config, algo, peak) for algo in algos],
    }
    print(f"matmul peak (fp32, 1024^3, {results['threads']} threads): {peak / 1e9:.1f} GFLOP/s")
    header = "algo           step s  generate s (tok/s)  score s (tok/s)   update s (tok/s)   MFU"
    print(header)
    base = results["algos"][0]["step_s"]
    for r in results["algos"]:
        print(
            f"{r['algo']:13s} {r['step_s']:7.2f}  {r['generate_s']:6.2f} ({r['generate_tokens_per_s']:7.0f})"
            f"  {r['score_s']:6.2f} ({r['score_tokens_per_s']:7.0f})  {r['update_s']:6.2f} "
            f"({r['update_tokens_per_s']:7.0f})  {r['mfu']:.1%}   x{r['step_s'] / base:.2f} of {algos[0]}"
        )
    if config.out:
        Path(config.out).write_text(json.dumps(results, indent=1) + "\n")
    return results
