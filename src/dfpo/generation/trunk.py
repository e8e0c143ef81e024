"""A separate critic trunk that trains only its top layers (``critic.trunk_layers``).

A separate critic trunk learns the value where a head on the policy's features does not, but each of its extra
gradient steps runs the whole model forward and backward again. With only the top ``n`` layers trainable, the
layers below are a fixed function of the tokens: :meth:`SplitTrunk.lower` runs them once per training step, while
scoring, and every critic step after that runs only the top layers on those saved states (the embeddings and the
lower layers are frozen; their states are kept for the step's sequences, ``[N, T, H]``).

The split works for decoder stacks whose base model takes ``inputs_embeds`` as the first layer's input unchanged
(Llama, SmolLM2, Qwen2, Mistral); :func:`split_trunk` checks that the two halves give the whole model's states and
refuses a model whose forward changes them (one that scales its embeddings, say)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from dfpo.generation.rollout import position_ids


class SplitTrunk(nn.Module):
    """A bare transformer trunk cut after layer ``cut``: ``lower`` (embeddings and layers ``0 .. cut - 1``, frozen)
    and ``upper`` (layers ``cut ..`` and the final norm, trained)."""

    def __init__(self, lower: nn.Module, upper: nn.Module, cut: int) -> None:
        super().__init__()
        self.lower_part, self.upper, self.cut = lower, upper, cut
        for p in self.lower_part.parameters():
            p.requires_grad_(False)

    @property
    def config(self) -> Any:
        return self.upper.config

    @torch.no_grad()
    def lower(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[N, T, H]`` states after the frozen layers, at every position."""
        out = self.lower_part(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids(attention_mask), use_cache=False)  # fmt: skip
        return out.last_hidden_state

    def forward(self, states: Tensor, attention_mask: Tensor) -> Tensor:
        """``[N, T, H]`` last-layer states (after the final norm) from ``states`` of :meth:`lower`."""
        out = self.upper(inputs_embeds=states, attention_mask=attention_mask,
                         position_ids=position_ids(attention_mask), use_cache=False)  # fmt: skip
        return out.last_hidden_state


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
    lower = copy.copy(trunk)  # a shallow copy: the two halves share the embeddings' and layers' modules
    lower._modules = dict(trunk._modules)
    lower.layers = nn.ModuleList(layers[:cut])
    lower.norm = nn.Identity()  # the final norm belongs to the top
    upper = copy.copy(trunk)
    upper._modules = dict(trunk._modules)
    upper.layers = nn.ModuleList(layers[cut:])
    upper.embed_tokens = None  # the top reads the lower layers' states, never token ids
    split = SplitTrunk(lower, upper, cut)
    _check_split(trunk, split)
    return split


@torch.no_grad()
def _check_split(trunk: nn.Module, split: SplitTrunk) -> None:
    ids = torch.arange(1, 9).remainder(trunk.config.vocab_size)[None].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    device = next(trunk.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    whole = trunk(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    parts = split(split.lower(ids, mask), mask)
    keep = mask.bool()
    if not torch.allclose(whole.last_hidden_state[keep], parts[keep], atol=1e-4, rtol=1e-4):
        raise ValueError(f"{type(trunk).__name__}'s forward changes the states it is given between layers")
