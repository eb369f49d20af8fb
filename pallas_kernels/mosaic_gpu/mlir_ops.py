"""Kernel-side (Mosaic GPU MLIR) implementations used inside `plgpu.inline_mgpu`.

`MlirOps` implements, on one thread's scalar registers, the operations that
`sparse_fragments.NumpyOps` implements for the CPU twin, so the algorithms of
`tile_select` run unchanged in the kernel. The other helpers move between
Mosaic GPU `FragmentedArray`s and per-thread scalar lists, and issue
`wgmma.mma_async.sp` through inline PTX.
"""

from __future__ import annotations


import numpy as np
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import fragmented_array as fa
from jax.experimental.mosaic.gpu import mma_utils
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, nvvm, vector

from pallas_kernels.mosaic_gpu import sparse_fragments as sf


def _i32():
  return ir.IntegerType.get_signless(32)


class MlirOps:
  """Scalar operations on one thread's registers (see `NumpyOps`)."""

  def __init__(self):
    self._consts = {}

  def _const(self, ty, value):
    key = (str(ty), value)
    if key not in self._consts:
      self._consts[key] = mgpu_utils.c(value, ty)
    return self._consts[key]

  def thread_id(self):
    return arith.remui(mgpu_utils.thread_idx(), self.i32(sf.WARPGROUP))

  def f32(self, v):
    return self._const(ir.F32Type.get(), float(v))

  def i32(self, v):
    return self._const(_i32(), int(v))

  def fmul(self, a, b):
    return arith.mulf(a, b)

  def fadd(self, a, b):
    return arith.addf(a, b)

  # NaN-propagating min/max as the one PTX instruction each; `arith.maximumf`
  # also orders -0 below +0, which the NVPTX backend may expand into several
  # (Mosaic GPU emits its own f32 max the same way).
  def fmax(self, a, b):
    return _f32_asm("max.NaN.f32 $0, $1, $2;", a, b)

  def fmin(self, a, b):
    return _f32_asm("min.NaN.f32 $0, $1, $2;", a, b)

  def fgt(self, a, b):
    return arith.cmpf(arith.CmpFPredicate.OGT, a, b)

  def fge(self, a, b):
    return arith.cmpf(arith.CmpFPredicate.OGE, a, b)

  def sel(self, p, a, b):
    return arith.select(p, a, b)

  def not_(self, p):
    return arith.xori(p, self._const(ir.IntegerType.get_signless(1), 1))

  def and_(self, p, q):
    return arith.andi(p, q)

  def or_(self, p, q):
    return arith.ori(p, q)

  def iadd(self, a, b):
    return arith.addi(a, b)

  def isub(self, a, b):
    return arith.subi(a, b)

  def imul(self, a, b):
    return arith.muli(a, b)

  def iand(self, a, b):
    return arith.andi(a, b)

  def ior(self, a, b):
    return arith.ori(a, b)

  def ishl(self, a, b):
    return arith.shli(a, b)

  def ishr(self, a, b):
    return arith.shrui(a, b)

  def ine(self, a, b):
    return arith.cmpi(arith.CmpIPredicate.ne, a, b)

  def ile(self, a, b):
    return arith.cmpi(arith.CmpIPredicate.sle, a, b)

  def ilt(self, a, b):
    return arith.cmpi(arith.CmpIPredicate.slt, a, b)

  def zext(self, p):
    return arith.extui(_i32(), p)

  def shfl_xor(self, x, mask):
    return mgpu_utils.shfl_bfly(x, mask)


def _f32_asm(asm: str, *args: ir.Value) -> ir.Value:
  """One f32 result of inline PTX over f32 operands (free to reorder or drop)."""
  return llvm.inline_asm(ir.F32Type.get(), list(args), asm,
                         "=f" + ",f" * len(args))


def thread_rows(arr: fa.FragmentedArray) -> list[list[ir.Value]]:
  """Scalars of a `[64, N]` WGMMA-layout array: `rows[r][2j + e]`."""
  if arr.layout != fa.WGMMA_LAYOUT:
    raise ValueError(f"expected WGMMA_LAYOUT; got {arr.layout}")
  regs = arr.registers
  cols = regs.shape[1]
  rows = []
  for r in range(2):
    row = []
    for j in range(cols):
      reg = regs[0, j, 0, 0, r, 0, 0, 0, 0]
      for e in range(2):
        row.append(vector.extract(reg, dynamic_position=[], static_position=[e]))
    rows.append(row)
  return rows


def rows_to_array(rows, *, is_signed=None) -> fa.FragmentedArray:
  """Inverse of `thread_rows` (`rows[r][2j + e]`, same element type)."""
  el_ty = rows[0][0].type
  cols = len(rows[0]) // 2
  vec_ty = ir.VectorType.get((2,), el_ty)
  regs = np.empty((1, cols, 1, 1, 2, 1, 1, 1, 1), dtype=object)
  for r in range(2):
    for j in range(cols):
      regs[0, j, 0, 0, r, 0, 0, 0, 0] = vector.from_elements(
          vec_ty, [rows[r][2 * j], rows[r][2 * j + 1]])
  return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT,
                            _is_signed=is_signed)


def words_to_array(ops: MlirOps, words) -> fa.FragmentedArray:
  """Up to four metadata words of a thread as a `[64, 8]` int32 array."""
  if len(words) > 4:
    raise ValueError(f"at most 4 metadata words fit; got {len(words)}")
  slots = list(words) + [ops.i32(0)] * (4 - len(words))
  return rows_to_array([slots[:2], slots[2:]], is_signed=True)


