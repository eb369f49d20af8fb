"""The Hopper backward kernels (pallas_kernels/mosaic_gpu/backward.py).

On the CPU: tuning and support checks, and every static variant of both
kernels built for the "cuda" platform (`jax.export`), which runs the whole
Pallas Mosaic GPU lowering. On a Hopper GPU: the shared attention test base
through `PallasMosaic(vjp=MosaicBackward())`, and the agreement of the
backward's N:M selection with the forward's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nmattn
from nmattn.backends import MosaicBackward, PallasMosaic
from nmattn._validation import canonicalize
from pallas_kernels.mosaic_gpu import attention as mosaic_attention
from pallas_kernels.mosaic_gpu import backward as bw
from pallas_kernels.mosaic_gpu import forward as fw
from attention_test_base import AttentionTestBase


def _spec(q_len=256, kv_len=256, head_dim=128, dtype=jnp.bfloat16, **kwargs):
  q = jnp.zeros((1, q_len, 2, head_dim), dtype)
  k = jnp.zeros((1, kv_len, 2, head_dim), dtype)
  return canonicalize(q, k, k, **kwargs)[0].spec


def test_tuning_rejects_bad_values():
  with pytest.raises(ValueError, match="block_kv_dq must be 64 or 128; got block_kv_dq=96"):
    bw.BackwardTuning(block_kv_dq=96)
  with pytest.raises(ValueError, match="max_concurrent_steps=1"):
    bw.BackwardTuning(max_concurrent_steps=1)
  with pytest.raises(ValueError, match="consumer_registers=30"):
    bw.BackwardTuning(consumer_registers=30)


def test_backend_rejects_a_config_of_another_kind():
  with pytest.raises(ValueError, match="MosaicBackward\\(config=...\\) must be a "
                     "BackwardTuning"):
    MosaicBackward(config=fw.MosaicTuning())


def test_unsupported_reasons_name_what_is_missing():
  reason = lambda spec, tuning=bw.BackwardTuning(): bw.unsupported_reason(spec, tuning)
  assert reason(_spec(n=2, m=4)) is None
  assert reason(_spec(n=4, m=4, is_causal=True)) is None
  assert "dtype float32" in reason(_spec(dtype=jnp.float32, n=2, m=4))
  assert "head_dim=32" in reason(_spec(head_dim=32, n=2, m=4))
  bias = jnp.zeros((1, 2, 256, 256), jnp.float32)
  assert reason(_spec(n=2, m=4, bias=bias)) is None
  # 128-key steps of three streams, three stages: more than a CTA's memory.
  big = bw.BackwardTuning(block_kv_dq=128, max_concurrent_steps=3)
  assert "the dq kernel needs" in reason(_spec(n=2, m=4), big)
  # A bias adds float32 dS tiles to the dK/dV kernel's memory.
  three = bw.BackwardTuning(max_concurrent_steps=3)
  assert reason(_spec(n=2, m=4), three) is None
  assert "the dkv kernel needs" in reason(_spec(n=2, m=4, bias=bias), three)
  assert reason(_spec(n=2, m=4), bw.BackwardTuning(block_kv_dq=128, sparse_dq=False)) is None


def test_patterns_need_blocks_of_whole_ctas():
  pattern = lambda bq, bk: nmattn.BlockPattern(
      jnp.ones((1, 1, 256 // bq, 256 // bk), jnp.int8), bq, bk)
  reason = lambda bq, bk: bw.unsupported_reason(
      _spec(n=2, m=4, block_pattern=pattern(bq, bk)), bw.BackwardTuning())
  assert reason(128, 128) is None and reason(256, 128) is None
  assert "block_pattern.block_q=64, block_k=128 (it needs multiples of 128" in reason(64, 128)
  assert "block_k=64" in reason(128, 64)
  spec = _spec(n=2, m=4, block_pattern=pattern(128, 64))
  full = PallasMosaic(vjp=MosaicBackward(), config=fw.MosaicTuning(block_kv=64))
  if mosaic_attention.unsupported_reason(spec, fw.MosaicTuning(block_kv=64)) is None:
    assert "its vjp backend 'pallas_mosaic_backward' cannot" in full.unsupported_reason(spec)


def test_default_vjp_is_the_hopper_backward_where_it_takes_the_call():
  """`PallasMosaic()` differentiates with `MosaicBackward()` on a Hopper GPU
  and with the Triton backward where the Hopper one cannot (blocks of 64
  keys here, or no Hopper GPU); an explicit `vjp` is kept as given."""
  pattern = nmattn.BlockPattern(jnp.ones((1, 1, 2, 4), jnp.int8), 128, 64)
  plain, blocks_of_64 = _spec(n=2, m=4), _spec(n=2, m=4, block_pattern=pattern)
  default = PallasMosaic()
  on_hopper = mosaic_attention.backward_unsupported_reason(
      plain, bw.BackwardTuning()) is None
  assert type(default.backward_backend(plain)) is (
      MosaicBackward if on_hopper else nmattn.backends.PallasTriton)
  assert type(default.backward_backend(blocks_of_64)) is nmattn.backends.PallasTriton
  explicit = PallasMosaic(vjp=MosaicBackward())
  assert type(explicit.backward_backend(blocks_of_64)) is MosaicBackward


@pytest.mark.gpu
def test_default_vjp_on_the_gpu_is_the_hopper_backward():
  plain = _spec(n=2, m=4)
  assert mosaic_attention.backward_unsupported_reason(plain, bw.BackwardTuning()) is None
  assert type(PallasMosaic().backward_backend(plain)) is MosaicBackward


# Every static variant of the two kernels: sparse or dense dQ (2:4, 1:2, 1:4,
# general n:m, dense), the masks (causal, window, key lengths and padding, a
# mask), GQA/MQA, float16 at head_dim 64, 128-key dQ steps and three stages.
LOWERING_CASES = {
    "2:4 sparse": dict(),
    "2:4 dense dq": dict(tuning=bw.BackwardTuning(sparse_dq=False)),
    "4:4": dict(n=4, m=4),
    "1:2 causal": dict(n=1, m=2, is_causal=True),
    "1:4 window": dict(n=1, m=4, local_window_size=(100, 20)),
    "mask causal": dict(mask=True, is_causal=True),
    "bias mask window": dict(bias=(2, 4), mask=True, local_window_size=(70, 0)),
    "broadcast bias dense dq": dict(bias=(1, 1), tuning=bw.BackwardTuning(
        sparse_dq=False)),
    "3:8 causal": dict(n=3, m=8, is_causal=True),
    "2:16": dict(n=2, m=16),
    "d64 fp16 mqa": dict(head_dim=64, dtype=jnp.float16, kv_heads=1),
    "ragged lengths": dict(q_len=300, kv_len=333, lengths=True),
    "bk128 dense dq 3 stages": dict(tuning=bw.BackwardTuning(
        block_kv_dq=128, sparse_dq=False, max_concurrent_steps=3), head_dim=64),
    # Block patterns: per-segment bodies (N:M or dense, partial or full),
    # per-head lists in the dK/dV kernel, dbias cleared over skipped tiles.
    "pattern 2:4 sparse causal": dict(pattern=(128, 128), is_causal=True),
    "pattern dense dq lengths bias": dict(
        pattern=(256, 128), lengths=True, bias=(1, 4), q_len=384, kv_len=300,
        tuning=bw.BackwardTuning(sparse_dq=False)),
    "pattern 4:4 gqa": dict(pattern=(128, 256), n=4, m=4, kv_heads=1),
}


@pytest.mark.parametrize("case", list(LOWERING_CASES))
def test_backward_lowers_for_cuda(case):
  kw = dict(LOWERING_CASES[case])
  dtype, head_dim = kw.pop("dtype", jnp.bfloat16), kw.pop("head_dim", 128)
  kv_heads = kw.pop("kv_heads", 2)
  q_len, kv_len = kw.pop("q_len", 256), kw.pop("kv_len", 256)
  mask, lengths = kw.pop("mask", False), kw.pop("lengths", False)
  bias = kw.pop("bias", None)  # its (batch, heads) extent
  pattern = kw.pop("pattern", None)
  tuning = kw.pop("tuning", None)
  kw = dict(dict(n=2, m=4), **kw)
  shape = jax.ShapeDtypeStruct
  rows = shape((2, q_len, 4, head_dim), dtype)
  keys = shape((2, kv_len, kv_heads, head_dim), dtype)
  args = [rows, keys, keys, rows, rows, shape((2, 4, q_len), jnp.float32)]
  if bias:
    args.append(shape((*bias, q_len, kv_len), jnp.float32))
  if mask:
    args.append(shape((2, 1, q_len, kv_len), jnp.bool_))
  if lengths:
    args += [shape((2,), jnp.int32)] * 2
  if pattern:
    args.append(shape((2, 4, -(-q_len // pattern[0]), -(-kv_len // pattern[1])),
                      jnp.int8))

  def gradients(q, k, v, out, d_out, lse, *rest):
    rest = list(rest)
    bias_ = rest.pop(0) if bias else None
    mask_ = rest.pop(0) if mask else None
    q_lengths, kv_lengths = (rest.pop(0), rest.pop(0)) if lengths else (None, None)
    extra = {}
    if pattern:
      extra["block_pattern"] = nmattn.BlockPattern(rest.pop(0), *pattern)
    call, _ = canonicalize(q, k, v, bias_, mask_, query_seq_lengths=q_lengths,
                           key_value_seq_lengths=kv_lengths, **kw, **extra)
    return bw.nm_flash_attention_bwd(call, out, lse, d_out, tuning)

  exported = jax.export.export(jax.jit(gradients), platforms=["cuda"])(*args)
  dq, dk, dv, *dbias = exported.out_avals
  assert dq.shape == rows.shape and dq.dtype == dtype
  assert dk.shape == dv.shape == keys.shape and dk.dtype == dv.dtype == dtype
  if bias:
    assert dbias[0].shape == (*bias, q_len, kv_len) and dbias[0].dtype == jnp.float32
  assert exported.mlir_module().count("mosaic_gpu") >= 2


# --------------------------------------------------------------------------
# GPU.


@pytest.fixture
def hopper():
  reason = mosaic_attention.backward_unsupported_reason(
      _spec(n=2, m=4), bw.BackwardTuning())
  if reason is not None:
    pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.usefixtures("hopper")
class TestMosaicBackward(AttentionTestBase):
  """The shared base, forward and gradients, with the Hopper backward asked
  for explicitly: sparse `dS K` at head_dim 128 in bfloat16 and float16
  (test_pallas_mosaic's TestMosaicAttention runs it at head_dim 64 as the
  default vjp)."""
  implementation = PallasMosaic(vjp=MosaicBackward())
  dtypes = (jnp.bfloat16, jnp.float16)
  head_dim = 128

  def make_case(self, rng, name, dtype):
    # The base's one-key, fully-masked-row and NaN tests use float32, which
    # these kernels do not take; they run in bfloat16 here.
    if dtype not in self.dtypes:
      dtype = jnp.bfloat16
    return super().make_case(rng, name, dtype)


@pytest.mark.gpu
@pytest.mark.usefixtures("hopper")
class TestMosaicBackwardDenseDq(TestMosaicBackward):
  """The same with `dS K` dense and 128-key dQ steps."""
  implementation = PallasMosaic(vjp=MosaicBackward(
      config=bw.BackwardTuning(sparse_dq=False, block_kv_dq=128)))


def _selection_probe(n, m, rng, batch=4, heads=8, dtype=jnp.bfloat16):
  """The forward's and the backward's keep-masks `[B, H, T, S]` on random
  normal q, k with T = S = head_dim = 128: with V the identity the output
  is the forward's `P`, with dO the identity dV is the backward's `P^T`."""
  d = 128
  q = jnp.asarray(rng.standard_normal((batch, d, heads, d)), dtype)
  k = jnp.asarray(rng.standard_normal((batch, d, heads, d)), dtype)
  eye = jnp.broadcast_to(jnp.eye(d, dtype=dtype)[None, :, None], (batch, d, heads, d))
  attention = lambda q, k, v: nmattn.nm_attention(
      q, k, v, n=n, m=m, implementation=PallasMosaic(vjp=MosaicBackward()))
  out, vjp = jax.jit(lambda q, k, v: jax.vjp(attention, q, k, v))(q, k, eye)
  dv = vjp(eye)[2]
  forward = np.asarray(out, np.float32).transpose(0, 2, 1, 3) > 0
  backward = np.asarray(dv, np.float32).transpose(0, 2, 3, 1) > 0
  return forward, backward


@pytest.mark.gpu
@pytest.mark.usefixtures("hopper")
@pytest.mark.parametrize("n,m", [(2, 4), (1, 2), (3, 8)])
def test_backward_selects_the_forward_keys(rng, n, m):
  forward, backward = _selection_probe(n, m, rng)
  groups = lambda keep: keep.reshape(*keep.shape[:-1], -1, m)
  assert (groups(forward).sum(-1) == n).all()  # every group keeps n keys
  differ = (groups(forward) != groups(backward)).any(-1).mean()
  print(f"{n}:{m}: groups selected differently {differ:.2e}")
  assert differ <= 1e-3
