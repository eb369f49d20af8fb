"""The few Pallas and device calls whose spelling differs between JAX versions.

The CPU machines run jax 0.10.x, the GPU machine jax 0.11.x. Both accept a
Triton `CompilerParams` object from `jax.experimental.pallas.triton`; passing
one explicitly matters because without it 0.10.x lowers `pl.pallas_call` on
CUDA through Mosaic GPU rather than Triton.
"""

from __future__ import annotations

import functools
import inspect

import jax
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pallas_triton

# `pl.dot` is deprecated from jax 0.10.x on; the Triton module keeps it.
# HIGHEST makes float32 operands exact IEEE products (the default is TF32,
# measured 2.5e-3 relative error on an H100); 16-bit operands are unaffected.
dot = functools.partial(pallas_triton.dot, precision=lax.Precision.HIGHEST)


def triton_compiler_params(num_warps: int, num_stages: int):
  """Compiler parameters that select the Triton lowering of `pl.pallas_call`."""
  return pallas_triton.CompilerParams(num_warps=num_warps,
                                      num_stages=num_stages)


# jax 0.10.x requires `plgpu.load`'s index, its second parameter; 0.11.x makes
# it optional and deprecates passing one (index the ref instead).
_LOAD_NEEDS_INDEX = (list(inspect.signature(plgpu.load).parameters.values())[1]
                     .default is inspect.Parameter.empty)


def mosaic_load(ref, *, layout):
  """`plgpu.load` of the whole (already indexed) ref into registers of `layout`."""
  if _LOAD_NEEDS_INDEX:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def cuda_compute_capability() -> tuple[int, int] | None:
  """(major, minor) of the default device when it is a CUDA GPU, else None."""
  device = jax.devices()[0]
  platform_version = getattr(device.client, "platform_version", "")
  if device.platform != "gpu" or "rocm" in platform_version.lower():
    return None
  capability = getattr(device, "compute_capability", None)
  if capability is None:
    return None
  major, minor = str(capability).split(".")
  return int(major), int(minor)
