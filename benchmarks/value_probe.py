"""How much value information the policy's own hidden states carry: what a critic on frozen features can learn.

Samples ``--samples`` responses to each of ``--prompts`` training prompts at the rollout temperature, scores them
against the gold answers, and fits ridge-regression probes from the policy's last hidden state (the features a
``critic.backbone=frozen`` head sees) to the reward: at the first response token, at the last one, and at every
token. Probes are fitted on 70% of the prompts and scored on the other 30% (held-out R^2; split by prompt, so
the answers to one prompt never sit on both sides). Beside them: the share of the reward's variance that lies
between prompts (``reward/prompt_share``, what knowing each prompt's success rate would explain).

    .venv/bin/python benchmarks/value_probe.py                         # tiny model, 2-3 term subtraction chains
    .venv/bin/python benchmarks/value_probe.py --option operators=+    # additions
    .venv/bin/python benchmarks/value_probe.py --model smollm2 --task science --option few_shot=3 \
        --max-new-tokens 48 --prompts 96
"""

from __future__ import annotations

import argparse

import torch

from dfpo.evaluate import render_prompt
from dfpo.experiments.critic_learning import ridge_r2
from dfpo.generation.rollout import response_forward, sample
from dfpo.models import load_model
from dfpo.options import parse_scalar
from dfpo.tasks import get
from dfpo.tasks.presets import task_options_for
from dfpo.training.phases import prompt_share as _prompt_share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument(
        "--option", action="append", default=[], help="a task option as name=value (repeatable); arithmetic "
        "defaults to operators=- eval_size=1000, the tiny grid's sub domain",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    model.eval()
    given = {k: parse_scalar(v) for k, v in (o.split("=", 1) for o in args.option)}
    defaults = {"operators": "-", "eval_size": 1000} if args.task == "arithmetic" else {}
    options = task_options_for(args.model, args.task, {**defaults, **given})
    task = get(args.task, **options)
    examples = task.examples("train", args.prompts)
    first, last, every, every_prompt, rewards, prompt_of = [], [], [], [], [], []
    for start in range(0, len(examples), 25):
        chunk = examples[start : start + 25]
        prompts = [render_prompt(tokenizer, task.messages(e)) for e in chunk]
        rollout = sample(model, tokenizer, prompts, args.samples, args.max_new_tokens, args.temperature)
        ids, attn, width = rollout.input_ids, rollout.attention_mask, rollout.response_mask.shape[1]
        with torch.no_grad():
            _, hidden = response_forward(model, ids, attn, width, args.temperature, True)
        for i, completion in enumerate(rollout.completions):
            prompt = start + int(rollout.prompt_index[i])
            h = hidden[i][rollout.response_mask[i].bool()]
            first.append(h[0])
            last.append(h[-1])
            every.append(h)
            every_prompt += [prompt] * len(h)
            rewards.append(task.score(completion, examples[prompt]))
            prompt_of.append(prompt)
    y, groups = torch.tensor(rewards), torch.tensor(prompt_of)
    order = torch.randperm(len(examples))
    held_out = set(order[int(0.7 * len(examples)) :].tolist())
    test = torch.tensor([g in held_out for g in prompt_of])
    y_every = torch.cat([torch.full((len(h),), r) for h, r in zip(every, rewards, strict=True)])
    test_every = torch.tensor([g in held_out for g in every_prompt])
    print(f"{args.model}, {args.task} {options}: {len(examples)} prompts x {args.samples} samples "
          f"at temperature {args.temperature}; mean reward {float(y.mean()):.3f}")  # fmt: skip
    print(f"between-prompt share of the reward's variance (reward/prompt_share): {_prompt_share(y, groups):.3f}")
    print("held-out R^2 of ridge probes on the frozen features (best of lambda 1, 10, 100):")
    for name, x, target, mask in (
        ("first response token", torch.stack(first), y, test),
        ("last response token", torch.stack(last), y, test),
        ("every response token", torch.cat(every), y_every, test_every),
    ):
        best = max(ridge_r2(x[~mask], target[~mask], x[mask], target[mask], lam) for lam in (1.0, 10.0, 100.0))
        print(f"  {name:22s} {best:.3f}")


if __name__ == "__main__":
    main()
