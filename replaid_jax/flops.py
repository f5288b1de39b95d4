"""FLOP accounting: analytic counts, XLA's count of a compiled step, a measured matmul peak."""

import time

import jax
import jax.numpy as jnp
import numpy as np


def forward_flops_per_sequence(*, seq_len: int, width: int, num_layers: int, vocab_size: int, embed_dim: int,
                               mlp_ratio: int = 4, output_prior: bool = True, token_input: bool = False,
                               include_attention: bool = True, input_posterior: bool = False) -> float:
  """Matmul FLOPs (2 per multiply-add) of one denoiser forward pass over one sequence.

  Blocks: QKV, attention scores and values (full L x L, also when causal, as
  the kernel computes them), attention output and the MLP. Input/output: the
  d_e -> D input and self-conditioning projections, the D -> V head, and for
  RePlaid the output prior z.E^T and x_hat = p.E (`token_input` models look
  their input up in a table, which costs no FLOPs, and have neither).
  `input_posterior` adds the V -> D embedding of each position's posterior
  (and z.E^T when there is no output prior to share it with).

  `include_attention=False` drops the L x L score and value products: the
  scaling protocol's size table (configs/flops in scaling-dllms, measured with
  an uncompiled flex-attention that the counter does not see) matches that
  count, e.g. 66M at L = 2048: 2.852e11 here against 2.858e11 in the table.
  """
  L, D, V, E = seq_len, width, vocab_size, embed_dim
  attention = 2 * 2 * L * L * D if include_attention else 0
  per_block = 2 * L * D * 3 * D + attention + 2 * L * D * D + 2 * 2 * L * D * mlp_ratio * D
  if token_input:
    io = 2 * L * D * V
  else:
    io = 2 * 2 * L * E * D + 2 * L * D * V + 2 * L * V * E * (2 if output_prior else 1)
    if input_posterior:
      io += 2 * L * V * D + (0 if output_prior else 2 * L * V * E)
  return float(num_layers * per_block + io)


def config_forward_flops(c, *, token_input: bool) -> float:
  """`forward_flops_per_sequence` for a converted `config_lib.Config` (model.vocab_size must be set) and an
  objective whose network reads noisy embeddings or (`token_input`) token ids."""
  return forward_flops_per_sequence(
      seq_len=c.data.seq_len, width=c.model.width, num_layers=c.model.num_layers, vocab_size=c.model.vocab_size,
      embed_dim=c.model.embed_dim, mlp_ratio=c.model.mlp_ratio, output_prior=c.diffusion.output_prior,
      token_input=token_input, input_posterior=c.model.input_posterior)


def steps_for_budget(budget_flops: float, fwd_per_seq: float, batch: int) -> int:
  """Optimizer steps that spend `budget_flops` at 3 F_fwd B per step (the scaling protocol), at least 1."""
  return max(int(budget_flops // (3.0 * fwd_per_seq * batch)), 1)


def train_flops_per_step(fwd_per_seq: float, *, batch: int, selfcond_fraction: float) -> tuple[float, float]:
  """(with, without) the self-conditioning pass: 3 F B, plus F B f for the no-grad first pass."""
  base = 3.0 * fwd_per_seq * batch
  return base + fwd_per_seq * batch * selfcond_fraction, base


def compiled_flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled computation, if the backend reports one."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def xla_forward_flops(objective, params, seq_len: int) -> float | None:
  """XLA's FLOP count of one forward pass over one sequence, compiled with the blocks unrolled.

  (A `lax.scan` body is counted once by XLA's cost analysis, so the training
  step's own count misses all blocks but one.) Unlike the analytic count it
  includes elementwise work: norms, softmaxes, activations, RoPE.
  """
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  compiled = jax.jit(lambda p, x: objective.forward(p, x, unroll=True)).lower(abstract, tokens).compile()
  return compiled_flops(compiled)


def measure_matmul_flops(n: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
  """Median FLOP/s of an n x n matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2.0 * n**3 / float(np.median(times))
