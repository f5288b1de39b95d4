"""Learning-curve studies of how fast a model leaves the unigram plateau, and a fixed-level probe.

`train_curve` trains one config in-process on a corpus that is already in
memory (no checkpoints, no tokenizer work) and measures the validation bound
at chosen steps on a fixed subset with common random numbers, so that runs of
different variants at the same seed are paired; optionally with the
per-noise-level diagnostic of `replaid_jax.eval.diagnostics`.
`fixed_level_probe` trains the denoiser alone at one noise level.
`gradient_noise_scale` measures how noisy a step's gradient is against the
gradient itself (McCandlish et al.'s simple noise scale, the batch size at
which the two are equal), so that objectives can be compared by how far a
batch is from its critical size.
"""

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from replaid_jax import config_lib
from replaid_jax.data import pipeline
from replaid_jax.diffusion import elbo
from replaid_jax.diffusion import sampler
from replaid_jax.diffusion import time_sampling
from replaid_jax.eval import bound as bound_lib
from replaid_jax.eval import diagnostics
from replaid_jax.models import denoiser as denoiser_lib
from replaid_jax.models import embedding
from replaid_jax.models import model as model_lib
from replaid_jax.models import noise_schedule
from replaid_jax.train import step as step_lib


@dataclasses.dataclass
class CurvePoint:
  step: int
  bound: float
  stderr: float
  seconds: float
  train: dict


def train_curve(cd: ml_collections.ConfigDict, corpus: pipeline.Corpus, *, eval_steps: Sequence[int],
                eval_rows: int = 256, eval_times: int = 2, eval_seed: int = 1234,
                on_point: Callable[[CurvePoint], None] | None = None,
                diagnostics_at: Sequence[int] = (), chunk: int = 25, noise_batches: int = 0,
                time_bins: int = 0) -> dict[str, Any]:
  """Trains `cd` for max(eval_steps) steps on one device and returns its bound at each eval step.

  The bound is the objective's own per-sequence estimator on the first
  `eval_rows` validation rows with K = `eval_times` and a fixed key
  (`eval_seed`): the same draws for every run, so differences between variants
  are paired. Training metrics are averaged over the steps since the last point.
  With `noise_batches` = M > 1, each point also has the gradient noise scale of
  the training estimator (`gradient_noise_scale`, M batches of the training
  batch size from a fixed set of training rows) under "noise/...", and under
  "noise_draws/..." the same with one batch of rows repeated M times: the part
  of the noise that comes from the estimator's own draws (times, Gaussians,
  row roles) rather than from the data; "noise_eps/..." and "noise_times/..."
  split those draws into the Gaussians (masks, for MDLM and Duo) alone and the
  times and row roles alone; "noise_shuffled/..." is that batch's sequences in
  a fresh order in every batch, so that which sequence sits in which lattice
  cell is drawn too: the whole noise less the part of which sequences are drawn.
  With `time_bins` > 0, each point of a RePlaid run (other objectives skip it) also has `noise_by_time` on one
  batch of training rows (2 draws each): its factors under "time/..." and the per-cell profile under the
  result's "noise_by_time"."""
  c, run = _build_one_device(cd, corpus, eval_steps)
  steps_fn = _multi_step_fn(run, c)
  base_key = jax.random.key(c.seed)
  it = pipeline.train_iterator(corpus.train, global_batch=c.train.batch_size, seed=c.seed, process_index=0,
                               process_count=1, num_workers=0)
  curve = _Curve(run, c, corpus, eval_rows=eval_rows, eval_times=eval_times, eval_seed=eval_seed, on_point=on_point,
                 noise_batches=noise_batches, time_bins=time_bins)
  state = run.state
  acc, n_acc = {}, 0
  targets = sorted(set(eval_steps))
  step = 0
  while step < targets[-1]:
    nxt = min(t for t in (*targets, *diagnostics_at) if t > step)  # targets[-1] > step bounds this
    n = min(nxt - step, chunk)
    batches = jnp.asarray(np.stack([next(it)["tokens"] for _ in range(n)]), jnp.int32)
    state, m = steps_fn(state, batches, base_key)
    _accumulate(acc, jax.device_get(m))
    n_acc += n
    step += n
    if step in targets:
      curve.add_point(step, state, acc, n_acc)
      acc, n_acc = {}, 0
    if step in diagnostics_at and run.objective.learned_embeddings:
      curve.add_diagnostics(step, state)
  return curve.result()


