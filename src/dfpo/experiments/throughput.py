"""``dfpo bench throughput``: where a training step's time goes, per algorithm, against this machine's own peak,
and side by side with TRL's ``GRPOTrainer`` on the same work.

Each system (a dfpo algorithm, or ``trl`` for TRL's GRPO) runs in its own child process, so that its peak
resident memory is its own: it loads the model, runs ``steps + 1`` training steps on the calibrated arithmetic
preset of the chosen model, and reports every step. The first step of each run is discarded (it pays one-off
allocation and warm-up costs). With ``rounds > 1`` the systems run again in reverse order, then forward again, so
that a slow drift of the machine does not favour whichever runs first; the figures are medians over the measured
steps of all rounds. Every system answers the same prompts (the preset's training problems in the same seeded
order), with the same group size, response length, batch, sampling temperature, learning rate and KL coefficient.

Model FLOP utilisation (MFU) divides the model's matrix FLOPs by the time and by a matrix-product peak measured
in the parent process of the same run (fp32, or bf16 with ``precision=bf16``): ``2 x non-embedding parameters``
per token position run through a model forward, twice that for a backward. The positions are those actually
computed: a prompt shared by several rows runs once (see :mod:`dfpo.generation.rollout`). Attention's
sequence-length term and the critic heads are left out, so MFU is a lower bound.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dfpo.options import ConfigError, check_writable, option

TRL = "trl"


@dataclass(frozen=True)
class ThroughputConfig:
    """``dfpo bench throughput [key=value ...]``: per-phase step time, MFU and peak memory of each system."""

    model: str = option("tiny", "'tiny' or 'smollm2' (each uses its calibrated arithmetic preset)")
    algos: str = option(
        "grpo,ppo,dfpo",
        "comma-separated systems: dfpo algorithms (dfpo list shows them), each with its own settings after '+' "
        "('dfpo+critic.updates=1' is DFPO with one critic step), and 'trl' (TRL's GRPO)",
    )
    steps: int = option(3, "measured steps per run (one more is run first and discarded)")
    rounds: int = option(1, "runs of every system, in alternating order (medians pool the rounds' steps)")
    prompts: int = option(8, "prompts per step")
    samples: int = option(4, "responses per prompt")
    max_new_tokens: int = option(64, "response length limit")
    kl: float = option(0.0, "KL coefficient of every system (0: no reference model; TRL's beta)")
    lr: float = option(1e-6, "actor learning rate of every system")
    precision: str = option("fp32", "fp32 or bf16 (dfpo's precision=bf16; TRL's bf16=True)")
    checkpoint_prompts: int = option(
        4, "dfpo's actor.checkpoint_prompts; > 0 also turns on TRL's gradient checkpointing (its default); 0: off"
    )
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    train: str = option("", "more dfpo train settings for the dfpo systems, space-separated: 'actor.micro_batch=16'")
    out: str = option("", "also write the results as JSON to this file")


def matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 30) -> float:
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


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# -- the children: one system, one run ---------------------------------------------------------------------------


def _dfpo_overrides(config: ThroughputConfig, system: str, run_dir: str) -> list[str]:
    """The ``dfpo train`` settings of ``system``'s benchmark run: ``algo`` or ``algo+key=value+...``."""
    from dfpo.tasks.presets import preset

    algo, *own = system.split("+")
    chosen = preset(f"{config.model}-arithmetic")
    kl = ["kl.mode=none"] if config.kl == 0 else [f"kl.coef={config.kl}"]
    return [
        f"algo={algo}", f"model={chosen.model}", f"task={chosen.task}", f"run_dir={run_dir}",
        f"rollout.prompts={config.prompts}", f"rollout.samples={config.samples}",
        f"rollout.max_new_tokens={config.max_new_tokens}", f"threads={config.threads}", "critic.warmup_steps=0",
        f"actor.lr={config.lr}", f"precision={config.precision}", "log.progress=false",
        f"actor.checkpoint_prompts={config.checkpoint_prompts}", *kl,
        *(f"task_options.{k}={v}" for k, v in chosen.task_options.items()), *config.train.split(), *own,
    ]  # fmt: skip


def _dfpo_run(config: ThroughputConfig, algo: str) -> dict[str, Any]:
    """Every step's phase times and work of ``algo`` in dfpo's trainer."""
    from dfpo.training.config import build_config
    from dfpo.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = _dfpo_overrides(config, algo, run_dir)
        trainer = Trainer(build_config(overrides))
        steps = []
        for _ in range(config.steps + 1):
            trainer.step += 1
            steps.append(trainer.train_step())
        trainer.log.close()
    return {
        "non_embedding_parameters": _non_embedding_parameters(trainer.policy),
        # model passes per token position, by phase (see the module docstring)
        "forwards": {"generate": 1, "score": 1 + (trainer.ref is not None) + (trainer.trunk is not None)},
        "steps": [
            {
                "step_s": r["perf/step_s"],
                **{f"{p}_s": r[f"perf/{p}_s"] for p in ("generate", "score", "update")},
                "positions": r["perf/forward_positions"],
                "response_tokens": r["perf/generate_tokens_per_s"] * r["perf/generate_s"],
                "update_passes": _update_passes(trainer, bool(r.get("actor/active", 1.0))),
                "actor_active": bool(r.get("actor/active", 1.0)),
            }
            for r in steps
        ],
    }


