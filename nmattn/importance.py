"""Key importance: the attention probability each key receives, summed over queries.

For every `(batch, head, key)`, the sum over valid queries of the N:M-pruned
attention probabilities, the statistic SpAtten prunes tokens by (Wang, Zhang,
Han, HPCA 2021). The `"xla"` form is blocked like the xla backend's forward:
for one query block at a time, one pass over the key tiles gives each row's
log-sum-exp, a second pass adds each tile's probabilities into the key sums,
so only one `[batch, heads, block_q, block_k]` score tile is live at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from nmattn import xla_backend
from nmattn._validation import AttentionCall, canonicalize
from nmattn.attention import IMPLEMENTATIONS
from nmattn.backends import UnsupportedCallError


def xla_key_importance(call: AttentionCall,
                       tuning: xla_backend.XlaTuning | None = None) -> jax.Array:
  """Key importance `[batch, heads, kv_len]` float32 of a canonical call, blocked.

  `call.value` is not read. `tuning` sets the block sizes (default: the xla
  backend's `default_tuning`).
  """
  spec = call.spec
  tuning = tuning or xla_backend.default_tuning(spec)
  pr = xla_backend._Problem(spec, tuning, call.query, call.key, call.key,  # pylint: disable=protected-access
                            call.bias, call.mask, call.q_lengths,
                            call.kv_lengths)
  stats_shape = (spec.batch, spec.kv_heads, pr.groups, pr.bq)

  def q_block(totals, qi):
    q_tile = pr.q_tile(pr.q, qi)
    tile_scores = lambda ki: pr.scores(q_tile, pr.k_tile(pr.k, ki), qi, ki)

    def lse_step(carry, ki):
      row_max, row_sum = carry
      s = tile_scores(ki)
      new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
      safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
      row_sum = (row_sum * jnp.exp(row_max - safe_max)
                 + jnp.sum(jnp.exp(s - safe_max[..., None]), axis=-1))
      return (new_max, row_sum), None

    init = (jnp.full(stats_shape, -jnp.inf, pr.cd), jnp.zeros(stats_shape, pr.cd))
    (row_max, row_sum), _ = lax.scan(lse_step, init, jnp.arange(pr.nk))
    # A row with no kept score has row_sum 0 and all-(-inf) scores: any finite
    # lse gives it zero probabilities.
    lse = (jnp.where(row_max == -jnp.inf, 0.0, row_max)
           + jnp.log(jnp.where(row_sum == 0.0, 1.0, row_sum)))
    # Rows past q_len are the query padding of the last block, not queries.
    real_row = qi * pr.bq + jnp.arange(pr.bq) < spec.q_len

    def sum_step(_, ki):
      p = jnp.exp(tile_scores(ki) - lse[..., None])
      return None, jnp.sum(jnp.where(real_row[:, None], p, 0.0), axis=-2)

    _, sums = lax.scan(sum_step, None, jnp.arange(pr.nk))  # [nk, B, K, G, bk]
    sums = jnp.moveaxis(sums, 0, 3).reshape(stats_shape[:3] + (pr.nk * pr.bk,))
    return totals + sums.astype(jnp.float32), None

  totals = jnp.zeros(stats_shape[:3] + (pr.nk * pr.bk,), jnp.float32)
  totals, _ = lax.scan(q_block, totals, jnp.arange(pr.nq))
  return totals.reshape(spec.batch, spec.heads, -1)[..., :spec.kv_len]


def key_importance(query, key, bias=None, mask=None, *, scale=None,
                   is_causal=False, query_seq_lengths=None,
                   key_value_seq_lengths=None, local_window_size=None, n=2,
                   m=4, implementation=None) -> jax.Array:
  """The attention probability each key receives, summed over the queries.

  `importance[b, h, j] = sum_i p[b, h, i, j]`, where `p` are the N:M-pruned
  attention probabilities of `nmattn.nm_attention` with the same arguments
  (`nmattn.nm_attention_weights`); queries with no valid key (padding,
  masked rows) contribute nothing. It is a statistic for pruning decisions,
  not a differentiable quantity: the inputs pass through `stop_gradient`, so
  its gradient is zero.

  Args:
    query: `[batch, q_len, heads, head_dim]` (or `[q_len, heads, head_dim]`).
    key: `[batch, kv_len, kv_heads, head_dim]`, `heads % kv_heads == 0`.
    bias, mask, scale, is_causal, query_seq_lengths, key_value_seq_lengths,
      local_window_size, n, m: as in `nmattn.nm_attention`.
    implementation: None or "xla" (the blocked, memory-efficient form). The
      kernel backends' fused form is not built yet: naming one raises.

  Returns:
    float32 `[batch, heads, kv_len]` (`[heads, kv_len]` for unbatched inputs).

  Raises:
    ValueError: bad arguments (the message names the argument and value);
      `nmattn.UnsupportedCallError` for "pallas_triton" or "pallas_mosaic".
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got "
                     f"implementation={implementation!r}")
  if implementation not in (None, "xla"):
    raise UnsupportedCallError(
        f"implementation={implementation!r} cannot compute key importance: the "
        "fused kernel output is not built; use implementation=None or 'xla'")
  call, added_batch = canonicalize(
      query, key, key, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, n=n, m=m)
  call = call._replace(query=lax.stop_gradient(call.query),
                       key=lax.stop_gradient(call.key),
                       value=lax.stop_gradient(call.value),
                       bias=None if call.bias is None
                       else lax.stop_gradient(call.bias))
  importance = xla_key_importance(call)
  return importance[0] if added_batch else importance
