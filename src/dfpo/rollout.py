"""Rollouts: sampling n responses per prompt with a Hugging Face causal LM, and reading them back token by token.

Layout of a rollout of ``N = prompts x n`` sequences, prompt width ``P`` and response width ``R``::

    input_ids       [N, P + R]   left-padded prompt, then the response, right-padded after its end token
    attention_mask  [N, P + R]   1 on real prompt and response tokens
    response_mask   [N, R]       1 on response tokens up to and including the end token

Alignment (the off-by-one that still trains, just badly): the log-prob of response token ``t`` comes from the
logits at sequence position ``P + t - 1``, and the value of the state before token ``t`` is read from the hidden
state at that same position (the last prompt token for ``t = 0``). Position ids are computed from the attention
mask, as ``generate`` does, so a left-padded sequence is scored exactly as it would be alone.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Rollout:
    """Sampled responses (see the module docstring for the shapes).

    ``prompt_index`` ``[N]`` says which prompt each sequence answers (the group of GRPO-style statistics);
    ``truncated`` ``[N]`` marks responses cut at ``max_new_tokens`` without an end token.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_index: Tensor
    truncated: Tensor
    completions: list[str]

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]


def position_ids(attention_mask: Tensor) -> Tensor:
    """``[N, L]`` positions counted over real tokens only (0 at each sequence's first real token)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def response_mask(responses: Tensor, eos_token_id: int) -> Tensor:
    """``[N, R]`` mask of response tokens up to and including the first end token (all of a truncated one).

    Works when the pad token is the end token: what follows the first end token never counts.
    """
    is_end = (responses == eos_token_id).long()
    ended_before = is_end.cumsum(-1) - is_end  # end tokens strictly before each position
    return (ended_before == 0).long()


@torch.no_grad()
def generate_batch(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0
) -> Rollout:
    """One ``generate`` call over ``prompts`` (rendered text) with the KV cache: greedy at ``temperature=0``,
    sampled otherwise. ``prompt_index`` is ``0..len(prompts)-1``."""
    if tokenizer.padding_side != "left":
        raise ValueError(
            "generation needs a left-padding tokenizer (tokenizer.padding_side = 'left'), as it appends on the right"
        )
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    # top_k=0 overrides any top-k of the model's generation config: at top_p=1 the tokens then come from exactly
    # the tempered distribution whose log-probs the trainer computes
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if temperature > 0
        else {"do_sample": False}
    )
    out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    responses = out[:, batch["input_ids"].shape[1] :]
    mask = response_mask(responses, tokenizer.eos_token_id)
    ended = (responses == tokenizer.eos_token_id).any(-1)
    return Rollout(
        input_ids=out,
        attention_mask=torch.cat([batch["attention_mask"], mask], dim=1),
        response_mask=mask,
        prompt_index=torch.arange(len(prompts)),
        truncated=~ended & (responses.shape[1] >= max_new_tokens),
        completions=tokenizer.batch_decode(responses, skip_special_tokens=True),
    )


def sample(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    n: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> Rollout:
    """``n`` sampled responses to each of ``prompts`` (rendered text), generated in one batch with the KV cache.

    Sequences are ordered prompt by prompt (``prompt_index = [0]*n + [1]*n + ...``). Seed torch beforehand for a
    reproducible draw.
    """
    if n < 1:
        raise ValueError(f"sample needs n >= 1 responses per prompt, got {n}")
    if temperature <= 0:
        raise ValueError(f"sample needs temperature > 0 (greedy decoding is dfpo.evaluate.generate), got {temperature}")
    rollout = generate_batch(
        model, tokenizer, [p for p in prompts for _ in range(n)], max_new_tokens, temperature, top_p
    )
    rollout.prompt_index = torch.arange(len(prompts)).repeat_interleave(n)
    return rollout


def response_forward(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_length: int,
    temperature: float = 1.0,
    hidden_states: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One forward pass over ``input_ids`` ``[N, P + R]``: the log-probabilities ``[N, R]`` of the last
    ``response_length`` tokens and, with ``hidden_states=True``, the last layer's hidden states ``[N, R, H]`` of
    the states before each response token (what a critic head reads on a shared or frozen trunk).

    Logits are divided by the sampling ``temperature`` so that the log-probs are those of the distribution the
    tokens were drawn from. Values at masked (padding) positions are meaningless: mask them downstream.
    """
    # Only the last R + 1 positions' logits are needed: computing the output layer at the prompt positions would
    # cost a vocabulary-sized matrix product and an [N, P, V] tensor for nothing.
    keep = {"logits_to_keep": response_length + 1} if _takes_logits_to_keep(type(model)) else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        output_hidden_states=hidden_states,
        **keep,
    )
    prompt_length = input_ids.shape[1] - response_length
    # position P + t - 1 predicts response token t, and holds the state before it
    before = slice(prompt_length - 1, input_ids.shape[1] - 1)
    logits = out.logits[:, -(response_length + 1) : -1].float() / temperature
    targets = input_ids[:, prompt_length:]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logprobs, out.hidden_states[-1][:, before] if hidden_states else None


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    # once per model class, not on every forward
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def response_logprobs(
    model: Any, input_ids: Tensor, attention_mask: Tensor, response_length: int, temperature: float = 1.0
) -> Tensor:
    """``[N, R]`` log-probabilities of the response tokens (:func:`response_forward` without hidden states)."""
    return response_forward(model, input_ids, attention_mask, response_length, temperature)[0]


def prompt_features(model: Any, input_ids: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
    """``[N, H]``: the last layer's hidden states averaged over each sequence's real prompt tokens (FlowRL's
    log-partition input). Reads the prompt part only, so it does not depend on the response."""
    ids, mask = input_ids[:, :prompt_length], attention_mask[:, :prompt_length]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), output_hidden_states=True)
    weights = mask.to(out.hidden_states[-1].dtype).unsqueeze(-1)
    return (out.hidden_states[-1] * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def trunk_hidden(trunk: Any, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
    """``[N, R, H]`` hidden states of a bare transformer trunk (a separate critic backbone) at the states before
    each of the last ``response_length`` tokens: the same positions as :func:`response_forward`."""
    out = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    prompt_length = input_ids.shape[1] - response_length
    return out.last_hidden_state[:, prompt_length - 1 : input_ids.shape[1] - 1]