def _update_passes(trainer: Any, actor_active: bool) -> float:
    """Forward-equivalents of the update phase: 3 per trained model and epoch (a backward costs two forwards),
    less the policy's forward when it already ran while scoring, plus its recomputation per epoch under
    activation checkpointing; a step that trains the critic alone (``critic.warmup_steps``) runs the policy
    forward only for a frozen backbone's features; a separate critic trunk's extra steps (``critic.updates``) run
    its forward and backward again, only its top layers' share of the model under ``critic.trunk_layers``."""
    c = trainer.config
    epochs = c.actor.epochs
    backward = actor_active or (trainer.critic is not None and c.critic.backbone == "shared")
    passes = 0
    if backward or trainer.critic_on_policy:
        passes = (3 if backward else 1) * epochs - (1 if trainer.fused else 0)
        passes += epochs if backward and c.actor.checkpoint_prompts else 0
    if trainer.trunk is not None:
        split = getattr(trainer.trunk, "upper", None)  # a trunk that trains its top layers only
        share = len(split.layers) / (trainer.trunk.cut + len(split.layers)) if split is not None else 1.0
        passes += 3 * (epochs + trainer.critic_updates - 1) * share
    return passes


def _trl_run(config: ThroughputConfig) -> dict[str, Any]:
    """Every step's wall time of TRL's ``GRPOTrainer`` on the same prompts, rewards and settings."""
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as error:
        raise ConfigError(
            f"algos=trl needs TRL and datasets ({error.name} is missing): pip install 'dfpo[bench]'"
        ) from None
    import dfpo.tasks as tasks
    from dfpo.models import load_model
    from dfpo.tasks.presets import preset, task_options_for
    from dfpo.training.trainer import DataOrder

    chosen = preset(f"{config.model}-arithmetic")
    task = tasks.get(chosen.task, **task_options_for(chosen.model, chosen.task, chosen.task_options))
    train = task.examples("train")
    model, tokenizer = load_model(chosen.model)
    # the prompts dfpo's trainer draws at seed 0, in its order; TRL keeps the dataset order (shuffle off)
    order = DataOrder(len(train), seed=0).take(config.prompts * (config.steps + 1))
    rows = [{"prompt": task.prompt_text(tokenizer, train[i]), "index": i} for i in order]

    def reward(prompts: list[str], completions: list[str], index: list[int], **_: Any) -> list[float]:
        return [task.score(c, train[i]) for c, i in zip(completions, index, strict=True)]

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimes()
    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir, per_device_train_batch_size=config.prompts * config.samples,
            num_generations=config.samples, max_completion_length=config.max_new_tokens, temperature=0.7, top_p=1.0,
            top_k=0, learning_rate=config.lr, beta=config.kl, loss_type="grpo", num_iterations=1,
            max_steps=config.steps + 1, gradient_accumulation_steps=1, max_grad_norm=1.0, shuffle_dataset=False,
            lr_scheduler_type="constant", gradient_checkpointing=config.checkpoint_prompts > 0, use_cpu=True,
            bf16=config.precision == "bf16", report_to="none", save_strategy="no", logging_strategy="no",
            disable_tqdm=True, dataloader_num_workers=0, seed=0,
        )  # fmt: skip
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_list(rows), callbacks=[timer])  # fmt: skip
        trainer.train()
    return {"non_embedding_parameters": _non_embedding_parameters(model), "steps": [{"step_s": t} for t in timer.times]}


def _child(config: ThroughputConfig, system: str) -> dict[str, Any]:
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    result = _trl_run(config) if system == TRL else _dfpo_run(config, system)
    return {**result, "peak_rss_gib": _peak_rss_gib()}


