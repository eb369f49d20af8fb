"""The definition of truth: N:M attention with the whole score matrix materialised.

Every backend is tested against `nm_attention_reference`; its autodiff gradient
is the gradient semantics (the N:M selection is a constant).

Block patterns (hierarchical structured sparsity). An optional
`BlockPattern(modes, block_q, block_k)` (`nmattn.patterns`) has static block
sizes, `block_k` a multiple of `m`, and int8 `modes` broadcastable to
`[batch, heads, ceil(q_len / block_q), ceil(kv_len / block_k)]`, one mode per
(batch, query head, query block, key block): query `i` and key `j` lie in
block `(i // block_q, j // block_k)`, the last blocks partial where the
lengths are not multiples of the block sizes.
- `SKIP = 0`: every score of the block is masked (as `mask == False`) before
  pruning.
- `NM = 1`: the N:M rule applies as without a pattern; each group of `m`
  keys lies inside one block, since `block_k % m == 0`.
- `DENSE = 2`: every valid score of the block is kept (no pruning).
Softmax runs over all kept scores of the row, across blocks; a row with no
kept score gives zeros. No pattern is every block `NM` (the same result, bit
for bit); `n == m` with a pattern is plain block-sparse attention. Gradients
flow through the kept scores only; the pattern, like the selection, is a
constant. Traced modes outside {0, 1, 2} (unchecked under `jit`) act as `SKIP`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nmattn import masking, patterns
from nmattn._validation import AttentionCall, canonicalize

HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for 16/32-bit inputs, float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def masked_softmax(scores: jax.Array) -> jax.Array:
  """Softmax over the last axis where `-inf` entries get weight 0.

  A row whose entries are all `-inf` gives zeros (and zero gradients), not NaN.
  """
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(row_max == -jnp.inf, 0.0, row_max))
  unnormalised = jnp.exp(scores - row_max)
  total = jnp.sum(unnormalised, axis=-1, keepdims=True)
  return unnormalised / jnp.where(total == 0.0, 1.0, total)


def call_scores(call: AttentionCall) -> jax.Array:
  """Masked scores `[batch, heads, q_len, kv_len]` before N:M selection."""
  spec = call.spec
  cd = compute_dtype(spec.dtype)
  groups = spec.heads // spec.kv_heads
  q = call.query.astype(cd).reshape(spec.batch, spec.q_len, spec.kv_heads,
                                    groups, spec.head_dim)
  s = jnp.einsum("btkgd,bskd->bkgts", q, call.key.astype(cd), precision=HIGHEST)
  s = s.reshape(spec.batch, spec.heads, spec.q_len, spec.kv_len) * spec.scale
  if call.bias is not None:
    s = s + call.bias.astype(cd)
  valid = masking.validity_mask(
      jnp.arange(spec.q_len), jnp.arange(spec.kv_len), mask=call.mask,
      is_causal=spec.is_causal, window=spec.window, q_lengths=call.q_lengths,
      kv_lengths=call.kv_lengths)
  if valid is not None:
    s = jnp.where(valid, s, -jnp.inf)
  return s


def call_keep(call: AttentionCall, scores: jax.Array) -> jax.Array:
  """Which of the masked `scores` (`call_scores`) are kept: bool `[B, H, T, S]`.

  N:M selection, or with the call's block pattern the selection of each
  block's mode.
  """
  spec = call.spec
  if not spec.has_pattern:
    return masking.nm_mask(scores, spec.n, spec.m)
  element_modes = patterns.element_modes(
      call.block_modes, jnp.arange(spec.q_len), jnp.arange(spec.kv_len),
      block_q=spec.block_q, block_k=spec.block_k)
  return patterns.keep_mask(scores, element_modes, spec.n, spec.m)


def call_weights(call: AttentionCall) -> jax.Array:
  """Pruned attention probabilities `[batch, heads, q_len, kv_len]`: N:M, or
  block by block as the call's pattern says."""
  s = call_scores(call)
  return masked_softmax(jnp.where(call_keep(call, s), s, -jnp.inf))


def apply_weights(weights: jax.Array, value: jax.Array,
                  precision=HIGHEST) -> jax.Array:
  """`weights [B, H, T, S] @ value [B, S, K, D]` -> `[B, T, H, D]` (GQA aware)."""
  batch, heads, q_len, kv_len = weights.shape
  kv_heads = value.shape[2]
  w = weights.reshape(batch, kv_heads, heads // kv_heads, q_len, kv_len)
  out = jnp.einsum("bkgts,bskd->btkgd", w, value.astype(weights.dtype),
                   precision=precision)
  return out.reshape(batch, q_len, heads, value.shape[-1])


def nm_attention_weights(query, key, bias=None, mask=None, *, scale=None,
                         is_causal=False, query_seq_lengths=None,
                         key_value_seq_lengths=None, local_window_size=None,
                         n=2, m=4, block_pattern=None) -> jax.Array:
  """The N:M-pruned attention probabilities.

  Arguments as `nm_attention_reference` (without `value`). Returns float32
  (float64 for float64 inputs) `[batch, heads, q_len, kv_len]`, or
  `[heads, q_len, kv_len]` for unbatched inputs. Kept entries of a row sum to
  1; a row with no kept score is all zeros.
  """
  call, added_batch = canonicalize(
      query, key, key, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, n=n, m=m,
      block_pattern=block_pattern)
  weights = call_weights(call)
  return weights[0] if added_batch else weights


def nm_attention_reference(query, key, value, bias=None, mask=None, *,
                           scale=None, is_causal=False, query_seq_lengths=None,
                           key_value_seq_lengths=None, local_window_size=None,
                           n=2, m=4, block_pattern=None) -> jax.Array:
  """N:M sparse attention, materialising the scores (ARCHITECTURE.md semantics).

  1. `s = scale * q.k` in float32 (float64 for float64 inputs) `+ bias`;
  2. masked pairs (`mask == False`, causal, window, lengths, and the scores
     of `SKIP` blocks) become `-inf`;
  3. each group of `m` consecutive keys keeps its `n` largest scores (in
     `NM` blocks; `DENSE` blocks keep every valid score);
  4. softmax over the kept scores, `out = p @ v`, cast to the input dtype; a
     row with no kept score gives zeros.

  Args:
    query: `[batch, q_len, heads, head_dim]` (or without `batch`).
    key: `[batch, kv_len, kv_heads, head_dim]`, `heads % kv_heads == 0`.
    value: same shape as `key`.
    bias: optional float, broadcastable to `[batch, heads, q_len, kv_len]`.
    mask: optional bool (True = attend), broadcastable like `bias`.
    scale: score scale, default `head_dim ** -0.5`.
    is_causal: key position <= query position.
    query_seq_lengths: optional int `[batch]`; queries at or beyond are padding.
    key_value_seq_lengths: optional int `[batch]`; keys at or beyond are padding.
    local_window_size: int or (left, right): `q - left <= k <= q + right`.
    n, m: keep `n` of every `m` consecutive keys.
    block_pattern: optional `nmattn.BlockPattern`: the mode (`SKIP`, `NM`,
      `DENSE`) of every `[block_q, block_k]` block, `block_k % m == 0`; no
      pattern is every block `NM`.

  Returns:
    `[batch, q_len, heads, head_dim]` in the dtype of `query`.
  """
  call, added_batch = canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, n=n, m=m,
      block_pattern=block_pattern)
  out = apply_weights(call_weights(call),
                      call.value).astype(call.spec.dtype)
  return out[0] if added_batch else out
