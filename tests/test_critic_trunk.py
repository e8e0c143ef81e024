"""A separate critic trunk that trains only its top layers (``critic.trunk_layers``): the two halves give the whole
model's features, the lower layers stay the starting model's, the top ones learn, resume is exact, and what the
split cannot serve is refused with the reason."""

from __future__ import annotations

import pytest
import torch
from conftest import straight_and_resumed
from safetensors.torch import load_file

from dfpo.cli import main
from dfpo.generation.rollout import trunk_hidden
from dfpo.generation.trunk import SplitTrunk, split_trunk
from dfpo.models import load_model
from dfpo.options import ConfigError
from dfpo.training.config import build_config

RUN = [
    "algo=dfpo", "model=tiny", "task=arithmetic", "rollout.prompts=2", "rollout.samples=2",
    "rollout.max_new_tokens=24", "eval.splits=", "critic.warmup_steps=0", "critic.flow.samples=8",
    "log.progress=false", "critic.backbone=separate", "critic.trunk_layers=1", "critic.updates=3",
    "checkpoint.every=1",
]  # fmt: skip


def _batch(shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """4 rows of 20 tokens, the last 8 a response; ``shared``: two prompts of 12 tokens, two responses each (as a
    rollout has them: the prompt then runs once)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (4, 20), generator=generator)
    attn = torch.ones_like(ids)
    attn[1, :6], attn[3, :2] = 0, 0  # left padding, as rollouts have
    if shared:
        ids[1, :12], attn[1, :12] = ids[0, :12], attn[0, :12]
        ids[3, :12], attn[3, :12] = ids[2, :12], attn[2, :12]
    return ids, attn


@pytest.mark.parametrize(("layers", "shared"), [(1, False), (2, False), (4, False), (1, True), (3, True)])
def test_the_split_trunk_gives_the_whole_trunks_features(layers, shared):
    from dfpo.generation import rollout

    ids, attn = _batch(shared)
    assert (rollout._shared_prefixes(ids, attn, 11) is not None) == shared
    whole = load_model("tiny")[0].base_model
    split = split_trunk(load_model("tiny")[0].base_model, layers)
    with torch.no_grad():
        expected = trunk_hidden(whole, ids, attn, 8)
        assert torch.allclose(trunk_hidden(split, ids, attn, 8), expected, atol=1e-5)
        states = split.lower(ids, attn, 8)  # [N, L, H], what scoring keeps for the step's critic passes
        assert states.shape == (4, 20, whole.config.hidden_size)
        assert torch.allclose(trunk_hidden(split, ids, attn, 8, states), expected, atol=1e-5)
    trained = {n for n, p in split.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("upper.") for n in trained)
    assert len({n.split(".")[2] for n in trained if ".layers." in n}) == layers  # the top `layers` layers, no more
    assert any(n.startswith("upper.norm") for n in trained)


def test_a_split_the_model_cannot_serve_is_refused():
    from transformers import GemmaConfig, GemmaModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    with pytest.raises(ValueError, match="train between 1 and 4"):
        split_trunk(load_model("tiny")[0].base_model, 5)
    with pytest.raises(ValueError, match="GPT2Model has no list of decoder layers"):
        split_trunk(GPT2Model(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2)), 1)

    class Rescaled(LlamaModel):  # a forward that changes what it is given before the first layer
        def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
            embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            return super().forward(inputs_embeds=embeds * 2.0, **kwargs)

    small = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}  # fmt: skip
    with pytest.raises(ValueError, match="Rescaled's forward changes the states it is given"):
        split_trunk(Rescaled(LlamaConfig(**small)), 1)
    # Gemma scales its embeddings inside the embedding module, which stays below the cut: it splits
    ids, attn = _batch()
    gemma = GemmaModel(GemmaConfig(**small)).eval()
    with torch.no_grad():
        expected = trunk_hidden(gemma, ids, attn, 8)
        assert torch.allclose(trunk_hidden(split_trunk(gemma, 1), ids, attn, 8), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["critic.trunk_layers=2", "critic.backbone=frozen"], r"set critic\.backbone=separate"),
        (["critic.trunk_layers=2", "critic.backbone=separate", "critic.lora_rank=4"], "critic.lora_rank is not"),
        (["critic.trunk_layers=-1", "critic.backbone=separate"], r"critic\.trunk_layers=-1: must be >= 0"),
    ],
)
def test_trunk_layers_without_a_trunk_to_split_is_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        build_config(settings)


def test_too_many_trunk_layers_is_named_before_training(tmp_path, capsys):
    assert main(["train", *RUN, "steps=1", "critic.trunk_layers=9", f"run_dir={tmp_path / 'r'}"]) == 2
    assert "critic.trunk_layers=9: the model has 4 layers: train between 1 and 4 of them" in capsys.readouterr().err


def _modules(run_dir, step):
    return load_file(run_dir / "checkpoints" / f"step_{step:06d}" / "modules.safetensors")


def test_only_the_top_layers_learn_and_resume_is_exact(tmp_path):
    straight, resumed = straight_and_resumed(RUN, 3, tmp_path)
    a, b = _modules(straight, 3), _modules(resumed, 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_model("tiny")[0].base_model.state_dict()
    lower = {k: v for k, v in a.items() if k.startswith("critic_trunk.lower_part.")}
    upper = {k: v for k, v in a.items() if k.startswith("critic_trunk.upper.layers.")}
    assert lower and all(torch.equal(v, start[k.removeprefix("critic_trunk.lower_part.")]) for k, v in lower.items())
    # the top layer is the model's last (index 3), kept at index 0 of the upper half; it moved
    assert upper and any(not torch.equal(v, start[k.replace("critic_trunk.upper.layers.0", "layers.3")])
                         for k, v in upper.items())  # fmt: skip
    assert isinstance(split_trunk(load_model("tiny")[0].base_model, 1), SplitTrunk)
