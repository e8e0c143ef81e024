"""Training on several processes (torchrun, gloo, CPU) equals training on one with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfpo.cli import main
from dfpo.distributed import World
from dfpo.generation.rollout import concat_rollouts, response_forward, sample
from dfpo.models import load_model
from dfpo.supervision.noise import make_noise

# 4 prompts x 2 samples per step; 2 prompts per generate call, so that one process and two sample the same
# rollouts; the critic learns from the first step on, so that both the actor and the critic are compared
COMMON = [
    "model=tiny", "task=arithmetic", "rollout.prompts=4", "rollout.samples=2", "rollout.generate_prompts=2",
    "rollout.max_new_tokens=32", "noise=flip(0.2)", "critic.warmup_steps=0", "critic.flow.samples=8", "eval.splits=",
    "log.progress=false", "log.samples_every=0", "threads=1", "checkpoint.every=1", "checkpoint.keep=3",
    "actor.lr=1e-5",
]  # fmt: skip
CASES = {
    "dfpo": ["algo=dfpo"],
    # two minibatches of micro-batches of 2: each process holds a different number of each minibatch's rows
    "ppo-minibatches": ["algo=ppo", "actor.minibatches=2", "actor.micro_batch=2"],
    "grpo-kl-loss": ["algo=grpo", "kl.mode=loss"],
    # the ensemble members' bootstrap masks are drawn for the sequences' rows in the whole batch
    "robust-ppo-minibatches": ["algo=robust_ppo", "actor.minibatches=2", "actor.micro_batch=2"],
    # a critic head on the policy's own trunk: its extra steps (the head alone) sum their gradients over processes
    "ppo-shared": ["algo=ppo", "critic.backbone=shared"],
    # FSDP2: the policy sharded over the 2 processes (the flow critic's head is not)
    "dfpo-fsdp": ["algo=dfpo", "parallel=fsdp"],
    # micro-batches sized by tokens at the longest padded length over both processes: sharded forwards are
    # collectives, so both must run the same number of passes. Here the processes' first rollouts are padded to 49
    # and 48 tokens: 193 positions hold one prompt's 2 rows at 49 but all 4 of a process's rows at 48, so sizing
    # by each process's own length leaves one process waiting for a forward the other never runs
    "dfpo-fsdp-micro-tokens": ["algo=dfpo", "parallel=fsdp", "actor.micro_tokens=193"],
}


def _torchrun(args: list[str], processes: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "dfpo", "train", *args]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run_dir / "checkpoints" / f"step_{step:06d}"
    out = {f"policy.{k}": v for k, v in load_file(folder / "policy" / "model.safetensors").items()}
    out.update({f"modules.{k}": v for k, v in load_file(folder / "modules.safetensors").items()})
    return out


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_train_as_one(case, tmp_path):
    args = [*COMMON, *CASES[case], "steps=2"]
    assert main(["train", *args, f"run_dir={tmp_path / 'one'}"]) == 0
    _torchrun([*args, f"run_dir={tmp_path / 'two'}"])
    one, two = _weights(tmp_path / "one", 2), _weights(tmp_path / "two", 2)
    learned = _max_difference(one, _weights(tmp_path / "one", 1))  # what the second step changed
    difference = _max_difference(one, two)
    assert difference < 1e-5 and difference < learned / 10, (difference, learned)
    # rank 0 alone wrote the run's files: one line per step
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    if "micro_tokens" in case:  # passes of fewer rows than a process's share of the batch
        assert all(json.loads(line)["perf/micro_batch"] < 4 for line in lines)
    if case.startswith("dfpo"):
        # and a run checkpointed by two processes (sharded or not) resumes on one, exactly
        (tmp_path / "two" / "latest").write_text("step_000001\n")
        assert main(["train", *args, f"run_dir={tmp_path / 'two'}", "resume=auto"]) == 0
        assert _max_difference(one, _weights(tmp_path / "two", 2)) < 1e-5


def test_a_batch_that_does_not_split_evenly_is_refused():
    assert World(rank=1, size=2).shard(8) == (4, 8)
    with pytest.raises(ValueError, match=r"rollout\.prompts=6 does not split evenly over 4 processes"):
        World(rank=0, size=4).shard(6)


def test_concatenated_rollouts_score_as_they_were_sampled():
    model, tokenizer = load_model("tiny")
    torch.manual_seed(0)
    short = sample(model, tokenizer, ["1+2=?\n"], n=2, max_new_tokens=12)
    long = sample(model, tokenizer, ["12+34+56=?\n", "7+8=?\n"], n=2, max_new_tokens=20)
    both = concat_rollouts([short, long], tokenizer.pad_token_id)
    assert both.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert both.completions == short.completions + long.completions
    width = both.response_mask.shape[1]
    assert width == max(short.response_mask.shape[1], long.response_mask.shape[1])
    logp, _ = response_forward(model, both.input_ids, both.attention_mask, width)
    for part, rows in ((short, slice(0, 2)), (long, slice(2, 6))):
        own, _ = response_forward(model, part.input_ids, part.attention_mask, part.response_mask.shape[1])
        n = part.response_mask.shape[1]
        assert torch.equal(both.response_mask[rows, :n], part.response_mask)
        assert not both.response_mask[rows, n:].any()
        assert torch.allclose((logp[rows, :n] * part.response_mask), own * part.response_mask, atol=1e-5)


def test_noise_of_a_share_is_that_share_of_the_whole_batch():
    import dfpo.tasks as tasks

    task = tasks.get("arithmetic")
    examples = task.examples("train", 8)
    completions = [e["solution"] if i % 2 else "no" for i, e in enumerate(examples)]
    noise = make_noise("flip(0.4)", seed=3)
    whole = noise.score(task, completions, examples, step=5)
    halves = [noise.score(task, completions[i : i + 4], examples[i : i + 4], step=5, first=i) for i in (0, 4)]
    assert halves[0].observed + halves[1].observed == whole.observed
    assert whole.observed != whole.true  # some rewards were flipped
