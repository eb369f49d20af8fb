"""Measures the MiniLM port against sentence-transformers (needs torch).

  pip install torch==2.13.0 sentence-transformers   # CPU wheel
  python -m experiments.verify_minilm [--out experiments/results/minilm_port.json]

Embeds real sentences (stdlib docstrings and function code from the
retrieval test split) with sentence-transformers' model and with our Flax
port (dense attention, same package files) and writes the agreement: max
absolute difference of the embeddings and min / mean cosine.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import numpy as np

from experiments.data import minilm, stdlib
from experiments.models.attention import AttentionSpec
from experiments.models.transformer import SentenceEncoder


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_texts", type=int, default=256)
  parser.add_argument("--max_len", type=int, default=128)
  parser.add_argument("--out", default="experiments/results/minilm_port.json")
  args = parser.parse_args(argv)
  import sentence_transformers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  pairs = stdlib.docstring_pairs()["test"]
  order = np.random.default_rng(0).permutation(len(pairs))[:args.num_texts // 2]
  texts = ([pairs[i].docstring for i in order] +
           [pairs[i].code for i in order])
  model = sentence_transformers.SentenceTransformer(
      str(minilm.model_dir()), device="cpu")
  model.max_seq_length = args.max_len
  reference = model.encode(texts, batch_size=32, convert_to_numpy=True)

  config = minilm.transformer_config(args.max_len)
  params = {"params": {"encoder": minilm.encoder_params(config)}}
  tokenizer = minilm.Tokenizer(args.max_len)
  apply = jax.jit(SentenceEncoder(config, AttentionSpec("dense")).apply)
  ours = np.concatenate([
      np.asarray(apply(params, *tokenizer(texts[i:i + 32])))
      for i in range(0, len(texts), 32)])
  cosine = np.sum(ours * reference, -1)
  result = {
      "num_texts": len(texts), "max_len": args.max_len,
      "max_abs_diff": float(np.abs(ours - reference).max()),
      "min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean()),
      "sentence_transformers": sentence_transformers.__version__,
      "torch": torch.__version__, "jax": jax.__version__,
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
