"""Train-step speed of this project next to a straightforward PyTorch DiT of the same shape, in one process.

  python launch/compare_torch.py --config=configs/demo.py --rounds=3 --steps=8
  python launch/compare_torch.py --config=configs/demo.py --config.diffusion.selfcond_fraction=0.25

The PyTorch side (`TorchDiT`, below) is the model a PyTorch user would write
for RePlaid's forward and loss: unit-norm d_e-dimensional embeddings, the input
scaling, adaLN-Zero DiT blocks with RoPE, `scaled_dot_product_attention` and a
GELU-tanh MLP, the output prior (alpha / sigma^2) z E^T, x_hat = softmax(logits) E,
the diffusion and reconstruction terms, and AdamW, run eagerly with PyTorch's
default CPU threads. It has no self-conditioning pass (unless
`diffusion.selfcond_fraction` > 0, when it runs the same no-gradient first pass
on that share of the rows) and a linear noise schedule with learned endpoints in
place of the schedule MLP (whose cost is negligible). This project's side is its
real train step (`launch/benchmark.py` builds it the same way) on random tokens.

The two are timed in alternating rounds (PyTorch, then JAX, `--rounds` times;
each round `--steps` timed steps after `--warmup` untimed ones), so a change in
the machine's load hits both; the ratio reported is the median over rounds of
(JAX tokens/s) / (PyTorch tokens/s). With `--json_out` the per-round figures,
the matmul rate measured in the same process and the configuration are written
as JSON.
"""

from replaid_jax import hostenv

hostenv.reexec_with_huge_pages()  # first, before JAX allocates anything: see replaid_jax/hostenv.py

