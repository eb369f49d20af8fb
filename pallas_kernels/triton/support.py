"""Where the Triton kernels run: CUDA GPUs natively, CPUs in interpret mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _compat
from pallas_kernels.call import AttentionSpec
from pallas_kernels.triton._common import (MAX_FLOAT32_HEAD_DIM, SUPPORTED_DTYPES,
                                           SUPPORTED_HEAD_DIMS,
                                           power_of_two_factor)
from pallas_kernels.triton.config import MIN_BLOCK

# bfloat16 dots in Triton need Ampere (sm_80) or newer.
MIN_COMPUTE_CAPABILITY = (8, 0)


def runs_natively() -> bool:
  """Whether the default device is a CUDA GPU the kernels compile for."""
  capability = _compat.cuda_compute_capability()
  return capability is not None and capability >= MIN_COMPUTE_CAPABILITY


def unsupported_reason(spec: AttentionSpec) -> str | None:
  """None if the kernels can run a call with `spec` on the default device,
  else why not.

  On a CPU they run in Pallas interpret mode (slow; for tests). Other
  arguments (masks, lengths, window, GQA, any n:m) are always supported. A
  block pattern needs kernel tiles that divide its blocks: `block_q` with a
  power-of-two factor of at least 16, `block_k` of at least `16 * m` (16 at
  `n == m`), e.g. blocks of 64 or 128 at 2:4.
  """
  dtype, head_dim = jnp.dtype(spec.dtype).name, spec.head_dim
  if dtype not in SUPPORTED_DTYPES:
    return f"dtype {dtype} is not supported (supported: {', '.join(SUPPORTED_DTYPES)})"
  if head_dim not in SUPPORTED_HEAD_DIMS:
    return (f"head_dim={head_dim} is not supported (supported: "
            f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))})")
  if dtype == "float32" and head_dim > MAX_FLOAT32_HEAD_DIM:
    return (f"float32 needs head_dim <= {MAX_FLOAT32_HEAD_DIM}; got "
            f"head_dim={head_dim}")
  if spec.has_pattern:
    lanes = 1 if spec.is_dense else spec.m
    if power_of_two_factor(spec.block_q) < MIN_BLOCK:
      return (f"block_pattern.block_q={spec.block_q} needs a power-of-two "
              f"factor >= {MIN_BLOCK} (the query tile divides it)")
    if power_of_two_factor(spec.block_k) < MIN_BLOCK * lanes:
      return (f"block_pattern.block_k={spec.block_k} needs a power-of-two "
              f"factor >= {MIN_BLOCK * lanes} at m={spec.m} (the key tile, "
              f"{MIN_BLOCK} keys per N:M lane, divides it)")
  device = jax.devices()[0]
  if device.platform == "cpu" or runs_natively():
    return None
  capability = _compat.cuda_compute_capability()
  if capability is not None:
    return (f"the CUDA GPU ({device.device_kind}) has compute capability "
            f"{capability[0]}.{capability[1]}; the kernels need "
            f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or newer")
  return (f"the default device is {device.platform} ({device.device_kind}); the "
          "kernels need a CUDA GPU (or a CPU, in interpret mode)")
