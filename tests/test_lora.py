"""LoRA adapters (peft) on the policy and on a separate critic trunk: only the adapters train, resume is exact,
and a checkpoint's adapters load as a merged model."""

from __future__ import annotations

import pytest
import torch
from conftest import straight_and_resumed
from safetensors.torch import load_file

from dfpo.models import load_model
from dfpo.options import ConfigError
from dfpo.training.config import build_config

LORA = [
    "algo=dfpo", "model=tiny", "task=arithmetic", "rollout.prompts=2", "rollout.samples=2",
    "rollout.max_new_tokens=24", "eval.limit=4", "critic.warmup_steps=0", "critic.flow.samples=8", "log.progress=false",
    "actor.lora_rank=4", "actor.lr=1e-3", "critic.backbone=separate", "critic.lora_rank=2", "checkpoint.every=1",
]  # fmt: skip


def _adapters(run_dir, step):
    folder = run_dir / "checkpoints" / f"step_{step:06d}"
    out = {f"policy.{k}": v for k, v in load_file(folder / "policy" / "adapter_model.safetensors").items()}
    out.update({f"modules.{k}": v for k, v in load_file(folder / "modules.safetensors").items()})
    return out


def test_lora_trains_the_adapters_only_and_resumes_exactly(tmp_path):
    straight, resumed = straight_and_resumed(LORA, 2, tmp_path)
    a, b = _adapters(straight, 2), _adapters(resumed, 2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the policy's checkpoint holds adapters only; they moved, and the critic trunk's base weights did not
    assert all("lora_" in k for k in a if k.startswith("policy."))
    first = _adapters(straight, 1)
    assert any(not torch.equal(first[k], a[k]) for k in a if "lora_B" in k and k.startswith("policy."))
    tiny, _ = load_model("tiny")
    base = {
        f"modules.critic_trunk.base_model.model.{k.removeprefix('model.')}": v for k, v in tiny.state_dict().items()
    }
    frozen = [k for k in a if k in base]
    assert frozen and all(torch.equal(a[k], base[k]) for k in frozen)
    # the adapters load as one merged model, which differs from the starting one
    merged, _ = load_model(str(straight))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(merged(input_ids=ids).logits, tiny(input_ids=ids).logits)


def test_lora_on_a_critic_without_its_own_trunk_is_refused():
    with pytest.raises(ConfigError, match=r"critic\.backbone=separate"):
        build_config(["critic.lora_rank=4", "critic.backbone=frozen"])
    with pytest.raises(ConfigError, match=r"actor\.lora_rank=-1"):
        build_config(["actor.lora_rank=-1"])
