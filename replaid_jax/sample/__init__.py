"""Sampling from trained checkpoints: the `sample` config section, prompts, quality figures, the CLI."""
