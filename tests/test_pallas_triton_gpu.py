"""The Triton kernels on a CUDA GPU at real sizes (skipped without a GPU).

bf16 forward and gradients against the float32 reference, the fraction of N:M
groups whose selection differs from the reference's, the output error against
the reference evaluated with the kernel's own selection, other dtypes and
head dims, and peak temporary memory growing linearly in the sequence length.
Measured figures are printed (`pytest -s`) and, with $OUT set, appended to
`$OUT/triton_gpu_tests.jsonl`.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nmattn
from attention_test_base import FORWARD_TOL, GRAD_TOL, random_inputs, rel_err
from nmattn import masking, reference
from nmattn._validation import canonicalize
from nmattn.attention import select_backend
from pallas_kernels import triton as nm_triton
from test_pallas_triton import (check_nan_scores_propagate, triton_attention,
                                triton_selection)

pytestmark = pytest.mark.gpu

# Expected well below this for random normal inputs (docs/ARCHITECTURE.md).
MAX_SELECTION_MISMATCH = 0.005


@pytest.fixture(autouse=True)
def _needs_native_kernels():
  if not nm_triton.runs_natively():
    pytest.skip("needs a CUDA GPU the Triton kernels compile for")


def _report(name, **figures):
  print(f"\n{name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else
                                  f"{k}={v}" for k, v in figures.items()))
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "triton_gpu_tests.jsonl"), "a") as f:
      f.write(json.dumps(dict(test=name, **figures)) + "\n")


def _selection_mismatch(keep, want_keep, scores, m):
  """Fraction of N:M groups holding a valid score whose selections differ."""
  def groups(x):
    x = np.asarray(x)
    whole = x.shape[-1] // m * m
    return x[..., :whole].reshape(x.shape[:-1] + (-1, m))

  differs = groups(np.asarray(keep) != np.asarray(want_keep)).any(-1)
  has_valid = groups(np.asarray(scores) != -np.inf).any(-1)
  return float(differs[has_valid].mean())


def _weights_with_selection(call, keep):
  scores = reference.call_scores(call)
  return reference.masked_softmax(jnp.where(keep, scores, -jnp.inf))


# name -> (head_dim, q_len, kv_len, kv_heads, kwargs builder(rng, batch, t, s)).
SCALE_CASES = {
    "d128_causal_2of4_gqa": (128, 2048, 2048, 2, lambda r, b, t, s: dict(
        is_causal=True, n=2, m=4)),
    "d64_1of2": (64, 2048, 2048, 8, lambda r, b, t, s: dict(n=1, m=2)),
    "d128_ragged_lengths_window_2of4": (128, 1000, 1500, 4, lambda r, b, t, s: dict(
        n=2, m=4, local_window_size=(700, 200),
        query_seq_lengths=jnp.asarray(r.integers(t // 2, t + 1, (b,)), jnp.int32),
        key_value_seq_lengths=jnp.asarray(r.integers(s // 2, s + 1, (b,)), jnp.int32))),
    "d64_bias_mask_2of4": (64, 1024, 1024, 8, lambda r, b, t, s: dict(
        n=2, m=4, bias=jnp.asarray(r.standard_normal((1, 8, t, s)), jnp.float32),
        mask=jnp.asarray(r.random((b, 1, t, s)) < 0.9))),
}

@pytest.mark.parametrize("name", SCALE_CASES)
def test_bf16_at_scale_matches_reference(rng, name):
  head_dim, q_len, kv_len, kv_heads, build = SCALE_CASES[name]
  batch, heads = 2, 8
  q, k, v = random_inputs(rng, batch=batch, q_len=q_len, kv_len=kv_len, heads=heads,
                          kv_heads=kv_heads, head_dim=head_dim, dtype=jnp.bfloat16)
  kwargs = build(rng, batch, q_len, kv_len)
  kernel_kwargs = dict(kwargs, interpret=False)
  bias = kernel_kwargs.pop("bias", None)
  out = jax.jit(functools.partial(triton_attention, **kernel_kwargs))(
      q, k, v, bias)
  keep = jax.jit(functools.partial(triton_selection, **kernel_kwargs))(q, k, v, bias)
  call, _ = canonicalize(q, k, v, **kwargs)
  ref_weights = reference.call_weights(call)
  ref = reference.apply_weights(ref_weights, v)
  want_keep = masking.nm_mask(reference.call_scores(call), call.spec.n,
                              call.spec.m)
  mismatch = _selection_mismatch(keep, want_keep, reference.call_scores(call),
                                 call.spec.m)
  own = reference.apply_weights(_weights_with_selection(call, keep), v)
  forward_err, own_err = rel_err(out, ref), rel_err(out, own)

  cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)

  kernel = functools.partial(triton_attention, bias=bias, **kernel_kwargs)
  got = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(functools.partial(
      loss, functools.partial(reference.nm_attention_reference, **kwargs)),
      argnums=(0, 1, 2)))(q, k, v)
  grad_errs = {f"{n}_err": rel_err(g, w) for n, g, w in zip(("dq", "dk", "dv"), got, want)}
  _report(name, forward_err=forward_err, own_selection_err=own_err,
          selection_mismatch=mismatch, **grad_errs)
  assert np.isfinite(np.asarray(out, np.float32)).all()
  assert forward_err < FORWARD_TOL[jnp.bfloat16]
  assert own_err < FORWARD_TOL[jnp.bfloat16]
  assert mismatch < MAX_SELECTION_MISMATCH
  for grad_name, err in grad_errs.items():
    assert err < GRAD_TOL[jnp.bfloat16], grad_name


@pytest.mark.parametrize("dtype,head_dim", [
    (jnp.float16, 128), (jnp.float32, 64), (jnp.float32, 128), (jnp.bfloat16, 32),
    (jnp.bfloat16, 256)])
def test_dtypes_and_head_dims(rng, dtype, head_dim):
  q, k, v = random_inputs(rng, batch=2, q_len=300, kv_len=520, heads=4, kv_heads=2,
                          head_dim=head_dim, dtype=dtype)
  kwargs = dict(is_causal=True, n=2, m=4)
  cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  def loss(fn, q, k, v):
    out = fn(q, k, v, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  kernel = functools.partial(triton_attention, interpret=False)
  (got, out) = jax.jit(jax.grad(functools.partial(loss, kernel),
                                argnums=(0, 1, 2), has_aux=True))(q, k, v)
  (want, ref) = jax.grad(functools.partial(loss, reference.nm_attention_reference),
                         argnums=(0, 1, 2), has_aux=True)(q, k, v)
  errs = dict(forward_err=rel_err(out, ref),
              **{f"{n}_err": rel_err(g, w) for n, g, w in zip(("dq", "dk", "dv"), got, want)})
  _report(f"{jnp.dtype(dtype).name}_d{head_dim}", **errs)
  assert errs["forward_err"] < FORWARD_TOL[dtype]
  for name in ("dq_err", "dk_err", "dv_err"):
    assert errs[name] < GRAD_TOL[dtype], name


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (3, 8)])
def test_nan_scores_propagate_like_reference(rng, n, m):
  """The compiled selection's NaN path (`min.NaN`/`max.NaN` in 2:4) in bf16
  at the default tiles."""
  check_nan_scores_propagate(rng, n, m, q_len=200, kv_len=333, head_dim=64,
                             dtype=jnp.bfloat16, interpret=False)


def test_temporary_memory_is_linear_in_sequence_length():
  """Forward + backward temp bytes at S and 2S: about double, far below S^2."""
  def temp_bytes(seq):
    shape = jax.ShapeDtypeStruct((1, seq, 16, 128), jnp.bfloat16)

    def loss(q, k, v):
      return jnp.sum(triton_attention(q, k, v, is_causal=True, interpret=False)
                     .astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        shape, shape, shape).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  small, large = temp_bytes(8192), temp_bytes(16384)
  score_bytes = 16 * 16384 * 16384 * 4
  _report("temp_memory", temp_8k_bytes=small, temp_16k_bytes=large,
          ratio=large / small, score_tensor_16k_bytes=score_bytes)
  assert large <= 2.2 * small
  assert large < score_bytes / 20


# name -> (head_dim, q_len, kv_len, kv_heads, block_q, block_k, kwargs builder).
PATTERN_CASES = {
    "d128_causal_2of4_gqa_128x128": (128, 2048, 2048, 2, 128, 128,
                                     lambda r, b, t, s: dict(is_causal=True, n=2, m=4)),
    "d64_lengths_block_sparse_64x256": (64, 1000, 1800, 8, 64, 256, lambda r, b, t, s: dict(
        n=4, m=4,
        query_seq_lengths=jnp.asarray(r.integers(t // 2, t + 1, (b,)), jnp.int32),
        key_value_seq_lengths=jnp.asarray(r.integers(s // 2, s + 1, (b,)), jnp.int32))),
    "d128_bias_window_1of2_256x128": (128, 1024, 1024, 4, 256, 128, lambda r, b, t, s: dict(
        n=1, m=2, local_window_size=(300, 100),
        bias=jnp.asarray(r.standard_normal((1, 8, t, s)), jnp.float32))),
}


@pytest.mark.parametrize("name", PATTERN_CASES)
def test_bf16_pattern_at_scale_matches_reference(rng, name):
  """Random per-head modes (all three) at real sizes: the compiled
  per-segment loops of the forward, dQ and dK/dV against the reference."""
  head_dim, q_len, kv_len, kv_heads, block_q, block_k, build = PATTERN_CASES[name]
  batch, heads = 2, 8
  q, k, v = random_inputs(rng, batch=batch, q_len=q_len, kv_len=kv_len, heads=heads,
                          kv_heads=kv_heads, head_dim=head_dim, dtype=jnp.bfloat16)
  kwargs = build(rng, batch, q_len, kv_len)
  modes = jnp.asarray(rng.integers(0, 3, (batch, heads, -(-q_len // block_q),
                                          -(-kv_len // block_k))), jnp.int8)
  kwargs["block_pattern"] = nmattn.BlockPattern(modes, block_q, block_k)
  bias = kwargs.pop("bias", None)
  cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  def loss(fn, q, k, v, bias):
    out = fn(q, k, v, bias, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  kernel = functools.partial(nmattn.nm_attention, implementation="pallas_triton")
  got, out = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=argnums,
                              has_aux=True))(q, k, v, bias)
  want, ref = jax.jit(jax.grad(functools.partial(
      loss, reference.nm_attention_reference), argnums=argnums, has_aux=True))(
          q, k, v, bias)
  errs = dict(forward_err=rel_err(out, ref),
              **{f"{n}_err": rel_err(g, w)
                 for n, g, w in zip(("dq", "dk", "dv", "dbias"), got, want)})
  _report(f"pattern_{name}", **errs)
  assert np.isfinite(np.asarray(out, np.float32)).all()
  assert errs["forward_err"] < FORWARD_TOL[jnp.bfloat16]
  for grad_name in ("dq_err", "dk_err", "dv_err", "dbias_err"):
    if grad_name in errs:
      assert errs[grad_name] < GRAD_TOL[jnp.bfloat16], grad_name


def test_auto_picks_a_kernel_for_patterns(rng):
  """`None` runs a pattern on the Hopper kernel where its tiles divide the
  blocks, else on Triton (both against the reference)."""
  q, k, v = random_inputs(rng, batch=1, q_len=512, kv_len=512, heads=4,
                          kv_heads=4, head_dim=128, dtype=jnp.bfloat16)
  hopper = nmattn.backends.PallasMosaic().unsupported_reason(
      canonicalize(q, k, v)[0].spec) is None
  for block, want_backend in ((128, "pallas_mosaic" if hopper else "pallas_triton"),
                              (64, "pallas_triton")):
    pattern = nmattn.patterns.local_band(512, 512, block_q=block,
                                         block_k=block, width=1)
    spec = canonicalize(q, k, v, n=2, m=4, block_pattern=pattern)[0].spec
    assert select_backend(spec).name == want_backend
    out = jax.jit(functools.partial(nmattn.nm_attention,
                                    block_pattern=pattern))(q, k, v)
    want = reference.nm_attention_reference(q, k, v, block_pattern=pattern)
    assert rel_err(out, want) < FORWARD_TOL[jnp.bfloat16]


@pytest.mark.parametrize("kwargs", [dict(is_causal=True, n=2, m=4),
                                    dict(n=1, m=2, local_window_size=(500, 100))])
def test_key_importance_at_scale_matches_reference(rng, kwargs):
  """The importance kernel in bf16 at 2048 tokens, GQA, against the float32
  reference's column sums of its probabilities."""
  q, k, v = random_inputs(rng, batch=2, q_len=2048, kv_len=2048, heads=8,
                          kv_heads=2, head_dim=128, dtype=jnp.bfloat16)
  out, got = jax.jit(functools.partial(nmattn.nm_attention_with_importance,
                                       implementation="pallas_triton",
                                       **kwargs))(q, k, v)
  call, _ = canonicalize(q, k, v, **kwargs)
  want = reference.call_weights(call).sum(axis=2)
  errs = dict(importance_err=rel_err(got, want),
              forward_err=rel_err(out, reference.nm_attention_reference(
                  q, k, v, **kwargs)))
  _report(f"importance_{'causal' if kwargs.get('is_causal') else 'window'}", **errs)
  assert errs["importance_err"] < 1e-2
  assert errs["forward_err"] < FORWARD_TOL[jnp.bfloat16]
