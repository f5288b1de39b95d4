r"""Exports a config's packed corpus as .npy token streams plus its tokenizer, for runs that share one tokenisation.

  python launch/export_tokens.py --config=configs/demo.py --out=runs/demo_tokens

writes OUT/train.npy, OUT/val.npy (int32 streams whose rows of data.seq_len are
exactly the config's packed rows) and OUT/tokenizer.model. A run then reads them
with --config.data.source=npy --config.data.train_files=OUT/train.npy
--config.data.val_files=OUT/val.npy --config.data.npy_vocab_size=V
--config.data.tokenizer_path=OUT/tokenizer.model, skipping tokenisation.
"""

from replaid_jax import hostenv

hostenv.reexec_with_huge_pages()  # first, before JAX allocates anything: see replaid_jax/hostenv.py

import json
import os
import shutil

from absl import flags
from ml_collections import config_flags
import numpy as np

from replaid_jax import cli
from replaid_jax import config_lib
from replaid_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:ARG]).", lock_config=False)
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)


def export(cd, out: str) -> dict:
  c = config_lib.from_config_dict(cd)
  os.makedirs(out, exist_ok=True)
  corpus = pipeline.load_corpus(c.data, workdir=out)
  for split in ("train", "val"):
    np.save(os.path.join(out, f"{split}.npy"), getattr(corpus, split).reshape(-1).astype(np.int32))
  info = {"vocab_size": corpus.vocab_size, "seq_len": c.data.seq_len, "data": corpus.info}
  if corpus.tokenizer is not None:
    shutil.copyfile(corpus.tokenizer.path, os.path.join(out, "tokenizer.model"))
  with open(os.path.join(out, "info.json"), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
  return info


def main(argv):
  del argv
  info = export(cli.config(_CONFIG), _OUT.value)
  print(f"wrote {_OUT.value}/train.npy, val.npy, tokenizer.model: vocabulary {info['vocab_size']}, "
        f"{info['data']['train_rows']} train and {info['data']['val_rows']} validation rows of {info['seq_len']}")


if __name__ == "__main__":
  cli.run(main)
