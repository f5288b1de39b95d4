"""Test setup: 8 fake CPU devices (set before jax is imported) and tiny shared configs."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Identical programs (the same tiny train step in several tests, workers and subprocesses) compile once:
# XLA's persistent cache is keyed by the program and the jax version, so sharing it changes no result.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    __import__("tempfile").gettempdir(), f"replaid-jax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Trained tokenizers are cached per corpus and settings; tests share one cache of their own, not the user's.
os.environ.setdefault("REPLAID_JAX_TOKENIZER_CACHE", os.path.join(
    __import__("tempfile").gettempdir(), f"replaid-jax-tests-tokenizers-{os.getuid()}"))

import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from replaid_jax.diffusion import elbo  # pylint: disable=g-import-not-at-top,wrong-import-position
from replaid_jax.models import model as model_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_threefry_partitionable", True)

TINY_MODEL = model_lib.ModelConfig(
    vocab_size=24, embed_dim=4, width=32, num_layers=2, num_heads=2, mlp_ratio=2, cond_dim=16, cond_freqs=8,
    cond_input="gamma", max_seq_len=32, rope_base=10000.0, compute_dtype="float32", causal=False,
    output_bias_init="zeros", schedule_hidden=32, remat=False, block="dit", remat_policy="full", head_init_scale=0.0,
    gate_init=0.0, input_posterior=False, attention_bias="none",
)
TINY_DIFFUSION = elbo.DiffusionConfig(
    gamma_0=-3.0, gamma_1=6.0, schedule="learned", learn_bounds=True, selfcond_fraction=0.25, output_prior=True,
    output_prior_warmup_steps=0, recon_split="adaptive", recon_fraction=0.125, loss_stats_decay=0.997,
    learn_embeddings=True, aux_ce_weight=0.0, mdlm_train_loss="low_var", antithetic_noise=False,
)


def npy_cli_args(directory) -> list[str]:
  """Writes a small random .npy train/val token stream (vocabulary 40) and returns the train.py flags reading it."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  np.save(directory / "train.npy", rng.integers(0, 40, 5000, dtype=np.int32))
  np.save(directory / "val.npy", rng.integers(0, 40, 600, dtype=np.int32))
  return ["--config.data.source=npy", f"--config.data.train_files={directory / 'train.npy'}",
          f"--config.data.val_files={directory / 'val.npy'}", "--config.data.npy_vocab_size=40",
          "--config.data.val_plays=", "--config.eval.num_samples=0", "--config.eval.final_num_times=0"]


def read_events(path):
  """The Event records of a TensorBoard event file (TFRecord framing: length, its CRC, payload, its CRC)."""
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  data, events, pos = path.read_bytes(), [], 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
    pos += 12 + length + 4
  return events


def perturbed_params(key, model_cfg=TINY_MODEL, scale=0.3):
  """Init params with every zero-initialised weight made non-zero, so every path carries signal."""
  params, _ = model_lib.init(key, model_cfg, gamma_0=-3.0, gamma_1=6.0)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape) if x.ndim else x for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


@pytest.fixture(scope="session")
def tiny_model():
  return TINY_MODEL


@pytest.fixture(scope="session")
def tiny_diffusion():
  return TINY_DIFFUSION


def replace(cfg, **kw):
  return dataclasses.replace(cfg, **kw)
