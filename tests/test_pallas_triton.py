"""The "pallas_triton" backend on the CPU: its kernels in Pallas interpret mode.

The shared test base runs the dispatcher path at tiny shapes; the tests below
add several tiles per axis (small TuningConfig), the lse/backward entry
points, the kernel's own N:M selection, the tile-range arithmetic against
brute force, the Triton (CUDA) lowering, and every error path. GPU tests at
real sizes are in `test_pallas_triton_gpu.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nmattn
from attention_test_base import (FORWARD_TOL, GRAD_TOL, AttentionTestBase,
                                 random_inputs, rel_err)
from nmattn import masking, reference
from nmattn._validation import canonicalize
from nmattn.attention import select_backend
from pallas_kernels import tile_plan
from pallas_kernels import triton as nm_triton
from pallas_kernels.triton import _common

# Several query and key tiles at small sizes: key tiles stay >= 16 * m.
SMALL_TILES = nm_triton.TuningConfig(
    block_q=16, block_k=64, block_q_dq=16, block_k_dq=64, block_q_dkv=32,
    block_k_dkv=64)

_reference = reference.nm_attention_reference


def _call(q, k, v, bias=None, mask=None, **kwargs):
  """The canonical call of `nm_attention`-style arguments."""
  return canonicalize(q, k, v, bias, mask, **kwargs)[0]


def triton_attention(q, k, v, bias=None, mask=None, *, tuning=None,
                     interpret=True, **kwargs):
  """`nm_flash_attention` of the canonical call of these arguments."""
  return nm_triton.nm_flash_attention(_call(q, k, v, bias, mask, **kwargs),
                                      tuning=tuning, interpret=interpret)


def triton_selection(q, k, v, bias=None, mask=None, *, tuning=None,
                     interpret=True, **kwargs):
  """The forward kernel's keep-mask of the canonical call of these arguments."""
  return nm_triton.nm_flash_attention_selection(
      _call(q, k, v, bias, mask, **kwargs), tuning=tuning, interpret=interpret)


def _plan(q, k, v, bias=None, mask=None, *, tuning=None, **kwargs):
  return _common.make_plan(_call(q, k, v, bias, mask, **kwargs).spec, tuning,
                           interpret=True)


class TestPallasTriton(AttentionTestBase):
  """The shared base through `nm_attention(..., implementation="pallas_triton")`.

  Interpret mode compiles every kernel for XLA:CPU, so the base is narrowed to
  fit CI: float16 is checked in `test_several_tiles_match_reference`, and
  "2of4", "causal" and "gqa" are covered by the cases that extend them
  ("mask"/"lengths"/..., "causal_rect"/"causal_window_mask", "mqa").
  """
  implementation = "pallas_triton"
  dtypes = (jnp.float32, jnp.bfloat16)
  case_names = tuple(name for name in AttentionTestBase.case_names
                     if name not in ("2of4", "causal", "gqa"))


def _lengths(rng, batch, length):
  return jnp.asarray(rng.integers(1, length + 1, (batch,)), jnp.int32)


# name -> (dtype, heads, kv_heads, q_len, kv_len, kwargs builder(rng, b, h, t, s)).
MULTI_TILE_CASES = {
    "causal_gqa_lengths_2of4": (jnp.float32, 4, 2, 150, 150, lambda r, b, h, t, s: dict(
        is_causal=True, n=2, m=4, query_seq_lengths=_lengths(r, b, t),
        key_value_seq_lengths=_lengths(r, b, s))),
    "window_bias_mask_1of2": (jnp.float32, 2, 2, 100, 140, lambda r, b, h, t, s: dict(
        local_window_size=(37, 11), n=1, m=2,
        bias=jnp.asarray(r.standard_normal((b, h, t, s)), jnp.float32),
        mask=jnp.asarray(r.random((b, 1, t, s)) < 0.8))),
    "float16_mqa_causal_column_bias_dense": (
        jnp.float16, 4, 1, 90, 130, lambda r, b, h, t, s: dict(
            is_causal=True, n=4, m=4,
            bias=jnp.asarray(r.standard_normal((1, h, 1, s)), jnp.float32))),
}


