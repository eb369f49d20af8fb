"""The "pallas_mosaic" backend (Hopper kernel): shared test base, selection, lse.

GPU tests need an sm_90 GPU (conftest skips `gpu` tests without a GPU; the
fixture below skips other GPUs). CPU checks of the kernel's register code live
in `test_pallas_mosaic_twin.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nmattn
from nmattn import masking, reference
from nmattn._validation import canonicalize
from pallas_kernels.mosaic_gpu import attention as mosaic_attention
from pallas_kernels.mosaic_gpu import forward as fw
from pallas_kernels.mosaic_gpu import scores
from pallas_kernels.mosaic_gpu import sparse_fragments as sf
from attention_test_base import AttentionTestBase, rel_err


@pytest.fixture
def hopper():
  reason = mosaic_attention.unsupported_reason(
      canonicalize(*(jnp.zeros((1, 8, 1, 64), jnp.bfloat16),) * 3)[0].spec,
      fw.MosaicTuning())
  if reason is not None:
    pytest.skip(reason)


# --------------------------------------------------------------------------
# CPU: argument checking and dispatch.


def test_permute_keys_matches_twin_and_inverts(rng):
  k = jnp.asarray(rng.standard_normal((2, 64, 3, 8)), jnp.float32)
  for width in (0, 4, 8, 16):
    permuted = scores.permute_keys(k, width)
    np.testing.assert_array_equal(
        np.asarray(permuted), sf.permute_keys(np.asarray(k), width, axis=1))
    np.testing.assert_array_equal(
        np.asarray(scores.unpermute_keys(permuted, width)), np.asarray(k))
  # Along another axis (the backward's dbias has keys last).
  x = jnp.asarray(rng.standard_normal((3, 5, 32)), jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(scores.unpermute_keys(scores.permute_keys(x, 8, 2), 8, 2)),
      np.asarray(x))
  np.testing.assert_array_equal(np.asarray(scores.permute_keys(x, 8, 2)),
                                sf.permute_keys(np.asarray(x), 8, axis=2))


def test_tuning_errors():
  with pytest.raises(ValueError, match="block_kv must be a multiple of 64"):
    fw.MosaicTuning(block_kv=96)
  with pytest.raises(ValueError, match="max_concurrent_steps must be >= 2"):
    fw.MosaicTuning(max_concurrent_steps=1)
  with pytest.raises(ValueError, match=r"PallasMosaic\(config=...\) must be a "
                     r"MosaicTuning or None; got config=4"):
    nmattn.backends.PallasMosaic(config=4)
  with pytest.raises(ValueError, match=r"PallasMosaic\(vjp=...\) must be None "
                     r"or a backend with a backward"):
    nmattn.backends.PallasMosaic(vjp=nmattn.backends.Xla())


def test_unsupported_reason_names_the_problem():
  """The reason checks the backend's own tuning, not only the default one."""
  q = jnp.zeros((1, 8, 2, 32), jnp.float32)
  spec = canonicalize(q, q, q)[0].spec
  default = nmattn.backends.PallasMosaic()
  assert "dtype float32" in default.unsupported_reason(spec)
  spec = canonicalize(*(q.astype(jnp.bfloat16),) * 3)[0].spec
  assert "head_dim=32" in default.unsupported_reason(spec)
  spec = canonicalize(*(jnp.zeros((1, 8, 2, 128), jnp.bfloat16),) * 3)[0].spec
  big = nmattn.backends.PallasMosaic(config=fw.MosaicTuning(block_kv=256))
  assert "bytes of shared memory" in big.unsupported_reason(spec)
  reason = default.unsupported_reason(spec)
  if jax.default_backend() != "gpu":
    assert "needs a Hopper (sm_90) GPU" in reason
    with pytest.raises(nmattn.UnsupportedCallError, match="Hopper"):
      nmattn.nm_attention(*(jnp.zeros((1, 8, 2, 128), jnp.bfloat16),) * 3,
                          implementation=default)


def test_pattern_blocks_must_hold_whole_kernel_tiles():
  """A CTA's 128 query rows and `block_kv` keys must divide the blocks."""
  q = jnp.zeros((1, 512, 2, 128), jnp.bfloat16)

  def reason(block_q, block_k, tuning=fw.MosaicTuning()):
    pattern = nmattn.BlockPattern(np.ones((1, 1), np.int8), block_q, block_k)
    spec = canonicalize(q, q, q, block_pattern=pattern)[0].spec
    return fw.pattern_unsupported_reason(spec, tuning)

  assert reason(128, 128) is None and reason(256, 384) is None
  assert "block_pattern.block_q=64" in reason(64, 128)
  assert "block_pattern.block_k=64 (it needs a multiple of block_kv=128)" in (
      reason(128, 64))
  assert reason(128, 64, fw.MosaicTuning(block_kv=64)) is None
  assert fw.pattern_unsupported_reason(
      canonicalize(q, q, q)[0].spec, fw.MosaicTuning()) is None
  if jax.default_backend() != "gpu":
    pattern = nmattn.BlockPattern(np.ones((1, 1), np.int8), 64, 128)
    with pytest.raises(nmattn.UnsupportedCallError, match="pallas_mosaic"):
      nmattn.nm_attention(q, q, q, block_pattern=pattern,
                          implementation="pallas_mosaic")


