"""Generation: batched sampling and greedy decoding with the KV cache (:mod:`~dfpo.generation.rollout`), the
token-level helpers the trainer scores rollouts with, and the optional colocated vLLM engine
(:mod:`~dfpo.generation.vllm_engine`). Depends on models and torch only, never on tasks' scoring or training."""
