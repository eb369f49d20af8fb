"""Key importance (`nmattn.importance`) against the reference's probabilities:
the blocked xla form, and the Triton kernel in interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nmattn
from attention_test_base import CASES, random_inputs, rel_err
from nmattn import importance, reference
from nmattn._validation import canonicalize
from nmattn import xla_backend
from nmattn.xla_backend import XlaTuning
from pallas_kernels import triton as nm_triton

# Kernel and reference select on float32 scores of the same bf16 inputs; near
# ties can still flip a group, which moves a little probability mass.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _inputs(rng, case, dtype):
  overrides, build = CASES[case]
  shape = dict(batch=2, q_len=40, kv_len=56, heads=4, kv_heads=4, head_dim=16)
  shape.update(overrides)
  q, k, _ = random_inputs(rng, dtype=dtype, **shape)
  kwargs = build(rng, shape["batch"], shape["heads"], shape["q_len"],
                 shape["kv_len"])
  return q, k, kwargs


def _expected(q, k, kwargs):
  """Column sums of the materialised pruned probabilities, float64."""
  kwargs = dict(kwargs)
  bias, mask = kwargs.pop("bias", None), kwargs.pop("mask", None)
  call, _ = canonicalize(q, k, k, bias, mask, **kwargs)
  return np.asarray(reference.call_weights(call), np.float64).sum(axis=2)


# Every option in float32, the main ones in bfloat16 (CPU test time).
@pytest.mark.parametrize("case,dtype", [
    *((case, jnp.float32) for case in sorted(CASES)),
    *((case, jnp.bfloat16) for case in ("2of4", "gqa", "lengths",
                                        "causal_window_mask"))],
                         ids=lambda x: getattr(x, "__name__", x))
def test_matches_reference(rng, case, dtype):
  q, k, kwargs = _inputs(rng, case, dtype)
  got = jax.jit(lambda q, k: importance.key_importance(q, k, **kwargs))(q, k)
  assert got.dtype == jnp.float32
  assert got.shape == (q.shape[0], q.shape[2], k.shape[1])
  assert rel_err(got, _expected(q, k, kwargs)) < TOL[dtype]


@pytest.mark.parametrize("case,block_q,block_k", [
    ("causal_window_mask", 16, 16), ("lengths", 16, 16), ("bias", 16, 16),
    ("gqa", 32, 48)])
def test_several_blocks_match_reference(rng, case, block_q, block_k):
  q, k, kwargs = _inputs(rng, case, jnp.float32)
  kwargs = dict(kwargs)
  bias, mask = kwargs.pop("bias", None), kwargs.pop("mask", None)
  call, _ = canonicalize(q, k, k, bias, mask, **kwargs)
  got = xla_backend.xla_key_importance(call, XlaTuning(block_q, block_k))
  assert rel_err(got, reference.call_weights(call).sum(axis=2)) < 1e-5


def test_each_valid_query_contributes_one(rng):
  """Summed over keys, the importance counts the queries that see a key."""
  q, k, _ = random_inputs(rng, q_len=21, kv_len=30, head_dim=8)
  q_lengths = jnp.asarray([13, 21], jnp.int32)
  got = importance.key_importance(q, k, query_seq_lengths=q_lengths,
                                  is_causal=True, n=1, m=2)
  np.testing.assert_allclose(got.sum(-1), np.broadcast_to(
      np.asarray(q_lengths, np.float32)[:, None], (2, 4)), rtol=1e-5)


def test_unbatched_inputs(rng):
  q, k, _ = random_inputs(rng, batch=1, q_len=9, kv_len=12, head_dim=8)
  got = importance.key_importance(q[0], k[0], n=2, m=4)
  np.testing.assert_allclose(got, importance.key_importance(q, k)[0], rtol=1e-6)
  assert got.shape == (4, 12)


def test_is_a_statistic_without_gradient(rng):
  q, k, _ = random_inputs(rng, q_len=8, kv_len=8, head_dim=8)
  bias = jnp.asarray(rng.standard_normal((1, 4, 8, 8)), jnp.float32)
  weights = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
  grads = jax.grad(
      lambda q, k, bias: jnp.sum(weights * importance.key_importance(
          q, k, bias)), argnums=(0, 1, 2))(q, k, bias)
  for g in grads:
    np.testing.assert_array_equal(g, np.zeros_like(g))


def test_rejects_backends_without_importance(rng):
  q, k, _ = random_inputs(rng, q_len=8, kv_len=8, head_dim=8)
  for name in ("pallas_mosaic", "cudnn"):
    with pytest.raises(nmattn.UnsupportedCallError,
                       match=f"implementation='{name}' cannot compute key importance"):
      importance.key_importance(q, k, implementation=name)
  with pytest.raises(ValueError, match="implementation='flash'"):
    importance.key_importance(q, k, implementation="flash")


# Several query and key tiles of the importance kernel (the dK/dV tiles).
SMALL_TRITON = nmattn.backends.PallasTriton(config=nm_triton.TuningConfig(
    block_q_dkv=16, block_k_dkv=64))


@pytest.mark.parametrize("case", ["gqa", "causal_window_mask", "lengths",
                                  "bias_broadcast", "dense"])
def test_triton_matches_reference(rng, case):
  """The importance kernel in interpret mode, and the output beside it."""
  q, k, kwargs = _inputs(rng, case, jnp.float32)
  v = jnp.asarray(rng.standard_normal(k.shape), jnp.float32)
  out, got = jax.jit(lambda q, k, v: nmattn.nm_attention_with_importance(
      q, k, v, **kwargs, implementation=SMALL_TRITON))(q, k, v)
  assert got.dtype == jnp.float32 and got.shape == (q.shape[0], q.shape[2],
                                                    k.shape[1])
  assert rel_err(got, _expected(q, k, kwargs)) < 1e-5
  assert rel_err(out, reference.nm_attention_reference(q, k, v, **kwargs)) < 1e-5


@pytest.mark.parametrize("implementation", ["xla", SMALL_TRITON],
                         ids=["xla", "pallas_triton"])
def test_block_pattern_matches_reference(rng, implementation):
  q, k, kwargs = _inputs(rng, "causal", jnp.float32)
  modes = jnp.asarray(rng.integers(0, 3, (2, 4, 3, 1)), jnp.int8)
  kwargs = dict(kwargs, block_pattern=nmattn.BlockPattern(modes, 16, 64))
  got = jax.jit(lambda q, k: importance.key_importance(
      q, k, **kwargs, implementation=implementation))(q, k)
  assert rel_err(got, _expected(q, k, kwargs)) < 1e-5


def test_rejects_bad_arguments(rng):
  q, k, _ = random_inputs(rng, q_len=8, kv_len=8, head_dim=8)
  with pytest.raises(ValueError, match="n=5"):
    importance.key_importance(q, k, n=5, m=4)
  with pytest.raises(ValueError, match="key head_dim"):
    importance.key_importance(q, k[..., :4])
  with pytest.raises(ValueError, match="mask must be a boolean"):
    importance.key_importance(q, k, mask=jnp.ones((8, 8), jnp.int32))


def test_memory_is_a_fraction_of_the_score_tensor():
  """S=8192, B=1, H=4: the f32 probabilities alone would be 1 GiB."""
  shape = jax.ShapeDtypeStruct((1, 8192, 4, 64), jnp.float32)
  compiled = jax.jit(lambda q, k: importance.key_importance(
      q, k, is_causal=True)).lower(shape, shape).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 4 * 8192**2 * 4 / 4
