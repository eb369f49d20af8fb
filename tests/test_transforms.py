"""nm_attention under jit, vmap, grad, remat and sharding."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

import nmattn
from attention_test_base import random_inputs, rel_err
from nmattn import reference

KW = dict(is_causal=True, n=2, m=4)


def test_jit_matches_eager(rng):
  q, k, v = random_inputs(rng)
  eager = nmattn.nm_attention(q, k, v, **KW)
  assert rel_err(jax.jit(functools.partial(nmattn.nm_attention, **KW))(q, k, v),
                 eager) < 1e-6


def test_vmap_over_an_extra_axis(rng):
  q, k, v = random_inputs(rng, batch=6)
  stacked = [x.reshape((3, 2) + x.shape[1:]) for x in (q, k, v)]
  mapped = jax.vmap(functools.partial(nmattn.nm_attention, **KW))(*stacked)
  assert rel_err(mapped.reshape(q.shape), nmattn.nm_attention(q, k, v, **KW)) < 1e-6
  # vmap over the unbatched form: each example [q_len, heads, head_dim]
  per_example = jax.vmap(functools.partial(nmattn.nm_attention, **KW))(q, k, v)
  assert rel_err(per_example, nmattn.nm_attention(q, k, v, **KW)) < 1e-6


def test_vmap_of_grad_and_grad_of_vmap(rng):
  q, k, v = random_inputs(rng, batch=3)
  loss = lambda q, k, v: jnp.sum(nmattn.nm_attention(q, k, v, **KW) ** 2)
  per_example = jax.vmap(jax.grad(loss), in_axes=(0, 0, 0))(q, k, v)
  whole = jax.grad(loss)(q, k, v)
  assert rel_err(per_example, whole) < 1e-5


def test_remat_gives_the_same_gradients(rng):
  q, k, v = random_inputs(rng)
  loss = lambda q, k, v: jnp.sum(jnp.sin(nmattn.nm_attention(q, k, v, **KW)))
  plain = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(
      reference.nm_attention_reference(q, k, v, **KW))), argnums=(0, 1, 2))(q, k, v)
  for a, b, w in zip(plain, remat, want):
    assert rel_err(a, b) < 1e-6 and rel_err(a, w) < 1e-4


def test_second_call_with_new_shape_recompiles_correctly(rng):
  fn = jax.jit(functools.partial(nmattn.nm_attention, **KW))
  for q_len in (8, 33):
    q, k, v = random_inputs(rng, q_len=q_len, kv_len=q_len)
    assert rel_err(fn(q, k, v), reference.nm_attention_reference(q, k, v, **KW)) < 1e-5


def test_sharded_over_four_devices_matches_single_device(tmp_path, seed):
  """Batch over 'data', heads over 'model' on 4 fake CPU devices (own process)."""
  script = textwrap.dedent(f"""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      import nmattn
      assert jax.device_count() == 4, jax.devices()
      rng = np.random.default_rng({seed})
      q, k, v = (jnp.asarray(rng.standard_normal((4, 32, 4, 16)), jnp.float32)
                 for _ in range(3))
      def loss(q, k, v):
        return jnp.sum(nmattn.nm_attention(q, k, v, is_causal=True) ** 2)
      fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      want = fn(q, k, v)
      mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
      spec = NamedSharding(mesh, P("data", None, "model", None))
      got = fn(*(jax.device_put(x, spec) for x in (q, k, v)))
      assert got[1][0].sharding.is_equivalent_to(spec, 4), got[1][0].sharding
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        err = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        assert err < 1e-5, err
      print("OK")
  """)
  env = dict(os.environ,
             XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""),
                                 "--xla_force_host_platform_device_count=4"]),
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(sys.path))
  result = subprocess.run([sys.executable, "-c", script], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
