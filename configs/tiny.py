"""A seconds-scale model on the embedded corpus, for tests and smoke runs."""

from configs import base


def get_config():
  c = base.get_base_config()
  c.model.width = 32
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.cond_dim = 32
  c.model.cond_freqs = 8
  c.model.max_seq_len = 64
  c.model.schedule_hidden = 64
  c.data.seq_len = 32
  c.data.tokenizer_vocab_size = 512
  c.data.val_plays = "the-comedy-of-errors"
  c.train.batch_size = 8
  c.train.num_steps = 4
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.peak_flops = 1e11
  c.optim.warmup_steps = 2
  c.diffusion.output_prior_warmup_steps = 0
  c.eval.batch_size = 16
  c.eval.num_times = 1
  c.eval.final_num_times = 2
  c.eval.max_batches = 2
  c.eval.final_max_batches = 2
  c.eval.num_samples = 1
  c.eval.sample_steps = 8
  c.checkpoint.every_steps = 2
  c.mesh.shape = (1, 1, 1)  # one device, also where tests fake eight
  return c