def _reference_lse(q, k, v, bias=None, mask=None, **kwargs):
  """The log-sum-exp of each row's N:M-kept scores (-inf where none is
  kept), under jit like the kernels (eagerly, each op compiles on its own)."""
  def lse(q, k, v, bias, mask):
    scores = reference.call_scores(_call(q, k, v, bias, mask, **kwargs))
    kept = masking.nm_mask(scores, kwargs["n"], kwargs["m"])
    return jax.nn.logsumexp(jnp.where(kept, scores, -jnp.inf), axis=-1)
  return jax.jit(lse)(q, k, v, bias, mask)


def _check_against_reference(rng, q, k, v, bias, kwargs, *, tuning, forward_tol,
                             grad_tol):
  """The interpret-mode kernel's output and gradients (bias too, if given)
  against the reference's, for a random cotangent."""
  cotangent = jnp.asarray(rng.standard_normal(q.shape), q.dtype)

  def loss(fn, q, k, v, bias):
    out = fn(q, k, v, bias, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out

  kernel = functools.partial(triton_attention, tuning=tuning)
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  got, out = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=argnums,
                              has_aux=True))(q, k, v, bias)
  want, ref = jax.jit(jax.grad(functools.partial(loss, _reference),
                               argnums=argnums, has_aux=True))(q, k, v, bias)
  assert rel_err(out, ref) < forward_tol
  for grad_name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, grad_name
    assert rel_err(g, w) < grad_tol, grad_name


@pytest.mark.parametrize("name", MULTI_TILE_CASES)
def test_several_tiles_match_reference(rng, name):
  dtype, heads, kv_heads, q_len, kv_len, build = MULTI_TILE_CASES[name]
  q, k, v = random_inputs(rng, batch=2, q_len=q_len, kv_len=kv_len, heads=heads,
                          kv_heads=kv_heads, head_dim=16, dtype=dtype)
  kwargs = build(rng, 2, heads, q_len, kv_len)
  bias = kwargs.pop("bias", None)
  _check_against_reference(rng, q, k, v, bias, kwargs, tuning=SMALL_TILES,
                           forward_tol=FORWARD_TOL[dtype],
                           grad_tol=GRAD_TOL.get(dtype, 1e-2))


@pytest.mark.parametrize("scale,with_bias", [(0.37, False), (0.37, True),
                                             (-0.5, False), (0.0, False)])
def test_explicit_scales_match_reference(rng, scale, with_bias):
  """Tiles hold `q.k` unscaled only for a positive scale without a bias
  (`Plan.selects_unscaled`); a negative scale reverses the selection's order
  and zero makes every group a tie, which both paths must get right."""
  q, k, v = random_inputs(rng, batch=2, q_len=40, kv_len=72, heads=2,
                          kv_heads=2, head_dim=16)
  bias = (jnp.asarray(rng.standard_normal((1, 2, 40, 72)), jnp.float32)
          if with_bias else None)
  kwargs = dict(scale=scale, is_causal=True, n=2, m=4)
  call = _call(q, k, v, bias, **kwargs)
  plan = _common.make_plan(call.spec, SMALL_TILES, interpret=True)
  assert plan.selects_unscaled == (scale > 0 and not with_bias)
  _check_against_reference(rng, q, k, v, bias, kwargs, tuning=SMALL_TILES,
                           forward_tol=1e-5, grad_tol=1e-4)
  _, lse = jax.jit(lambda q, k, v, bias: nm_triton.nm_flash_attention_fwd(
      _call(q, k, v, bias, **kwargs), interpret=True, tuning=SMALL_TILES))(
          q, k, v, bias)
  np.testing.assert_allclose(np.asarray(lse),
                             np.asarray(_reference_lse(q, k, v, bias, **kwargs)),
                             rtol=1e-5, atol=1e-5)


