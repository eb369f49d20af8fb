"""The `"xla"` backend: memory-efficient N:M attention in pure JAX.

Queries are processed in blocks (`lax.map`), keys in blocks inside each
(`lax.scan`) with an online softmax, so no more than one
`[batch, heads, block_q, block_k]` float32 score tile is live at a time. The
backward pass (a `jax.custom_vjp`) recomputes each tile, including the N:M
selection, from the saved log-sum-exp. Key blocks are multiples of `m` and
start at multiples of `m`, so every N:M group lies inside one tile.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from nmattn import masking, patterns
from nmattn.reference import HIGHEST, compute_dtype
from pallas_kernels.call import (KEY_ALIGN, AttentionCall, AttentionSpec,
                                 pad_axis, pad_broadcast, round_up)


@dataclasses.dataclass(frozen=True)
class XlaTuning:
  """Block sizes of the blocked XLA backend."""
  block_q: int
  block_k: int

  def __post_init__(self):
    if self.block_q < 1 or self.block_k < 1 or self.block_k % KEY_ALIGN:
      raise ValueError(f"block_k must be a positive multiple of {KEY_ALIGN} "
                       f"and block_q positive; got {self}")


def default_tuning(spec: AttentionSpec,
                   tile_bytes: int = 16 * 2**20) -> XlaTuning:
  """Key blocks of up to 512; query blocks so one f32 score tile fits `tile_bytes`."""
  block_k = min(512, round_up(spec.kv_len, KEY_ALIGN))
  bytes_per_row = spec.batch * spec.heads * block_k * 4
  rows = max(KEY_ALIGN, tile_bytes // bytes_per_row)
  rows = 1 << (rows.bit_length() - 1)
  return XlaTuning(block_q=min(rows, round_up(spec.q_len, KEY_ALIGN)),
                   block_k=block_k)


def _tile(x, qi, ki, bq, bk):
  """The `[.., bq, bk]` tile of a padded 4-D bias/mask (broadcast dims stay 1)."""
  if x is None:
    return None
  starts = (0, 0, qi * bq if x.shape[2] > 1 else 0, ki * bk if x.shape[3] > 1 else 0)
  sizes = (x.shape[0], x.shape[1], bq if x.shape[2] > 1 else 1,
           bk if x.shape[3] > 1 else 1)
  return lax.dynamic_slice(x, starts, sizes)


class _Problem:
  """Padded operands and the per-tile score computation shared by fwd and bwd."""

  def __init__(self, spec: AttentionSpec, tuning: XlaTuning, q, k, v, bias,
               mask, q_lengths, kv_lengths, block_modes=None):
    self.spec, self.tuning = spec, tuning
    self.bq, self.bk = tuning.block_q, tuning.block_k
    self.nq = -(-spec.q_len // self.bq)
    self.nk = -(-spec.kv_len // self.bk)
    self.groups = spec.heads // spec.kv_heads
    self.cd = compute_dtype(spec.dtype)
    tq, tk = self.nq * self.bq, self.nk * self.bk
    self.q = pad_axis(q, 1, tq).reshape(spec.batch, tq, spec.kv_heads,
                                         self.groups, spec.head_dim)
    self.k = pad_axis(k, 1, tk)
    self.v = pad_axis(v, 1, tk)
    self.bias = pad_broadcast(bias, tq, tk)
    self.mask = pad_broadcast(mask, tq, tk)
    self.q_lengths, self.kv_lengths = q_lengths, kv_lengths
    self.block_modes = block_modes

  def q_tile(self, x, qi):
    return lax.dynamic_slice_in_dim(x, qi * self.bq, self.bq, axis=1)

  def k_tile(self, x, ki):
    return lax.dynamic_slice_in_dim(x, ki * self.bk, self.bk, axis=1)

  def scores(self, q_tile, k_tile, qi, ki):
    """Kept scores `[B, K, G, bq, bk]` of one tile; `-inf` where not kept."""
    spec = self.spec
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_tile, k_tile,
                   preferred_element_type=self.cd, precision=HIGHEST)
    s = s.reshape(spec.batch, spec.heads, self.bq, self.bk) * spec.scale
    if self.bias is not None:
      s = s + _tile(self.bias, qi, ki, self.bq, self.bk).astype(self.cd)
    valid = masking.validity_mask(
        qi * self.bq + jnp.arange(self.bq), ki * self.bk + jnp.arange(self.bk),
        mask=_tile(self.mask, qi, ki, self.bq, self.bk),
        is_causal=spec.is_causal, window=spec.window,
        q_lengths=self.q_lengths, kv_lengths=self.kv_lengths,
        kv_len=spec.kv_len if self.nk * self.bk != spec.kv_len else None)
    if valid is not None:
      s = jnp.where(valid, s, -jnp.inf)
    if spec.has_pattern:
      modes = patterns.element_modes(
          self.block_modes, qi * self.bq + jnp.arange(self.bq),
          ki * self.bk + jnp.arange(self.bk), block_q=spec.block_q,
          block_k=spec.block_k)
      keep = patterns.keep_mask(s, modes, spec.n, spec.m)
    else:
      keep = masking.nm_mask(s, spec.n, spec.m)
    s = jnp.where(keep, s, -jnp.inf)
    return s.reshape(spec.batch, spec.kv_heads, self.groups, self.bq, self.bk)

  def unblock_q(self, blocks):
    """`[nq, B, K, G, bq, ...]` -> `[B, K, G, nq * bq, ...]`."""
    b = jnp.moveaxis(blocks, 0, 3)
    return b.reshape(b.shape[:3] + (self.nq * self.bq,) + b.shape[5:])


def _forward(spec, tuning, q, k, v, bias, mask, q_lengths, kv_lengths,
             block_modes=None):
  """Returns out `[B, T, H, D]` and the log-sum-exp `[B, K, G, T_padded]`."""
  pr = _Problem(spec, tuning, q, k, v, bias, mask, q_lengths, kv_lengths,
                block_modes)
  stats_shape = (spec.batch, spec.kv_heads, pr.groups, pr.bq)

  def q_block(qi):
    q_tile = pr.q_tile(pr.q, qi)

    def k_step(carry, ki):
      acc, row_max, row_sum = carry
      s = pr.scores(q_tile, pr.k_tile(pr.k, ki), qi, ki)
      new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
      safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
      correction = jnp.exp(row_max - safe_max)
      p = jnp.exp(s - safe_max[..., None])
      row_sum = row_sum * correction + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(spec.dtype),
                      pr.k_tile(pr.v, ki), preferred_element_type=pr.cd,
                      precision=HIGHEST)
      return (acc * correction[..., None] + pv, new_max, row_sum), None

    init = (jnp.zeros(stats_shape + (spec.head_dim,), pr.cd),
            jnp.full(stats_shape, -jnp.inf, pr.cd), jnp.zeros(stats_shape, pr.cd))
    (acc, row_max, row_sum), _ = lax.scan(k_step, init, jnp.arange(pr.nk))
    safe_sum = jnp.where(row_sum == 0.0, 1.0, row_sum)
    lse = jnp.where(row_max == -jnp.inf, 0.0, row_max) + jnp.log(safe_sum)
    return acc / safe_sum[..., None], lse

  out, lse = lax.map(q_block, jnp.arange(pr.nq))
  out = pr.unblock_q(out)[:, :, :, :spec.q_len]  # [B, K, G, T, D]
  out = jnp.moveaxis(out, 3, 1).reshape(spec.batch, spec.q_len, spec.heads,
                                        spec.head_dim)
  return out.astype(spec.dtype), pr.unblock_q(lse)


def _backward(spec, tuning, residuals, d_out):
  q, k, v, bias, mask, q_lengths, kv_lengths, block_modes, out, lse = residuals
  pr = _Problem(spec, tuning, q, k, v, bias, mask, q_lengths, kv_lengths,
                block_modes)
  tq = pr.nq * pr.bq
  shape5 = (spec.batch, tq, spec.kv_heads, pr.groups, spec.head_dim)
  d_out = pad_axis(d_out, 1, tq).reshape(shape5)
  out = pad_axis(out, 1, tq).reshape(shape5)
  # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij, the softmax-backward term.
  delta = jnp.einsum("bqkgd,bqkgd->bkgq", d_out.astype(pr.cd), out.astype(pr.cd))
  scale = spec.scale

  def k_block(carry, ki):
    k_tile, v_tile = pr.k_tile(pr.k, ki), pr.k_tile(pr.v, ki)

    def q_step(inner, qi):
      dk, dv, dq, dbias = inner
      q_tile, do_tile = pr.q_tile(pr.q, qi), pr.q_tile(d_out, qi)
      rows = lambda x: lax.dynamic_slice_in_dim(x, qi * pr.bq, pr.bq, axis=3)
      s = pr.scores(q_tile, k_tile, qi, ki)
      p = jnp.exp(s - rows(lse)[..., None])
      dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(spec.dtype), do_tile,
                           preferred_element_type=pr.cd, precision=HIGHEST)
      dp = jnp.einsum("bqkgd,bskd->bkgqs", do_tile, v_tile,
                      preferred_element_type=pr.cd, precision=HIGHEST)
      ds = p * (dp - rows(delta)[..., None])
      ds_in = ds.astype(spec.dtype)
      dq_tile = jnp.einsum("bkgqs,bskd->bqkgd", ds_in, k_tile,
                           preferred_element_type=pr.cd, precision=HIGHEST)
      dq = lax.dynamic_update_slice_in_dim(
          dq, pr.q_tile(dq, qi) + scale * dq_tile, qi * pr.bq, axis=1)
      dk = dk + scale * jnp.einsum("bkgqs,bqkgd->bskd", ds_in, q_tile,
                                   preferred_element_type=pr.cd,
                                   precision=HIGHEST)
      if dbias is not None:
        ds4 = ds.reshape(spec.batch, spec.heads, pr.bq, pr.bk)
        summed = tuple(i for i in range(4) if dbias.shape[i] == 1)
        contribution = jnp.sum(ds4, axis=summed, keepdims=True)
        starts = (0, 0, qi * pr.bq if dbias.shape[2] > 1 else 0,
                  ki * pr.bk if dbias.shape[3] > 1 else 0)
        current = lax.dynamic_slice(dbias, starts, contribution.shape)
        dbias = lax.dynamic_update_slice(dbias, current + contribution, starts)
      return (dk, dv, dq, dbias), None

    dq, dbias = carry
    zeros_kv = jnp.zeros((spec.batch, pr.bk, spec.kv_heads, spec.head_dim), pr.cd)
    (dk, dv, dq, dbias), _ = lax.scan(q_step, (zeros_kv, zeros_kv, dq, dbias),
                                      jnp.arange(pr.nq))
    return (dq, dbias), (dk, dv)

  dbias0 = None if pr.bias is None else jnp.zeros(pr.bias.shape, pr.cd)
  (dq, dbias), (dk, dv) = lax.scan(
      k_block, (jnp.zeros(shape5, pr.cd), dbias0), jnp.arange(pr.nk))
  dq = dq[:, :spec.q_len].reshape(q.shape).astype(q.dtype)

  def unblock_k(x):
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((spec.batch, pr.nk * pr.bk) + x.shape[3:])[:, :spec.kv_len]

  dk = unblock_k(dk).astype(k.dtype)
  dv = unblock_k(dv).astype(v.dtype)
  if dbias is not None:
    dbias = dbias[:, :, :bias.shape[2], :bias.shape[3]].astype(bias.dtype)
  return dq, dk, dv, dbias, None, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(spec, tuning, q, k, v, bias, mask, q_lengths, kv_lengths,
               block_modes):
  return _forward(spec, tuning, q, k, v, bias, mask, q_lengths, kv_lengths,
                  block_modes)[0]


def _attention_fwd(spec, tuning, q, k, v, bias, mask, q_lengths, kv_lengths,
                   block_modes):
  out, lse = _forward(spec, tuning, q, k, v, bias, mask, q_lengths, kv_lengths,
                      block_modes)
  return out, (q, k, v, bias, mask, q_lengths, kv_lengths, block_modes, out,
               lse)


_attention.defvjp(_attention_fwd, _backward)


def nm_attention_xla(call: AttentionCall, tuning: XlaTuning | None = None):
  """Runs a canonical call (see `nmattn._validation.canonicalize`)."""
  spec = call.spec
  return _attention(spec, tuning or default_tuning(spec), call.query, call.key,
                    call.value, call.bias, call.mask, call.q_lengths,
                    call.kv_lengths, call.block_modes)


def xla_key_importance(call: AttentionCall,
                       tuning: XlaTuning | None = None) -> jax.Array:
  """Key importance `[batch, heads, kv_len]` float32 of a canonical call, blocked
  (`nmattn.importance`): for one query block at a time, one pass over the key
  tiles gives each row's log-sum-exp, a second adds each tile's
  probabilities into the key sums.

  `call.value` is not read. `tuning` sets the block sizes (default: the xla
  backend's `default_tuning`).
  """
  spec = call.spec
  tuning = tuning or default_tuning(spec)
  pr = _Problem(spec, tuning, call.query, call.key, call.key, call.bias,
                call.mask, call.q_lengths, call.kv_lengths, call.block_modes)
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
