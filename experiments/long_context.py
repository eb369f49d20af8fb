"""The long-context byte LM with hierarchical attention: task "bytelm_pattern".

The "bytelm" task (`experiments.tasks.ByteLMTask`: next-byte prediction on the
stdlib sources or given text, bits per byte) whose attention may also carry a
block pattern, chosen in the config (a function cannot be a config value):

  config.attention.pattern.name   ""      no pattern: the "bytelm" task as it is
                                  "topk"  `nmattn.patterns.topk_blocks` of each
                                          layer's own query and key, causal:
                                          a DENSE band of `local_blocks` blocks
                                          either side of the diagonal (so the
                                          diagonal and the one before it at 2)
                                          and `sink_blocks` DENSE first key
                                          blocks, then the highest pooled
                                          scores, `k` blocks per query block
                                          in all, N:M inside (attention.n:m;
                                          n == m: plain block-sparse); chosen
                                          from earlier positions only
                                          (`autoregressive=True`: a block mean
                                          would read the block's later
                                          bytes, which the LM learns to use)
  config.attention.pattern.block  square block size (128: the Triton tile)

and whose layers may compute in bfloat16:

  config.model.dtype   "float32" (the experiment models' default) or
                       "bfloat16": activations and attention inputs in
                       bfloat16 (the GPU kernels' tensor-core path),
                       parameters, logits and loss in float32
                       (`TransformerConfig.dtype`)

A run picks it with `config.task = "bytelm_pattern"` and
`config.task_module = "experiments.long_context"` (as
experiments/configs/bytelm_long.py does). `attention.kind` stays "dense" or
"nm" (what `experiments.train` validates); the run's summary names the
model's attention ("pattern+2:4"), its overrides the pattern. Every kind has
the same parameter tree.
"""

from __future__ import annotations

import dataclasses
import functools

from experiments import tasks
from experiments.models.attention import AttentionSpec
from nmattn import patterns

PATTERNS = ("", "topk")


def pattern_function(pattern_config):
  """`(query, key) -> BlockPattern` of `config.attention.pattern`, or None for no pattern.

  Raises ValueError naming the field for an unknown name or a bad size.
  """
  name = pattern_config.name
  if name not in PATTERNS:
    raise ValueError(f"config.attention.pattern.name must be one of {PATTERNS}; "
                     f"got config.attention.pattern.name={name!r}")
  if not name:
    return None
  for field in ("block", "k", "local_blocks", "sink_blocks"):
    value = pattern_config[field]
    low = 1 if field in ("block", "k") else 0
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ValueError(f"config.attention.pattern.{field} must be an int >= {low}; "
                       f"got config.attention.pattern.{field}={value!r}")
  return functools.partial(
      patterns.topk_blocks, block_q=pattern_config.block,
      block_k=pattern_config.block, k=pattern_config.k,
      local_blocks=pattern_config.local_blocks,
      sink_blocks=pattern_config.sink_blocks, is_causal=True, mode=patterns.NM,
      autoregressive=True)


def causal_block_fraction(seq_len: int, pattern_config) -> float:
  """Fraction of the causal blocks a "topk" pattern keeps at `seq_len`.

  Every query block keeps `min(k, blocks it can reach)` blocks (the band and
  sinks included), whatever the inputs: the count is fixed, only the choice
  depends on q and k.
  """
  nb = patterns.num_blocks(seq_len, pattern_config.block)
  reachable = range(1, nb + 1)
  return sum(min(pattern_config.k, r) for r in reachable) / sum(reachable)


class PatternByteLMTask(tasks.ByteLMTask):
  """`tasks.ByteLMTask` with `config.attention.pattern` on every layer and
  `config.model.dtype` as the decoder's compute dtype."""

  # The values of config.model.dtype this task runs (`train.validate`).
  compute_dtypes = ("float32", "bfloat16")

  def __init__(self, config):
    super().__init__(config)
    self.model = self.model.clone(config=dataclasses.replace(
        self.model.config, dtype=config.model.get("dtype", "float32")))
    block_pattern = pattern_function(config.attention.pattern)
    if block_pattern is not None:
      if config.attention.kind != "nm":
        raise ValueError(
            "config.attention.kind must be 'nm' with a pattern (its n:m applies "
            "inside the NM blocks; n == m for plain block-sparse); got "
            f"config.attention.kind={config.attention.kind!r}")
      spec = AttentionSpec("pattern", config.attention.n, config.attention.m,
                           block_pattern=block_pattern)
      self.model = self.model.clone(attention=spec)


tasks.register("bytelm_pattern", PatternByteLMTask)
