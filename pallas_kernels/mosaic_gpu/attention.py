"""The `"pallas_mosaic"` backend: the Hopper forward kernel behind a custom VJP.

Gradients reuse the Triton backward (`pallas_kernels.triton.nm_flash_attention_bwd`),
which recomputes the N:M selection from the saved log-sum-exp; until a Hopper
backward exists that is the only backward of this backend.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.mosaic_gpu import forward


def _device_reason() -> str | None:
  device = jax.devices()[0]
  if device.platform != "gpu":
    return f"it needs a Hopper (sm_90) GPU; the default device is {device.platform}"
  capability = str(getattr(device, "compute_capability", ""))
  if capability != "9.0":
    return (f"it needs a Hopper (sm_90) GPU; {device.device_kind} has compute "
            f"capability {capability or 'unknown'}")
  return None


def unsupported_reason(spec) -> str | None:
  """Why this backend cannot run a call with `spec` here (None if it can)."""
  reason = forward.shape_unsupported_reason(spec.dtype, spec.head_dim, spec.m,
                                            forward.MosaicTuning())
  if reason is not None:
    return f"the kernel does not support {reason}"
  return _device_reason()


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, q, k, v, bias, mask, q_lengths, kv_lengths):
  return _forward(static, q, k, v, bias, mask, q_lengths, kv_lengths)[0]


def _forward(static, q, k, v, bias, mask, q_lengths, kv_lengths):
  scale, is_causal, window, n, m = static
  return forward.nm_flash_attention_fwd(
      q, k, v, bias, mask, q_lengths, kv_lengths, scale=scale,
      is_causal=is_causal, window=window, n=n, m=m)


def _attention_fwd(static, q, k, v, bias, mask, q_lengths, kv_lengths):
  out, lse = _forward(static, q, k, v, bias, mask, q_lengths, kv_lengths)
  return out, (q, k, v, bias, mask, q_lengths, kv_lengths, out, lse)


def _attention_bwd(static, residuals, d_out):
  try:
    from pallas_kernels.triton import nm_flash_attention_bwd  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise NotImplementedError(
        "gradients of implementation='pallas_mosaic' use the Triton backward "
        f"(pallas_kernels.triton.nm_flash_attention_bwd), unavailable: {e}") from e
  scale, is_causal, window, n, m = static
  q, k, v, bias, mask, q_lengths, kv_lengths, out, lse = residuals
  dq, dk, dv, dbias = nm_flash_attention_bwd(
      q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, d_out, scale=scale,
      is_causal=is_causal, window=window, n=n, m=m)
  return dq, dk, dv, dbias, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def nm_attention_mosaic(call):
  """Runs a canonical `nmattn` call (see `nmattn._validation.canonicalize`)."""
  spec = call.spec
  static = (spec.scale, spec.is_causal, spec.window, spec.n, spec.m)
  return _attention(static, call.query, call.key, call.value, call.bias,
                    call.mask, call.q_lengths, call.kv_lengths)
