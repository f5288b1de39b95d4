"""RePlaid-JAX: likelihood-trained continuous diffusion language models."""

__version__ = "0.1.0"
