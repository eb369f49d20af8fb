"""One test base run against every backend (tokamax style).

A backend's test module subclasses `AttentionTestBase`, sets `implementation`
and, where it must, narrows `dtypes` / `head_dim` / `case_names`. Every test
draws fresh random inputs and compares against `nmattn.reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nmattn
from nmattn import reference

# Relative-error bounds against the float32 reference (ARCHITECTURE.md).
FORWARD_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2, jnp.float16: 5e-3}
GRAD_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2, jnp.float16: 1e-2}


def rel_err(x, ref) -> float:
  """`|x - ref| / |ref|`; the absolute error where `ref` is all zeros.

  A reference of zeros is exact, not rare: with every key length 1, each
  query sees one key, so dq and dk vanish (kernels give 1e-5..1e-4 there).
  """
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  norm = np.linalg.norm(ref)
  return float(np.linalg.norm(x - ref) / (norm if norm > 0 else 1.0))


def random_inputs(rng, *, batch=2, q_len=40, kv_len=56, heads=4, kv_heads=4,
                  head_dim=32, dtype=jnp.float32):
  """Normal query/key/value in `dtype`."""
  q = rng.standard_normal((batch, q_len, heads, head_dim))
  k = rng.standard_normal((batch, kv_len, kv_heads, head_dim))
  v = rng.standard_normal((batch, kv_len, kv_heads, head_dim))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


# Redraw inputs whose N:M choice is closer to a tie than this: a kernel sums
# `q.k` in another order (float32 rounding ~1e-7 of the score) and may keep
# the other key, a difference of one value row that no tolerance should hide.
SELECTION_MARGIN = 1e-5


def selection_margin(q, k, **kwargs) -> float:
  """The smallest gap, over all groups of `m` keys, between the `n`-th and
  `(n+1)`-th largest valid score (inf where no group has a choice to make)."""
  n, m = kwargs.get("n", 2), kwargs.get("m", 4)
  if n == m:
    return float("inf")
  call, _ = reference.canonicalize(q, k, k, **kwargs)
  s = np.asarray(reference.call_scores(call), np.float64)
  pad = -s.shape[-1] % m
  s = np.pad(s, [(0, 0)] * 3 + [(0, pad)], constant_values=-np.inf)
  ranked = -np.sort(-s.reshape(*s.shape[:-1], -1, m), axis=-1)
  has_choice = np.isfinite(ranked[..., n])
  gaps = ranked[..., n - 1][has_choice] - ranked[..., n][has_choice]
  return float(gaps.min()) if gaps.size else float("inf")



# name -> (shape overrides, attention kwargs builder(rng, batch, heads, q, kv)).
CASES = {
    "dense": (dict(), lambda r, b, h, t, s: dict(n=4, m=4)),
    "2of4": (dict(), lambda r, b, h, t, s: dict(n=2, m=4)),
    "1of2": (dict(), lambda r, b, h, t, s: dict(n=1, m=2)),
    "3of8": (dict(), lambda r, b, h, t, s: dict(n=3, m=8)),
    "gqa": (dict(heads=4, kv_heads=2), lambda r, b, h, t, s: dict(n=2, m=4)),
    "mqa": (dict(heads=4, kv_heads=1), lambda r, b, h, t, s: dict(n=2, m=4)),
    "causal": (dict(q_len=48, kv_len=48),
               lambda r, b, h, t, s: dict(n=2, m=4, is_causal=True)),
    "causal_rect": (dict(q_len=24, kv_len=56),
                    lambda r, b, h, t, s: dict(n=2, m=4, is_causal=True)),
    "ragged_kv": (dict(q_len=17, kv_len=45), lambda r, b, h, t, s: dict(n=2, m=4)),
    "bias": (dict(), lambda r, b, h, t, s: dict(
        n=2, m=4, bias=jnp.asarray(r.standard_normal((b, h, t, s)), jnp.float32))),
    "bias_broadcast": (dict(), lambda r, b, h, t, s: dict(
        n=2, m=4, bias=jnp.asarray(r.standard_normal((1, h, 1, s)), jnp.float32))),
    "mask": (dict(), lambda r, b, h, t, s: dict(
        n=2, m=4, mask=jnp.asarray(r.random((b, 1, t, s)) < 0.7))),
    "lengths": (dict(), lambda r, b, h, t, s: dict(
        n=2, m=4,
        query_seq_lengths=jnp.asarray(r.integers(1, t + 1, (b,)), jnp.int32),
        key_value_seq_lengths=jnp.asarray(r.integers(1, s + 1, (b,)), jnp.int32))),
    "window": (dict(q_len=48, kv_len=48), lambda r, b, h, t, s: dict(
        n=2, m=4, local_window_size=(13, 5))),
    "causal_window_mask": (dict(q_len=48, kv_len=48), lambda r, b, h, t, s: dict(
        n=1, m=2, is_causal=True, local_window_size=(21, 0),
        mask=jnp.asarray(r.random((1, h, t, s)) < 0.8))),
}


class AttentionTestBase:
  """Forward and gradient agreement with the reference for one backend.

  Every test runs with implicit rank promotion an error
  (`jax_numpy_rank_promotion="raise"`, which some users set globally), as
  `jax.nn.dot_product_attention` allows. The setting only adds checks, so
  results under it are those of the default setting.
  """

  implementation: str | None = None
  dtypes = (jnp.float32, jnp.bfloat16, jnp.float16)
  head_dim = 32
  case_names = tuple(CASES)

  @pytest.fixture(autouse=True)
  def rank_promotion_raises(self):
    with jax.numpy_rank_promotion("raise"):
      yield

  def attention(self, q, k, v, **kwargs):
    return nmattn.nm_attention(q, k, v, implementation=self.implementation,
                               **kwargs)

  def make_case(self, rng, name, dtype):
    """Fresh inputs for case `name`, with no N:M choice near a tie."""
    shape, build = CASES[name]
    shape = dict(dict(head_dim=self.head_dim), **shape)
    while True:
      q, k, v = random_inputs(rng, dtype=dtype, **shape)
      b, t, h, _ = q.shape
      kwargs = build(rng, b, h, t, k.shape[1])
      if selection_margin(q, k, **kwargs) >= SELECTION_MARGIN:
        return (q, k, v), kwargs

  @pytest.fixture(params=CASES)
  def case(self, request):
    if request.param not in self.case_names:
      pytest.skip(f"{request.param} not supported by {self.implementation}")
    return request.param

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                           ids=lambda d: jnp.dtype(d).name)
  def test_forward_matches_reference(self, rng, case, dtype):
    if dtype not in self.dtypes:
      pytest.skip(f"{jnp.dtype(dtype).name} not supported")
    (q, k, v), kwargs = self.make_case(rng, case, dtype)
    out = jax.jit(functools.partial(self.attention, **kwargs))(q, k, v)
    ref = reference.nm_attention_reference(q, k, v, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    err = rel_err(out, ref)
    assert err < FORWARD_TOL[dtype], f"{case} {jnp.dtype(dtype).name}: {err:.2e}"

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                           ids=lambda d: jnp.dtype(d).name)
  def test_gradients_match_reference(self, rng, case, dtype):
    if dtype not in self.dtypes:
      pytest.skip(f"{jnp.dtype(dtype).name} not supported")
    (q, k, v), kwargs = self.make_case(rng, case, dtype)
    bias = kwargs.pop("bias", None)
    cotangent = jnp.asarray(rng.standard_normal(q.shape), dtype)

    def loss(fn, q, k, v, bias):
      out = fn(q, k, v, bias=bias, **kwargs)
      return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32))

    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    got = jax.jit(jax.grad(functools.partial(loss, self.attention),
                           argnums=argnums))(q, k, v, bias)
    want = jax.grad(functools.partial(loss, reference.nm_attention_reference),
                    argnums=argnums)(q, k, v, bias)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
      assert g.shape == w.shape and g.dtype == w.dtype, name
      err = rel_err(g, w)
      assert err < GRAD_TOL[dtype], f"{case} {name}: {err:.2e}"

  def test_gradients_with_one_key_per_row(self, rng):
    # Key lengths of 1: every query sees one key, so the reference's dq and
    # dk are exactly zero: `dO.v - dO.o` cancels, which a kernel's dot and
    # the row sum of `dO * o` (another summation order) do only to rounding.
    # Their error is measured against dv's size, the cancelling terms' scale.
    (q, k, v), _ = self.make_case(rng, "2of4", jnp.float32)
    kwargs = dict(n=2, m=4, key_value_seq_lengths=jnp.ones((q.shape[0],),
                                                           jnp.int32))
    loss = lambda fn, *qkv: jnp.sum(fn(*qkv, **kwargs) ** 2)
    got = jax.jit(jax.grad(functools.partial(loss, self.attention),
                           argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(functools.partial(loss, reference.nm_attention_reference),
                    argnums=(0, 1, 2))(q, k, v)
    assert not np.any(np.asarray(want[0])) and not np.any(np.asarray(want[1]))
    scale = np.linalg.norm(np.asarray(want[2], np.float64))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
      g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
      err = np.linalg.norm(g - w) / scale
      assert np.isfinite(g).all() and err < GRAD_TOL[jnp.float32], f"{name}: {err:.2e}"

  def test_fully_masked_rows_give_zeros(self, rng):
    (q, k, v), _ = self.make_case(rng, "2of4", jnp.float32)
    mask = jnp.ones((1, 1, q.shape[1], k.shape[1]), bool).at[:, :, :5].set(False)

    def loss(q, k, v):
      return jnp.sum(self.attention(q, k, v, mask=mask) ** 2)

    out = jax.jit(functools.partial(self.attention, mask=mask))(q, k, v)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert np.all(np.asarray(out[:, :5]) == 0.0)
    assert np.isfinite(np.asarray(out)).all()
    assert np.all(np.asarray(grads[0][:, :5]) == 0.0)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)

  def test_nan_propagates_like_dense(self, rng):
    (q, k, v), _ = self.make_case(rng, "2of4", jnp.float32)
    q = q.at[0, 3, 1, 0].set(jnp.nan)
    out = np.asarray(jax.jit(self.attention)(q, k, v))
    assert np.isnan(out[0, 3, 1]).all()
    assert np.isfinite(np.delete(out[0], 3, axis=0)).all()
    assert np.isfinite(out[1]).all()


def check_against_reference(implementation, q, k, v, bias, cotangent, *,
                            forward_tol=1e-5, grad_tol=1e-4, **kwargs):
  """`nm_attention(..., implementation=)` under `jit` against the reference:
  the output, and the gradients of q, k, v (and the bias, if any) of
  `sum(out * cotangent)`."""
  def loss(fn, q, k, v, bias):
    out = fn(q, k, v, bias, **kwargs)
    return jnp.sum(out * cotangent), out

  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  kernel = functools.partial(nmattn.nm_attention, implementation=implementation)
  got, out = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=argnums,
                              has_aux=True))(q, k, v, bias)
  # The reference under jit too: eagerly, each op of its gradient compiles on
  # its own (seconds for a new shape).
  want, ref = jax.jit(jax.grad(
      functools.partial(loss, reference.nm_attention_reference),
      argnums=argnums, has_aux=True))(q, k, v, bias)
  assert rel_err(out, ref) < forward_tol
  for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
    assert rel_err(g, w) < grad_tol, name
