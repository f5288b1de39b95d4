"""The embedded default: a small RePlaid model on Shakespeare, about 20 minutes on 2 CPU cores.

  python launch/train.py --config=configs/demo.py --workdir=runs/demo

Trains a SentencePiece tokenizer on the training plays (cached per user), sizes
the run to the machine (`train.size_to_minutes`: it measures its speed over its
first 20 steps, still in the warm-up, and takes the steps, at most 1,500, that
fit the budget, with the cosine schedule over exactly those), trains them, then
reports the bound on the held-out plays (whole split) with its standard error
next to the unigram cross-entropy of the same tokens, and prints a few samples.
"""

from configs import base


# Budget variants (configs/demo.py:60min): (most steps, minutes). The run takes the steps that fit the minutes at
# the speed measured after compilation, so that the learning rate completes its decay on a slower machine too;
# the same minutes stop it as a safety net.
_BUDGETS = {"20min": (1500, 16.0), "60min": (5400, 56.0)}


def get_config(budget: str = "20min"):
  if budget not in _BUDGETS:
    raise ValueError(f"unknown budget {budget!r}; choose one of {sorted(_BUDGETS)} (configs/demo.py:BUDGET).")
  num_steps, max_minutes = _BUDGETS[budget]
  c = base.get_base_config()
  c.data.tokenizer_vocab_size = 512  # short pieces: local structure a small model learns fast
  c.data.seq_len = 64
  c.data.val_plays = "the-tempest,the-comedy-of-errors"  # two short plays keep the full-split eval cheap
  c.model.width = 256
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.max_seq_len = 64
  # On CPU, rematerialising the elementwise work of each block and keeping only its matmul outputs is faster than
  # keeping everything: the scan over blocks then stacks fewer activations (zero-filled buffers, dynamic updates and
  # layout copies). Same values; 1.2x the train step's tokens/s on 2 cores (docs/performance.md).
  c.model.remat = True
  c.model.remat_policy = "dots"
  # A zero output bias and a short output-prior warm-up (the base config's and Plaid's choice, with the warm-up
  # sized to this run): a log-unigram bias without warm-up starts training on the saddle at the per-position
  # Bayes denoiser, where it stays for hundreds of steps (docs/plateau.md).
  c.model.output_bias_init = "zeros"
  c.diffusion.output_prior_warmup_steps = 500
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.optim.decay = "cosine"
  c.optim.ema_decay = 0.0
  c.train.batch_size = 32
  c.train.num_steps = num_steps
  c.train.size_to_minutes = max_minutes
  c.train.max_minutes = max_minutes
  c.train.log_every = 25
  c.train.eval_every = 0
  c.train.eval_every_minutes = 3.0
  c.eval.batch_size = 64
  c.eval.num_times = 2
  c.eval.max_batches = 4
  c.eval.final_num_times = 3
  c.checkpoint.every_steps = 500
  if budget == "60min":
    c.train.eval_every_minutes = 6.0
  return c