def test_lse_and_backward_entry_points(rng):
  """The (out, lse) / backward contract that other forward kernels rely on."""
  q, k, v = random_inputs(rng, batch=2, q_len=40, kv_len=72, heads=4, kv_heads=2,
                          head_dim=16)
  mask = jnp.asarray(rng.random((2, 1, 40, 72)) < 0.6).at[:, :, :3].set(False)
  kwargs = dict(is_causal=True, n=2, m=4)
  # Jitted: interpret-mode kernels run far faster compiled than eagerly.
  out, lse = jax.jit(lambda q, k, v, mask: nm_triton.nm_flash_attention_fwd(
      _call(q, k, v, mask=mask, **kwargs), interpret=True))(q, k, v, mask)
  want_lse = _reference_lse(q, k, v, mask=mask, **kwargs)
  assert lse.shape == (2, 4, 40) and lse.dtype == jnp.float32
  empty = np.asarray(want_lse == -jnp.inf)
  assert empty[:, :, :3].all() and (~empty).any()
  assert np.all(np.asarray(lse)[empty] == np.inf)
  np.testing.assert_allclose(np.asarray(lse)[~empty], np.asarray(want_lse)[~empty],
                             rtol=1e-5, atol=1e-5)

  d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  def reference_out_and_grads(q, k, v):
    ref, vjp = jax.vjp(lambda q, k, v: _reference(q, k, v, mask=mask, **kwargs),
                       q, k, v)
    return ref, vjp(d_out)

  ref, want = jax.jit(reference_out_and_grads)(q, k, v)
  assert rel_err(out, ref) < 1e-5
  # Both conventions for rows with no kept score: +inf (this forward), -inf.
  backward = jax.jit(lambda q, k, v, mask, out, lse, d_out:
                     nm_triton.nm_flash_attention_bwd(
                         _call(q, k, v, mask=mask, **kwargs), out, lse, d_out,
                         interpret=True))
  for empty_lse in (jnp.inf, -jnp.inf):
    grads = backward(q, k, v, mask, out, jnp.where(empty, empty_lse, lse), d_out)
    assert grads[3] is None
    for g, w in zip(grads[:3], want):
      assert np.isfinite(np.asarray(g)).all()
      assert rel_err(g, w) < 1e-5
    assert np.all(np.asarray(grads[0])[:, :3] == 0.0)


def test_kernel_selection_matches_reference(rng):
  q, k, v = random_inputs(rng, batch=2, q_len=48, kv_len=100, heads=2,
                          kv_heads=2, head_dim=32)
  bias = jnp.asarray(rng.standard_normal((1, 2, 48, 100)), jnp.float32)
  keep = jax.jit(functools.partial(triton_selection, local_window_size=(30, 9),
                                   n=2, m=4))(q, k, v, bias)
  call, _ = canonicalize(q, k, v, bias, local_window_size=(30, 9), n=2, m=4)
  want = masking.nm_mask(reference.call_scores(call), 2, 4)
  assert keep.shape == want.shape == (2, 2, 48, 100) and keep.dtype == jnp.bool_
  groups = (np.asarray(keep) != np.asarray(want)).reshape(2, 2, 48, 25, 4).any(-1)
  assert groups.mean() < 0.005, groups.mean()


