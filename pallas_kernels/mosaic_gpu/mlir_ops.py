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


def metadata_columns(words: int) -> int:
  """Columns of the int32 `[64, C]` array that holds `words` words a thread."""
  return 8 * -(-words // 4)


def words_to_array(ops: MlirOps, words) -> fa.FragmentedArray:
  """A thread's metadata words as a `[64, metadata_columns(len(words))]` array."""
  slots = list(words) + [ops.i32(0)] * (-len(words) % 4)
  half = len(slots) // 2
  return rows_to_array([slots[:half], slots[half:]], is_signed=True)


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


def _pin(values: list[ir.Value]) -> list[ir.Value]:
  """`values` through an empty side-effecting asm, so they are computed here.

  Keeps LLVM from sinking the computation of wgmma operands past an earlier
  wgmma of the same stage (ptxas then serializes every wgmma, C7513).
  """
  letter = {"f32": "f", "i32": "r", "i64": "l"}
  constraints = ",".join([f"={letter[str(v.type)]}" for v in values]
                         + [str(i) for i in range(len(values))])
  result = llvm.inline_asm(
      llvm.StructType.get_literal([v.type for v in values]), values, "",
      constraints, asm_dialect=0, has_side_effects=True)
  return [llvm.extractvalue(v.type, result, [i]) for i, v in enumerate(values)]


class _SparseOperands:
  """The registers of one `P V` on the sparse tensor cores, ready to issue."""

  def __init__(self, acc: fa.FragmentedArray, a_regs, words, v_ref: ir.Value,
               swizzle: int):
    el_ty = ir.MemRefType(v_ref.type).element_type
    self.dtype_name = "bfloat16" if el_ty == ir.BF16Type.get() else "float16"
    self.head_dim = acc.shape[1]
    descs, self.transpose_b = _v_descriptors(v_ref, swizzle, len(a_regs))
    acc32 = acc.to_layout(fa.WGMMA_LAYOUT_ACC_32BIT)
    self.acc_shape = acc32.registers.shape
    acc_vals = [vector.extract(reg, dynamic_position=[], static_position=[0])
                for reg in acc32.registers.flat]
    flat = _pin([*acc_vals, *[r for regs in a_regs for r in regs], *descs,
                 *words])
    n_acc, n_a = len(acc_vals), 4 * len(a_regs)
    self.acc_vals = flat[:n_acc]
    self.a_regs = [flat[n_acc + 4 * kb:n_acc + 4 * kb + 4]
                   for kb in range(len(a_regs))]
    self.descs = flat[n_acc + n_a:n_acc + n_a + len(descs)]
    self.words = flat[n_acc + n_a + len(descs):]

  def issue(self) -> fa.FragmentedArray:
    """The wgmma instructions (no fence, no commit); the accumulator they write."""
    f32 = ir.F32Type.get()
    acc_vals = self.acc_vals
    for kb, (regs, desc) in enumerate(zip(self.a_regs, self.descs)):
      asm, constraints = sf.sparse_wgmma_ptx(self.head_dim, self.dtype_name,
                                             kb % 2, self.transpose_b)
      result = llvm.inline_asm(
          llvm.StructType.get_literal([f32] * len(acc_vals)),
          [*acc_vals, *regs, desc, self.words[kb // 2]], asm, constraints,
          asm_dialect=0, has_side_effects=True)
      acc_vals = [llvm.extractvalue(f32, result, [i])
                  for i in range(len(acc_vals))]
    vec1 = ir.VectorType.get((1,), f32)
    regs = np.array([vector.from_elements(vec1, [v]) for v in acc_vals],
                    dtype=object).reshape(self.acc_shape)
    return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT_ACC_32BIT,
                              _is_signed=None)


def sparse_mma(acc: fa.FragmentedArray, a_regs, words, v_ref: ir.Value, *,
               swizzle: int) -> fa.FragmentedArray:
  """`acc + A @ V` over `len(a_regs)` 32-key blocks on the sparse tensor cores.

  `a_regs[kb]`: the four b32 sparse-A registers of K block `kb`;
  `words[kb // 2]`: the metadata word of blocks `2p` (selector 0) and `2p + 1`
  (selector 1); `v_ref`: the value tile in shared memory (tiled
  `(8, swizzle // 2)`, swizzled); `acc`: f32 `[64, N]` in WGMMA layout.
  Fences the operands, issues the instructions as one wgmma group and waits
  for it.
  """
  operands = _SparseOperands(acc, a_regs, words, v_ref, swizzle)
  nvvm.wgmma_fence_aligned()
  out = operands.issue()
  nvvm.wgmma_commit_group_sync_aligned()
  nvvm.wgmma_wait_group_sync_aligned(0)
  return mgpu.optimization_barrier(out).to_layout(fa.WGMMA_LAYOUT)


def wait_accumulator(*arrays: fa.FragmentedArray, pending: int = 0):
  """`arrays` (a list) once at most `pending` wgmma groups of this warpgroup run.

  The barrier after the wait keeps every use of the registers after it, and
  every definition of them: an array carried into the next wgmma then never
  overwrites registers an earlier, still running wgmma reads.
  """
  nvvm.wgmma_wait_group_sync_aligned(pending)
  out = mgpu.optimization_barrier(*arrays)
  return [out] if len(arrays) == 1 else list(out)


def join_p_operands(p: fa.FragmentedArray, halves: fa.FragmentedArray,
                    words: int, dtype_name: str) -> tuple[fa.FragmentedArray, ...]:
  """`(P, metadata)` for `sparse_pv` from float32 P and split metadata.

  `halves` holds the `2 * words` halves that `select_compress(split=True)`
  returns, in order; they are or-ed into `words` words and P is rounded to
  `dtype_name` ("bfloat16" or "float16") here, so that both registers are
  written where this is called: after a wgmma wait, never under a running
  `P V` that reads the previous ones (else ptxas serializes, C7513).
  """
  flat = array_words(halves, 2 * words)
  ops = MlirOps()
  joined = [ops.ior(flat[2 * i], flat[2 * i + 1]) for i in range(words)]
  el_ty = ir.BF16Type.get() if dtype_name == "bfloat16" else ir.F16Type.get()
  return p.astype(el_ty), words_to_array(ops, joined)


def _p_operands(p: fa.FragmentedArray, meta: fa.FragmentedArray):
  """Sparse-A registers per K block and metadata words of a compressed P."""
  blocks = p.shape[1] // (sf.SPARSE_K // 2)
  p, meta = mgpu.optimization_barrier(p, meta)
  regs = p.registers
  a_regs = [[_as_i32(regs[0, 2 * kb + h, 0, 0, r, 0, 0, 0, 0])
             for h in range(2) for r in range(2)] for kb in range(blocks)]
  return a_regs, array_words(meta, -(-blocks // 2))


def qk_and_sparse_pv(q_ref: ir.Value, k_ref: ir.Value, acc: fa.FragmentedArray,
                     p: fa.FragmentedArray, meta: fa.FragmentedArray,
                     v_ref: ir.Value, *, swizzle: int):
  """Issues `Q K^T` and then `acc + P V` as two wgmma groups, waiting for neither.

  `q_ref [64, D]` and `k_ref [block_kv, D]` are tiled and swizzled like
  `v_ref`; `p`, `meta` as in `sparse_pv`. Every operand of the sparse group
  is computed before the first wgmma is issued. Returns `(scores, acc)`, both
  still being written: pass them to `wait_accumulator` (`pending=1` for the
  scores alone).
  """
  a_regs, words = _p_operands(p, meta)
  operands = _SparseOperands(acc, a_regs, words, v_ref, swizzle)
  block_kv = ir.MemRefType(k_ref.type).shape[0] * ir.MemRefType(k_ref.type).shape[2]
  scores = mgpu.WGMMAAccumulator.zero(acc.shape[0], block_kv)  # fences
  scores = mgpu.wgmma(scores, q_ref, mgpu.memref_transpose(k_ref, (1, 0, 3, 2)),
                      swizzle=swizzle)
  nvvm.wgmma_commit_group_sync_aligned()
  out = operands.issue()
  nvvm.wgmma_commit_group_sync_aligned()
  return scores.value, out.to_layout(fa.WGMMA_LAYOUT)


def sparse_pv(acc: fa.FragmentedArray, p: fa.FragmentedArray,
              meta: fa.FragmentedArray, v_ref: ir.Value, *,
              swizzle: int) -> fa.FragmentedArray:
  """`acc + P @ V` with P as `tile_select.select_compress` leaves it.

  `p` is the compressed `[64, block_kv // 2]` 16-bit array (register `b` is
  sparse-A register `2 * (b % 2) + r` of K block `b // 2`), `meta` the
  metadata words (`words_to_array`).
  """
  a_regs, words = _p_operands(p, meta)
  return sparse_mma(acc, a_regs, words, v_ref, swizzle=swizzle)
