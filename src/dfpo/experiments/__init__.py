"""Experiments that measure what the components are for: critics fitted in the trainer's regime, critic learning
on tasks whose value is known."""