def _build_one_device(cd: ml_collections.ConfigDict, corpus: pipeline.Corpus,
                      eval_steps: Sequence[int]) -> tuple[config_lib.Config, Any]:
  """The validated config of `cd` on a (1, 1, 1) mesh for max(eval_steps) steps, and its run built on one device."""
  from replaid_jax.train import build as build_lib  # late import: train/ imports this package's siblings

  cd = ml_collections.ConfigDict(cd.to_dict())
  cd.mesh.shape = (1, 1, 1)
  cd.train.num_steps = max(eval_steps)
  c = build_lib.resolve_vocab(config_lib.from_config_dict(cd), corpus)
  run = build_lib.build(c, corpus, devices=jax.devices()[:1])
  return c, run


def _multi_step_fn(run: Any, c: config_lib.Config) -> Callable[..., Any]:
  """A jitted (state, batches [N, B, L], key) -> (state, metrics [N]) that applies N train steps (donating state)."""
  one_step = functools.partial(step_lib.train_step, tx=run.tx, objective=run.objective,
                               grad_accum_steps=c.train.grad_accum_steps, ema_decay=c.optim.ema_decay,
                               draws_per_sequence=c.train.draws_per_sequence)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def steps_fn(state, batches, key):
    # Several optimizer steps per call: on a CPU, tiny models are bound by per-call overhead.
    return jax.lax.scan(lambda s, b: one_step(s, b, key), state, batches)

  return steps_fn


def _accumulate(acc: dict[str, float], m: dict[str, Any]) -> None:
  """Adds the per-step training metrics `m` (one value per step of a chunk) to the sums in `acc`."""
  for k, v in m.items():
    if np.ndim(v) == 1:
      acc[k] = acc.get(k, 0.0) + float(np.sum(v))


