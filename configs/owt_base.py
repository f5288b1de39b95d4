"""The OpenWebText benchmark model: DiT-small (768 x 12 layers x 12 heads), L = 1024, d_e = 16.

The data are pre-tokenised GPT-2 BPE token streams (.npy, vocab 50,257) that the
user prepares; both paths are required:

  python launch/train.py --config=configs/owt_base.py --workdir=gs://bucket/owt \
      --config.data.train_files=/data/owt/train_*.npy --config.data.val_files=/data/owt/val.npy

Optimisation follows the MDLM/Duo OWT recipe (global batch 512, AdamW 3e-4,
constant after 2,500 warm-up steps, EMA 0.9999, clip 1.0), with RePlaid's
per-module learning rates for embeddings, schedule and bounds.
"""

from ml_collections import config_dict

from configs import base


def get_config():
  c = base.get_base_config()
  c.data.source = "npy"
  c.data.train_files = config_dict.placeholder(str)  # required
  c.data.val_files = config_dict.placeholder(str)  # required
  c.data.npy_vocab_size = 50257
  c.data.val_plays = ""
  c.data.seq_len = 1024
  c.data.num_workers = 2
  c.model.width = 768
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.max_seq_len = 1024
  c.model.compute_dtype = "bfloat16"
  c.optim.lr = 3e-4
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 2500
  c.optim.decay = "constant"
  c.optim.ema_decay = 0.9999
  c.train.batch_size = 512
  c.train.num_steps = 1_000_000
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.eval.batch_size = 64
  c.eval.num_times = 1
  c.eval.max_batches = 100
  c.eval.final_num_times = 8
  c.eval.num_samples = 0
  c.checkpoint.every_steps = 5000
  return c
