"""A separate critic trunk that trains only its top layers (``critic.trunk_layers``).

A separate critic trunk learns the value where a head on the policy's features does not, but each of its extra
gradient steps runs the whole model forward and backward again. With only the top ``n`` layers trainable, the
layers below are a fixed function of the tokens: :meth:`SplitTrunk.lower` runs them once per training step, while
scoring, and every critic step after that runs only the top layers on those saved states (the embeddings and the
lower layers are frozen; their states are kept for the step's sequences, ``[N, T, H]``).

The split works for decoder stacks whose base model takes ``inputs_embeds`` as the first layer's input unchanged
(Llama, SmolLM2, Qwen2, Mistral); :func:`split_trunk` checks that the two halves give the whole model's states and
refuses a model whose forward changes them before its first layer (one that rescales the embedding module's
output inside the forward, say)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from dfpo.generation import rollout
from dfpo.generation.rollout import position_ids


class SplitTrunk(nn.Module):
    """A bare transformer trunk cut after layer ``cut``: ``lower_part`` (embeddings and layers ``0 .. cut - 1``,
    frozen) and ``upper`` (layers ``cut ..`` and the final norm, trained). Both halves run the rows that share a
    prompt through it once (as :func:`~dfpo.generation.rollout.response_forward` does), then each row's tail."""

    def __init__(self, lower: nn.Module, upper: nn.Module, cut: int) -> None:
        super().__init__()
        self.lower_part, self.upper, self.cut = lower, upper, cut
        for p in self.lower_part.parameters():
            p.requires_grad_(False)

    @property
    def config(self) -> Any:
        return self.upper.config

    @torch.no_grad()
    def lower(self, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
        """``[N, L, H]`` states after the frozen layers, at every position."""
        return _shared_forward(self.lower_part, input_ids, attention_mask, response_length, None)

    def forward(self, states: Tensor, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
        """``[N, R + 1, H]`` last-layer states (after the final norm) at the last ``R + 1`` positions, from
        ``states [N, L, H]`` of :meth:`lower`; ``input_ids`` only tell which rows share a prompt."""
        out = _shared_forward(self.upper, input_ids, attention_mask, response_length, states)
        return out[:, -(response_length + 1) :]


def _shared_forward(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_length: int, states: Tensor | None
) -> Tensor:
    """``model``'s last hidden states ``[N, T, H]`` on ``input_ids``, or on ``states`` in place of the embeddings,
    each distinct prompt once and its key-value cache reused by the rows that share it (``T = L``; on ``states``
    with shared prompts only the last ``R + 1`` positions, all that the top half is asked for)."""
    prefix = input_ids.shape[1] - response_length - 1
    positions = position_ids(attention_mask)
    shared = rollout._shared_prefixes(input_ids, attention_mask, prefix)

    def given(rows: Tensor | None, columns: slice) -> dict[str, Tensor]:
        source = input_ids if states is None else states
        picked = source[:, columns] if rows is None else source[rows, columns]
        return {"input_ids": picked} if states is None else {"inputs_embeds": picked}

    if shared is None:
        return model(**given(None, slice(None)), attention_mask=attention_mask, position_ids=positions,
                     use_cache=False).last_hidden_state  # fmt: skip
    _, mask, row_of = shared
    first = torch.stack([(row_of == d).nonzero()[0, 0] for d in range(len(mask))])  # one row of each prompt
    head = model(**given(first, slice(None, prefix)), attention_mask=mask, position_ids=position_ids(mask),
                 use_cache=True)  # fmt: skip
    cache = head.past_key_values
    cache.batch_select_indices(row_of)
    tail = model(**given(None, slice(prefix, None)), attention_mask=attention_mask, position_ids=positions[:, prefix:],
                 past_key_values=cache, use_cache=True).last_hidden_state  # fmt: skip
    return tail if states is not None else torch.cat([head.last_hidden_state[row_of], tail], dim=1)


def split_trunk(trunk: nn.Module, trainable_layers: int) -> SplitTrunk:
    """``trunk`` (a bare Hugging Face decoder, e.g. ``LlamaModel``) with only its top ``trainable_layers`` layers
    trainable. Raises ``ValueError`` when the model has no ``layers`` list, too few layers, or a forward that the
    split would change."""
    layers = getattr(trunk, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(trunk, "norm"):
        raise ValueError(f"{type(trunk).__name__} has no list of decoder layers to split")
    if not 1 <= trainable_layers <= len(layers):
        raise ValueError(f"the model has {len(layers)} layers: train between 1 and {len(layers)} of them")
    cut = len(layers) - trainable_layers
    lower = _half(trunk, slice(None, cut))
    lower.norm = nn.Identity()  # the final norm belongs to the top
    upper = _half(trunk, slice(cut, None))
    upper.embed_tokens = None  # the top reads the lower layers' states, never token ids
    split = SplitTrunk(lower, upper, cut)
    _check_split(trunk, split)
    return split


def _half(trunk: nn.Module, layers: slice) -> nn.Module:
    """A shallow copy of ``trunk`` (its modules shared, not copied) with only ``layers``, numbered from 0, and a
    config of that many layers: a key-value cache of the half holds its own layers from index 0."""
    half = copy.copy(trunk)
    half._modules = dict(trunk._modules)
    half.layers = nn.ModuleList(trunk.layers[layers])
    config = copy.deepcopy(trunk.config)
    config.num_hidden_layers = len(half.layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[layers]
    half.config = config
    for index, layer in enumerate(half.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    return half


@torch.no_grad()
def _check_split(trunk: nn.Module, split: SplitTrunk) -> None:
    ids = torch.arange(1, 9).remainder(trunk.config.vocab_size)[None].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    device = next(trunk.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    whole = trunk(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    parts = split(split.lower(ids, mask, 7), ids, mask, 7)
    keep = mask.bool()
    if not torch.allclose(whole.last_hidden_state[keep], parts[keep], atol=1e-4, rtol=1e-4):
        raise ValueError(f"{type(trunk).__name__}'s forward changes the states it is given between layers")
