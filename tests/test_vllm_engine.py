"""The optional vLLM engine: refused with the fix on a machine without it; its outputs become the same rollout
layout as transformers' generate (vLLM itself needs a CUDA GPU and is not exercised here)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dfpo.generation.rollout import sample
from dfpo.generation.vllm_engine import rollout_from_tokens
from dfpo.models import load_model
from dfpo.options import ConfigError
from dfpo.training.config import build_config


def test_vllm_engine_is_refused_with_the_fix_where_it_cannot_run():
    runnable = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if runnable:
        assert build_config(["rollout.engine=vllm"]).rollout.engine == "vllm"
    else:
        with pytest.raises(ConfigError, match=r"pip install '\.\[vllm\]'"):
            build_config(["rollout.engine=vllm"])
    with pytest.raises(ConfigError, match=r"rollout\.engine"):
        build_config(["rollout.engine=sglang"])


def test_token_ids_become_the_rollout_that_generate_returns():
    model, tokenizer = load_model("tiny")
    torch.manual_seed(0)
    prompts = ["1+2=?\n", "12+34+56=?\n"]
    rollout = sample(model, tokenizer, prompts, n=3, max_new_tokens=16)
    width = rollout.prompt_length
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    responses = []
    for row, mask in zip(rollout.input_ids[:, width:], rollout.response_mask, strict=True):
        responses.append(row[: int(mask.sum())].tolist())  # up to and including the end token, as vLLM returns
    again = rollout_from_tokens(prompt_ids, responses, rollout.truncated.tolist(), 3, tokenizer.eos_token_id,
                                tokenizer.pad_token_id, rollout.completions)  # fmt: skip
    r = again.response_mask.shape[1]
    assert torch.equal(again.response_mask, rollout.response_mask[:, :r])
    assert not rollout.response_mask[:, r:].any()
    assert torch.equal(again.attention_mask[:, : width + r], rollout.attention_mask[:, : width + r])
    real = again.attention_mask.bool()
    assert torch.equal(again.input_ids[real], rollout.input_ids[:, : width + r][real])
    assert torch.equal(again.prompt_index, rollout.prompt_index)
    with pytest.raises(ValueError, match="need as many responses"):
        rollout_from_tokens(prompt_ids, responses[:-1], [False] * 5, 3, 1, 0, [])
