"""Public entry points and the `jax.custom_vjp` wiring of the Triton kernels.

The log-sum-exp convention shared with other forward kernels (the Mosaic GPU
one reuses `nm_flash_attention_bwd`): `lse [batch, heads, q_len]` float32 is
the natural log of the sum of `exp` of the kept scores of each query row,
where a score is `scale * q.k + bias` after masking and N:M selection. A row
with no kept score (every key masked, or a padded query) has `lse = +inf`
from this forward; the backward accepts `+inf` or `-inf` there and gives such
rows zero gradients, never NaN.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.triton import _common, backward, forward
from pallas_kernels.triton._common import Plan


def _plan(q, k, v, bias, mask, q_lengths, kv_lengths, scale, is_causal, window,
          n, m, interpret, tuning):
  return _common.plan_call(q, k, v, bias, mask, q_lengths, kv_lengths,
                           scale=scale, is_causal=is_causal, window=window, n=n,
                           m=m, interpret=interpret, tuning=tuning)


def nm_flash_attention_fwd(q, k, v, bias=None, mask=None, *, scale=None,
                           is_causal=False, q_lengths=None, kv_lengths=None,
                           window=None, n=2, m=4, interpret=False, tuning=None):
  """Forward pass only: `(out [B, T, H, D], lse [B, H, T] float32)`.

  Arguments as `nm_flash_attention`; `lse` as in this module's docstring.
  """
  plan, bias, mask, q_lengths, kv_lengths = _plan(
      q, k, v, bias, mask, q_lengths, kv_lengths, scale, is_causal, window, n,
      m, interpret, tuning)
  return forward.forward(plan, q, k, v, bias, mask, q_lengths, kv_lengths)


def nm_flash_attention_bwd(q, k, v, bias, mask, q_lengths, kv_lengths, out, lse,
                           d_out, *, scale=None, is_causal=False, window=None,
                           n=2, m=4, interpret=False, tuning=None):
  """Gradients `(dq, dk, dv, dbias)` given a forward's `out` and `lse`.

  `out` and `d_out` are `[B, T, H, D]` like `q`; `lse` is `[B, H, T]` float32
  (this module's convention). `dbias` is None without a bias, else in the
  bias' shape and dtype. The N:M selection is recomputed from the scores.
  """
  plan, canonical_bias, mask, q_lengths, kv_lengths = _plan(
      q, k, v, bias, mask, q_lengths, kv_lengths, scale, is_causal, window, n,
      m, interpret, tuning)
  _check_residuals(plan, out, lse, d_out)
  dq, dk, dv, dbias = backward.backward(plan, q, k, v, canonical_bias, mask,
                                        q_lengths, kv_lengths, out, lse, d_out)
  if dbias is not None:
    dbias = dbias.reshape(bias.shape)
  return dq, dk, dv, dbias


def _check_residuals(plan: Plan, out, lse, d_out):
  q_shape = (plan.batch, plan.q_len, plan.heads, plan.head_dim)
  for name, x in (("out", out), ("d_out", d_out)):
    if tuple(x.shape) != q_shape:
      raise ValueError(f"{name} must have the shape of q {q_shape}; got "
                       f"{name}.shape={tuple(x.shape)}")
  lse_shape = (plan.batch, plan.heads, plan.q_len)
  if tuple(lse.shape) != lse_shape or lse.dtype != jax.numpy.float32:
    raise ValueError(f"lse must be float32 [batch, heads, q_len]={lse_shape}; got "
                     f"lse.shape={tuple(lse.shape)}, lse.dtype={lse.dtype}")


def nm_flash_attention_selection(q, k, v, bias=None, mask=None, *, scale=None,
                                 is_causal=False, q_lengths=None,
                                 kv_lengths=None, window=None, n=2, m=4,
                                 interpret=False, tuning=None):
  """The forward kernel's own keep-mask `[B, H, T, S]` (bool), for testing.

  Materialises `B * H * T * S` bytes: meant for measuring how often the
  kernel's selection differs from the reference's, not for training.
  """
  plan, bias, mask, q_lengths, kv_lengths = _plan(
      q, k, v, bias, mask, q_lengths, kv_lengths, scale, is_causal, window, n,
      m, interpret, tuning)
  return forward.forward(plan, q, k, v, bias, mask, q_lengths, kv_lengths,
                         return_keep=True)[2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan, q, k, v, bias, mask, q_lengths, kv_lengths):
  return forward.forward(plan, q, k, v, bias, mask, q_lengths, kv_lengths)[0]


def _attention_fwd(plan, q, k, v, bias, mask, q_lengths, kv_lengths):
  out, lse = forward.forward(plan, q, k, v, bias, mask, q_lengths, kv_lengths)
  return out, (q, k, v, bias, mask, q_lengths, kv_lengths, out, lse)


def _attention_bwd(plan, residuals, d_out):
  q, k, v, bias, mask, q_lengths, kv_lengths, out, lse = residuals
  dq, dk, dv, dbias = backward.backward(plan, q, k, v, bias, mask, q_lengths,
                                        kv_lengths, out, lse, d_out)
  return dq, dk, dv, dbias, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def nm_flash_attention(q, k, v, bias=None, mask=None, *, scale=None,
                       is_causal=False, q_lengths=None, kv_lengths=None,
                       window=None, n=2, m=4, interpret=False, tuning=None):
  """Fused N:M sparse flash attention (Pallas, lowered through Triton).

  The semantics of `nmattn.nm_attention`: scores `scale * q.k + bias` in
  float32, masked (`mask`, `is_causal`, `window`, lengths) to `-inf`, then in
  each group of `m` consecutive keys the `n` largest are kept (ties to the
  lower key index, `-inf` never kept); softmax over the kept scores and
  `P V`. A query row with no valid key gives zeros. Differentiable: gradients
  flow through the kept scores, the selection is a constant.

  Args:
    q: `[batch, q_len, heads, head_dim]`, bfloat16, float16 or float32;
      head_dim one of 16, 32, 64, 128, 256.
    k, v: `[batch, kv_len, kv_heads, head_dim]`, `heads % kv_heads == 0`.
    bias: optional float array broadcastable to `[batch, heads, q_len, kv_len]`.
    mask: optional bool array broadcastable like `bias` (True = attend).
    scale: score scale, default `head_dim ** -0.5`.
    is_causal: key position <= query position (top-left aligned).
    q_lengths, kv_lengths: optional int `[batch]`; positions at or beyond are
      padding.
    window: None, an int, or (left, right): `q - left <= k <= q + right`.
    n, m: keep `n` of every `m` consecutive keys; m in (1, 2, 4, 8, 16).
    interpret: run the kernels in Pallas interpret mode (CPU).
    tuning: a `TuningConfig`; None picks `default_tuning(head_dim)`.

  Returns:
    `[batch, q_len, heads, head_dim]` in the dtype of `q`.

  Raises:
    ValueError: an argument of the wrong shape, dtype or value (the message
      names it and says what was expected).
  """
  plan, bias, mask, q_lengths, kv_lengths = _plan(
      q, k, v, bias, mask, q_lengths, kv_lengths, scale, is_causal, window, n,
      m, interpret, tuning)
  return _attention(plan, q, k, v, bias, mask, q_lengths, kv_lengths)
