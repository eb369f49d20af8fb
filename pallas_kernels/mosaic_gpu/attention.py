"""The Hopper forward kernel behind a `jax.custom_vjp` whose backward is a field.

`nm_flash_attention(call, tuning, backward)` runs the Mosaic GPU forward and
differentiates through `backward(call, out, lse, d_out) -> (dq, dk, dv,
dbias)`, any backward that takes this forward's log-sum-exp convention (that
of `pallas_kernels.triton.attention`); `nmattn.backends.PallasMosaic` passes
this package's own (`backward.py`, `nmattn.backends.MosaicBackward`) where
it takes the call, else the Triton backward.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

from pallas_kernels.call import AttentionCall, AttentionSpec
from pallas_kernels.mosaic_gpu import backward as backward_kernels
from pallas_kernels.mosaic_gpu import forward
from pallas_kernels.mosaic_gpu.backward import BackwardTuning
from pallas_kernels.mosaic_gpu.forward import MosaicTuning


def _device_reason() -> str | None:
  device = jax.devices()[0]
  if device.platform != "gpu":
    return f"it needs a Hopper (sm_90) GPU; the default device is {device.platform}"
  capability = str(getattr(device, "compute_capability", ""))
  if capability != "9.0":
    return (f"it needs a Hopper (sm_90) GPU; {device.device_kind} has compute "
            f"capability {capability or 'unknown'}")
  return None


def unsupported_reason(spec: AttentionSpec, tuning: MosaicTuning) -> str | None:
  """Why the kernel cannot run a call with `spec` and `tuning` here (None if it can)."""
  reason = (forward.shape_unsupported_reason(spec.dtype, spec.head_dim, spec.m,
                                             tuning)
            or forward.pattern_unsupported_reason(spec, tuning))
  if reason is not None:
    return f"the kernel does not support {reason}"
  return _device_reason()


def backward_unsupported_reason(spec: AttentionSpec,
                                tuning: BackwardTuning) -> str | None:
  """Why the backward kernels cannot differentiate `spec` here (None if they can)."""
  reason = backward_kernels.unsupported_reason(spec, tuning)
  if reason is not None:
    return f"the backward kernels do not support {reason}"
  return _device_reason()


Backward = Callable[..., tuple]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(spec, tuning, backward, q, k, v, bias, mask, q_lengths,
               kv_lengths, block_modes):
  call = AttentionCall(q, k, v, bias, mask, q_lengths, kv_lengths, spec,
                       block_modes)
  return forward.nm_flash_attention_fwd(call, tuning)[0]


def _attention_fwd(spec, tuning, backward, q, k, v, bias, mask, q_lengths,
                   kv_lengths, block_modes):
  del backward
  call = AttentionCall(q, k, v, bias, mask, q_lengths, kv_lengths, spec,
                       block_modes)
  out, lse = forward.nm_flash_attention_fwd(call, tuning)
  return out, ((q, k, v, bias, mask, q_lengths, kv_lengths, block_modes), out,
               lse)


def _attention_bwd(spec, tuning, backward, residuals, d_out):
  del tuning
  (q, k, v, bias, mask, q_lengths, kv_lengths, block_modes), out, lse = residuals
  call = AttentionCall(q, k, v, bias, mask, q_lengths, kv_lengths, spec,
                       block_modes)
  dq, dk, dv, dbias = backward(call, out, lse, d_out)
  return dq, dk, dv, dbias, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def nm_flash_attention(call: AttentionCall, tuning: MosaicTuning,
                       backward: Backward):
  """The Hopper forward of `call`, differentiable through `backward`."""
  return _attention(call.spec, tuning, backward, *call[:7], call.block_modes)
