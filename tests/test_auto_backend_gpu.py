"""`implementation=None` on a GPU: the backend it picks compiles and is right.

Each dtype and head_dim, with and without a bias and mask tiled along both
sequence axes (the layout that needs the most shared memory), at full kernel
tiles: forward and gradients against the float32 reference. float32 at
head_dim 128 once picked Triton tiles that overflowed the H100's shared memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

import nmattn
from attention_test_base import FORWARD_TOL, GRAD_TOL, random_inputs, rel_err
from nmattn import reference
from nmattn._validation import canonicalize
from nmattn.attention import select_backend

pytestmark = pytest.mark.gpu

SEQ = 512  # several full 128-wide tiles per program


@pytest.mark.parametrize("tiled_extras", [False, True], ids=["plain", "bias_mask"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32],
                         ids=lambda d: jnp.dtype(d).name)
def test_default_backend_runs_and_matches_reference(rng, dtype, head_dim,
                                                    tiled_extras):
  q, k, v = random_inputs(rng, batch=1, q_len=SEQ, kv_len=SEQ, heads=2,
                          kv_heads=2, head_dim=head_dim, dtype=dtype)
  kwargs = dict(n=2, m=4, is_causal=True)
  if tiled_extras:
    kwargs.update(
        bias=jnp.asarray(rng.standard_normal((1, 2, SEQ, SEQ)), jnp.float32),
        mask=jnp.asarray(rng.random((1, 2, SEQ, SEQ)) < 0.9))
  backend = select_backend(canonicalize(q, k, v, **kwargs)[0].spec).name
  cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  def loss(fn, q, k, v):
    out = fn(q, k, v, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  def run(fn):
    return jax.jit(jax.value_and_grad(functools.partial(loss, fn),
                                      argnums=(0, 1, 2), has_aux=True))(q, k, v)

  (_, out), grads = run(nmattn.nm_attention)
  (_, want), want_grads = run(reference.nm_attention_reference)
  errors = {"out": rel_err(out, want)}
  errors.update({name: rel_err(g, w) for name, g, w in
                 zip(("dq", "dk", "dv"), grads, want_grads)})
  print(f"\n{backend}: " + ", ".join(f"{n}={e:.2e}" for n, e in errors.items()))
  assert errors.pop("out") < FORWARD_TOL[dtype], (backend, errors)
  assert max(errors.values()) < GRAD_TOL[dtype], (backend, errors)