def test_shared_memory_check_leaves_room_for_mosaic_padding():
  # Three 128-key stages at head_dim 128 allocate 230008 bytes of our own,
  # which Mosaic GPU pads to 232568 > 232448: the check must refuse them.
  three = fw.MosaicTuning(max_concurrent_steps=3)
  reason = fw.shape_unsupported_reason(jnp.bfloat16, 128, 4, three)
  assert reason is not None and "bytes of shared memory" in reason
  assert fw.shape_unsupported_reason(jnp.bfloat16, 64, 4, three) is None
  assert fw.shape_unsupported_reason(
      jnp.bfloat16, 128, 4, fw.MosaicTuning()) is None


# Every static variant of the kernel body: the selection (2:4 compressed or
# dense-PV, 1:2, 1:4, general n:m, dense), the masks (causal, window, key
# lengths and padding, tiled bias + mask), GQA and float16 at head_dim 64.
LOWERING_CASES = {
    "2:4 sparse": dict(),
    "2:4 dense-pv": dict(tuning=fw.MosaicTuning(sparse_pv=False)),
    "4:4": dict(n=4, m=4),
    "1:2 causal": dict(n=1, m=2, is_causal=True),
    "1:4 window": dict(n=1, m=4, local_window_size=(100, 20)),
    "bias window causal": dict(extras=True, is_causal=True,
                               local_window_size=(130, 0)),
    "3:8 causal": dict(n=3, m=8, is_causal=True),
    "d64 fp16 gqa": dict(head_dim=64, dtype=jnp.float16, kv_heads=1),
    "ragged lengths": dict(q_len=300, kv_len=333, lengths=True),
    "bias mask bk64": dict(extras=True, tuning=fw.MosaicTuning(block_kv=64)),
    # Block patterns: per-segment bodies (N:M or dense, partial or full),
    # the second copy of V for the dense tiles of a sparse-PV kernel.
    "pattern 2:4 sparse causal": dict(pattern=(128, 128), is_causal=True),
    "pattern 2:4 dense-pv lengths": dict(pattern=(256, 128), lengths=True,
                                         tuning=fw.MosaicTuning(sparse_pv=False)),
    "pattern 4:4 bias": dict(pattern=(128, 256), n=4, m=4, extras=True),
}