class _Curve:
  """The measurements of `train_curve`: its points, its per-noise-level diagnostics and its time since setup."""

  def __init__(self, run: Any, c: config_lib.Config, corpus: pipeline.Corpus, *, eval_rows: int, eval_times: int,
               eval_seed: int, on_point: Callable[[CurvePoint], None] | None, noise_batches: int = 0,
               time_bins: int = 0):
    self.run, self.c, self.eval_seed, self.on_point = run, c, eval_seed, on_point
    # The profile along t is RePlaid's (Gaussian noise at a continuous time); other objectives skip it.
    self.time_bins, self.noise_by_time = (time_bins if run.objective.learned_embeddings else 0), {}
    if self.time_bins:
      pick = np.random.default_rng(eval_seed + 5).choice(corpus.train.shape[0], c.train.batch_size, replace=False)
      self.time_rows = jnp.asarray(corpus.train[pick], jnp.int32)
    self.noise_rows = None
    if noise_batches:
      if noise_batches < 2:
        raise ValueError(f"the gradient noise scale needs at least 2 batches, got noise_batches={noise_batches}")
      b = c.train.batch_size
      pick = np.random.default_rng(eval_seed + 2).choice(corpus.train.shape[0], noise_batches * b, replace=False)
      self.noise_rows = jnp.asarray(corpus.train[pick].reshape(noise_batches, b, -1), jnp.int32)
      self.shuffled_rows = shuffled_batches(self.noise_rows[0], noise_batches, np.random.default_rng(eval_seed + 4))
    self.bound_fn = bound_lib.make_bound_fn(run.objective, num_times=eval_times)
    self.val = corpus.val[:eval_rows]
    self.eval_key = jax.random.key(eval_seed)
    self.log_unigram = bound_lib.log_unigram(corpus.unigram_counts)
    self.unigram = bound_lib.unigram_cross_entropy(corpus.unigram_counts, self.val)
    self.points: list[CurvePoint] = []
    self.diagnostics: dict[int, Any] = {}
    self.t0 = time.time()

  def add_point(self, step: int, state: step_lib.TrainState, acc: dict[str, float], n_acc: int) -> None:
    """Measures the bound of the EMA parameters; the training metrics are the sums in `acc` over `n_acc` steps."""
    res = bound_lib.evaluate(self.bound_fn, state.ema_params, self.val, self.eval_key,
                             batch_size=min(64, len(self.val)))
    train = {k: v / n_acc for k, v in acc.items()}
    if self.run.objective.learned_embeddings:
      train.update(diagnostics.embedding_separation(jax.device_get(state.params)))
    if self.noise_rows is not None:
      # Fresh rows in every batch (the whole noise), then one batch of rows M times (the noise of the estimator's
      # own draws, times and Gaussians, given the data and which row holds which sequence), then that with only
      # the Gaussians (or masks) drawn afresh, and with only the times and row roles; and the one batch's
      # sequences in a fresh order in every batch with fresh draws (the draws' noise with the pairing of
      # sequences and lattice cells drawn too: the whole noise less that of which sequences are in the batch).
      same = jnp.broadcast_to(self.noise_rows[:1], self.noise_rows.shape)
      for label, rows, fixed in (("noise", self.noise_rows, ()), ("noise_draws", same, ()),
                                 ("noise_eps", same, ("setup",)), ("noise_times", same, ("noise",)),
                                 ("noise_shuffled", self.shuffled_rows, ())):
        noise = gradient_noise_scale(self.run, state, rows, jax.random.key(self.eval_seed + 3), fixed=fixed)
        train.update({f"{label}/{k}_{group}": v for group, est in noise.items() for k, v in est.items()})
    if self.time_bins:
      prof = noise_by_time(self.run, state, self.time_rows, jax.random.key(self.eval_seed + 6), bins=self.time_bins)
      self.noise_by_time[step] = prof
      train.update({f"time/{k}": v for k, v in prof.items() if k.startswith("gain_")})
    point = CurvePoint(step, res["nats_per_token"], res["stderr"], time.time() - self.t0, train)
    self.points.append(point)
    if self.on_point:
      self.on_point(point)

  def add_diagnostics(self, step: int, state: step_lib.TrainState) -> None:
    """The denoiser's gain over the context-free one by noise level, on the first 64 validation rows."""
    self.diagnostics[step] = diagnostics.denoiser_gain_by_level(
        jax.device_get(state.ema_params), self.val[:64], self.log_unigram, jax.random.key(self.eval_seed + 1),
        model_cfg=self.c.model, schedule=self.c.diffusion.schedule)

  def result(self) -> dict[str, Any]:
    return {"unigram": self.unigram, "points": [dataclasses.asdict(p) for p in self.points],
            "diagnostics": self.diagnostics, "noise_by_time": self.noise_by_time, "seconds": time.time() - self.t0}


def shuffled_batches(rows_BL: jax.Array, m: int, rng: np.random.Generator) -> jax.Array:
  """[m, B, L]: the B rows in m independent random orders (the first in the given order)."""
  b = rows_BL.shape[0]
  order = np.stack([np.arange(b)] + [rng.permutation(b) for _ in range(m - 1)])
  return jnp.asarray(rows_BL)[order]


