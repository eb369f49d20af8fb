"""The backends behind `nm_attention(..., implementation=...)`, as objects.

A backend is a frozen dataclass carrying its tuning (`config`); it answers
`unsupported_reason(spec)` (None when it can run the call on the current
default device, else a sentence saying why not), `auto_eligible(spec)`
(whether `implementation=None` may pick it: not a kernel that would run in
Pallas interpret mode on a CPU) and `run(call)`, where `call` is the
canonical `pallas_kernels.call.AttentionCall` that `nmattn` validated once.
`implementation=` takes a name (`BACKENDS`) or such an object, e.g.
`PallasTriton(config=pallas_kernels.triton.TuningConfig(block_q=64))`.
Kernel packages are imported on first use, so `import nmattn` needs no GPU
toolchain (docs/ARCHITECTURE.md, "Backends").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from nmattn import masking
from nmattn.xla_backend import XlaTuning, nm_attention_xla, xla_key_importance
from pallas_kernels.call import AttentionCall, AttentionSpec


class UnsupportedCallError(NotImplementedError, ValueError):
  """An explicitly requested backend cannot run this call.

  Raised by `nm_attention(..., implementation=NAME)` (and the layers) when
  that backend does not support the device, dtype, shapes or options of the
  call; the message says which. Both a `ValueError` and a
  `NotImplementedError`. `implementation=None` never raises it: it falls back
  to "xla".
  """


# Block patterns run on the xla, pallas_triton and pallas_mosaic backends.
_NO_PATTERNS = ("block_pattern (supported by implementation='pallas_triton', "
                "'pallas_mosaic' and 'xla')")


def _check_config(backend: str, config: Any, expected: type) -> None:
  if config is not None and not isinstance(config, expected):
    raise ValueError(f"{backend}(config=...) must be a {expected.__name__} or "
                     f"None; got config={config!r}")


@dataclasses.dataclass(frozen=True)
class Backend:
  """The contract every backend keeps (see the module docstring)."""
  name: ClassVar[str] = ""

  def unsupported_reason(self, spec: AttentionSpec) -> str | None:
    del spec
    return None

  def auto_eligible(self, spec: AttentionSpec) -> bool:
    del spec
    return True

  def run(self, call: AttentionCall):
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Xla(Backend):
  """Pure JAX, blocked with an online softmax and a recomputing custom VJP.

  Runs every call on every device; `config` sets its block sizes (None: by
  the call's shapes, `xla_backend.default_tuning`).
  """
  name: ClassVar[str] = "xla"
  config: XlaTuning | None = None

  def __post_init__(self):
    _check_config("Xla", self.config, XlaTuning)

  def run(self, call):
    return nm_attention_xla(call, self.config)

  def with_importance(self, call):
    """`(out, key importance [B, H, S] float32)`: the forward and the
    blocked two-pass importance (`xla_backend.xla_key_importance`)."""
    return self.run(call), xla_key_importance(call, self.config)


def _triton():
  from pallas_kernels import triton  # pylint: disable=g-import-not-at-top
  return triton


@dataclasses.dataclass(frozen=True)
class PallasTriton(Backend):
  """The fused Triton kernels, forward and backward (any CUDA GPU >= sm_80;
  Pallas interpret mode on a CPU, which `implementation=None` never picks).

  `config`: a `pallas_kernels.triton.TuningConfig` (None: `default_tuning`).
  """
  name: ClassVar[str] = "pallas_triton"
  config: Any = None

  def __post_init__(self):
    if self.config is not None:
      _check_config("PallasTriton", self.config, _triton().TuningConfig)

  def unsupported_reason(self, spec):
    return _triton().unsupported_reason(spec)

  def auto_eligible(self, spec):
    del spec
    return _triton().runs_natively()

  def run(self, call):
    triton = _triton()
    return triton.nm_flash_attention(call, tuning=self.config,
                                     interpret=not triton.runs_natively())

  def with_importance(self, call):
    """`(out, key importance [B, H, S] float32)` from one forward and the
    importance kernel, which reuses the forward's lse."""
    triton = _triton()
    return triton.nm_flash_attention_with_importance(
        call, tuning=self.config, interpret=not triton.runs_natively())

  def backward(self, call, out, lse, d_out):
    """Gradients from a forward's `out` and `lse` (Triton's lse convention):
    what makes this backend usable as `PallasMosaic`'s `vjp`."""
    triton = _triton()
    return triton.nm_flash_attention_bwd(call, out, lse, d_out,
                                         tuning=self.config,
                                         interpret=not triton.runs_natively())


def _mosaic():
  from pallas_kernels.mosaic_gpu import attention  # pylint: disable=g-import-not-at-top
  return attention


@dataclasses.dataclass(frozen=True)
class PallasMosaic(Backend):
  """The Hopper (sm_90a) forward kernel: TMA, warp-specialized warpgroups,
  `P V` on the 2:4 sparse tensor cores.

  `config`: a `pallas_kernels.mosaic_gpu.MosaicTuning` (None: its defaults).
  `vjp`: the backend whose `backward(call, out, lse, d_out)` differentiates
  the forward. None (the default): the Hopper backward (`MosaicBackward()`)
  where it takes the call, else the Triton backward (`PallasTriton()`: block
  patterns of 64-key blocks, which this forward takes with
  `MosaicTuning(block_kv=64)`). A `vjp` given explicitly is used as given,
  or the call is unsupported.
  """
  name: ClassVar[str] = "pallas_mosaic"
  config: Any = None
  vjp: Backend | None = None

  def __post_init__(self):
    if self.config is not None:
      _check_config("PallasMosaic", self.config, _mosaic().MosaicTuning)
    if self.vjp is not None and not callable(getattr(self.vjp, "backward",
                                                     None)):
      raise ValueError("PallasMosaic(vjp=...) must be None or a backend with "
                       "a backward(call, out, lse, d_out) method, such as "
                       f"MosaicBackward(); got vjp={self.vjp!r}")

  def _tuning(self):
    return self.config if self.config is not None else _mosaic().MosaicTuning()

  def backward_backend(self, spec) -> Backend:
    """The backend that differentiates `spec`'s forward."""
    if self.vjp is not None:
      return self.vjp
    hopper = MosaicBackward()
    return hopper if hopper.unsupported_reason(spec) is None else PallasTriton()

  def unsupported_reason(self, spec):
    reason = _mosaic().unsupported_reason(spec, self._tuning())
    if reason is not None:
      return reason
    vjp = self.backward_backend(spec)
    if vjp_reason := vjp.unsupported_reason(spec):
      return f"its vjp backend {vjp.name!r} cannot: {vjp_reason}"
    return None

  def run(self, call):
    return _mosaic().nm_flash_attention(
        call, self._tuning(), self.backward_backend(call.spec).backward)


@dataclasses.dataclass(frozen=True)
class MosaicBackward(Backend):
  """The Hopper backward kernels (`pallas_kernels.mosaic_gpu.backward`),
  `PallasMosaic`'s gradient wherever they take the call: they recompute the
  scores with the forward's own selection and run `dS K` on the 2:4 sparse
  tensor cores. A `vjp` only, not an `implementation=` of its own. Block
  patterns need blocks of multiples of 128 (otherwise the backend says so,
  and `PallasMosaic()` takes the Triton backward for the call).

  `config`: a `pallas_kernels.mosaic_gpu.backward.BackwardTuning` (None: its
  defaults).
  """
  name: ClassVar[str] = "pallas_mosaic_backward"
  config: Any = None

  def __post_init__(self):
    if self.config is not None:
      _check_config("MosaicBackward", self.config, _mosaic().BackwardTuning)

  def _tuning(self):
    return self.config if self.config is not None else _mosaic().BackwardTuning()

  def unsupported_reason(self, spec):
    return _mosaic().backward_unsupported_reason(spec, self._tuning())

  def backward(self, call, out, lse, d_out):
    """Gradients `(dq, dk, dv, None)` from the Hopper forward's `out`, `lse`."""
    return _mosaic().backward_kernels.nm_flash_attention_bwd(
        call, out, lse, d_out, self._tuning())


# cuDNN's fused attention takes 16-bit inputs and head_dim up to 128.
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class Cudnn(Backend):
  """Dense attention (`n == m`) on cuDNN's fused kernel, through
  `jax.nn.dot_product_attention(..., implementation="cudnn")`, with
  nmattn's semantics kept: a query row with no valid key gives zeros and
  zero gradients. cuDNN itself attends uniformly (or gives NaN gradients)
  on a row that `mask` masks entirely (tools/cudnn_semantics.py measured
  it on an H200); such rows are given every key before the call and zeroed
  after it, so they receive no gradient either. A `bias` is not taken:
  cuDNN rounds it to the input dtype, and its bias gradient disagreed with
  the reference (relative error 2.6 on an H200, jax 0.11.2).
  """
  name: ClassVar[str] = "cudnn"

  def unsupported_reason(self, spec):
    if spec.has_pattern:
      return _NO_PATTERNS
    if not spec.is_dense:
      return (f"it computes dense attention only (n == m); got n={spec.n}, "
              f"m={spec.m}")
    device = jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))
    if device.platform != "gpu" or not capability or float(capability) < 8.0:
      return (f"it needs a CUDA GPU of compute capability >= 8.0; the default "
              f"device is {device.platform} ({device.device_kind})")
    if jnp.dtype(spec.dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
      return f"dtype {jnp.dtype(spec.dtype).name} (supported: bfloat16, float16)"
    if spec.head_dim > _CUDNN_MAX_HEAD_DIM or spec.head_dim % 8:
      return (f"head_dim={spec.head_dim} (supported: multiples of 8 up to "
              f"{_CUDNN_MAX_HEAD_DIM})")
    if spec.bias_shape is not None:
      return "a bias (see nmattn.backends.Cudnn)"
    if spec.window is not None and not (
        spec.is_causal and spec.window[1] == 0 and not spec.has_kv_lengths
        and spec.q_len <= spec.kv_len):
      # cuDNN rejects a right window without causal masking; the other
      # conditions keep every row's own key valid (no row empty by position).
      return (f"local_window_size={spec.window} (supported: (left, 0) with "
              "is_causal, q_len <= kv_len and no key_value_seq_lengths)")
    return _cudnn_trace_reason(spec)

  def run(self, call):
    spec = call.spec
    mask = call.mask
    row_valid = None if mask is None else _rows_with_a_key(call)
    if row_valid is not None:
      mask = mask | jnp.logical_not(row_valid)[..., None]
    out = _cudnn_attention(spec, call.query, call.key, call.value, mask,
                           call.q_lengths, call.kv_lengths)
    if row_valid is not None:
      keep = jnp.transpose(row_valid, (0, 2, 1))[..., None]  # [B|1, T, H|1, 1]
      out = jnp.where(keep, out, jnp.zeros((), out.dtype))
    return out


def _cudnn_attention(spec, query, key, value, mask, q_lengths, kv_lengths):
  return jax.nn.dot_product_attention(
      query, key, value, None, mask, scale=spec.scale,
      is_causal=spec.is_causal, query_seq_lengths=q_lengths,
      key_value_seq_lengths=kv_lengths, local_window_size=spec.window,
      implementation="cudnn")


@functools.lru_cache(maxsize=256)
def _cudnn_trace_reason(spec: AttentionSpec) -> str | None:
  """What `jax.nn.dot_product_attention`'s own checks (they differ between
  jax and cuDNN versions) say of the call's forward and backward, traced on
  shapes only: None if it accepts both."""
  def shape(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)

  q = shape((spec.batch, spec.q_len, spec.heads, spec.head_dim), spec.dtype)
  kv = shape((spec.batch, spec.kv_len, spec.kv_heads, spec.head_dim), spec.dtype)
  mask = None if spec.mask_shape is None else shape(spec.mask_shape, jnp.bool_)
  lengths = shape((spec.batch,), jnp.int32)

  def forward_and_backward(q, k, v, mask, q_lengths, kv_lengths):
    attention = lambda q, k, v: _cudnn_attention(spec, q, k, v, mask, q_lengths,
                                                 kv_lengths)
    out, vjp = jax.vjp(attention, q, k, v)
    return vjp(out)

  try:
    jax.eval_shape(forward_and_backward, q, kv, kv, mask,
                   lengths if spec.has_q_lengths else None,
                   lengths if spec.has_kv_lengths else None)
  except (ValueError, NotImplementedError, TypeError) as e:
    return f"cuDNN refuses the call: {str(e).splitlines()[0]}"
  return None


def _rows_with_a_key(call: AttentionCall):
  """`[B|1, H|1, T]` bool: whether each query row has a valid key under the
  mask and the positional masks."""
  spec = call.spec
  valid = masking.validity_mask(
      jnp.arange(spec.q_len), jnp.arange(spec.kv_len), mask=call.mask,
      is_causal=spec.is_causal, window=spec.window,
      kv_lengths=call.kv_lengths)
  return jnp.any(valid, axis=-1)


BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (Xla(), PallasTriton(), PallasMosaic(), Cudnn())
}

# Tried in this order under implementation=None; "xla" always runs. "cudnn"
# takes only dense calls.
AUTO_ORDER = ("cudnn", "pallas_mosaic", "pallas_triton", "xla")
