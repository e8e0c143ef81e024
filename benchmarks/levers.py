"""What each speed lever of a training step gives, measured side by side in one run on one rollout batch.

Samples one batch (``prompts`` x ``samples`` responses of the model's calibrated arithmetic preset), then times,
for each lever, the phase it acts on with the lever off and on:

- generation: every row prefilled whole / each distinct prompt prefilled once (``repeats``) / that, from a bf16
  copy of the weights / a static KV cache (whole rows, the only way ``generate`` takes one);
- policy forward and backward (the update): every row whole / each distinct prompt run once / that under bf16
  autocast / that through ``torch.compile`` (its first call, which compiles, reported apart);
- torch threads: the shared-prompt forward and backward with 1 thread against the default.

Every timing is the median of ``--reps`` repetitions after one warm-up, with the configurations of a phase
interleaved so that drift in the machine's speed hits them alike. Sampling is seeded, so "whole" and "shared"
generate the same tokens at temperature 0 (checked) and the forward/backward rows all score one fixed batch.

Run from the repository root::

    .venv/bin/python benchmarks/levers.py                     # SmolLM2, 4 prompts x 4 samples, several minutes
    .venv/bin/python benchmarks/levers.py --model tiny --quick  # smoke test, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import dfpo.generation.rollout as rollout_module
import dfpo.tasks as tasks
from dfpo.evaluate import render_prompt
from dfpo.generation.rollout import generate_batch, response_forward
from dfpo.models import load_model
from dfpo.tasks.presets import preset, task_options_for


def _median_times(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each function: one warm-up call each, then ``reps`` interleaved rounds."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class _WholeRows:
    """Within the block, every row runs its prompt itself (no shared-prompt cache)."""

    def __enter__(self) -> None:
        self.saved = rollout_module._shared_prefixes
        rollout_module._shared_prefixes = lambda *args: None

    def __exit__(self, *_: object) -> None:
        rollout_module._shared_prefixes = self.saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["tiny", "smollm2"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 prompts x 2 samples, 16 tokens, 1 repetition")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.samples, args.max_new_tokens, args.reps = 2, 2, 16, 1

    chosen = preset(f"{args.model}-arithmetic")
    task = tasks.get(chosen.task, **task_options_for(chosen.model, chosen.task, chosen.task_options))
    model, tokenizer = load_model(chosen.model)
    model.eval()
    prompts = [render_prompt(tokenizer, task.messages(e)) for e in task.examples("train", args.prompts)]
    low = copy.deepcopy(model).to(torch.bfloat16)
    n, new = args.samples, args.max_new_tokens
    repeated = [p for p in prompts for _ in range(n)]
    results: dict[str, float] = {}

    def sampled(m: torch.nn.Module, shared: bool) -> Callable[[], object]:
        def run() -> object:
            torch.manual_seed(0)
            if shared:
                return generate_batch(m, tokenizer, prompts, new, 0.7, repeats=n)
            return generate_batch(m, tokenizer, repeated, new, 0.7)

        return run

    greedy_whole = generate_batch(model, tokenizer, repeated, new)
    greedy_shared = generate_batch(model, tokenizer, prompts, new, repeats=n)
    same_tokens = torch.equal(greedy_whole.input_ids, greedy_shared.input_ids)
    gen = {
        "generate: whole rows, fp32": sampled(model, False),
        "generate: shared prefill, fp32": sampled(model, True),
        "generate: shared prefill, bf16 weights": sampled(low, True),
    }
    failures: dict[str, str] = {}
    static = "generate: whole rows, static KV cache"
    try:
        _static_generate(model, tokenizer, repeated, new)
    except Exception as error:  # report it, keep the other rows
        failures[static] = f"{type(error).__name__}: {str(error)[:200]}"
    else:
        gen[static] = lambda: _static_generate(model, tokenizer, repeated, new)
    results.update(_median_times(gen, args.reps))

    torch.manual_seed(0)
    batch = generate_batch(model, tokenizer, prompts, new, 0.7, repeats=n)
    ids, attn, width = batch.input_ids, batch.attention_mask, batch.response_mask.shape[1]
    model.train()

    def update(m: torch.nn.Module, whole: bool = False, bf16: bool = False) -> Callable[[], object]:
        def run() -> object:
            m.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if whole:
                    with _WholeRows():
                        logp, _ = response_forward(m, ids, attn, width, 0.7)
                else:
                    logp, _ = response_forward(m, ids, attn, width, 0.7)
            (logp * batch.response_mask).sum().backward()
            return None

        return run

    upd = {
        "update: whole rows, fp32": update(model, whole=True),
        "update: shared prompt, fp32": update(model),
        "update: shared prompt, bf16 autocast": update(model, bf16=True),
    }
    results.update(_median_times(upd, args.reps))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results["update: shared prompt, fp32, 1 thread"] = _median_times({"x": update(model)}, args.reps)["x"]
    torch.set_num_threads(threads)

    if not args.no_compile:
        model.compile()  # in place: the model keeps its class, so logits_to_keep is still passed
        compiled = model
        start = time.perf_counter()
        try:
            update(compiled)()
        except Exception as error:  # e.g. no C++ compiler for inductor: report it, keep the other rows
            failures["update: shared prompt, fp32, torch.compile"] = f"{type(error).__name__}: {str(error)[:200]}"
        else:
            results["update: shared prompt, fp32, torch.compile (first call)"] = time.perf_counter() - start
            results["update: shared prompt, fp32, torch.compile"] = _median_times({"x": update(compiled)}, args.reps)[
                "x"
            ]

    print(f"{args.model}: {args.prompts} prompts x {args.samples} samples, up to {new} new tokens, "
          f"{threads} threads, median of {args.reps} after a warm-up; prompt {batch.prompt_length} tokens, "
          f"responses {width} wide; greedy tokens of shared and whole-row prefill equal: {same_tokens}")  # fmt: skip
    base = {"generate": results["generate: whole rows, fp32"], "update": results["update: whole rows, fp32"]}
    for name, seconds in results.items():
        ratio = base[name.split(":")[0]] / seconds
        print(f"  {name:58s} {seconds:8.2f} s   x{ratio:.2f} speed of whole rows, fp32")
    for name, reason in failures.items():
        print(f"  {name:58s} failed: {reason}")
    if args.out:
        record = {"args": vars(args), "threads": threads, "torch": torch.__version__, "seconds": results,
                  "failed": failures, "greedy_tokens_equal": same_tokens}  # fmt: skip
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


def _static_generate(model: torch.nn.Module, tokenizer: object, prompts: list[str], new: int) -> object:
    torch.manual_seed(0)
    model.generation_config.cache_implementation = "static"
    try:
        return generate_batch(model, tokenizer, prompts, new, 0.7)
    finally:
        model.generation_config.cache_implementation = None


if __name__ == "__main__":
    main()