def test_nm_keep_matches_group_rank_with_ties():
  """Lanes hold group members; integer scores force ties, plus -inf and NaN."""
  rng = np.random.default_rng(0)
  for m, n in ((2, 1), (4, 2), (4, 3), (8, 3), (16, 5)):
    scores = rng.integers(-2, 3, (64, 8, m)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.3] = -np.inf
    got = jax.jit(_common.nm_keep, static_argnums=1)(
        [jnp.asarray(scores[..., j]) for j in range(m)], n)
    want = masking.nm_mask(jnp.asarray(scores.reshape(64, 8 * m)), n, m)
    np.testing.assert_array_equal(np.stack(got, -1).reshape(64, 8 * m), want)
  nan_group = [jnp.asarray([[1.0]]), jnp.asarray([[jnp.nan]]),
               jnp.asarray([[3.0]]), jnp.asarray([[-jnp.inf]])]
  assert [bool(x[0, 0]) for x in _common.nm_keep(nan_group, 1)] == [
      False, True, True, False]


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (3, 8)])
def test_select_n_of_m_keeps_nan_groups_and_group_maxima(n, m):
  """NaN-free groups win as the reference ranks them; a NaN always wins (in
  1:2 and 2:4 with its whole group); the group maximum is the largest member."""
  rng = np.random.default_rng(1)
  scores = rng.integers(-2, 3, (64, 8, m)).astype(np.float32)
  scores[rng.random(scores.shape) < 0.2] = -np.inf
  nan_at = rng.random(scores.shape) < 0.05
  scores[nan_at] = np.nan
  wins, group_max = jax.jit(_common.select_n_of_m, static_argnums=1)(
      [jnp.asarray(scores[..., j]) for j in range(m)], n)
  wins = np.stack(wins, -1)
  nan_groups = nan_at.any(-1)
  assert nan_groups.any() and (~nan_groups).any()
  want = np.asarray(masking.nm_mask(jnp.asarray(scores.reshape(64, 8 * m)), n, m))
  want = want.reshape(scores.shape)
  clean = ~nan_groups
  np.testing.assert_array_equal((wins & (scores != -np.inf))[clean], want[clean])
  assert wins[nan_at].all()
  if m <= 4:
    assert wins[nan_groups].all()
  np.testing.assert_array_equal(np.asarray(group_max)[clean], scores.max(-1)[clean])


def check_nan_scores_propagate(rng, n, m, *, q_len, kv_len, head_dim, dtype,
                               **kernel):
  """One NaN score (from the bias) in half the rows, cycling through the group
  positions: those rows' outputs and dq are NaN as the reference's, the other
  rows match it, and the kernel's keep-mask keeps every NaN. `kernel`: extra
  arguments of the kernel entry points (interpret, tuning)."""
  q, k, v = random_inputs(rng, batch=2, q_len=q_len, kv_len=kv_len, heads=2,
                          kv_heads=2, head_dim=head_dim, dtype=dtype)
  bias = np.asarray(rng.standard_normal((2, 2, q_len, kv_len)), np.float32)
  rows = np.arange(0, q_len, 2)
  bias[:, :, rows, (rows * 5) % kv_len] = np.nan  # 5 is odd: every position mod m
  bias = jnp.asarray(bias)
  kwargs = dict(n=n, m=m)
  d_out = jnp.asarray(rng.standard_normal(q.shape), dtype)

  def out_and_dq(fn):
    out, vjp = jax.vjp(lambda q: fn(q, k, v, bias, **kwargs), q)
    return out, vjp(d_out)[0]

  out, dq = jax.jit(lambda: out_and_dq(functools.partial(
      triton_attention, **kernel)))()
  ref, ref_dq = out_and_dq(_reference)
  nan_rows = np.zeros((2, q_len, 2), bool)
  nan_rows[:, rows] = True
  for got, want, tol in ((out, ref, FORWARD_TOL[dtype]),
                         (dq, ref_dq, GRAD_TOL.get(dtype, 1e-2))):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_array_equal(np.isnan(want).all(-1), nan_rows)
    np.testing.assert_array_equal(np.isnan(got).any(-1), nan_rows)
    assert rel_err(got[~nan_rows], want[~nan_rows]) < tol
  keep = jax.jit(functools.partial(triton_selection, **kwargs, **kernel))(
      q, k, v, bias)
  assert np.asarray(keep)[np.isnan(np.asarray(bias))].all()


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (3, 8)])
def test_nan_scores_propagate_like_reference(rng, n, m):
  check_nan_scores_propagate(rng, n, m, q_len=40, kv_len=72, head_dim=16,
                             dtype=jnp.float32, interpret=True, tuning=SMALL_TILES)


def _brute_force_tiles(valid, block_rows, block_cols):
  """Per (row tile, col tile): any valid pair, all pairs valid."""
  rows, cols = valid.shape
  tiles = valid.reshape(rows // block_rows, block_rows, cols // block_cols,
                        block_cols)
  return tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))


@pytest.mark.parametrize("is_causal,window", [
    (False, None), (True, None), (False, (20, 3)), (True, (40, 0)), (False, (0, 50))])
