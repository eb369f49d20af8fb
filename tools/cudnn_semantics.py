"""What cuDNN's attention returns where nmattn's semantics are strict.

  python -m tools.cudnn_semantics        # on a CUDA GPU

nmattn's dense path under `implementation=None` goes to
`jax.nn.dot_product_attention(..., implementation="cudnn")`; nmattn promises
zeros (and zero gradients) for a query row with no valid key. This probe
runs cuDNN and the float32 reference on the same random inputs for the
options a call can carry (mask, bias, lengths, window, causal with
q_len != kv_len, GQA) and prints, per case: whether cuDNN accepted the call,
the relative error on rows that have a valid key, what it returns on rows
that have none, and whether its gradients are finite. JSON to $OUT.
"""

from __future__ import annotations

import json
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from nmattn import reference


def _cases(rng, b, t, s, h, kh, d):
  full_mask = np.ones((b, 1, t, s), bool)
  full_mask[:, :, :5] = False
  bias = rng.standard_normal((b, h, t, s)).astype(np.float32)
  return {
      "plain": {},
      "mask_empty_rows": dict(mask=jnp.asarray(full_mask)),
      "bias_and_mask_empty_rows": dict(bias=jnp.asarray(bias),
                                       mask=jnp.asarray(full_mask)),
      "q_lengths": dict(query_seq_lengths=jnp.asarray([t // 3, t], jnp.int32)),
      "kv_lengths": dict(key_value_seq_lengths=jnp.asarray([s // 3, s], jnp.int32)),
      "kv_lengths_zero": dict(key_value_seq_lengths=jnp.asarray([0, s], jnp.int32)),
      "causal": dict(is_causal=True),
      "causal_window": dict(is_causal=True, local_window_size=(17, 0)),
      "window_two_sided": dict(local_window_size=(17, 9)),
      "causal_lengths": dict(is_causal=True, query_seq_lengths=jnp.asarray(
          [t // 2, t], jnp.int32), key_value_seq_lengths=jnp.asarray(
              [s // 2, s], jnp.int32)),
  }


def _describe(x, rows):
  x = np.asarray(x, np.float32)
  sub = x[rows]
  if sub.size == 0:
    return "none"
  if np.isnan(sub).any():
    return "nan"
  if not np.any(sub):
    return "zeros"
  return f"nonzero (max |x| {np.abs(sub).max():.3g})"


def run():
  rng = np.random.default_rng(0)
  records = []
  for (b, t, s, h, kh, d) in ((2, 256, 256, 4, 4, 64), (2, 128, 320, 4, 2, 128)):
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, s, kh, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, s, kh, d)), jnp.bfloat16)
    ct = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    for name, kwargs in _cases(rng, b, t, s, h, kh, d).items():
      rec = dict(case=name, shape=[b, t, s, h, kh, d])
      try:
        fn = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, implementation="cudnn", **kwargs)
        out = jax.jit(fn)(q, k, v)
        grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
            fn(q, k, v).astype(jnp.float32) * ct), argnums=(0, 1, 2)))(q, k, v)
      except Exception as e:  # pylint: disable=broad-except
        rec["accepted"] = False
        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        records.append(rec)
        continue
      rec["accepted"] = True
      ref = reference.nm_attention_reference(q, k, v, n=4, m=4, **kwargs)
      weights = reference.nm_attention_weights(q, k, n=4, m=4, **{
          k_: v_ for k_, v_ in kwargs.items()})
      has_key = np.asarray(jnp.any(weights > 0, axis=-1))  # [B, H, T]
      empty = np.transpose(~has_key, (0, 2, 1))  # [B, T, H]
      o, r = np.asarray(out, np.float64), np.asarray(ref, np.float64)
      valid = ~empty
      rec["rel_err_valid_rows"] = float(
          np.linalg.norm((o - r)[valid]) / max(np.linalg.norm(r[valid]), 1e-30))
      rec["empty_rows"] = int(empty.sum())
      rec["out_on_empty_rows"] = _describe(out, empty)
      rec["grads_finite"] = [bool(np.isfinite(np.asarray(g, np.float32)).all())
                             for g in grads]
      rec["dq_on_empty_rows"] = _describe(grads[0], empty)
      records.append(rec)
      print(rec, flush=True)
  return records


def main():
  print(jax.__version__, jax.devices())
  try:
    records = run()
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    raise
  out = os.environ.get("OUT")
  if out:
    with open(os.path.join(out, "cudnn_semantics.json"), "w") as f:
      json.dump(records, f, indent=1)
  print()
  for r in records:
    if r["accepted"]:
      print(f"{r['case']:26s} {str(r['shape']):28s} err {r['rel_err_valid_rows']:.1e} "
            f"empty {r['empty_rows']:5d} out {r['out_on_empty_rows']:10s} "
            f"grads finite {r['grads_finite']} dq {r['dq_on_empty_rows']}")
    else:
      print(f"{r['case']:26s} {str(r['shape']):28s} REJECTED {r['error'][:150]}")


if __name__ == "__main__":
  main()