def noise_scale_estimates(sq_norms_M: np.ndarray, sq_norm_mean: float, batch: int) -> dict[str, float]:
  """McCandlish et al.'s unbiased estimates from M independent gradient estimates G_i of batch size b.

  `sq_norms_M` holds |G_i|^2 and `sq_norm_mean` |mean_i G_i|^2 (an estimate at batch M b). With
  E|G_B|^2 = |G|^2 + tr(S)/B for the per-example covariance S:
    |G|^2 ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small),
    tr(S) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big),
  and the simple noise scale B_simple = tr(S) / |G|^2, the batch size at which the gradient's noise and its
  squared norm are equal. Each estimate is unbiased; their ratio is not, and |G|^2 can come out negative when
  the noise dominates (then B_simple is reported as inf).
  """
  m = len(sq_norms_M)
  small, big = batch, m * batch
  g_small = float(np.mean(sq_norms_M))
  grad_sq = (big * sq_norm_mean - small * g_small) / (big - small)
  trace = (g_small - sq_norm_mean) / (1.0 / small - 1.0 / big)
  return {"grad_sq": grad_sq, "trace": trace, "b_simple": trace / grad_sq if grad_sq > 0 else float("inf")}


NOISE_PARTS = ("setup", "noise")  # the two keys of a training step's draws: times and row roles; Gaussians or masks


@functools.partial(jax.jit, static_argnames=("objective", "groups", "fixed", "draws"))
def _batch_grads(objective, groups, state, rows_MBL, key, fixed=(), draws=1):
  """The objective's training gradient of each batch in rows_MBL [M, B, L] (tiled `draws` times, as the training
  step tiles it), each with its own setup and noise.

  A part named in `fixed` ("setup", "noise") is drawn with batch 0's key for every batch instead.
  """
  def one(i):
    k_setup, _ = jax.random.split(jax.random.fold_in(key, 0 if "setup" in fixed else i))
    _, k_noise = jax.random.split(jax.random.fold_in(key, 0 if "noise" in fixed else i))
    rows = jnp.tile(rows_MBL[i], (draws, 1))
    setup = objective.setup(state, rows.shape[0], k_setup)
    _, _, g = objective.loss_and_grads(state.params, rows, setup, k_noise)
    return {name: g[name] for name in groups if name in g}
  return jax.lax.map(one, jnp.arange(rows_MBL.shape[0]))


def gradient_noise_scale(run: Any, state: step_lib.TrainState, rows_MBL: jax.Array, key: jax.Array,
                         groups: Sequence[str] = ("denoiser", "embedding"),
                         fixed: Sequence[str] = ()) -> dict[str, dict[str, float]]:
  """The simple noise scale of the training gradient at `state`, per parameter group and over `groups` together.

  Each of the M batches in `rows_MBL` [M, B, L] gets its own draw of the objective's per-step setup (times, row
  roles) and noise, exactly as a training step would, so the noise measured is the estimator's whole noise: the
  data, the times and the Gaussian draws. The schedule's and the bounds' gradients follow other rules
  (the schedule minimises the estimator's variance), so they are left out by default.
  With `fixed` (a subset of NOISE_PARTS) those draws are shared by the M batches: on one batch of rows
  repeated, fixing "setup" leaves the noise of the Gaussians (RePlaid) or masks (MDLM, Duo) alone, fixing
  "noise" that of the times and row roles.
  With `train.draws_per_sequence` K > 1 each batch is tiled K times, as the step tiles it, and the estimates stay
  per sequence (b = B): tr(S) is then the noise of a sequence's mean over its K draws.
  """
  m, b = rows_MBL.shape[:2]
  unknown = set(fixed) - set(NOISE_PARTS)
  if unknown:
    raise ValueError(f"fixed parts {sorted(unknown)} are not among {NOISE_PARTS}")
  stacked = jax.device_get(_batch_grads(run.objective, tuple(groups), state, rows_MBL, key,
                                        tuple(sorted(fixed)), run.config.train.draws_per_sequence))  # {group: [M, ...]}
  def sq(tree, axis=None):
    return sum(np.sum(np.square(np.asarray(x, np.float64)), axis=axis) for x in jax.tree.leaves(tree))
  out, per_batch_all, mean_all = {}, np.zeros(m), 0.0
  for name, tree in stacked.items():
    flat = jax.tree.map(lambda x: np.asarray(x, np.float64).reshape(m, -1), tree)
    per_batch = sq(flat, axis=1)
    mean_sq = sq(jax.tree.map(lambda x: x.mean(0), flat))
    out[name] = noise_scale_estimates(per_batch, mean_sq, b)
    per_batch_all, mean_all = per_batch_all + per_batch, mean_all + mean_sq
  out["all"] = noise_scale_estimates(per_batch_all, mean_all, b)
  return out


