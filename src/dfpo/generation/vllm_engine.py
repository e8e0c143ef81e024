"""An optional vLLM rollout engine (``rollout.engine=vllm``): sampling on GPUs with vLLM, scoring with the policy.

vLLM samples the step's responses from its own copy of the policy, in the same process (colocated: with several
processes each runs its own vLLM instance, ``distributed_executor_backend="external_launcher"``), and the trainer
scores them with the policy itself, so the log-probs and the losses are those of the policy that learns, whatever
vLLM's numerics. After every update the policy's weights are loaded into vLLM (:meth:`VLLMEngine.sync`).

Needs a CUDA GPU and ``pip install '.[vllm]'``; it is import-guarded, and not exercised on CPU machines (the
conversion of vLLM's outputs into a :class:`~dfpo.generation.rollout.Rollout` is: :func:`rollout_from_tokens`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from dfpo.generation.rollout import Rollout, response_mask


def rollout_from_tokens(
    prompts: list[list[int]],
    responses: list[list[int]],
    truncated: list[bool],
    repeats: int,
    eos_token_id: int,
    pad_token_id: int,
    completions: list[str],
    device: torch.device | str = "cpu",
) -> Rollout:
    """A :class:`Rollout` from token ids: ``prompts[i]`` answered by ``responses[i * repeats + j]``, ``j < repeats``;
    prompts left-padded, responses right-padded (the layout :func:`dfpo.generation.rollout.generate_batch` returns)."""
    if len(responses) != len(prompts) * repeats or len(truncated) != len(responses):
        raise ValueError(f"{len(prompts)} prompts x {repeats} need as many responses, got {len(responses)}")
    width_p = max(len(p) for p in prompts)
    width_r = max(1, max(len(r) for r in responses))
    rows, attention = [], []
    for i, response in enumerate(responses):
        prompt = prompts[i // repeats]
        left, right = width_p - len(prompt), width_r - len(response)
        rows.append([pad_token_id] * left + prompt + response + [pad_token_id] * right)
        attention.append([0] * left + [1] * len(prompt))
    ids = torch.tensor(rows, dtype=torch.long, device=device)
    mask = response_mask(ids[:, width_p:], eos_token_id)
    prompt_mask = torch.tensor(attention, dtype=mask.dtype, device=device)
    return Rollout(
        input_ids=ids,
        attention_mask=torch.cat([prompt_mask, mask], dim=1),
        response_mask=mask,
        prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(repeats),
        truncated=torch.tensor(truncated, device=device),
        completions=completions,
    )


class VLLMEngine:
    """Samples rollouts with vLLM from ``folder`` (the starting policy's weights); :meth:`sync` loads new ones."""

    def __init__(self, folder: str, tokenizer: Any, memory: float, distributed: bool, seed: int) -> None:
        try:
            from vllm import LLM
        except ImportError:
            raise ImportError(
                "rollout.engine=vllm needs vLLM on a CUDA machine: pip install '.[vllm]' (or use rollout.engine=hf)"
            ) from None
        options = {"distributed_executor_backend": "external_launcher"} if distributed else {}
        self.tokenizer = tokenizer
        self.llm = LLM(model=folder, tokenizer=folder, dtype="bfloat16", gpu_memory_utilization=memory, seed=seed,
                       enable_prefix_caching=True, **options)  # fmt: skip

    def sample(
        self, prompts: list[str], n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> Rollout:
        """``n`` responses to each prompt (rendered text, tokenized as the trainer does), from the stream ``seed``."""
        from vllm import SamplingParams

        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=-1, max_tokens=max_new_tokens,
                                seed=seed, skip_special_tokens=True)  # fmt: skip
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        samples = [s for out in outputs for s in out.outputs]
        eos = self.tokenizer.eos_token_id
        tokens = []
        for s in samples:
            t = list(s.token_ids)
            if s.finish_reason == "stop" and getattr(s, "stop_reason", None) is None and (not t or t[-1] != eos):
                t.append(eos)  # stopped at the end token: keep it, so that the policy learns to end there
            tokens.append(t)
        return rollout_from_tokens(
            ids, tokens, [s.finish_reason == "length" for s in samples], n,
            eos, self.tokenizer.pad_token_id, [s.text for s in samples],
            device="cuda" if torch.cuda.is_available() else "cpu",
        )  # fmt: skip

    def sync(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the policy's ``(name, tensor)`` weights (Hugging Face names) into vLLM's model."""
        weights = list(weights)
        if hasattr(self.llm, "apply_model"):
            self.llm.apply_model(lambda model: model.load_weights(weights))
            return
        try:
            model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError:
            raise RuntimeError(
                "this vLLM version offers neither LLM.apply_model nor the driver worker's model: install the "
                "version pinned in pyproject.toml's vllm extra"
            ) from None
        model.load_weights(weights)