import json
import math
import os
import statistics
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from replaid_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Path to a config file (configs/*.py[:arg]).",
                                          lock_config=True)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds (PyTorch, then JAX).")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps per side and round.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per side before the first round.")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "PyTorch intra-op threads (0: PyTorch's default).")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Where to write the result as JSON.")
flags.register_validator("rounds", lambda n: n >= 1, "--rounds must be at least 1.")
flags.register_validator("steps", lambda n: n >= 1, "--steps must be at least 1.")


def torch_model(cfg: dict):
  """A PyTorch DiT for RePlaid's loss, of the shape in `cfg` (see `shape_of`); returns (module, step function)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  d, h, v, e, n = cfg["width"], cfg["num_heads"], cfg["vocab_size"], cfg["embed_dim"], cfg["num_layers"]
  k = d // h

  def rope_tables(seq_len):
    inv = 1.0 / (cfg["rope_base"] ** (torch.arange(0, k, 2, dtype=torch.float32) / k))
    ang = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv[None, :]
    return ang.cos()[None, None], ang.sin()[None, None]  # [1, 1, L, K/2]

  def rope(x, cos, sin):  # x [B, H, L, K]
    x1, x2 = x[..., :k // 2], x[..., k // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

  def sinusoidal(s, num):
    freqs = torch.exp(torch.linspace(-5.0, 5.0, num))
    ang = s[:, None] * freqs[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.ln1 = nn.LayerNorm(d, bias=False)
      self.ln2 = nn.LayerNorm(d, bias=False)
      self.adaln = nn.Linear(cfg["cond_dim"], 6 * d)
      nn.init.zeros_(self.adaln.weight)
      nn.init.zeros_(self.adaln.bias)
      self.qkv = nn.Linear(d, 3 * d, bias=False)
      self.attn_out = nn.Linear(d, d, bias=False)
      self.mlp1 = nn.Linear(d, cfg["mlp_ratio"] * d)
      self.mlp2 = nn.Linear(cfg["mlp_ratio"] * d, d)

    def forward(self, x, c, cos, sin):
      b, l, _ = x.shape
      sh1, sc1, g1, sh2, sc2, g2 = self.adaln(c)[:, None, :].chunk(6, dim=-1)
      y = self.ln1(x) * (1 + sc1) + sh1
      q, kk, vv = self.qkv(y).view(b, l, 3, h, k).permute(2, 0, 3, 1, 4)
      att = F.scaled_dot_product_attention(rope(q, cos, sin), rope(kk, cos, sin), vv)
      x = x + g1 * self.attn_out(att.transpose(1, 2).reshape(b, l, d))
      y = self.ln2(x) * (1 + sc2) + sh2
      return x + g2 * self.mlp2(F.gelu(self.mlp1(y), approximate="tanh"))

  class TorchDiT(nn.Module):

    def __init__(self):
      super().__init__()
      self.embedding = nn.Parameter(torch.randn(v, e))
      self.gamma = nn.Parameter(torch.tensor([cfg["gamma_0"], cfg["gamma_1"]]))
      self.in_proj = nn.Linear(e, d, bias=False)
      self.sc_proj = nn.Linear(e, d, bias=False)
      nn.init.zeros_(self.sc_proj.weight)
      self.cond = nn.Sequential(nn.Linear(2 * cfg["cond_freqs"], cfg["cond_dim"]), nn.SiLU(),
                                nn.Linear(cfg["cond_dim"], cfg["cond_dim"]), nn.SiLU())
      self.blocks = nn.ModuleList([Block() for _ in range(n)])
      self.final_ln = nn.LayerNorm(d, bias=False)
      self.final_adaln = nn.Linear(cfg["cond_dim"], 2 * d)
      nn.init.zeros_(self.final_adaln.weight)
      nn.init.zeros_(self.final_adaln.bias)
      self.out = nn.Linear(d, v)
      nn.init.zeros_(self.out.weight)

    def predict(self, z, g, x_sc, table):
      alpha2, sigma2 = torch.sigmoid(-g), torch.sigmoid(g)
      u = z * torch.rsqrt(alpha2 / e + sigma2)[:, None, None]
      x = self.in_proj(u) + self.sc_proj(x_sc * math.sqrt(e))
      c = self.cond(sinusoidal(g, cfg["cond_freqs"]))
      cos, sin = rope_tables(z.shape[1])
      for block in self.blocks:
        x = block(x, c, cos, sin)
      sh, sc = self.final_adaln(c)[:, None, :].chunk(2, dim=-1)
      logits = self.out(self.final_ln(x) * (1 + sc) + sh)
      logits = logits + (torch.sqrt(alpha2) / sigma2)[:, None, None] * (z @ table.T)  # the output prior
      return logits, torch.softmax(logits, dim=-1) @ table

    def loss(self, tokens, sc_rows: int):
      b = tokens.shape[0]
      table = self.embedding / (self.embedding.norm(dim=-1, keepdim=True) + 1e-8)
      emb = table[tokens]
      t = torch.rand(b)
      g0, g1 = self.gamma[0], self.gamma[1]
      g = g0 + (g1 - g0) * t
      g[: b // 8] = g0  # reconstruction rows at t = 0
      alpha2, sigma2 = torch.sigmoid(-g), torch.sigmoid(g)
      z = alpha2.sqrt()[:, None, None] * emb + sigma2.sqrt()[:, None, None] * torch.randn_like(emb)
      x_sc = torch.zeros_like(z)
      if sc_rows:
        with torch.no_grad():
          x_sc[-sc_rows:] = self.predict(z[-sc_rows:], g[-sc_rows:], torch.zeros_like(z[-sc_rows:]), table)[1]
      logits, x_hat = self.predict(z, g, x_sc, table)
      recon = F.cross_entropy(logits[: b // 8].reshape(-1, v), tokens[: b // 8].reshape(-1))
      sq = ((emb - x_hat) ** 2).sum(-1).mean(-1)[b // 8:]
      diffusion = (0.5 * torch.exp(-g[b // 8:]) * (g1 - g0) * sq).mean()
      prior = 0.5 * (-e * F.logsigmoid(g1) - e * torch.sigmoid(-g1) + torch.sigmoid(-g1))
      return recon + diffusion + prior

  model = TorchDiT()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
  sc_rows = int(round(cfg["selfcond_fraction"] * cfg["batch_size"]))

  def step(tokens):
    opt.zero_grad(set_to_none=True)
    loss = model.loss(tokens, sc_rows)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss

  return model, step


def shape_of(c, vocab: int) -> dict:
  """The fields of a converted config that fix the PyTorch model's shape and cost."""
  m, d = c.model, c.diffusion
  return {"width": m.width, "num_layers": m.num_layers, "num_heads": m.num_heads, "mlp_ratio": m.mlp_ratio,
          "cond_dim": m.cond_dim, "cond_freqs": m.cond_freqs, "embed_dim": m.embed_dim, "rope_base": m.rope_base,
          "vocab_size": vocab, "seq_len": c.data.seq_len, "batch_size": c.train.batch_size,
          "gamma_0": d.gamma_0, "gamma_1": d.gamma_1, "selfcond_fraction": d.selfcond_fraction}


def _time(fn, steps: int) -> float:
  """Median seconds per call of `fn(i)` over `steps` calls."""
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    fn(i)
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def compare(cd, *, rounds: int, steps: int, warmup: int, torch_threads: int = 0, log=print) -> dict:
  """Alternating rounds of the PyTorch step and this project's step at the config's shape; a JSON-able dict."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from replaid_jax import benchmark  # pylint: disable=g-import-not-at-top
  from replaid_jax import errors  # pylint: disable=g-import-not-at-top
  from replaid_jax import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from replaid_jax.models import model as model_lib  # pylint: disable=g-import-not-at-top
  from replaid_jax.train import build as build_lib  # pylint: disable=g-import-not-at-top

  if cd.objective != "replaid":
    raise ValueError(f"the PyTorch reference is RePlaid's model; got objective={cd.objective!r}.")
  if cd.train.draws_per_sequence != 1:
    raise errors.ConfigError("the PyTorch reference draws once per sequence; run the comparison with "
                             f"train.draws_per_sequence=1 (got {cd.train.draws_per_sequence}).")
  if torch_threads:
    torch.set_num_threads(torch_threads)
  c, run_, batches = benchmark.synthetic_run(cd)
  shape = shape_of(c, c.model.vocab_size)
  b, seq_len = c.train.batch_size, c.data.seq_len
  key = jax.random.key(c.seed)
  compiled = build_lib.compile_step(run_).lower(run_.state, batches[0], key).compile()
  holder = {"state": run_.state}

  def jax_step(i):
    holder["state"], m = compiled(holder["state"], batches[i % 2], key)
    jax.block_until_ready(m["loss"])

  torch.manual_seed(c.seed)
  torch_module, torch_step = torch_model(shape)
  torch_batches = [torch.from_numpy(np.asarray(x).astype("int64")) for x in batches]

  def t_step(i):
    torch_step(torch_batches[i % 2])

  for i in range(warmup):
    t_step(i)
    jax_step(i)
  matmul = flops_lib.measure_matmul_flops()
  fwd = flops_lib.config_forward_flops(c, token_input=run_.objective.token_input)
  per_step = flops_lib.train_flops_per_step(fwd, batch=b, selfcond_fraction=c.diffusion.selfcond_fraction)[0]
  tokens = b * seq_len
  rows = []
  for r in range(rounds):
    st = _time(t_step, steps)
    sj = _time(jax_step, steps)
    rows.append({"round": r, "torch_tokens_per_s": tokens / st, "jax_tokens_per_s": tokens / sj,
                 "ratio": st / sj, "jax_matmul_fraction": per_step / sj / matmul})
    log(f"round {r + 1}/{rounds}: PyTorch {tokens / st:,.0f} tokens/s, replaid_jax {tokens / sj:,.0f} tokens/s, "
        f"ratio {st / sj:.2f}, replaid_jax at {per_step / sj / matmul:.2f} of the matmul rate")
  return {
      "shape": shape, "rounds": rows, "ratio_median": statistics.median(r["ratio"] for r in rows),
      "jax_matmul_fraction_median": statistics.median(r["jax_matmul_fraction"] for r in rows),
      "matmul_flops_per_s": matmul, "flops_per_step_analytic": per_step,
      "params": {"torch": sum(p.numel() for p in torch_module.parameters()),
                 "replaid_jax": model_lib.count(run_.state.params),
                 "replaid_jax_denoiser": model_lib.count(run_.state.params["denoiser"])},
      "torch_threads": torch.get_num_threads(), "jax_devices": len(run_.mesh.devices.reshape(-1)),
      "torch_version": torch.__version__, "jax_version": jax.__version__, "cpu_count": os.cpu_count(),
      "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from replaid_jax import distributed  # pylint: disable=g-import-not-at-top
  cd = cli.config(_CONFIG)
  distributed.split_cpu(distributed.cpu_devices_of(cd))  # as launch/train.py does on CPU
  result = compare(cd, rounds=_ROUNDS.value, steps=_STEPS.value, warmup=_WARMUP.value,
                   torch_threads=_THREADS.value)
  print(f"median over {_ROUNDS.value} rounds: replaid_jax / PyTorch = {result['ratio_median']:.2f}; replaid_jax "
        f"train step at {result['jax_matmul_fraction_median']:.2f} of the measured "
        f"{result['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s matmul rate")
  if _JSON_OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON_OUT.value)), exist_ok=True)
    with open(_JSON_OUT.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  cli.run(main)