@functools.partial(jax.jit, static_argnames=("model_cfg", "cfg", "draws"))
def _time_bin_sums(params, rows_NL, t, key, pscale, *, model_cfg, cfg, draws):
  """Over `draws` Gaussian draws of every row at time t (one diffusion row each, no self-conditioning): the sum of
  the rows' denoiser-and-embedding gradients, the sum of their squared norms, and the sum and sum of squares of
  their diffusion losses."""
  n, length = rows_NL.shape
  eps = jax.random.normal(key, (draws, n, length, model_cfg.embed_dim), jnp.float32)
  one_row = elbo.Weights(n_recon=jnp.float32(1), n_diff=jnp.float32(1), n_rows=jnp.float32(1))
  plan = time_sampling.Plan(t=t[None], is_recon=jnp.zeros(1, bool), is_sc=jnp.zeros(1, bool),
                            sc_offset=jnp.int32(0), sc_period=0)

  def row(tokens_L, eps_LE):
    _, terms, g = elbo.loss_and_grads(params, tokens_L[None], plan, key, one_row, model_cfg=model_cfg, cfg=cfg,
                                      pscale=pscale, noise=eps_LE[None])
    flat = jnp.concatenate([x.ravel() for name in ("denoiser", "embedding") for x in jax.tree.leaves(g[name])])
    return flat, terms.diffusion[0]

  def one_draw(i):
    g, l = jax.vmap(row)(rows_NL, eps[i])
    return jnp.sum(g, 0), jnp.sum(g * g), jnp.sum(l), jnp.sum(l * l)

  g, gg, l, ll = jax.lax.map(one_draw, jnp.arange(draws))
  return jnp.sum(g, 0), jnp.sum(gg), jnp.sum(l), jnp.sum(ll)


def noise_by_time(run: Any, state: step_lib.TrainState, rows_NL: jax.Array, key: jax.Array, *, bins: int = 16,
                  draws: int = 2) -> dict[str, Any]:
  """Where along t RePlaid's training gradient is noisy, and what a different time density would do about it.

  For each of `bins` equal cells of t (at its centre), each of the N rows is a diffusion row (no
  self-conditioning) with `draws` Gaussian draws; per cell: the per-row gradient's (denoiser and embedding)
  second moment and its variance within the cell (`grad_within`: around the cell's mean, over rows and
  draws), and the diffusion loss's mean and variance. The training lattice puts one row in each cell, so its
  estimator's noise is the within-cell part; a time density p (a different schedule shape, the bound unchanged)
  multiplies a within-cell variance w(t) by mean(w / p) / mean(w), least at p ~ sqrt(w). Reported factors:
  `gain_grad_best` at that optimum; `gain_grad_at_second_moment_optimum` at the optimum of the paper's schedule
  objective E[l^2] (p ~ sqrt(E[l^2 | t])); `gain_grad_at_loss_within_optimum` at the optimum of the loss's
  within-cell variance (p ~ sqrt(Var[l | t]), what `diffusion.schedule_variance="within_time"` trains for); and
  `gain_second_moment`, how far E[l^2] itself is above its optimum (1: the schedule has converged).
  """
  c = run.config
  pscale = elbo.prior_scale(c.diffusion, state.step)
  n = rows_NL.shape[0] * draws
  cells = []
  for j in range(bins):
    g, gg, l, ll = jax.device_get(_time_bin_sums(
        state.params, rows_NL, jnp.float32((j + 0.5) / bins), jax.random.fold_in(key, j), pscale,
        model_cfg=c.model, cfg=c.diffusion, draws=draws))
    g = np.asarray(g, np.float64)
    cells.append({"grad_second_moment": float(gg) / n, "grad_within": (float(gg) - float(g @ g) / n) / (n - 1),
                  "loss_mean": float(l) / n, "loss_var": (float(ll) - float(l) ** 2 / n) / (n - 1)})
  col = lambda k: np.array([cell[k] for cell in cells])
  w, lm, lv = col("grad_within"), col("loss_mean"), col("loss_var")
  under = lambda p: float(np.mean(w / (p / np.mean(p))) / np.mean(w))
  second = np.sqrt(lv + lm ** 2)
  out = {"t": [(j + 0.5) / bins for j in range(bins)], **{k: col(k).tolist() for k in cells[0]}}
  out.update(gain_grad_best=under(np.sqrt(w)), gain_grad_at_second_moment_optimum=under(second),
             gain_grad_at_loss_within_optimum=under(np.sqrt(lv)),
             gain_second_moment=float(np.mean(second) ** 2 / np.mean(second ** 2)))
  return out