@pytest.mark.parametrize("case", list(LOWERING_CASES))
def test_kernel_lowers_for_cuda(case):
  """Builds the kernel's Mosaic GPU IR (every inline register function) on the CPU.

  `jax.export` for the "cuda" platform runs the Pallas lowering, so a
  mistake in the kernel body's IR construction fails here, without a GPU.
  """
  kw = dict(LOWERING_CASES[case])
  dtype = kw.pop("dtype", jnp.bfloat16)
  head_dim, kv_heads = kw.pop("head_dim", 128), kw.pop("kv_heads", 2)
  q_len, kv_len = kw.pop("q_len", 256), kw.pop("kv_len", 256)
  lengths, extras = kw.pop("lengths", False), kw.pop("extras", False)
  tuning = kw.pop("tuning", None)
  pattern = kw.pop("pattern", None)
  kw = dict(dict(n=2, m=4), **kw)
  spec = jax.ShapeDtypeStruct
  args = [spec((2, q_len, 4, head_dim), dtype),
          spec((2, kv_len, kv_heads, head_dim), dtype),
          spec((2, kv_len, kv_heads, head_dim), dtype),
          spec((1, 4, q_len, kv_len), jnp.float32) if extras else None,
          spec((2, 1, q_len, kv_len), jnp.bool_) if extras else None,
          spec((2,), jnp.int32) if lengths else None,
          spec((2,), jnp.int32) if lengths else None,
          None if pattern is None else spec(
              (2, 4, -(-q_len // pattern[0]), -(-kv_len // pattern[1])), jnp.int8)]
  present = [a for a in args if a is not None]

  def kernel(*xs):
    it = iter(xs)
    q, k, v, bias, mask, q_lengths, kv_lengths, modes = [
        None if a is None else next(it) for a in args]
    if pattern is not None:
      kw["block_pattern"] = nmattn.BlockPattern(modes, *pattern)
    call, _ = canonicalize(q, k, v, bias, mask, query_seq_lengths=q_lengths,
                           key_value_seq_lengths=kv_lengths, **kw)
    return fw.nm_flash_attention_fwd(call, tuning)

  exported = jax.export.export(jax.jit(kernel), platforms=["cuda"])(*present)
  out, lse = exported.out_avals
  assert out.shape == (2, q_len, 4, head_dim) and out.dtype == dtype
  assert lse.shape == (2, 4, q_len) and lse.dtype == jnp.float32
  assert "mosaic_gpu" in exported.mlir_module()


# --------------------------------------------------------------------------
# GPU.


@pytest.mark.gpu
@pytest.mark.usefixtures("hopper")
class TestMosaicAttention(AttentionTestBase):
  """The shared base at head_dim 64 in bfloat16 and float16, as shipped: the
  gradients come from the default vjp, the Hopper backward."""
  implementation = "pallas_mosaic"
  dtypes = (jnp.bfloat16, jnp.float16)
  head_dim = 64

  def make_case(self, rng, name, dtype):
    # The base's fully-masked-row and NaN tests use float32, which this
    # kernel does not take; they run in bfloat16 here.
    if dtype not in self.dtypes:
      dtype = jnp.bfloat16
    return super().make_case(rng, name, dtype)


def _kernel(q, k, v, *, tuning=None, **kwargs):
  """The forward's `(out, lse)` of the canonical call of these arguments."""
  def forward(q, k, v):
    return fw.nm_flash_attention_fwd(canonicalize(q, k, v, **kwargs)[0], tuning)
  return jax.jit(forward)(q, k, v)


def _normal(rng, shape, dtype=jnp.bfloat16):
  return jnp.asarray(rng.standard_normal(shape), dtype)


@pytest.mark.gpu
@pytest.mark.usefixtures("hopper")
@pytest.mark.parametrize("sparse_pv", [True, False], ids=["sparse_pv", "dense_pv"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_long_sequences_and_lse(rng, sparse_pv, is_causal):
  """bf16 relative error < 1e-2 at head_dim 128, ragged lengths, and the lse."""
  shape_q, shape_kv = (2, 1000, 4, 128), (2, 1100, 2, 128)
  tuning = fw.MosaicTuning(sparse_pv=sparse_pv)
  # A first call on other inputs leaves its results in memory the second
  # call may reuse: an element the kernel failed to write would show up.
  _kernel(*(_normal(rng, s) for s in (shape_q, shape_kv, shape_kv)),
          n=2, m=4, is_causal=is_causal, tuning=tuning)
  q, k, v = _normal(rng, shape_q), _normal(rng, shape_kv), _normal(rng, shape_kv)
  out, lse = _kernel(q, k, v, n=2, m=4, is_causal=is_causal, tuning=tuning)
  ref = reference.nm_attention_reference(q, k, v, is_causal=is_causal)
  assert rel_err(out, ref) < 1e-2
  call, _ = canonicalize(q, k, v, is_causal=is_causal)
  s = reference.call_scores(call)
  kept = jnp.where(masking.nm_mask(s, 2, 4), s, -jnp.inf)
  want = jax.nn.logsumexp(kept, axis=-1)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(want), atol=2e-3, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.usefixtures("hopper")
@pytest.mark.parametrize("n,m,sparse_pv", [(2, 4, True), (2, 4, False), (1, 2, True),
                                           (3, 8, False)])
def test_selection_mismatch_is_rare(rng, record_property, n, m, sparse_pv):
  """The kernel's P, read out through one-hot values, against nm_mask."""
  batch, q_len, heads, kv_len = 2, 512, 8, 128
  q = _normal(rng, (batch, q_len, heads, 128))
  k = _normal(rng, (batch, kv_len, heads, 128))
  v = jnp.broadcast_to(jnp.eye(kv_len, 128, dtype=jnp.bfloat16)[None, :, None],
                       (batch, kv_len, heads, 128))
  out, _ = _kernel(q, k, v, n=n, m=m, tuning=fw.MosaicTuning(sparse_pv=sparse_pv))
  got = jnp.transpose(out != 0, (0, 2, 1, 3))
  call, _ = canonicalize(q, k, v)
  want = masking.nm_mask(reference.call_scores(call), n, m)
  groups = (batch, heads, q_len, kv_len // m, m)
  mismatch = float(jnp.mean(jnp.any(got.reshape(groups) != want.reshape(groups), -1)))
  record_property("group_mismatch", mismatch)
  print(f"{n}:{m} sparse_pv={sparse_pv}: groups selected differently {mismatch:.2e}")
  assert mismatch < 5e-3
  assert int(jnp.max(jnp.sum(got.reshape(groups), -1))) <= n


@pytest.mark.gpu
@pytest.mark.usefixtures("hopper")
def test_backend_dispatch_on_hopper(rng):
  q = _normal(rng, (1, 256, 2, 128))
  out = nmattn.nm_attention(q, q, q, implementation="pallas_mosaic")
  ref = reference.nm_attention_reference(q, q, q)
  assert rel_err(out, ref) < 1e-2


# Random per-head modes (all three) at real sizes: (q_len, kv_len, kv heads,
# block_q, block_k, tuning, kwargs of the call).
PATTERN_CASES = {
    "2:4 sparse-pv causal gqa": (1024, 1024, 2, 128, 128, None,
                                 dict(n=2, m=4, is_causal=True)),
    "2:4 dense-pv bias lengths": (
        700, 900, 4, 256, 128, fw.MosaicTuning(sparse_pv=False),
        dict(n=2, m=4, bias=True, lengths=True)),
    "1:2 window bk64": (1024, 768, 4, 128, 64, fw.MosaicTuning(block_kv=64),
                        dict(n=1, m=2, local_window_size=(300, 100))),
    "4:4 block-sparse": (1024, 1024, 1, 128, 256, None, dict(n=4, m=4)),
}


@pytest.mark.gpu
@pytest.mark.usefixtures("hopper")
@pytest.mark.parametrize("vjp", ["triton", "mosaic"])
@pytest.mark.parametrize("name", list(PATTERN_CASES))
def test_block_pattern_matches_reference(rng, name, vjp):
  """The per-segment loops over the tile lists, forward and (through the
  Triton or the Hopper backward) gradients, against the float32 reference;
  a second call on other inputs first, so that unwritten output would show."""
  q_len, kv_len, kv_heads, block_q, block_k, tuning, kwargs = PATTERN_CASES[name]
  if vjp == "mosaic" and block_k % 128:
    pytest.skip("the Hopper backward takes blocks of multiples of 128")
  kwargs = dict(kwargs)
  batch, heads = 2, 4

  def case():
    q = _normal(rng, (batch, q_len, heads, 128))
    k, v = (_normal(rng, (batch, kv_len, kv_heads, 128)) for _ in range(2))
    modes = jnp.asarray(rng.integers(0, 3, (batch, heads, -(-q_len // block_q),
                                            -(-kv_len // block_k))), jnp.int8)
    return q, k, v, modes

  bias = None
  if kwargs.pop("bias", False):
    bias = jnp.asarray(rng.standard_normal((1, heads, q_len, kv_len)), jnp.float32)
  if kwargs.pop("lengths", False):
    kwargs["query_seq_lengths"] = jnp.asarray([q_len, q_len // 2], jnp.int32)
    kwargs["key_value_seq_lengths"] = jnp.asarray([kv_len // 3, kv_len], jnp.int32)
  backend = nmattn.backends.PallasMosaic(
      config=tuning, vjp=(nmattn.backends.MosaicBackward() if vjp == "mosaic"
                          else nmattn.backends.PallasTriton()))
  cotangent = jnp.asarray(rng.standard_normal((batch, q_len, heads, 128)),
                          jnp.float32)

  def loss(fn, q, k, v, bias, modes):
    pattern = nmattn.BlockPattern(modes, block_q, block_k)
    out = fn(q, k, v, bias, block_pattern=pattern, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  kernel = functools.partial(nmattn.nm_attention, implementation=backend)
  grad = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=argnums,
                          has_aux=True))
  grad(*case()[:3], bias, case()[3])
  q, k, v, modes = case()
  got, out = grad(q, k, v, bias, modes)
  want, ref = jax.jit(jax.grad(functools.partial(
      loss, reference.nm_attention_reference), argnums=argnums, has_aux=True))(
          q, k, v, bias, modes)
  errs = {"forward": rel_err(out, ref)}
  errs.update({n: rel_err(g, w) for n, g, w in zip(("dq", "dk", "dv", "dbias"),
                                                  got, want)})
  print(f"mosaic pattern {name}, {vjp} backward: " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))
  assert np.isfinite(np.asarray(out, np.float32)).all()
  assert errs.pop("forward") < 1e-2
  for grad_name, err in errs.items():
    assert err < 1e-2, grad_name


@pytest.mark.gpu
@pytest.mark.usefixtures("hopper")
def test_all_skipped_query_blocks_give_zero_rows(rng):
  """A CTA whose list is empty writes zeros and lse +inf."""
  q = _normal(rng, (1, 512, 2, 128))
  modes = jnp.ones((1, 2, 4, 4), jnp.int8).at[:, :, 1].set(nmattn.SKIP)
  pattern = nmattn.BlockPattern(modes, 128, 128)
  out, lse = _kernel(q, q, q, n=2, m=4, block_pattern=pattern)
  assert np.all(np.asarray(out[:, 128:256]) == 0)
  assert np.all(np.isinf(np.asarray(lse[:, :, 128:256])))
  want = reference.nm_attention_reference(q, q, q, block_pattern=pattern)
  assert rel_err(out, want) < 1e-2
