"""Public entry points and the `jax.custom_vjp` wiring of the Triton kernels.

Every entry point takes the canonical `AttentionCall` (`pallas_kernels.call`)
that `nmattn` built and validated, plus the kernels' `TuningConfig` (None:
`default_tuning`) and `interpret` (Pallas interpret mode, for the CPU).

The log-sum-exp convention shared with other forward kernels (the Mosaic GPU
backend takes `nm_flash_attention_bwd` as its default VJP): `lse
[batch, heads, q_len]` float32 is the natural log of the sum of `exp` of the
kept scores of each query row, where a score is `scale * q.k + bias` after
masking and N:M selection. A row with no kept score (every key masked, or a
padded query) has `lse = +inf` from this forward; the backward accepts
`+inf` or `-inf` there and gives such rows zero gradients, never NaN.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.call import AttentionCall
from pallas_kernels.triton import _common, backward, forward, importance
from pallas_kernels.triton.config import TuningConfig


def _operands(call: AttentionCall):
  return (call.query, call.key, call.value, call.bias, call.mask,
          call.q_lengths, call.kv_lengths, call.block_modes)


def nm_flash_attention_fwd(call: AttentionCall, *,
                           tuning: TuningConfig | None = None,
                           interpret: bool = False):
  """Forward pass only: `(out [B, T, H, D], lse [B, H, T] float32)`."""
  plan = _common.make_plan(call.spec, tuning, interpret)
  return forward.forward(plan, *_operands(call))


def nm_flash_attention_bwd(call: AttentionCall, out, lse, d_out, *,
                           tuning: TuningConfig | None = None,
                           interpret: bool = False):
  """Gradients `(dq, dk, dv, dbias)` given a forward's `out` and `lse`.

  `out` and `d_out` are `[B, T, H, D]` like the query; `lse` is `[B, H, T]`
  float32 (this module's convention), as a forward of the same call returned
  them. `dbias` is None without a bias, else in the call's (4-D) bias shape
  and dtype. The N:M selection is recomputed from the scores.
  """
  plan = _common.make_plan(call.spec, tuning, interpret)
  return backward.backward(plan, *_operands(call), out, lse, d_out)


def nm_flash_attention_selection(call: AttentionCall, *,
                                 tuning: TuningConfig | None = None,
                                 interpret: bool = False):
  """The forward kernel's own keep-mask `[B, H, T, S]` (bool), for testing.

  Materialises `B * H * T * S` bytes: meant for measuring how often the
  kernel's selection differs from the reference's, not for training.
  """
  plan = _common.make_plan(call.spec, tuning, interpret)
  return forward.forward(plan, *_operands(call), return_keep=True)[2]


def nm_flash_attention_with_importance(call: AttentionCall, *,
                                       tuning: TuningConfig | None = None,
                                       interpret: bool = False):
  """`(out [B, T, H, D], importance [B, H, S] float32)`, not differentiable.

  `importance[b, h, j]` sums the kept attention probabilities that key `j`
  receives over the queries (`importance.key_importance`, from this
  forward's lse).
  """
  plan = _common.make_plan(call.spec, tuning, interpret)
  q, k, v, bias, mask, q_lengths, kv_lengths, block_modes = _operands(call)
  out, lse = forward.forward(plan, q, k, v, bias, mask, q_lengths, kv_lengths,
                             block_modes)
  return out, importance.key_importance(plan, q, k, bias, mask, q_lengths,
                                        kv_lengths, block_modes, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan, q, k, v, bias, mask, q_lengths, kv_lengths, block_modes):
  return forward.forward(plan, q, k, v, bias, mask, q_lengths, kv_lengths,
                         block_modes)[0]


def _attention_fwd(plan, q, k, v, bias, mask, q_lengths, kv_lengths,
                   block_modes):
  out, lse = forward.forward(plan, q, k, v, bias, mask, q_lengths, kv_lengths,
                             block_modes)
  return out, (q, k, v, bias, mask, q_lengths, kv_lengths, block_modes, out,
               lse)


def _attention_bwd(plan, residuals, d_out):
  *operands, out, lse = residuals
  dq, dk, dv, dbias = backward.backward(plan, *operands, out, lse, d_out)
  return dq, dk, dv, dbias, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def nm_flash_attention(call: AttentionCall, *, tuning: TuningConfig | None = None,
                       interpret: bool = False):
  """Fused N:M sparse flash attention (Pallas, lowered through Triton).

  The semantics of `nmattn.nm_attention` (docs/ARCHITECTURE.md, "The semantics"): scores
  `scale * q.k + bias` in float32, masked (mask, causal, window, lengths) to
  `-inf`, then in each group of `m` consecutive keys the `n` largest are
  kept (ties to the lower key index, `-inf` never kept); softmax over the
  kept scores and `P V`. A query row with no valid key gives zeros.
  Differentiable: gradients flow through the kept scores, the selection is
  a constant.

  Args:
    call: the canonical call; its spec must pass `unsupported_reason`
      (dtype bfloat16, float16 or float32; head_dim in 16 ... 256).
    tuning: tiles and launch parameters; None picks `default_tuning`.
    interpret: run the kernels in Pallas interpret mode (CPU).

  Returns:
    `[batch, q_len, heads, head_dim]` in the dtype of the query.
  """
  plan = _common.make_plan(call.spec, tuning, interpret)
  return _attention(plan, *_operands(call))