def fixed_level_probe(cd: ml_collections.ConfigDict, corpus: pipeline.Corpus, *, gamma: float, steps: int,
                      loss: str = "ce", every: int = 100, seed: int = 0) -> list[dict]:
  """Trains only the denoiser at one noise level, embeddings and schedule frozen; a probe, not a bound.

  Every row is noised at `gamma`; the loss is the token cross-entropy of the
  logits ("ce", the most direct signal there is) or the squared error of x_hat
  ("mse", the ELBO's integrand at that level), with Adam at `lr`. Returns, every
  `every` steps, the mean CE of the model and of the context-free denoiser over
  those steps: how long the model takes to use context when the only obstacle
  is learning the network.
  """
  import optax  # pylint: disable=g-import-not-at-top
  from replaid_jax.train import build as build_lib  # pylint: disable=g-import-not-at-top
  c = build_lib.resolve_vocab(config_lib.from_config_dict(cd), corpus)
  bias = build_lib.output_bias(c, corpus)
  log_unigram = jnp.asarray(bound_lib.log_unigram(corpus.unigram_counts), jnp.float32)
  params, _ = model_lib.init(jax.random.key(seed), c.model, gamma_0=c.diffusion.gamma_0,
                             gamma_1=c.diffusion.gamma_1, output_bias=bias)
  tx = optax.adam(c.optim.lr)
  opt = tx.init(params["denoiser"])
  t_level = float(sampler.time_of_gamma(params, np.array([gamma]), c.diffusion.schedule)[0])  # schedule frozen

  def losses(den, rest, tokens, key):
    p = {**rest, "denoiser": den}
    table = embedding.normalized(p["embedding"])
    e = embedding.lookup(table, tokens)
    g = jnp.full((tokens.shape[0],), gamma, jnp.float32)
    alpha2, sigma2 = noise_schedule.alpha_sigma2(g)
    z = jnp.sqrt(alpha2)[:, None, None] * e + jnp.sqrt(sigma2)[:, None, None] * jax.random.normal(key, e.shape)
    logits, x_hat = model_lib.predict(p, z, g, jnp.zeros_like(z), cfg=c.model, prior_scale=1.0,
                                      t_B=jnp.full_like(g, t_level))
    nll = lambda lg: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), tokens[..., None], -1))
    free = diagnostics.context_free_logits(log_unigram, z, table, alpha2, sigma2)
    mse = jnp.mean(jnp.sum(jnp.square(e - x_hat), -1))
    return (nll(logits) if loss == "ce" else mse), (nll(logits), nll(free))

  @jax.jit
  def step(den, opt, rest, tokens, key):
    (_, aux), grads = jax.value_and_grad(losses, has_aux=True)(den, rest, tokens, key)
    updates, opt = tx.update(grads, opt, den)
    return optax.apply_updates(den, updates), opt, aux

  rest = {k: v for k, v in params.items() if k != "denoiser"}
  den = params["denoiser"]
  rng = np.random.default_rng(seed)
  out, acc = [], []
  for i in range(1, steps + 1):
    tokens = jnp.asarray(corpus.train[rng.integers(0, corpus.train.shape[0], c.train.batch_size)], jnp.int32)
    den, opt, aux = step(den, opt, rest, tokens, jax.random.fold_in(jax.random.key(seed + 1), i))
    acc.append([float(a) for a in aux])
    if i % every == 0:
      m = np.mean(acc, axis=0)
      out.append({"step": i, "ce": float(m[0]), "context_free_ce": float(m[1]), "gain": float(m[1] - m[0])})
      acc = []
  return out


