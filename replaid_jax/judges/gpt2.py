"""GPT-2 (small to XL) in JAX, loaded from a local Hugging Face-format directory, as a perplexity judge.

The directory holds config.json, model.safetensors (or model.safetensors.index.json
with its shards) and the tokenizer: tokenizer.json, or vocab.json + merges.txt.
Weights are read with a small safetensors reader; the byte-level BPE tokenizer is
the `tokenizers` package (install the `judges` extra). Nothing is downloaded.

  h   = wte[x] + wpe[pos]
  h  += attn(ln_1(h))          causal, heads of n_embd / n_head, scale 1/sqrt(head_dim)
  h  += mlp(ln_2(h))           act(h W_fc + b) W_proj + b
  out = ln_f(h) wte^T          (the head is tied to the token embedding)

Hugging Face's Conv1D stores weights as [in, out], so y = x W + b as written.
"""

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from replaid_jax import errors
from replaid_jax.judges import perplexity

_HIGHEST = jax.lax.Precision.HIGHEST
_ACTIVATIONS = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int
  n_positions: int
  n_embd: int
  n_layer: int
  n_head: int
  n_inner: int
  layer_norm_epsilon: float
  activation_function: str
  scale_attn_weights: bool
  scale_attn_by_inverse_layer_idx: bool
  bos_token_id: int

  @classmethod
  def from_json(cls, path: str) -> "GPT2Config":
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    model_type = raw.get("model_type", "gpt2")
    if model_type != "gpt2":
      raise errors.ConfigError(f"{path}: model_type is {model_type!r}; this judge loads GPT-2 checkpoints only.")
    act = raw.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
      raise errors.ConfigError(f"{path}: activation_function {act!r} is not supported ({sorted(_ACTIVATIONS)}).")
    n_embd = raw.get("n_embd", 768)
    return cls(
        vocab_size=raw.get("vocab_size", 50257), n_positions=raw.get("n_positions", 1024), n_embd=n_embd,
        n_layer=raw.get("n_layer", 12), n_head=raw.get("n_head", 12), n_inner=raw.get("n_inner") or 4 * n_embd,
        layer_norm_epsilon=raw.get("layer_norm_epsilon", 1e-5), activation_function=act,
        scale_attn_weights=raw.get("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=raw.get("scale_attn_by_inverse_layer_idx", False),
        bos_token_id=raw.get("bos_token_id", 50256) if raw.get("bos_token_id") is not None else 50256,
    )


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a .safetensors file (memory-mapped, not copied)."""
  with open(path, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    if size <= 0 or size > 100_000_000:
      raise errors.DataError(f"'{path}' is not a safetensors file (bad header length {size}).")
    header = json.loads(f.read(size))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise errors.DataError(f"'{path}': tensor {name} has unsupported dtype {info['dtype']}.")
    start, end = info["data_offsets"]
    out[name] = data[start:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def _read_weights(directory: str) -> dict[str, np.ndarray]:
  single = os.path.join(directory, "model.safetensors")
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.isfile(single):
    tensors = read_safetensors(single)
  elif os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for shard in shards:
      tensors.update(read_safetensors(os.path.join(directory, shard)))
  else:
    raise errors.DataError(f"'{directory}' has no model.safetensors (nor model.safetensors.index.json); save the "
                           "model with save_pretrained(..., safe_serialization=True).")
  prefix = "transformer."
  return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in tensors.items()}


def load_params(directory: str, cfg: GPT2Config) -> dict:
  """Parameters as float32 arrays, the blocks stacked on a leading layer axis."""
  w = _read_weights(directory)
  f32 = lambda name: np.asarray(w[name], np.float32)
  try:
    blocks = {
        name: np.stack([f32(f"h.{i}.{hf}") for i in range(cfg.n_layer)])
        for name, hf in (("ln1_g", "ln_1.weight"), ("ln1_b", "ln_1.bias"), ("qkv_w", "attn.c_attn.weight"),
                         ("qkv_b", "attn.c_attn.bias"), ("proj_w", "attn.c_proj.weight"),
                         ("proj_b", "attn.c_proj.bias"), ("ln2_g", "ln_2.weight"), ("ln2_b", "ln_2.bias"),
                         ("fc_w", "mlp.c_fc.weight"), ("fc_b", "mlp.c_fc.bias"), ("out_w", "mlp.c_proj.weight"),
                         ("out_b", "mlp.c_proj.bias"))
    }
    params = {"wte": f32("wte.weight"), "wpe": f32("wpe.weight"), "lnf_g": f32("ln_f.weight"),
              "lnf_b": f32("ln_f.bias"), "blocks": blocks}
  except KeyError as e:
    raise errors.DataError(f"'{directory}': the weights lack {e}; is this a GPT-2 checkpoint?") from None
  d = cfg.n_embd
  if params["wte"].shape != (cfg.vocab_size, d) or blocks["qkv_w"].shape[1:] != (d, 3 * d):
    raise errors.DataError(f"'{directory}': weight shapes {params['wte'].shape}, {blocks['qkv_w'].shape[1:]} do not "
                           f"match config.json (vocab {cfg.vocab_size}, n_embd {d}).")
  return jax.tree.map(jnp.asarray, params)


def _layer_norm(x, g, b, eps):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * g + b


def forward(params: dict, tokens_BT: jax.Array, cfg: GPT2Config) -> jax.Array:
  """Next-token logits [B, T, V] (float32) for token ids [B, T], T <= n_positions."""
  b, t = tokens_BT.shape
  h, k = cfg.n_head, cfg.n_embd // cfg.n_head
  act = _ACTIVATIONS[cfg.activation_function]
  eps = cfg.layer_norm_epsilon
  x = params["wte"][tokens_BT] + params["wpe"][:t][None]
  causal = jnp.tril(jnp.ones((t, t), bool))
  layer_ids = jnp.arange(cfg.n_layer, dtype=jnp.float32)

  def block(x, p):
    p, layer = p
    a = _layer_norm(x, p["ln1_g"], p["ln1_b"], eps)
    qkv = jnp.einsum("btd,de->bte", a, p["qkv_w"], precision=_HIGHEST) + p["qkv_b"]
    q, kk, v = (y.reshape(b, t, h, k) for y in jnp.split(qkv, 3, axis=-1))
    scale = (1.0 / math.sqrt(k)) if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
      scale = scale / (layer + 1.0)
    s = jnp.einsum("bqhk,bshk->bhqs", q, kk, precision=_HIGHEST) * scale
    s = jnp.where(causal, s, jnp.finfo(jnp.float32).min)
    o = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(s, axis=-1), v, precision=_HIGHEST).reshape(b, t, h * k)
    x = x + jnp.einsum("btd,de->bte", o, p["proj_w"], precision=_HIGHEST) + p["proj_b"]
    m = _layer_norm(x, p["ln2_g"], p["ln2_b"], eps)
    m = act(jnp.einsum("btd,df->btf", m, p["fc_w"], precision=_HIGHEST) + p["fc_b"])
    x = x + jnp.einsum("btf,fd->btd", m, p["out_w"], precision=_HIGHEST) + p["out_b"]
    return x, None

  x, _ = jax.lax.scan(block, x, (params["blocks"], layer_ids))
  x = _layer_norm(x, params["lnf_g"], params["lnf_b"], eps)
  return jnp.einsum("btd,vd->btv", x, params["wte"], precision=_HIGHEST)


def _token_nll(params, inputs_BT, targets_BT, mask_BT, *, cfg):
  logp = jax.nn.log_softmax(forward(params, inputs_BT, cfg), axis=-1)
  nll = -jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask_BT, nll, 0.0), axis=-1)


def load_tokenizer(directory: str) -> Any:
  """The byte-level BPE tokenizer of the directory (a `tokenizers.Tokenizer`)."""
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.ConfigError("the GPT-2 judge needs the `tokenizers` package: pip install -e '.[judges]'.") from None
  full = os.path.join(directory, "tokenizer.json")
  vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
  if os.path.isfile(full):
    return tokenizers.Tokenizer.from_file(full)
  if os.path.isfile(vocab) and os.path.isfile(merges):
    return tokenizers.ByteLevelBPETokenizer(vocab, merges, add_prefix_space=False)
  raise errors.DataError(f"'{directory}' has no tokenizer.json (nor vocab.json + merges.txt); save the tokenizer "
                         "with save_pretrained into the same directory.")


class GPT2Judge:
  """Scores text under a GPT-2: every judge token is predicted from <|endoftext|> and the tokens before it."""

  def __init__(self, directory: str, *, batch_size: int = 8):
    directory = os.path.expanduser(directory)
    if not os.path.isfile(os.path.join(directory, "config.json")):
      raise errors.DataError(f"sample.judge: '{directory}' is not a Hugging Face model directory (no config.json); "
                             "point it at a local GPT-2 saved with save_pretrained.")
    self.directory = directory
    self.cfg = GPT2Config.from_json(os.path.join(directory, "config.json"))
    self.params = load_params(directory, self.cfg)
    self.tokenizer = load_tokenizer(directory)
    self.batch_size = batch_size
    self.name = f"gpt2:{directory}"
    self._nll = jax.jit(functools.partial(_token_nll, cfg=self.cfg))

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text).ids)

  def logits(self, tokens_BT: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(functools.partial(forward, cfg=self.cfg))(self.params, jnp.asarray(tokens_BT)))

  def score(self, texts: list[str]) -> list[tuple[float, int]]:
    """(sum of token NLLs in nats, number of tokens) per text.

    Texts longer than the context are scored in windows of n_positions tokens, each
    window's first token predicted from <|endoftext|> alone.
    """
    return perplexity.score_in_windows(texts, encode=self.encode, window=self.cfg.n_positions,
                                       batch_size=self.batch_size, batch_nll=self._batch_nll)

  def _batch_nll(self, windows: list[list[int]]) -> np.ndarray:
    width = min(-(-max(len(ids) for ids in windows) // 64) * 64, self.cfg.n_positions)  # buckets of 64: few compiles
    inputs = np.full((self.batch_size, width), self.cfg.bos_token_id, np.int32)
    targets = np.zeros((self.batch_size, width), np.int32)
    mask = np.zeros((self.batch_size, width), bool)
    for r, ids in enumerate(windows):
      inputs[r, 1:len(ids)] = ids[:-1]
      targets[r, :len(ids)] = ids
      mask[r, :len(ids)] = True
    return np.asarray(self._nll(self.params, inputs, targets, mask))