def array_words(arr: fa.FragmentedArray, count: int) -> list[ir.Value]:
  """The first `count` metadata words stored by `words_to_array`."""
  rows = thread_rows(arr)
  return (rows[0] + rows[1])[:count]


def _as_i32(packed: ir.Value) -> ir.Value:
  """A 2-vector of 16-bit floats as one b32 register."""
  return llvm.extractelement(
      vector.bitcast(ir.VectorType.get((1,), _i32()), packed),
      mgpu_utils.c(0, _i32()))


def _v_descriptors(v_ref: ir.Value, swizzle: int, blocks: int):
  """B descriptors of the 32-row slices of a `[K, N]` value tile, and transpose-B."""
  (k_tiles, n_tiles, k_tiling, n_tiling) = ir.MemRefType(v_ref.type).shape
  head_dim = n_tiles * n_tiling
  if blocks * sf.SPARSE_K > k_tiles * k_tiling:
    raise ValueError(f"{blocks} K blocks exceed the {k_tiles * k_tiling} rows of V")
  k_group = swizzle // 2  # rows of V per descriptor group
  (desc_base, (k_tiling_desc, k_strides)), (_, k_group_stride), fastest = (
      mma_utils.create_descriptor(
          v_ref, swizzle=swizzle, large_tile=(k_group, k_group),
          group_size=(k_group, head_dim), logical_k_major=True))
  if k_tiling_desc:
    raise NotImplementedError("multi-level K striding of the V descriptor")
  k16_stride = k_strides[0]  # bytes between 16-row steps inside a group
  i64 = ir.IntegerType.get_signless(64)
  descs = []
  for kb in range(blocks):
    row0 = kb * sf.SPARSE_K
    offset = ((row0 // k_group) * k_group_stride
              + (row0 % k_group) // 16 * k16_stride)
    descs.append(llvm.add(desc_base,
                          mgpu_utils.c(mma_utils.encode_addr(offset), i64),
                          overflow_flags=llvm.IntegerOverflowFlags.none))
  return descs, fastest != mma_utils.Dim.K


def sparse_mma(acc: fa.FragmentedArray, a_regs, words, v_ref: ir.Value, *,
               swizzle: int) -> fa.FragmentedArray:
  """`acc + A @ V` over `len(a_regs)` 32-key blocks on the sparse tensor cores.

  `a_regs[kb]`: the four b32 sparse-A registers of K block `kb`;
  `words[kb // 2]`: the metadata word of blocks `2p` (selector 0) and `2p + 1`
  (selector 1); `v_ref`: the value tile in shared memory (tiled
  `(8, swizzle // 2)`, swizzled); `acc`: f32 `[64, N]` in WGMMA layout.
  Fences the operands, issues the instructions and waits for them.
  """
  el_ty = ir.MemRefType(v_ref.type).element_type
  dtype_name = "bfloat16" if el_ty == ir.BF16Type.get() else "float16"
  head_dim = acc.shape[1]
  descs, transpose_b = _v_descriptors(v_ref, swizzle, len(a_regs))
  f32 = ir.F32Type.get()
  acc32 = mgpu.optimization_barrier(acc.to_layout(fa.WGMMA_LAYOUT_ACC_32BIT))
  acc_vals = [vector.extract(reg, dynamic_position=[], static_position=[0])
              for reg in acc32.registers.flat]
  nvvm.wgmma_fence_aligned()
  for kb, (regs, desc) in enumerate(zip(a_regs, descs)):
    asm, constraints = sf.sparse_wgmma_ptx(head_dim, dtype_name, kb % 2,
                                           transpose_b)
    result = llvm.inline_asm(
        llvm.StructType.get_literal([f32] * len(acc_vals)),
        [*acc_vals, *regs, desc, words[kb // 2]], asm, constraints,
        asm_dialect=0, has_side_effects=True)
    acc_vals = [llvm.extractvalue(f32, result, [i]) for i in range(len(acc_vals))]
  nvvm.wgmma_commit_group_sync_aligned()
  nvvm.wgmma_wait_group_sync_aligned(0)
  vec1 = ir.VectorType.get((1,), f32)
  regs = np.array([vector.from_elements(vec1, [v]) for v in acc_vals],
                  dtype=object).reshape(acc32.registers.shape)
  out = fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT_ACC_32BIT,
                           _is_signed=None)
  return mgpu.optimization_barrier(out).to_layout(fa.WGMMA_LAYOUT)


def sparse_pv(acc: fa.FragmentedArray, p: fa.FragmentedArray,
              meta: fa.FragmentedArray, v_ref: ir.Value, *,
              swizzle: int) -> fa.FragmentedArray:
  """`acc + P @ V` with P as `tile_select.select_compress` leaves it.

  `p` is the compressed `[64, block_kv // 2]` 16-bit array (register `b` is
  sparse-A register `2 * (b % 2) + r` of K block `b // 2`), `meta` the
  metadata words (`words_to_array`).
  """
  blocks = p.shape[1] // (sf.SPARSE_K // 2)
  p, meta = mgpu.optimization_barrier(p, meta)
  regs = p.registers
  a_regs = [[_as_i32(regs[0, 2 * kb + h, 0, 0, r, 0, 0, 0, 0])
             for h in range(2) for r in range(2)] for kb in range(blocks)]
  words = array_words(meta, -(-blocks // 2))
  return sparse_mma(acc, a_regs, words, v_ref, swizzle=swizzle)
