"""The miniature scaling study that runs on a 2-core CPU: tiny DiTs on the embedded Shakespeare corpus.

One row of the size table per config (configs/scaling_mini.py:SIZE); the
objective and the step count come from the sweep generator. The README's
reproduction (each budget samples the sizes around its optimum, added with
--append):

  python launch/export_tokens.py --config=configs/scaling_mini.py:text --out=runs/mini_tokens
  G="python launch/sweeps/isoflop.py --config=configs/scaling_mini.py --out=runs/mini_sweep"
  $G --methods=replaid,ar,mdlm --budgets=7.5e11,2.25e12,6.75e12 --sizes=XXS,XS,S,M
  $G --append --methods=replaid,ar,mdlm --budgets=7.5e11 --sizes=XXXS
  $G --append --methods=replaid,mdlm --budgets=2.25e12 --sizes=XXXS
  $G --append --methods=replaid --budgets=6.75e12 --sizes=XXXS
  $G --append --methods=replaid --budgets=2e13 --sizes=XXXS,XXS,XS,S
  $G --append --methods=ar --budgets=8.3e10,2.5e11 --sizes=XXXS,XXS,XS
  $G --append --methods=duo --budgets=7.5e11,2.25e12 --sizes=XXXS,XXS,XS
  $G --append --methods=duo --budgets=6.75e12 --sizes=XXS,XS,S
  python launch/sweeps/run.py --sweep=runs/mini_sweep --parallel=2
  python launch/sweeps/analyze.py --sweep=runs/mini_sweep --window=3

Every method shares the data (SentencePiece 512, L = 64), batch, optimizer and
schedule; the final evaluation covers 512 held-out sequences (K = 3 times per
sequence for the diffusion models, the exact NLL for AR). The first command
tokenises the embedded corpus once (`:text` is the same config reading the
plays), so that each of the sweep's runs loads .npy streams instead.
"""

from configs import base

# name: (width, layers, heads)
SIZES = {"XXXS": (16, 2, 1), "XXS": (32, 2, 2), "XS": (64, 2, 2), "S": (96, 3, 3), "M": (128, 4, 4)}


TOKENS = "runs/mini_tokens"  # written by launch/export_tokens.py (relative to the repository root)


def get_config(size: str = "XS"):
  if size not in SIZES and size != "text":
    raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)} or 'text' "
                     "(configs/scaling_mini.py:SIZE).")
  c = base.get_base_config()
  c.model.width, c.model.num_layers, c.model.num_heads = SIZES.get(size, SIZES["XS"])
  c.model.cond_dim = 64
  c.model.cond_freqs = 16
  c.model.max_seq_len = 64
  c.model.schedule_hidden = 256
  c.model.output_bias_init = "unigram"
  c.data.tokenizer_vocab_size = 512
  c.data.seq_len = 64
  c.data.val_plays = "the-tempest,the-comedy-of-errors"
  if size != "text":
    c.data.source = "npy"
    c.data.train_files = f"{TOKENS}/train.npy"
    c.data.val_files = f"{TOKENS}/val.npy"
    c.data.npy_vocab_size = 512
    c.data.tokenizer_path = f"{TOKENS}/tokenizer.model"
  c.diffusion.output_prior_warmup_steps = 0
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 30
  c.optim.decay = "cosine"
  c.train.batch_size = 32
  c.train.num_steps = 1000  # set per run from the FLOP budget by the sweep generator
  c.train.log_every = 50
  c.train.eval_every = 0
  c.train.peak_flops = 1.2e11  # this CPU's 2048^2 matmul rate; skips measuring it in every run
  c.eval.batch_size = 64
  c.eval.final_num_times = 3
  c.eval.final_max_batches = 8
  c.eval.num_samples = 0
  c.checkpoint.every_steps = 0
  c.checkpoint.keep = 1
  c.mesh.shape = (1, 1, 1)
  return c
