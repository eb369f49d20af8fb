"""The "xla" backend against the reference, plus its memory bound."""

import jax
import jax.numpy as jnp
import pytest

import nmattn
from attention_test_base import AttentionTestBase, random_inputs, rel_err
from nmattn import reference
from nmattn._validation import canonicalize
from nmattn.xla_backend import XlaTuning, default_tuning, nm_attention_xla


class TestXlaBackend(AttentionTestBase):
  implementation = "xla"


@pytest.mark.parametrize("block_q,block_k", [(16, 16), (32, 48), (128, 512)])
def test_block_sizes_agree(rng, block_q, block_k):
  q, k, v = random_inputs(rng, q_len=70, kv_len=99)
  kwargs = dict(is_causal=True, n=2, m=4)
  call, _ = canonicalize(q, k, v, **kwargs)
  out = nm_attention_xla(call, XlaTuning(block_q, block_k))
  assert rel_err(out, reference.nm_attention_reference(q, k, v, **kwargs)) < 1e-5


def test_tuning_rejects_misaligned_key_blocks():
  with pytest.raises(ValueError, match="block_k"):
    XlaTuning(block_q=16, block_k=24)


def test_temp_memory_is_a_fraction_of_the_score_tensor():
  """S=8192, B=1, H=4, D=64: the f32 score tensor alone would be 1 GiB."""
  batch, seq, heads, dim = 1, 8192, 4, 64
  shape = jax.ShapeDtypeStruct((batch, seq, heads, dim), jnp.float32)

  def loss(q, k, v):
    return jnp.sum(nmattn.nm_attention(q, k, v, is_causal=True,
                                       implementation="xla"))

  score_bytes = batch * heads * seq * seq * 4
  for fn in (loss, jax.grad(loss, argnums=(0, 1, 2))):
    stats = jax.jit(fn).lower(shape, shape, shape).compile().memory_analysis()
    assert stats.temp_size_in_bytes < score_bytes / 4, stats.temp_size_in_bytes


def test_default_tuning_bounds_the_tile():
  """Large batch*heads: the f32 score tile stays within the 16 MiB budget."""
  shape = jax.ShapeDtypeStruct((64, 4096, 16, 8), jnp.bfloat16)
  call, _ = canonicalize(shape, shape, shape)
  tuning = default_tuning(call.spec)
  assert (tuning.block_q, tuning.block_k) == (16, 512)
  small, _ = canonicalize(*[jax.ShapeDtypeStruct((1, 70, 2, 8), jnp.float32)] * 3)
  assert default_tuning(small.spec) == XlaTuning(block_q=80, block_k=80)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd"])
def test_forward_mode_raises_and_says_what_works(rng, transform):
  """Every backend's gradient is a custom VJP (no forward mode): the error
  says so and names the reverse-mode way out, instead of JAX's bare TypeError."""
  q, k, v = random_inputs(rng, batch=1, q_len=8, kv_len=8, heads=1, kv_heads=1,
                          head_dim=16)
  fn = lambda q: nmattn.nm_attention(q, k, v)
  run = {"jvp": lambda: jax.jvp(fn, (q,), (q,)),
         "jacfwd": lambda: jax.jacfwd(fn)(q)}[transform]
  with pytest.raises(NotImplementedError, match=r"reverse-mode .*jax\.vjp"):
    run()
  # Reverse mode runs, and matches the reference.
  out, vjp = jax.vjp(fn, q)
  want = jax.vjp(lambda q: reference.nm_attention_reference(q, k, v), q)[1](out)
  assert rel_err(vjp(out)[0], want[0]) < 1e-5


def test_backend_objects_carry_their_tuning(rng):
  q, k, v = random_inputs(rng, q_len=40, kv_len=56)
  backend = nmattn.backends.Xla(config=XlaTuning(block_q=16, block_k=16))
  out = nmattn.nm_attention(q, k, v, is_causal=True, implementation=backend)
  call, _ = canonicalize(q, k, v, is_causal=True)
  assert jnp.array_equal(out, nm_attention_xla(call, XlaTuning(16, 16)))
  with pytest.raises(ValueError, match=r"Xla\(config=...\) must be a XlaTuning"):
    nmattn.backends.Xla(config=(16, 16))
  with pytest.raises(ValueError, match="implementation must be one of"):
    nmattn.nm_attention(q, k, v, implementation=XlaTuning(16, 16))
