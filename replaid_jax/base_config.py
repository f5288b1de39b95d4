"""Every configuration field, defined once, with its meaning.

Experiment configs (configs/*.py) import `get_base_config()`, through
`from configs import base`, and override only what differs. The defaults live
in the library because evaluation and sampling fill keys a saved config lacks
from them.
Each section is converted into a frozen dataclass by `replaid_jax.config_lib`,
which rejects unknown and missing keys.
"""

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.objective = "replaid"  # "replaid" (VDM on embeddings), "ar" (causal, exact NLL), "mdlm" (masked) or "duo" (uniform)
  c.seed = 0  # seeds parameter init, time sampling, noise and data order

  # ---- model: the denoiser (DiT backbone) and its RePlaid input/output layers.
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = config_dict.placeholder(int)  # set from the tokenizer when left None
  m.embed_dim = 16  # d_e: dimension of the learned unit-norm token embeddings
  m.width = 256  # D: transformer width
  m.num_layers = 6  # number of DiT blocks
  m.num_heads = 4  # attention heads; width must be divisible by it
  m.mlp_ratio = 4  # MLP hidden width = mlp_ratio * width
  m.cond_dim = 128  # width of the adaLN conditioning vector
  m.cond_freqs = 32  # sinusoidal frequencies of the noise-level embedding
  m.cond_input = "gamma"  # scalar fed to adaLN: "gamma" (noise level, default) or "t" (ablation)
  m.max_seq_len = 1024  # longest sequence the model accepts (RoPE tables are built to this)
  m.rope_base = 10000.0  # RoPE base frequency
  m.compute_dtype = "float32"  # matmul dtype in the blocks: float32 (CPU) or bfloat16 (GPU/TPU)
  m.causal = False  # causal attention (AR baseline); RePlaid is bidirectional
  m.output_bias_init = "zeros"  # output bias init: "zeros" or "unigram" (log unigram of training tokens)
  m.schedule_hidden = 1024  # hidden units of the monotone noise-schedule MLP
  m.remat = False  # rematerialise each block in the backward pass
  m.remat_policy = "full"  # what remat keeps: "full" (block inputs only), "dots" (matmul outputs), "dots_no_batch"
  m.head_init_scale = 0.0  # output projection init: 0 (zeros, DiT) or N(0, (scale/sqrt(width))^2)
  m.gate_init = 0.0  # initial adaLN residual gates: 0 (adaLN-Zero) or a constant
  m.input_posterior = False  # also feed each position's own-z token posterior, embedded by a V x D table, to h_0
  # A study switch for the plateau (docs/plateau.md), a departure from the DiT: "alibi" adds a fixed penalty
  # -s_h |i - j| to the attention logits, next to RoPE, with slopes s_h = 2^(-8h/H), h = 0..H-1 (head 0 local).
  # RoPE only ("none", the DiT's attention), plus a fixed locality penalty -s_h |i - j| ("alibi"), or plus a
  # trained bias per block, head and distance that starts as that penalty ("learned")
  m.attention_bias = "none"  # "none", "alibi" or "learned" (see above)
  m.block = "dit"  # "dit" (adaLN-Zero, LayerNorm, MLP biases) or "plaid" (the original Plaid block, ablation)

  # ---- diffusion: the ELBO, its estimator and the schedule.
  d = c.diffusion = ml_collections.ConfigDict()
  d.gamma_0 = -3.0  # initial gamma at t=0 (learned bound)
  d.gamma_1 = 6.0  # initial gamma at t=1 (learned bound)
  d.schedule = "learned"  # "learned" (monotone MLP trained on E[l^2]) or "linear_fixed"
  d.learn_bounds = True  # train gamma_0 and gamma_1 on E[loss]
  d.selfcond_fraction = 0.25  # fraction of the training batch that is self-conditioned (0 disables)
  d.output_prior = True  # add (alpha/sigma^2) z.E^T to the logits
  d.output_prior_warmup_steps = 5000  # linear warm-up of the output-prior scale (0: full from the start)
  d.recon_split = "adaptive"  # reconstruction rows per batch: "adaptive" (Neyman) or "fixed"
  d.recon_fraction = 0.125  # reconstruction share when fixed, and the adaptive split's starting point
  d.loss_stats_decay = 0.997  # EMA decay of the per-term loss statistics driving the adaptive split
  d.learn_embeddings = True  # train the embedding matrix (False: frozen at its random init, ablation)
  d.aux_ce_weight = 0.0  # weight of an auxiliary token CE on the diffusion rows (ablation; 0 = pure ELBO)
  d.mdlm_train_loss = "low_var"  # objective=mdlm: "low_var" (unweighted masked CE) or "elbo"; eval is the ELBO
  d.antithetic_noise = False  # study switch (replaid, even train.draws_per_sequence): draws in pairs eps, -eps at one time
  d.schedule_variance = "second_moment"  # schedule interior: "second_moment" (E[l^2]) or "within_time" (study switch)

  # ---- data.
  da = c.data = ml_collections.ConfigDict()
  da.source = "shakespeare"  # "shakespeare" (embedded), "text" (.txt/.jsonl files) or "npy" (token arrays)
  da.train_files = ""  # comma-separated paths or globs (text/npy sources)
  da.val_files = ""  # comma-separated paths or globs (text/npy sources)
  da.jsonl_field = "text"  # field holding the document in .jsonl files
  da.val_plays = "hamlet,the-tempest,twelfth-night"  # held-out plays of the embedded corpus
  da.tokenizer_path = ""  # SentencePiece .model; empty trains one on the training text (cached)
  da.tokenizer_type = "unigram"  # SentencePiece model type when training: "unigram" or "bpe"
  da.tokenizer_vocab_size = 4096  # pieces when training a tokenizer
  da.npy_vocab_size = config_dict.placeholder(int)  # vocabulary size of pre-tokenised .npy data
  da.cache_dir = ""  # trained-tokenizer cache; empty: $REPLAID_JAX_TOKENIZER_CACHE or ~/.cache/replaid_jax/tokenizers
  da.seq_len = 128  # L: tokens per training sequence
  da.num_workers = 0  # grain worker processes

  # ---- optimisation.
  o = c.optim = ml_collections.ConfigDict()
  o.lr = 1e-3  # backbone peak learning rate
  o.embedding_lr = 1e-2  # learning rate of the embedding matrix
  o.schedule_lr = 1e-2  # learning rate of the noise-schedule MLP
  o.bounds_lr = 1e-2  # learning rate of gamma_0, gamma_1
  o.weight_decay = 0.1  # backbone decoupled weight decay (matrices only)
  o.embedding_weight_decay = 0.0  # weight decay of the embedding matrix
  o.schedule_weight_decay = 0.0  # weight decay of the schedule MLP
  o.bounds_weight_decay = 1e-3  # weight decay of the gamma bounds
  o.b1 = 0.9  # Adam beta1
  o.b2 = 0.99  # Adam beta2
  o.eps = 1e-8  # Adam epsilon
  o.warmup_steps = 100  # linear warm-up steps (all groups)
  o.decay = "cosine"  # after warm-up: "cosine", "linear" or "constant"
  o.final_lr_fraction = 0.1  # final lr as a fraction of the peak (cosine/linear)
  o.grad_clip = 1.0  # global gradient-norm clip (0 disables)
  o.ema_decay = 0.0  # EMA of parameters (0 disables; the EMA then equals the params)

  # ---- training loop.
  t = c.train = ml_collections.ConfigDict()
  t.batch_size = 16  # global batch (sequences per optimizer step)
  t.grad_accum_steps = 1  # micro-batches per step; batch_size must divide by it
  t.draws_per_sequence = 1  # K > 1 tiles each batch K times: K lattice times and noises per sequence, K x compute
  t.num_steps = 1000  # optimizer steps (ignored when max_minutes ends the run first)
  t.max_minutes = 0.0  # wall-clock budget in minutes, 0 for none; the run ends with a final eval
  # train.size_to_minutes measures the speed over the run's first real steps (up to 20, while they are warm-up steps,
  # whose learning rate does not depend on the run's length; with a shorter warm-up it times the compiled step on a
  # copy of the state) and sets num_steps, and the learning-rate schedule with it, to the steps that fit (num_steps
  # at most; 20% kept back for evaluations and checkpoints). The decision is logged and saved (train/config.json,
  # checkpoint metadata "sizing"); a resumed run keeps it.
  t.size_to_minutes = 0.0  # >0: size the run to this many minutes from its start (see above); 0: num_steps as given
  t.log_every = 10  # steps between metric logs
  t.eval_every = 250  # steps between in-loop validation bounds (0: only at the end)
  t.eval_every_minutes = 0.0  # also evaluate every so many minutes (0: off)
  t.peak_flops = 0.0  # device peak FLOP/s for MFU; 0 measures a 2048^2 fp32 matmul at start
  t.skip_nonfinite_steps = 0  # steps with a non-finite loss/gradient that are skipped (not applied) before the run stops

  # ---- evaluation (in-loop and the eval binary).
  e = c.eval = ml_collections.ConfigDict()
  e.batch_size = 32  # sequences per eval batch
  e.num_times = 4  # K: diffusion times per sequence (low-discrepancy lattice)
  e.max_batches = 0  # 0: the whole split; else a quick look at that many batches
  e.final_num_times = 8  # K for the evaluation that ends a run (0: end without it)
  e.final_max_batches = 0  # batches of that evaluation (0: the whole validation split)
  e.num_samples = 4  # samples printed at the end of a run (0: none)
  e.sample_steps = 256  # ancestral steps for those samples
  e.split = "test"  # launch/eval.py: split of a zero-shot set ("test", "validation" or "train")
  e.data_dir = ""  # launch/eval.py: folder with local copies of zero-shot sets (errors name the files)
  e.curve_points = 21  # launch/eval.py --curves: points of the t-grid on [0, 1]
  e.curve_max_sequences = 128  # launch/eval.py --curves: held-out sequences per grid point
  e.geometry_top_tokens = 20  # launch/eval.py --geometry: most frequent tokens whose neighbours are listed
  e.diagnostic_sequences = 64  # RePlaid: sequences for the per-noise-level diagnostic at each in-loop evaluation (0: off)

  # ---- sampling (launch/sample.py; --config.sample.KEY=VALUE overrides these and nothing else).
  s = c.sample = ml_collections.ConfigDict()
  s.num_samples = 8  # sequences to generate
  s.batch_size = 8  # sequences per sampling batch (split over the devices of the mesh's batch axes)
  s.seq_len = 0  # tokens per sample; 0: the checkpoint's data.seq_len
  s.steps = 256  # T: sampler steps (up to thousands; coefficients are computed in float64)
  s.sampler = "ddpm"  # "ddpm" (ancestral, VDM eq. 33), "ddim" or "dpm2m" (DPM-Solver++(2M))
  s.time_grid = "uniform"  # step times: "uniform" in t, "quadratic" (finer near t=0) or "logsnr" (uniform in gamma)
  s.score_temp = 1.0  # score temperature: eps_hat is divided by it (1: none; Plaid used 0.9)
  s.selfcond = True  # feed each step's prediction x_hat to the next step (as in training)
  s.seed = 0  # noise seed; sample i uses stream i, so a seed and settings fix the tokens
  s.prefix = ""  # text every sample starts with (prefix completion)
  s.prefix_file = ""  # UTF-8 file whose text is the prefix (instead of sample.prefix)
  s.suffix = ""  # text every sample contains after the gap (infilling)
  s.suffix_file = ""  # UTF-8 file whose text is the suffix (instead of sample.suffix)
  s.gap = 0  # tokens generated between prefix and suffix; 0 puts the suffix at the end of the sequence
  s.constraints = ""  # words to include, comma-separated: "word" anywhere, "word@POS" at a token, ":W" weight (as " word")
  s.avoid = ""  # comma-separated words to avoid (negation), same syntax as sample.constraints
  s.condition = "guidance"  # how prefix/suffix are imposed: "guidance" (gradient on z), "clamp" or "both"
  s.guidance_weight = 2.0  # guidance weight w, multiplied by per-word weights (0 disables guidance)
  s.tokenizer_path = ""  # tokenizer file when the recorded one moved (its sha256 must match the checkpoint's)
  s.judge = ""  # generative-perplexity judge: "gpt2:DIR" (local Hugging Face GPT-2 directory) or "" for none
  s.judge_batch_size = 8  # judge sequences per forward pass
  s.print_samples = 8  # samples printed to the console (-1: all)
  s.progress = True  # progress line (replaid_jax/progress.py) over the sampler steps, on stderr

  # ---- checkpoints.
  k = c.checkpoint = ml_collections.ConfigDict()
  k.every_steps = 500  # save period in steps (and always at the end); 0: only at the end
  k.keep = 3  # checkpoints kept (at least 1)
  k.async_save = True  # write checkpoints in the background

  # ---- device mesh.
  me = c.mesh = ml_collections.ConfigDict()
  me.axes = ("data", "fsdp", "tensor")  # mesh axis names
  me.shape = (-1, 1, 1)  # one -1 is filled with the remaining devices
  me.cpu_devices = 0  # single-process CPU runs: devices shown (n; 0: one per core dividing the batch; see distributed.py)
  me.rules = (  # logical axis -> mesh axes
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("vocab", "tensor"),
  )
  return c


def get_config() -> ml_collections.ConfigDict:
  return get_base_config()
