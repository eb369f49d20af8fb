"""Block patterns through `nm_attention`: the xla backend against the reference.

The reference's pattern semantics are tested against a naive loop in
`test_reference_patterns.py`; here the blocked xla backend (several tiles per
axis, tiles that cut across pattern blocks) matches it, forward and
gradients, for random modes, under `jit` with traced modes, and cuDNN, which
takes no patterns, refuses them (explicitly) or is passed over (`None`). The
Triton kernels' patterns: `test_pallas_triton_patterns.py`; the Hopper
kernel's: `test_pallas_mosaic.py`.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nmattn
from attention_test_base import (check_against_reference, random_inputs,
                                 rel_err)
from nmattn import reference, xla_backend
from nmattn._validation import canonicalize
from nmattn.attention import select_backend

# Tiles of 16 x 32 against pattern blocks of 24 x 48: tiles straddle blocks.
SMALL = nmattn.backends.Xla(config=xla_backend.XlaTuning(block_q=16, block_k=32))


def _modes(rng, shape):
  return jnp.asarray(rng.integers(0, 3, shape), jnp.int8)


@pytest.mark.parametrize("case", ["causal_gqa_2of4", "bias_lengths_1of2",
                                  "dense_block_sparse"])
def test_xla_matches_reference(rng, case):
  q, k, v = random_inputs(rng, batch=2, q_len=70, kv_len=100, heads=4,
                          kv_heads=2, head_dim=16)
  kwargs = {
      "causal_gqa_2of4": dict(n=2, m=4, is_causal=True),
      "bias_lengths_1of2": dict(
          n=1, m=2, bias=jnp.asarray(rng.standard_normal((1, 4, 70, 100)),
                                     jnp.float32),
          key_value_seq_lengths=jnp.asarray([100, 61], jnp.int32)),
      "dense_block_sparse": dict(n=4, m=4),
  }[case]
  pattern = nmattn.BlockPattern(_modes(rng, (2, 4, 3, 3)), block_q=24,
                                block_k=48)
  bias = kwargs.pop("bias", None)
  cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  check_against_reference(SMALL, q, k, v, bias, cotangent,
                          block_pattern=pattern, **kwargs)


def test_traced_modes_under_jit_and_skip_rows(rng):
  """Modes computed inside `jit`; a query block whose key blocks all SKIP
  gives zero rows, as a row with no kept score must."""
  q, k, v = random_inputs(rng, batch=1, q_len=64, kv_len=64, heads=2,
                          kv_heads=2, head_dim=16)
  modes = _modes(rng, (1, 2, 2, 4)).at[:, :, 0].set(nmattn.SKIP)

  @jax.jit
  def run(q, k, v, modes):
    pattern = nmattn.BlockPattern(modes, block_q=32, block_k=16)
    return nmattn.nm_attention(q, k, v, block_pattern=pattern)

  out = run(q, k, v, modes)
  assert np.all(np.asarray(out[:, :32]) == 0.0)
  want = reference.nm_attention_reference(
      q, k, v, block_pattern=nmattn.BlockPattern(modes, 32, 16))
  assert rel_err(out, want) < 1e-5


def test_cudnn_refuses_patterns(rng):
  q, k, v = random_inputs(rng, batch=1, q_len=32, kv_len=32, heads=2,
                          kv_heads=2, head_dim=16)
  pattern = nmattn.BlockPattern(np.ones((1, 1), np.int8), block_q=32, block_k=32)
  spec = canonicalize(q, k, v, block_pattern=pattern)[0].spec
  assert spec.has_pattern and (spec.block_q, spec.block_k) == (32, 32)
  assert select_backend(spec).name == "xla"
  with pytest.raises(nmattn.UnsupportedCallError, match="block_pattern"):
    nmattn.nm_attention(q, k, v, block_pattern=pattern, implementation="cudnn")
  with pytest.raises(ValueError, match="block_pattern.block_k must be a multiple"):
    nmattn.nm_attention(q, k, v, n=2, m=4, block_pattern=nmattn.BlockPattern(
        np.ones((1, 1), np.int8), block_q=32, block_k=6))


def test_flax_attention_fn_takes_a_pattern(rng):
  q, k, v = random_inputs(rng, batch=2, q_len=32, kv_len=32, heads=2,
                          kv_heads=2, head_dim=16)
  pattern = nmattn.BlockPattern(_modes(rng, (2, 2, 2, 2)), block_q=16,
                                block_k=16)
  out = nmattn.nm_dot_product_attention(q, k, v, block_pattern=pattern)
  want = reference.nm_attention_reference(q, k, v, block_pattern=pattern)
  assert rel_err(out, want) < 1e-5
