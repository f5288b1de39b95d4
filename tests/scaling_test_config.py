"""A two-size config family for the isoFLOP sweep generator test (configs/*.py format: SIZES, get_config)."""

from configs import base

SIZES = {"XS": (32, 2, 2), "S": (64, 3, 4), "M": (96, 4, 4)}


def get_config(size: str = "XS"):
  width, num_layers, num_heads = SIZES[size]
  c = base.get_base_config()
  c.model.width = width
  c.model.num_layers = num_layers
  c.model.num_heads = num_heads
  c.model.cond_dim = 32
  c.model.max_seq_len = 64
  c.data.seq_len = 64
  c.data.tokenizer_vocab_size = 512
  c.train.batch_size = 8
  c.optim.warmup_steps = 10
  return c
