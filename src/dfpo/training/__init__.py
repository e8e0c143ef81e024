"""``dfpo train``: the trainer, its configuration, the algorithm presets, checkpoints and reports."""
