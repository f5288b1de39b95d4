"""The `model` config section, read by every module of the network, and the values its choices allow."""

import dataclasses

COND_INPUTS = ("gamma", "t")
OUTPUT_BIAS_INITS = ("zeros", "unigram")
COMPUTE_DTYPES = ("float32", "bfloat16")
BLOCKS = ("dit", "plaid")
ATTENTION_BIASES = ("none", "alibi", "learned")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The `model` config section; every field is described (and given its default) in replaid_jax/base_config.py."""

  vocab_size: int | None
  embed_dim: int
  width: int
  num_layers: int
  num_heads: int
  mlp_ratio: int
  cond_dim: int
  cond_freqs: int
  cond_input: str
  max_seq_len: int
  rope_base: float
  compute_dtype: str
  causal: bool
  output_bias_init: str
  schedule_hidden: int
  remat: bool
  block: str
  remat_policy: str
  head_init_scale: float
  gate_init: float
  input_posterior: bool
  attention_bias: str

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads
