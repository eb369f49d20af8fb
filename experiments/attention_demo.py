"""A one-minute tour: N:M attention and an N:M Flax layer, forward and backward.

Prints, for dense and several n:m patterns, the output error against dense
attention, the fraction of valid scores kept, and the gradient norm.

  python -m experiments.attention_demo [--seq 256] [--heads 4] [--head-dim 32]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

import nmattn


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--head-dim", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  kq, kk, kv, kx, kp = jax.random.split(jax.random.key(args.seed), 5)
  shape = (args.batch, args.seq, args.heads, args.head_dim)
  q, k, v = (jax.random.normal(key, shape) for key in (kq, kk, kv))
  dense = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  print(f"jax {jax.__version__} on {jax.default_backend()}; q/k/v {shape}, causal")
  print(f"{'pattern':>8} {'rel err vs dense':>17} {'kept':>7} {'|grad q|':>9} "
        f"{'time ms':>8}")

  valid = jnp.tril(jnp.ones((args.seq, args.seq), bool))
  for n, m in ((4, 4), (2, 4), (1, 2), (1, 4)):
    def loss(q):
      return jnp.sum(nmattn.nm_attention(q, k, v, is_causal=True, n=n, m=m) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    value_and_grad(q)[1].block_until_ready()
    start = time.perf_counter()
    _, grad = value_and_grad(q)
    grad.block_until_ready()
    elapsed = (time.perf_counter() - start) * 1e3
    out = jax.jit(lambda q: nmattn.nm_attention(q, k, v, is_causal=True, n=n,
                                                m=m))(q)
    weights = nmattn.nm_attention_weights(q, k, is_causal=True, n=n, m=m)
    kept = float(jnp.sum(weights > 0) / (jnp.sum(valid) * args.batch * args.heads))
    print(f"{n}:{m:<6} {_rel(out, dense):17.4f} {kept:7.3f} "
          f"{float(jnp.linalg.norm(grad)):9.3f} {elapsed:8.1f}")

  features = args.heads * args.head_dim
  x = jax.random.normal(kx, (args.batch, args.seq, features))
  dense_layer = nn.MultiHeadDotProductAttention(num_heads=args.heads)
  params = dense_layer.init(kp, x)
  y_dense = dense_layer.apply(params, x)
  print("\nFlax layer with the dense layer's parameters:")
  for n, m in ((4, 4), (2, 4)):
    layer = nmattn.layers.NMMultiHeadDotProductAttention(
        num_heads=args.heads, n=n, m=m)
    y = layer.apply(params, x)
    grads = jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params)
    grad_norm = float(jnp.sqrt(sum(jnp.sum(g ** 2)
                                   for g in jax.tree.leaves(grads))))
    print(f"  NMMultiHeadDotProductAttention n={n} m={m}: rel diff vs dense "
          f"{_rel(y, y_dense):.4f}, |grad params| {grad_norm:.3f}")


if __name__ == "__main__":
  main()