def attention_by_distance(cd: ml_collections.ConfigDict, corpus: pipeline.Corpus, *, gamma: float, seed: int = 0,
                          rows: int = 64, max_distance: int = 4) -> dict:
  """The first block's attention weights at initialisation, by distance |i - j|, on noisy validation rows.

  The rows are noised at `gamma` with the initial (random, unit-norm) embeddings, and the first block's
  attention is computed from its initial parameters (adaLN-Zero: its modulation is the identity then). Returns,
  per head, the mean weight a position puts on each distance 0..`max_distance` (both sides together) and on
  everything farther, with the share uniform attention would give: what reaches a position from its
  neighbours before any training.
  """
  from replaid_jax.models import layers  # pylint: disable=g-import-not-at-top
  from replaid_jax.train import build as build_lib  # pylint: disable=g-import-not-at-top
  c = build_lib.resolve_vocab(config_lib.from_config_dict(cd), corpus)
  if c.model.block != "dit":
    raise ValueError(f"the attention profile reads DiT blocks; got model.block={c.model.block!r}.")
  params, _ = model_lib.init(jax.random.key(seed), c.model, gamma_0=c.diffusion.gamma_0,
                             gamma_1=c.diffusion.gamma_1, output_bias=build_lib.output_bias(c, corpus))
  net, m = model_lib.bind(model_lib.abstract(c.model).graphdef, params).denoiser, c.model
  tokens = jnp.asarray(corpus.val[:rows], jnp.int32)
  e = embedding.lookup(embedding.normalized(params["embedding"]), tokens)
  alpha2, sigma2 = noise_schedule.alpha_sigma2(jnp.full((tokens.shape[0],), gamma, jnp.float32))
  z = jnp.sqrt(alpha2)[:, None, None] * e + jnp.sqrt(sigma2)[:, None, None] * jax.random.normal(
      jax.random.key(seed + 1), e.shape)
  x = net.inputs(z, jnp.zeros_like(z), alpha2, sigma2)
  blk = params["denoiser"]["blocks"]
  shift, scale = jnp.split(blk["adaln_b"][0], 6)[:2]  # the adaLN weights are zero at initialisation
  h = layers.modulate(layers.layer_norm(x, blk["ln1"][0]), shift[None], scale[None])
  rope = layers.rope_tables(tokens.shape[1], m.head_dim, m.rope_base)
  rel = blk["rel_bias"][0] if "rel_bias" in blk else None
  q, k, _, bias = denoiser_lib.attention_operands(m, blk["qkv"][0], h, rope, rel)
  logits = jnp.einsum("bihk,bjhk->bhij", q, k) / np.sqrt(m.head_dim)
  if bias is not None:
    logits = logits + bias[None]
  w = np.asarray(jax.nn.softmax(logits, axis=-1).mean(0))  # [H, L, L]
  length = w.shape[-1]
  dist = np.abs(np.arange(length)[:, None] - np.arange(length)[None, :])
  heads = []
  for hw in w:
    by = [float(hw[dist == d].sum() / length) for d in range(max_distance + 1)]
    heads.append({"by_distance": by, "farther": float(hw[dist > max_distance].sum() / length)})
  uniform = [float((dist == d).sum() / length**2) for d in range(max_distance + 1)]
  return {"gamma": gamma, "rows": int(tokens.shape[0]), "heads": heads, "uniform_by_distance": uniform}
