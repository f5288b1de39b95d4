r"""Writes a synthetic Markov token source with known entropy as .npy streams for data.source=npy.

  python launch/synthetic_data.py --out=runs/synth/v64o1s4 --vocab=64 --order=1 --successors=4

OUT/info.json records the exact entropy per token of a data.seq_len window
(`sequence_entropy`), the entropy rate and the unigram entropy. Train on it with

  --config.data.source=npy --config.data.train_files=OUT/train.npy \
  --config.data.val_files=OUT/val.npy --config.data.npy_vocab_size=VOCAB
"""

from replaid_jax import hostenv

hostenv.reexec_with_huge_pages()  # first, before JAX allocates anything: see replaid_jax/hostenv.py

import json

from absl import flags

from replaid_jax import cli

from replaid_jax.research import synthetic

_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_VOCAB = flags.DEFINE_integer("vocab", 64, "Vocabulary size.")
_ORDER = flags.DEFINE_integer("order", 1, "Markov order (tokens of context).")
_SUCC = flags.DEFINE_integer("successors", 4, "Possible next tokens per context (sparsity).")
_CONC = flags.DEFINE_float("concentration", 1.0, "Dirichlet concentration of the next-token probabilities.")
_SEQ = flags.DEFINE_integer("seq_len", 64, "Window length the entropy per token is computed for.")
_TRAIN = flags.DEFINE_integer("train_tokens", 2_000_000, "Training tokens.")
_VAL = flags.DEFINE_integer("val_tokens", 65_536, "Validation tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the chain and the draws.")


def main(argv):
  del argv
  src = synthetic.make_markov(_VOCAB.value, _ORDER.value, _SUCC.value, concentration=_CONC.value, seed=_SEED.value)
  name = f"markov V={_VOCAB.value} order={_ORDER.value} successors={_SUCC.value}"
  info = synthetic.write_source(src, _OUT.value, train_tokens=_TRAIN.value, val_tokens=_VAL.value,
                                seq_len=_SEQ.value, seed=_SEED.value, name=name)
  print(json.dumps(info, indent=1))


if __name__ == "__main__":
  cli.run(main)
