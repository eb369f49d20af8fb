"""The backends behind `nm_attention(..., implementation=...)`.

Each backend answers `unsupported_reason(spec)` (None when it can run the call
on the current default device when asked for explicitly, else a sentence saying
why not), `auto_eligible(spec)` (whether `implementation=None` may pick it, e.g.
not a kernel that would run in Pallas interpret mode on a CPU) and `run(call)`.
Kernel packages are imported lazily, so `import nmattn` needs no GPU toolchain.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from nmattn._validation import AttentionCall, AttentionSpec
from nmattn.xla_backend import nm_attention_xla


class UnsupportedCallError(NotImplementedError, ValueError):
  """An explicitly requested backend cannot run this call.

  Raised by `nm_attention(..., implementation=NAME)` (and the layers) when
  that backend does not support the device, dtype, shapes or options of the
  call; the message says which. Both a `ValueError` and a
  `NotImplementedError`. `implementation=None` never raises it: it falls back
  to "xla".
  """


def _always_supported(spec: AttentionSpec) -> None:
  del spec
  return None


def _always_eligible(spec: AttentionSpec) -> bool:
  del spec
  return True


class Backend(NamedTuple):
  name: str
  unsupported_reason: Callable[[AttentionSpec], str | None]
  run: Callable[[AttentionCall], object]
  auto_eligible: Callable[[AttentionSpec], bool] = _always_eligible


def _mosaic_backend() -> Backend:
  """The Hopper kernels; `pallas_kernels.mosaic_gpu` is imported on first use."""

  def reason(spec):
    from pallas_kernels.mosaic_gpu import attention  # pylint: disable=g-import-not-at-top
    return attention.unsupported_reason(spec)

  def run(call):
    from pallas_kernels.mosaic_gpu import attention  # pylint: disable=g-import-not-at-top
    return attention.nm_attention_mosaic(call)

  return Backend("pallas_mosaic", reason, run)


XLA = Backend("xla", _always_supported, nm_attention_xla)


def _triton_unsupported_reason(spec: AttentionSpec) -> str | None:
  from pallas_kernels import triton  # pylint: disable=g-import-not-at-top
  return triton.unsupported_reason(head_dim=spec.head_dim, dtype=spec.dtype)


def _triton_auto_eligible(spec: AttentionSpec) -> bool:
  """Only natively: interpret mode on a CPU is for tests, not speed."""
  del spec
  from pallas_kernels import triton  # pylint: disable=g-import-not-at-top
  return triton.runs_natively()


def _triton_run(call: AttentionCall):
  from pallas_kernels import triton  # pylint: disable=g-import-not-at-top
  spec = call.spec
  return triton.nm_flash_attention(
      call.query, call.key, call.value, call.bias, call.mask, scale=spec.scale,
      is_causal=spec.is_causal, q_lengths=call.q_lengths,
      kv_lengths=call.kv_lengths, window=spec.window, n=spec.n, m=spec.m,
      interpret=not triton.runs_natively())


PALLAS_TRITON = Backend("pallas_triton", _triton_unsupported_reason, _triton_run,
                        _triton_auto_eligible)

BACKENDS: dict[str, Backend] = {
    "xla": XLA,
    "pallas_triton": PALLAS_TRITON,
    "pallas_mosaic": _mosaic_backend(),
}

# Tried in this order under implementation=None; "xla" always runs.
AUTO_ORDER = ("pallas_mosaic", "pallas_triton", "xla")
