"""Tasks: prompts, strict answer extraction, verifiers and noisy supervision."""
