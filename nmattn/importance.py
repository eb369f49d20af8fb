"""Key importance: the attention probability each key receives, summed over queries.

For every `(batch, head, key)`, the sum over valid queries of the N:M-pruned
attention probabilities, the statistic SpAtten prunes tokens by (Wang, Zhang,
Han, HPCA 2021). The `"pallas_triton"` form is a kernel of its own on the
forward's log-sum-exp (`pallas_kernels/triton/importance.py`); the `"xla"`
form (`xla_backend.xla_key_importance`) is blocked like the xla backend's
forward, so only one `[batch, heads, block_q, block_k]` score tile is live at
a time.
"""

from __future__ import annotations

import jax
from jax import lax

from nmattn import backends
from nmattn._validation import canonicalize
from nmattn.attention import resolve_implementation, select_backend
from nmattn.backends import UnsupportedCallError


def _importance_backend(spec, implementation) -> backends.Backend:
  """The backend computing key importance: one with `with_importance`
  ("xla", "pallas_triton"); None picks the first of `backends.AUTO_ORDER`
  that has it and supports the call here."""
  backend = resolve_implementation(implementation)
  if backend is None:
    for name in backends.AUTO_ORDER:
      candidate = backends.BACKENDS[name]
      if (hasattr(candidate, "with_importance") and candidate.auto_eligible(spec)
          and candidate.unsupported_reason(spec) is None):
        return candidate
    raise AssertionError("the xla backend computes every call's importance")
  if not hasattr(backend, "with_importance"):
    raise UnsupportedCallError(
        f"implementation={backend.name!r} cannot compute key importance "
        "(supported: 'xla', 'pallas_triton')")
  return select_backend(spec, backend)


def nm_attention_with_importance(query, key, value, bias=None, mask=None, *,
                                 scale=None, is_causal=False,
                                 query_seq_lengths=None,
                                 key_value_seq_lengths=None,
                                 local_window_size=None, n=2, m=4,
                                 block_pattern=None, implementation=None):
  """`nmattn.nm_attention`'s output and the key importance of the same call.

  `importance[b, h, j] = sum_i p[b, h, i, j]`, where `p` are the N:M-pruned
  attention probabilities of the call (`nmattn.nm_attention_weights`);
  queries with no valid key (padding, masked rows) contribute nothing. One
  forward gives both: "pallas_triton" runs its importance kernel on the
  forward's log-sum-exp (one `q k^T` per tile more, no `P V`), "xla" its
  blocked two-pass form. Neither output is differentiable here: the inputs
  pass through `stop_gradient` (use `nm_attention` for gradients).

  Args:
    query: as in `nmattn.nm_attention`, and so are `key`, `value`, `bias`,
      `mask`, `scale`, `is_causal`, `query_seq_lengths`,
      `key_value_seq_lengths`, `local_window_size`, `n`, `m` and
      `block_pattern`.
    implementation: None (the first of "pallas_triton" and "xla" that runs
      the call here; interpret-mode kernels are never picked), "xla",
      "pallas_triton", or such a backend object.

  Returns:
    `(out, importance)`: out as `nm_attention`'s; importance float32
    `[batch, heads, kv_len]` (`[heads, kv_len]` for unbatched inputs).

  Raises:
    ValueError: bad arguments (the message names the argument and value);
      `nmattn.UnsupportedCallError` for a backend without importance
      ("pallas_mosaic", "cudnn") or one that cannot run the call.
  """
  call, added_batch = canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, n=n, m=m,
      block_pattern=block_pattern)
  call = call._replace(**{
      name: lax.stop_gradient(getattr(call, name))
      for name in ("query", "key", "value", "bias")
      if getattr(call, name) is not None})
  out, importance = _importance_backend(call.spec, implementation
                                        ).with_importance(call)
  return (out[0], importance[0]) if added_batch else (out, importance)


def key_importance(query, key, bias=None, mask=None, *, scale=None,
                   is_causal=False, query_seq_lengths=None,
                   key_value_seq_lengths=None, local_window_size=None, n=2,
                   m=4, block_pattern=None, implementation=None) -> jax.Array:
  """The attention probability each key receives, summed over the queries.

  The importance of `nm_attention_with_importance` (same arguments, less
  `value`: the key stands in for it, and the attention output is dropped).
  A statistic for pruning decisions, not a differentiable quantity: its
  gradient is zero.

  Returns:
    float32 `[batch, heads, kv_len]` (`[heads, kv_len]` for unbatched inputs).

  Raises:
    ValueError: as `nm_attention_with_importance`.
  """
  return nm_attention_with_importance(
      query, key, key, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, n=n, m=m,
      block_pattern=block_pattern, implementation=implementation)[1]
