"""What the GPU machine has: versions, device, and the dense attention baselines.

  python -m tools.env_probe
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import jax
import jax.numpy as jnp

from experiments.bench.timing import attention_flops, median_seconds


def _version(name):
  try:
    return importlib.import_module(name).__version__
  except Exception as e:  # pylint: disable=broad-except
    return f"unavailable ({type(e).__name__}: {e})"


def main():
  info = {"python": sys.version.split()[0],
          "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()]}
  for name in ("jax", "jaxlib", "flax", "optax", "chex", "orbax.checkpoint",
               "triton", "tokamax", "numpy"):
    info[name] = _version(name)
  print(json.dumps(info, indent=1))
  if jax.default_backend() != "gpu":
    return
  batch, heads, seq, dim = 4, 16, 4096, 128
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (batch, seq, heads, dim), jnp.bfloat16)
             for key in keys)
  rows = {}
  for causal in (False, True):
    for impl in ("cudnn", "xla"):
      fn = jax.jit(lambda q, k, v, impl=impl, causal=causal:
                   jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                implementation=impl))
      sec = median_seconds(fn, q, k, v, iters=30)
      tflops = attention_flops(batch, heads, seq, seq, dim, causal=causal) / sec / 1e12
      rows[f"{impl} causal={causal}"] = (sec * 1e3, tflops)
  for name, (ms, tf) in rows.items():
    print(f"{name:24s} {ms:8.3f} ms {tf:7.1f} TFLOP/s")
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "env_probe.json"), "w") as f:
      json.dump({"info": info, "dense": rows}, f, indent=1)


if __name__ == "__main__":
  main()
