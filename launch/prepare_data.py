"""Tokenises and packs raw corpora into ArrayRecord shards (docs/data_preparation.md).

  python launch/prepare_data.py --input_format=jsonl.zst \
      --inputs='/data/SlimPajama/train/chunk1/*.jsonl.zst' \
      --tokenizer=/models/llama2/tokenizer.model --seq_len=2048 --output_dir=/data/sp_2048

  python launch/prepare_data.py --input_format=owt --inputs=/data/openwebtext.tar.xz \
      --tokenizer=/models/gpt2/tokenizer.json --seq_len=1024 --output_dir=/data/owt_1024

Rerunning the same command after an interruption resumes it.
"""

from replaid_jax import hostenv

hostenv.reexec_with_huge_pages()  # first, before JAX allocates anything: see replaid_jax/hostenv.py

from absl import app
from absl import flags

from replaid_jax import cli
from replaid_jax.data import prepare

_DEFAULTS = prepare.PrepareConfig(inputs="", output_dir="", tokenizer="")
_INPUTS = flags.DEFINE_string("inputs", None, "Comma-separated input paths or globs.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory for the shards and metadata.json"
                                  " (local, or gs://... written locally then copied).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece .model or Hugging Face tokenizer.json.")
_INPUT_FORMAT = flags.DEFINE_enum("input_format", _DEFAULTS.input_format, prepare.INPUT_FORMATS,
                                  "text: .txt files; jsonl: .jsonl; jsonl.zst: zstd-compressed jsonl"
                                  " (SlimPajama); owt: the OpenWebText openwebtext.tar.xz archive.")
_TOKENIZER_KIND = flags.DEFINE_enum("tokenizer_kind", _DEFAULTS.tokenizer_kind, prepare.TOKENIZER_KINDS,
                                    "auto: bpe for .json files, else sentencepiece.")
_EOS_TOKEN = flags.DEFINE_string("eos_token", _DEFAULTS.eos_token,
                                 "BPE end-of-sequence token; empty tries <|endoftext|>, </s>, <eos>, [EOS].")
_JSONL_FIELD = flags.DEFINE_string("jsonl_field", _DEFAULTS.jsonl_field, "Field of jsonl records holding the text.")
_SPLIT_PARAGRAPHS = flags.DEFINE_bool("split_paragraphs", _DEFAULTS.split_paragraphs,
                                      "text: one document per blank-line-separated block, not per file.")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", _DEFAULTS.val_fraction,
                                   "Expected share of documents held out (by a hash of their text);"
                                   " 0: none, 1: all (a held-out corpus of its own).")
_VAL_SALT = flags.DEFINE_string("val_salt", _DEFAULTS.val_salt, "Key of the validation hash.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", _DEFAULTS.seq_len, "Tokens per row.")
_ROWS_PER_SHARD = flags.DEFINE_integer("rows_per_shard", _DEFAULTS.rows_per_shard, "Rows per shard file.")
_FILES_PER_UNIT = flags.DEFINE_integer(
    "files_per_unit", _DEFAULTS.files_per_unit,
    "Input files (owt: archive members) per resumable unit; 0: text 256, jsonl 1, jsonl.zst 1, owt 64.")
_OPTIONS = flags.DEFINE_string("array_record_options", _DEFAULTS.array_record_options,
                               "ArrayRecordWriter options.")
_NUM_THREADS = flags.DEFINE_integer("num_threads", _DEFAULTS.num_threads,
                                    "SentencePiece encoding threads; 0: all cores.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", _DEFAULTS.num_workers,
                                    "Tokenizer processes; 0 tokenises in the main process.")
_LOG_EVERY = flags.DEFINE_float("log_every_seconds", _DEFAULTS.log_every_seconds, "Progress log period.")
_STAGING_DIR = flags.DEFINE_string("staging_dir", _DEFAULTS.staging_dir,
                                   "Local directory for a gs://... --output_dir; empty: under the temp dir.")
_OVERWRITE = flags.DEFINE_bool("overwrite", _DEFAULTS.overwrite,
                               "Delete what --output_dir holds of a previous run first.")
_MAX_UNITS = flags.DEFINE_integer("max_units", None, "Stop after this many units (resume later).")
flags.mark_flags_as_required(["inputs", "output_dir", "tokenizer"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = prepare.PrepareConfig(
      inputs=_INPUTS.value, output_dir=_OUTPUT_DIR.value, tokenizer=_TOKENIZER.value,
      input_format=_INPUT_FORMAT.value, tokenizer_kind=_TOKENIZER_KIND.value,
      eos_token=_EOS_TOKEN.value, jsonl_field=_JSONL_FIELD.value,
      split_paragraphs=_SPLIT_PARAGRAPHS.value, val_fraction=_VAL_FRACTION.value,
      val_salt=_VAL_SALT.value, seq_len=_SEQ_LEN.value, rows_per_shard=_ROWS_PER_SHARD.value,
      files_per_unit=_FILES_PER_UNIT.value, array_record_options=_OPTIONS.value,
      num_threads=_NUM_THREADS.value, num_workers=_NUM_WORKERS.value,
      log_every_seconds=_LOG_EVERY.value, staging_dir=_STAGING_DIR.value,
      overwrite=_OVERWRITE.value)
  meta = prepare.prepare(cfg, max_units=_MAX_UNITS.value)
  if meta is None:
    print(f"stopped after --max_units={_MAX_UNITS.value}; rerun without it to finish.")
  else:
    for split, info in meta["splits"].items():
      print(f"{split}: {info['docs']} docs, {info['rows']} rows x {meta['seq_len']} in"
            f" {len(info['files'])} files, {info['tokens_dropped']} tokens dropped")


if __name__ == "__main__":
  cli.run(main)