def test_tile_ranges_match_brute_force(is_causal, window):
  """Tiles outside [lo, hi) hold no valid pair; [full_lo, full_hi) only valid ones."""
  block_q, block_k, t_pad, s_pad = 16, 32, 96, 128
  rng = np.random.default_rng(1)
  for _ in range(6):
    q_len, kv_len = int(rng.integers(1, t_pad + 1)), int(rng.integers(1, s_pad + 1))
    q_limit, kv_limit = int(rng.integers(0, q_len + 1)), int(rng.integers(0, kv_len + 1))
    spec = _spec_for(q_len, kv_len, is_causal, window)
    qp, kp = np.arange(t_pad)[:, None], np.arange(s_pad)[None, :]
    valid = (qp < q_limit) & (kp < kv_limit)
    if is_causal:
      valid &= kp <= qp
    if window is not None:
      valid &= (kp >= qp - window[0]) & (kp <= qp + window[1])
    any_valid, all_valid = _brute_force_tiles(valid, block_q, block_k)
    for q_tile in range(t_pad // block_q):
      lo, full_lo, full_hi, hi = (int(x) for x in tile_plan.key_tiles(
          spec, jnp.int32(q_tile * block_q), block_q, block_k, jnp.int32(q_limit),
          jnp.int32(kv_limit)))
      _check_range(any_valid[q_tile], all_valid[q_tile], lo, full_lo, full_hi, hi)
    for k_tile in range(s_pad // block_k):
      lo, full_lo, full_hi, hi = (int(x) for x in tile_plan.query_tiles(
          spec, jnp.int32(k_tile * block_k), block_k, block_q, jnp.int32(q_limit),
          jnp.int32(kv_limit)))
      _check_range(any_valid[:, k_tile], all_valid[:, k_tile], lo, full_lo,
                   full_hi, hi)


def _spec_for(q_len, kv_len, is_causal, window):
  q = jnp.zeros((1, q_len, 1, 16))
  kv = jnp.zeros((1, kv_len, 1, 16))
  return _call(q, kv, kv, is_causal=is_causal, local_window_size=window).spec


def _check_range(any_valid, all_valid, lo, full_lo, full_hi, hi):
  assert lo <= full_lo <= full_hi <= hi <= len(any_valid)
  visited = np.zeros(len(any_valid), bool)
  visited[lo:hi] = True
  assert not (any_valid & ~visited).any(), (lo, hi, any_valid)
  assert all_valid[full_lo:full_hi].all(), (full_lo, full_hi, all_valid)
  # Tight: the range starts and ends at tiles with a valid pair.
  if hi > lo:
    assert any_valid[lo] and any_valid[hi - 1]


def test_lowers_through_triton_for_cuda():
  """The Pallas -> Triton lowering of forward and backward, without a GPU."""
  shape = jax.ShapeDtypeStruct((2, 300, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16)
  bias = jax.ShapeDtypeStruct((1, 4, 1, 300), jnp.float32)
  lengths = jax.ShapeDtypeStruct((2,), jnp.int32)

  def loss(q, k, v, bias, kv_lengths):
    out = triton_attention(q, k, v, bias, key_value_seq_lengths=kv_lengths,
                           is_causal=True, local_window_size=(64, 0), n=2, m=4,
                           interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(
      shape, kv, kv, bias, lengths)
  try:
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
  except RuntimeError as e:  # jax >= 0.11 needs a GPU (or an abstract one).
    pytest.skip(f"this jax cannot lower for CUDA without a GPU: {e}")
  # One forward (its residuals are reused), dQ and dK/dV.
  assert text.count("__gpu$xla.gpu.triton") == 3
  # The kernels' inline PTX (strings in the Triton bytecode): 2:4's
  # NaN-keeping pair min/max and the bare exponential.
  for ptx in ("min.NaN.f32", "max.NaN.f32", "ex2.approx.ftz.f32"):
    assert ptx in text, ptx


def test_dispatch_on_cpu():
  q, k, v = random_inputs(np.random.default_rng(0), head_dim=32)
  call, _ = canonicalize(q, k, v)
  # Explicitly: interpret mode; automatically: never on a CPU.
  assert select_backend(call.spec, "pallas_triton").name == "pallas_triton"
  assert select_backend(call.spec, None).name == "xla"
  odd, _ = canonicalize(*(x[..., :24] for x in (q, k, v)))
  with pytest.raises(nmattn.UnsupportedCallError,
                     match=r"pallas_triton.*head_dim=24 is not supported"):
    select_backend(odd.spec, "pallas_triton")
  assert select_backend(odd.spec, None).name == "xla"


def test_float64_is_refused_explicitly_and_falls_back(enable_x64):
  del enable_x64
  q, k, v = random_inputs(np.random.default_rng(0), head_dim=32, dtype=jnp.float64)
  with pytest.raises(nmattn.UnsupportedCallError, match="dtype float64 is not supported"):
    nmattn.nm_attention(q, k, v, implementation="pallas_triton")
  assert nmattn.nm_attention(q, k, v).dtype == jnp.float64


def test_backend_object_carries_its_tuning(rng):
  """`implementation=PallasTriton(config=...)` runs with that tuning; a
  config of the wrong type is refused at construction."""
  q, k, v = random_inputs(rng, batch=1, q_len=40, kv_len=72, heads=2,
                          kv_heads=2, head_dim=16)
  backend = nmattn.backends.PallasTriton(config=SMALL_TILES)
  out = jax.jit(functools.partial(nmattn.nm_attention, is_causal=True,
                                  implementation=backend))(q, k, v)
  want = jax.jit(functools.partial(triton_attention, is_causal=True,
                                   tuning=SMALL_TILES))(q, k, v)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
  assert rel_err(out, _reference(q, k, v, is_causal=True)) < 1e-5
  with pytest.raises(ValueError, match=r"PallasTriton\(config=...\) must be a "
                     r"TuningConfig or None; got config=\{'block_q': 64\}"):
    nmattn.backends.PallasTriton(config=dict(block_q=64))


@pytest.mark.parametrize("field,value,match", [
    ("block_q", 24, r"TuningConfig.block_q must be a power of two >= 16; got block_q=24"),
    ("block_k_dkv", 8, r"block_k_dkv must be a power of two >= 16; got block_k_dkv=8"),
    ("num_warps", 3, r"TuningConfig.num_warps must be a power of two <= 16; got num_warps=3"),
    ("num_stages_bwd", 0, r"num_stages_bwd must be a positive int; got num_stages_bwd=0"),
])
def test_tuning_errors(field, value, match):
  with pytest.raises(ValueError, match=match):
    nm_triton.TuningConfig(**{field: value})


def test_key_blocks_hold_whole_groups_of_lanes():
  """Key tiles widen to 16 * m lanes; dense calls need no lanes."""
  q, k, v = random_inputs(np.random.default_rng(0), batch=2, q_len=8,
                          kv_len=12, heads=4, kv_heads=2, head_dim=16)
  for (n, m), want in {(2, 4): 64, (1, 2): 32, (3, 8): 128, (5, 16): 256,
                       (4, 4): 16}.items():
    plan = _plan(q, k, v, n=n, m=m, tuning=nm_triton.TuningConfig(block_k=16))
    assert plan.forward_blocks == (16, want)


def test_pallas_kernels_does_not_import_nmattn():
  """Dependencies point one way: experiments -> nmattn -> pallas_kernels."""
  import pallas_kernels  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(pallas_kernels.__path__[0])
  paths = list(root.rglob("*.py"))
  for path in paths:
    text = path.read_text()
    for forbidden in ("import nmattn", "from nmattn", "import experiments",
                      "from experiments"):
      assert forbidden not in text, (path, forbidden)


def test_tiled_bias_or_mask_pipelines_fewer_stages():
  """Three stages of K, V, a [block_q, block_k] f32 bias and mask tile overflow
  an H100's shared memory (measured: 249856 > 232448 bytes at head_dim 64)."""
  q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  plan_of = lambda bias, mask: _plan(q, q, q, bias, mask)
  assert plan_of(None, None).tuning.num_stages == 3
  assert plan_of(jnp.ones((1, 1, 1, 256)), None).tuning.num_stages == 3
  assert plan_of(jnp.ones((1, 2, 256, 256)), None).tuning.num_stages == 2
  assert plan_of(None, jnp.ones((1, 1, 256, 256), bool)).tuning.num_stages == 2


def test_float32_takes_the_tiles_of_twice_the_head_dim():
  """float32 at head_dim 128 with the 16-bit tiles asked an H100 for 393728
  bytes of shared memory (232448 available)."""
  spec_of = lambda dtype, head_dim: _call(
      *[jnp.zeros((1, 256, 2, head_dim), dtype)] * 3).spec
  plan_of = lambda dtype, head_dim: _common.make_plan(spec_of(dtype, head_dim))
  assert plan_of(jnp.float32, 64).tuning == plan_of(jnp.bfloat16, 128).tuning
  assert plan_of(jnp.float32, 128).tuning == plan_of(jnp.bfloat16, 256).tuning
  assert "head_dim=256" in nm_triton.unsupported_reason(
      spec_of(jnp.float32, 256))
  assert nm_triton.unsupported_reason(spec_of(jnp.float32, 128)) is None


@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_lane_order_split_and_join(rng, m):
  """K tiles in lane order: a dot's columns split into the strided lanes."""
  plan = _plan(jnp.zeros((1, 8, 1, 16)), jnp.zeros((1, 256, 1, 16)),
               jnp.zeros((1, 256, 1, 16)), n=1, m=m)
  assert plan.lanes == (1 if m == 1 else m)
  keys = jnp.asarray(rng.standard_normal((2, 256, 3, 16)), jnp.float32)
  ordered = _common.lane_order(plan, keys, 128)
  np.testing.assert_array_equal(_common.lane_order(plan, ordered, 128, inverse=True),
                                keys)
  # Column c of a lane-order tile scores key `lane_order` put in row c.
  positions = jnp.arange(256, dtype=jnp.float32)[None, :, None, None]
  tile = _common.lane_order(plan, jnp.broadcast_to(positions, (1, 256, 1, 1)),
                            128)[0, 128:, 0, 0]
  lanes = _common.split_lanes(plan, jnp.broadcast_to(tile, (4, 128)))
  for j, lane in enumerate(lanes):
    np.testing.assert_array_equal(lane[0], 128 + j + plan.lanes * np.arange(
        128 // plan.lanes))
  np.testing.assert_array_equal(_common.join_lanes(plan, lanes),
                                jnp.broadcast_to(tile, (4, 128)))
  special = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 1e-30, -3.5, 0.0] * 21 + [7.0, 8.0])
  width = 128 // plan.lanes
  for j, lane in enumerate(_common.split_lanes(plan, special[None])):
    np.testing.assert_array_equal(lane[0], special[j * width:(j + 1) * width])


@pytest.mark.parametrize("n,m,bias_shape", [(2, 4, (2, 4, 70, 300)),
                                             (1, 2, (1, 4, 1, 300)), (3, 8, None)])
def test_128_key_tiles_match_reference(rng, n, m, bias_shape):
  """Forward and gradients with 128-key tiles in every kernel (lanes of 16-64)."""
  q, k, v = random_inputs(rng, batch=2, q_len=70, kv_len=300, heads=4,
                          kv_heads=2, head_dim=16)
  bias = (None if bias_shape is None
          else jnp.asarray(rng.standard_normal(bias_shape), jnp.float32))
  kwargs = dict(is_causal=True, n=n, m=m, local_window_size=(200, 40),
                mask=jnp.asarray(rng.random((2, 1, 70, 300)) < 0.8))
  tuning = dataclasses.replace(SMALL_TILES, block_k=128, block_k_dq=128,
                               block_k_dkv=128)
  _check_against_reference(rng, q, k, v, bias, kwargs, tuning=tuning,
                           forward_tol=1e-5, grad_tol=1e-4)
