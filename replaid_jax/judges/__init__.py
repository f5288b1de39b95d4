"""Judges: autoregressive models that score generated text (generative perplexity)."""