def _run_child(config: ThroughputConfig, system: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        spec = json.dumps({"config": dataclasses.asdict(config), "system": system, "out": out.name})
        done = subprocess.run([sys.executable, "-m", "dfpo.experiments.throughput", spec], env=os.environ.copy())
        if done.returncode != 0:
            raise RuntimeError(f"the benchmark run of {system} failed (exit {done.returncode}); its error is above")
        return json.loads(Path(out.name).read_text())


# -- the parent: interleave, pool, compare -----------------------------------------------------------------------


def _summarise(system: str, runs: list[dict[str, Any]], peak: float) -> dict[str, Any]:
    steps = [s for run in runs for s in run["steps"][1:]]  # each run's first step is discarded
    out: dict[str, Any] = {
        "algo": system,
        "runs": len(runs),
        "measured_steps": len(steps),
        "step_s": statistics.median(s["step_s"] for s in steps),
        "step_s_all": [round(s["step_s"], 3) for s in steps],
        "peak_rss_gib": max(run["peak_rss_gib"] for run in runs),
        "non_embedding_parameters": runs[0]["non_embedding_parameters"],
    }
    if system == TRL:
        return out
    out["critic_only_steps"] = sum(not s["actor_active"] for s in steps)  # under critic.warmup_steps
    params, forwards = runs[0]["non_embedding_parameters"], runs[0]["forwards"]
    flops = 0.0
    for phase in ("generate", "score", "update"):
        seconds = statistics.median(s[f"{phase}_s"] for s in steps)
        # positions x passes: the update's passes can differ by step (critic-only steps)
        work = statistics.median(s["positions"] * (s["update_passes"] if phase == "update" else forwards[phase])
                                 for s in steps)  # fmt: skip
        phase_flops = 2 * params * work
        flops += phase_flops
        out[f"{phase}_s"] = seconds
        out[f"{phase}_mfu"] = phase_flops / seconds / peak
    out["generate_tokens_per_s"] = statistics.median(s["response_tokens"] for s in steps) / out["generate_s"]
    out["forward_positions"] = statistics.median(s["positions"] for s in steps)
    out["mfu"] = flops / out["step_s"] / peak
    return out


def run_throughput(config: ThroughputConfig, command: str) -> dict[str, Any]:
    from dfpo.training.algos import ALGOS

    systems = [a.strip() for a in config.algos.split(",") if a.strip()]
    unknown = [a for a in systems if a.split("+")[0] not in ALGOS and a != TRL]
    if unknown:
        raise ConfigError(f"algos: unknown {', '.join(unknown)}; valid: {', '.join(ALGOS)}, {TRL}")
    if config.model not in ("tiny", "smollm2"):
        raise ConfigError(f"model={config.model!r}: valid values are tiny, smollm2")
    if config.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision={config.precision!r}: valid values are fp32, bf16")
    if config.checkpoint_prompts < 0:
        raise ConfigError(f"checkpoint_prompts={config.checkpoint_prompts}: must be 0 (off) or at least 1")
    for key in ("steps", "rounds", "prompts", "samples", "max_new_tokens"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key}={getattr(config, key)}: must be at least 1")
    if config.samples < 2 and any(s.split("+")[0] in (TRL, "grpo", "dr_grpo", "rloo", "flowrl") for s in systems):
        raise ConfigError(f"samples={config.samples}: group-relative systems need samples >= 2")
    if config.out:
        check_writable(Path(config.out), "out")
    if TRL in systems:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise ConfigError("algos=trl needs TRL: pip install 'dfpo[bench]' (TRL and datasets)") from None
    from dfpo.training.config import build_config

    for system in systems:
        if system != TRL:  # a wrong setting is refused here, not in a child process
            build_config(_dfpo_overrides(config, system, tempfile.gettempdir() + "/dfpo-bench-check"))
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    peak = matmul_peak(dtype)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for round_ in range(config.rounds):
        for system in systems if round_ % 2 == 0 else systems[::-1]:
            runs[system].append(_run_child(config, system))
    results = {
        "command": command,
        "config": dataclasses.asdict(config),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_peak_gflops": peak / 1e9,
        "matmul_peak_dtype": config.precision,
        "algos": [_summarise(s, runs[s], peak) for s in systems],
    }
    _print_table(results)
    if config.out:
        Path(config.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


def _print_table(results: dict[str, Any]) -> None:
    rows = results["algos"]
    print(f"matmul peak ({results['matmul_peak_dtype']}, 1024^3, {results['threads']} threads): "
          f"{results['matmul_peak_gflops']:.1f} GFLOP/s")  # fmt: skip
    name = max(12, *(len(r["algo"]) for r in rows))
    print(f"{'system':{name}s}  step s  generate s (tok/s)  score s  update s    MFU  peak GiB  steps  vs first")
    base = rows[0]["step_s"]
    for r in rows:
        if r["algo"] == TRL:
            phases = f"{'':6s}  {'':9s}  {'':7s}  {'':8s}  {'':5s}"
        else:
            phases = (f"{r['generate_s']:6.2f} ({r['generate_tokens_per_s']:7.0f})  {r['score_s']:7.2f}  "
                      f"{r['update_s']:8.2f}  {r['mfu']:5.1%}")  # fmt: skip
        print(f"{r['algo']:{name}s} {r['step_s']:7.2f}  {phases}  {r['peak_rss_gib']:8.2f}  {r['measured_steps']:5d}"
              f"  x{r['step_s'] / base:.2f}")  # fmt: skip
    if any(r["algo"] == TRL for r in rows):
        trl = next(r for r in rows if r["algo"] == TRL)
        for r in rows:
            if r["algo"] != TRL:
                print(f"{r['algo']}: TRL's GRPO step takes {trl['step_s'] / r['step_s']:.2f}x as long; peak memory "
                      f"{r['peak_rss_gib']:.2f} GiB against TRL's {trl['peak_rss_gib']:.2f} GiB")  # fmt: skip


if __name__ == "__main__":  # a child run: python -m dfpo.experiments.throughput '{"config": ..., "system": ...}'
    spec = json.loads(sys.argv[1])
    result = _child(ThroughputConfig(**spec["config"]), spec["system"])
    Path(spec["out"]).write_text(json.dumps(result))
