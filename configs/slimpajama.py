"""The SlimPajama scaling protocol (L = 2048, Llama-2 vocabulary + [MASK] = 32,001).

The model size is a config argument naming a row of the size table:

  python launch/train.py --config=configs/slimpajama.py:66M --workdir=... \
      --config.data.train_files=/data/slimpajama/train_*.npy --config.data.val_files=/data/slimpajama/val.npy

Global batch 256, AdamW (0.9, 0.95), weight decay 0.1, warm-up max(1% of steps,
100) then cosine 2e-4 -> 2e-5, clip 1.0, no EMA. `train.num_steps` is left to
the launcher (steps = C / (3 F_fwd B) for a FLOP budget C).
"""

from ml_collections import config_dict

from configs import base

# name: (width, layers, heads), from the scaling protocol's size list.
SIZES = {
    "6M": (256, 6, 4), "19M": (384, 8, 6), "34M": (512, 8, 8), "48M": (576, 9, 9), "66M": (640, 10, 10),
    "85M": (640, 13, 10), "75M": (640, 16, 8), "113M": (768, 12, 12), "142M": (768, 15, 12),
    "170M": (768, 18, 12), "180M": (896, 14, 14), "206M": (896, 16, 14), "231M": (896, 18, 14),
    "268M": (1024, 16, 16), "302M": (1024, 18, 16), "336M": (1024, 20, 16), "472M": (1280, 18, 10),
    "551M": (1280, 21, 10), "571M": (1408, 18, 11), "629M": (1280, 24, 10), "666M": (1408, 21, 11),
    "761M": (1408, 24, 11), "831M": (1536, 22, 12), "944M": (1536, 25, 12), "1233M": (1792, 24, 14),
    "1476M": (2048, 22, 16), "1678M": (2048, 25, 16), "2121M": (2176, 28, 17),
}


def get_config(size: str = "66M"):
  if size not in SIZES:
    raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)} (configs/slimpajama.py:SIZE).")
  width, layers, heads = SIZES[size]
  c = base.get_base_config()
  c.data.source = "npy"
  c.data.train_files = config_dict.placeholder(str)  # required
  c.data.val_files = config_dict.placeholder(str)  # required
  c.data.npy_vocab_size = 32001
  c.data.val_plays = ""
  c.data.seq_len = 2048
  c.data.num_workers = 2
  c.model.width, c.model.num_layers, c.model.num_heads = width, layers, heads
  c.model.cond_dim = 128
  c.model.max_seq_len = 2048
  c.model.compute_dtype = "bfloat16"
  c.optim.lr = 2e-4
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.weight_decay = 0.1
  c.optim.warmup_steps = 100
  c.optim.decay = "cosine"
  c.optim.final_lr_fraction = 0.1
  c.optim.ema_decay = 0.0
  c.train.batch_size = 256
  c.train.num_steps = 10_000
  c.train.log_every = 100
  c.train.eval_every = 2000
  c.eval.batch_size = 64
  c.eval.num_times = 1
  c.eval.max_batches = 1000
  c.eval.num_samples = 0
  c.checkpoint.every_steps = 2000
  return c
