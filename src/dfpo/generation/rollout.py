"""Rollouts: sampling n responses per prompt with a Hugging Face causal LM, and reading them back token by token.

Layout of a rollout of ``N = prompts x n`` sequences, prompt width ``P`` and response width ``R``::

    input_ids       [N, P + R]   left-padded prompt, then the response, right-padded after its end token
    attention_mask  [N, P + R]   1 on real prompt and response tokens
    response_mask   [N, R]       1 on response tokens up to and including the end token

Alignment (the off-by-one that still trains, just badly): the log-prob of response token ``t`` comes from the
logits at sequence position ``P + t - 1``, and the value of the state before token ``t`` is read from the hidden
state at that same position (the last prompt token for ``t = 0``). Position ids are computed from the attention
mask, as ``generate`` does, so a left-padded sequence is scored exactly as it would be alone.

Shared prompts: a rollout answers each prompt ``n`` times, and prompts are often much longer than responses (a
few-shot prompt of 225 tokens against 20-token answers). Sampling and scoring then run the prompt through the
model once per *distinct* prompt and copy its key/value cache to the rows that share it; only the response tokens
are run per row. This is exact (the same attention, the same positions; gradients of the copies add up in the
prompt's forward) and cuts the forward and backward work by up to ``n`` times. A prompt shorter than the
responses runs with its rows, in one pass: the separate pass would cost more than it saves.
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

    @property
    def completion_ids(self) -> list[list[int]]:
        """Each response's generated token ids, without padding."""
        responses = self.input_ids[:, self.prompt_length :]
        return [row[keep.bool()].tolist() for row, keep in zip(responses, self.response_mask, strict=True)]


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """One rollout of ``parts`` in order: prompts left-padded and responses right-padded to the widest part,
    ``prompt_index`` renumbered so that each part's prompts follow the previous part's."""
    if len(parts) == 1:
        return parts[0]
    prompt_width = max(p.prompt_length for p in parts)
    response_width = max(p.response_mask.shape[1] for p in parts)

    def widen(x: Tensor, prompt: int, value: int, left: bool = True) -> Tensor:
        pad = (prompt_width - prompt if left else 0, response_width - (x.shape[1] - prompt))
        return torch.nn.functional.pad(x, pad, value=value)

    offsets = [0]
    for p in parts[:-1]:
        offsets.append(offsets[-1] + int(p.prompt_index.max()) + 1)
    return Rollout(
        input_ids=torch.cat([widen(p.input_ids, p.prompt_length, pad_token_id) for p in parts]),
        attention_mask=torch.cat([widen(p.attention_mask, p.prompt_length, 0) for p in parts]),
        response_mask=torch.cat([widen(p.response_mask, 0, 0, left=False) for p in parts]),
        prompt_index=torch.cat([p.prompt_index + o for p, o in zip(parts, offsets, strict=True)]),
        truncated=torch.cat([p.truncated for p in parts]),
        completions=[c for p in parts for c in p.completions],
    )


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
def prompt_lengths(tokenizer: Any, prompts: list[str]) -> list[int]:
    """Tokens in each of ``prompts`` (rendered text), tokenized as generation tokenizes them."""
    return [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def prompts_over(tokenizer: Any, prompts: list[str], limit: int) -> list[tuple[int, int]]:
    """``(index, tokens)`` of each of ``prompts`` over ``limit`` tokens. Only prompts of more than ``limit - 2``
    bytes are tokenized: every token of a byte-level, character-level, WordPiece or SentencePiece tokenizer spans
    at least one byte of text, but for the one word-start marker a SentencePiece tokenizer may add."""
    maybe = [i for i, text in enumerate(prompts) if len(text.encode()) + 2 > limit]
    lengths = prompt_lengths(tokenizer, [prompts[i] for i in maybe]) if maybe else []
    return [(i, n) for i, n in zip(maybe, lengths, strict=True) if n > limit]


def context_limit(model: Any, max_new_tokens: int) -> int | None:
    """The longest prompt that leaves room for ``max_new_tokens`` in the model's context (its
    ``max_position_embeddings``), or None for a model that names no context length."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return None if not context else int(context) - max_new_tokens


def fit_prompts(tokenizer: Any, prompts: list[str], limit: int | None) -> tuple[list[str], int]:
    """``prompts`` with each over ``limit`` tokens cut to its last ``limit`` (the end, where a chat template puts the
    turn to answer, survives, as in TRL), and how many were cut. The cut is made on tokens and decoded back to
    text, then shortened further until it tokenizes within ``limit`` (a byte-level cut may re-tokenize longer)."""
    if limit is None:
        return prompts, 0
    out, over = list(prompts), prompts_over(tokenizer, prompts, limit)
    for i, _ in over:
        ids, keep = tokenizer(prompts[i], add_special_tokens=False)["input_ids"], limit
        while True:
            text = tokenizer.decode(ids[len(ids) - keep :], skip_special_tokens=False)
            if keep <= 1 or prompt_lengths(tokenizer, [text])[0] <= limit:
                break
            keep -= 1
        out[i] = text
    return out, len(over)


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repeats: int = 1,
) -> Rollout:
    """One ``generate`` call over ``prompts`` (rendered text) with the KV cache: greedy at ``temperature=0``,
    sampled otherwise. With ``repeats = n`` each prompt is answered ``n`` times in a row, its prompt run through
    the model once. ``prompt_index`` numbers the prompts, each repeated ``n`` times."""
    if tokenizer.padding_side != "left":
        raise ValueError(
            "generation needs a left-padding tokenizer (tokenizer.padding_side = 'left'), as it appends on the right"
        )
    device = _device_of(model)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    cache = None
    # a model sharded over processes (FSDP2) runs collectives in every forward: every process must make the same
    # calls, so it skips the prompt-sharing prefill (a choice that depends on this process's prompts) and generate
    # keeps every process stepping until all are done
    sharded = _is_sharded(model)
    if repeats > 1 and batch["input_ids"].shape[1] > max_new_tokens and not sharded:
        # prefill each distinct prompt once (all but its last token, which generate runs), then copy the cache
        ids, mask = batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1]
        cache = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True,
                      logits_to_keep=1).past_key_values  # fmt: skip
        cache.batch_repeat_interleave(repeats)
    if repeats > 1:
        batch = {k: v.repeat_interleave(repeats, dim=0) for k, v in batch.items()}
    # top_k=0 overrides any top-k of the model's generation config: at top_p=1 the tokens then come from exactly
    # the tempered distribution whose log-probs the trainer computes
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if temperature > 0
        else {"do_sample": False}
    )
    # past_key_values only when there is one: an explicit None made generate about 17% slower (tiny model)
    prefilled = {} if cache is None else {"past_key_values": cache}
    synced = {"synced_gpus": True} if sharded else {}
    out = model.generate(**batch, **prefilled, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         **sampling, **synced)  # fmt: skip
    responses = out[:, batch["input_ids"].shape[1] :]
    mask = response_mask(responses, tokenizer.eos_token_id)
    ended = (responses == tokenizer.eos_token_id).any(-1)
    return Rollout(
        input_ids=out,
        attention_mask=torch.cat([batch["attention_mask"], mask], dim=1),
        response_mask=mask,
        prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(repeats),
        truncated=~ended & (responses.shape[1] >= max_new_tokens),
        completions=tokenizer.batch_decode(responses, skip_special_tokens=True),
    )


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> tuple[list[str], list[bool]]:
    """Completions of ``prompts`` and, for each, whether it was cut at ``max_new_tokens`` (no end token)."""
    texts, truncated, _ = generate_with_ids(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, top_p)
    return texts, truncated


def generate_with_ids(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int, temperature: float = 0.0,
    top_p: float = 1.0,
) -> tuple[list[str], list[bool], list[list[int]]]:  # fmt: skip
    """:func:`generate`, with each completion's token ids."""
    texts, truncated, ids = [], [], []
    for start in range(0, len(prompts), batch_size):
        rollout = generate_batch(
            model, tokenizer, prompts[start : start + batch_size], max_new_tokens, temperature, top_p
        )
        texts += rollout.completions
        truncated += rollout.truncated.tolist()
        ids += rollout.completion_ids
    return texts, truncated, ids


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
        raise ValueError(f"sample needs temperature > 0 (greedy decoding is generate), got {temperature}")
    return generate_batch(model, tokenizer, prompts, max_new_tokens, temperature, top_p, repeats=n)


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
    logits, hidden = _tail_forward(model, input_ids, attention_mask, response_length, hidden_states)
    # the tail holds positions P - 1 .. L - 1; position P + t - 1 predicts response token t, holds the state before it
    logits = logits[:, :-1].float() / temperature
    targets = input_ids[:, input_ids.shape[1] - response_length :]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logprobs, hidden[:, :-1] if hidden_states else None


def _tail_forward(
    model: Any, input_ids: Tensor, attention_mask: Tensor, response_length: int, hidden_states: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Outputs at the last ``R + 1`` positions (``P - 1 .. L - 1``): logits ``[N, R + 1, V]`` (None for a bare
    trunk) and, with ``hidden_states``, the last layer's states ``[N, R + 1, H]``.

    Rows that share a prompt run it once (see the module docstring); only the output layer at these positions is
    computed, not a vocabulary-sized product over the whole prompt."""
    prefix = input_ids.shape[1] - response_length - 1  # tokens before the tail
    positions = position_ids(attention_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under LoRA adapters
    keep = {"logits_to_keep": response_length + 1} if _takes_logits_to_keep(type(base)) else {}
    shared = None if _is_sharded(model) else _shared_prefixes(input_ids, attention_mask, prefix)
    if shared is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                    output_hidden_states=hidden_states, **keep)  # fmt: skip
    else:
        ids, mask, row_of = shared
        cache = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True,
                      **({"logits_to_keep": 1} if keep else {})).past_key_values  # fmt: skip
        cache.batch_select_indices(row_of)
        out = model(input_ids=input_ids[:, prefix:], attention_mask=attention_mask, position_ids=positions[:, prefix:],
                    past_key_values=cache, use_cache=True, output_hidden_states=hidden_states)  # fmt: skip
    tail = slice(-(response_length + 1), None)
    logits = getattr(out, "logits", None)
    if logits is None:  # a bare trunk: its output is the last layer's hidden states
        return None, out.last_hidden_state[:, tail]
    return logits[:, tail], out.hidden_states[-1][:, tail] if hidden_states else None


def _shared_prefixes(input_ids: Tensor, attention_mask: Tensor, prefix: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """The distinct first ``prefix`` tokens (ids ``[D, prefix]`` and mask) and the one each row has ``[N]``; None
    when no two rows share them, or when the prefix is shorter than the rest: then a separate pass over it costs
    more than it saves (measured on the tiny model, whose prompts are shorter than its answers)."""
    if prefix < max(1, input_ids.shape[1] - prefix):
        return None
    distinct, row_of = _distinct_prefixes(input_ids, attention_mask, prefix)
    if len(distinct) == len(input_ids):
        return None
    return distinct[:, :prefix], distinct[:, prefix:], row_of


def _distinct_prefixes(input_ids: Tensor, attention_mask: Tensor, prefix: int) -> tuple[Tensor, Tensor]:
    """The distinct rows of the first ``prefix`` ids and mask, side by side ``[D, 2 x prefix]``, and the one each
    row has ``[N]``."""
    rows = torch.cat([input_ids[:, :prefix], attention_mask[:, :prefix].to(input_ids.dtype)], dim=1)
    return torch.unique(rows, dim=0, return_inverse=True)


def prompt_groups(input_ids: Tensor, attention_mask: Tensor, response_length: int) -> list[Tensor]:
    """Row indices of each distinct prompt (the first ``L - R`` tokens and their mask), in order of first row."""
    _, row_of = _distinct_prefixes(input_ids, attention_mask, input_ids.shape[1] - response_length)
    groups: dict[int, list[int]] = {}
    for row, key in enumerate(row_of.tolist()):
        groups.setdefault(key, []).append(row)
    return [torch.tensor(g) for g in groups.values()]


def forward_positions(input_ids: Tensor, attention_mask: Tensor, response_length: int) -> int:
    """Token positions one :func:`response_forward` over this batch runs through the model, padding included:
    each distinct prompt once, then ``R + 1`` positions per row (all ``N x L`` when no rows share a prompt)."""
    n, length = input_ids.shape
    prefix = length - response_length - 1
    shared = _shared_prefixes(input_ids, attention_mask, prefix)
    return n * length if shared is None else shared[0].numel() + n * (response_length + 1)


def _device_of(model: Any) -> torch.device:
    """Where ``model``'s weights are (the CPU for anything without parameters, e.g. a stand-in with ``generate``)."""
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


def _is_sharded(model: Any) -> bool:
    """Whether ``model`` is sharded with FSDP2 (its forwards are collectives every process must run)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(model, FSDPModule)


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


def trunk_hidden(
    trunk: Any, input_ids: Tensor, attention_mask: Tensor, response_length: int, states: Tensor | None = None
) -> Tensor:
    """``[N, R, H]`` hidden states of a bare transformer trunk (a separate critic backbone) at the states before
    each of the last ``response_length`` tokens: the same positions as :func:`response_forward`. A trunk split
    into frozen and trained layers (:class:`~dfpo.generation.trunk.SplitTrunk`) runs its top layers on ``states``
    ``[N, T, H]``, its lower layers' output saved while scoring (computed here when not given)."""
    if hasattr(trunk, "lower"):
        states = trunk.lower(input_ids, attention_mask, response_length) if states is None else states
        return trunk(states, input_ids, attention_mask, response_length)[:, :-1]
    return _tail_forward(trunk, input_ids, attention_mask, response_length, True)[1][:, :-1]
