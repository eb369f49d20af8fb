"""Register layouts, 2:4 metadata and the `wgmma.mma_async.sp` PTX, with a numpy twin.

Everything the Hopper kernel assumes about where a value sits in which thread's
registers lives here, written twice: once as the facts the kernel relies on
(`key_order`, `sparse_wgmma_ptx`, `metadata_bit`, ...) and once as a numpy model
of the PTX ISA's description of the sparse operand (`encode_sparse_a`,
`decode_sparse_a`) that CPU tests check against the kernel's own algorithm.

Facts used (PTX ISA 8.x, "Asynchronous Warpgroup Level Matrix ..."):

* wgmma accumulator `D` of shape 64xN (9.7.15.5.1, `wgmma-64n16-d`): thread
  `tid` of the warpgroup (warp `w = tid // 32`, lane `l`, `g = l // 4`,
  `t = l % 4`) holds, for each 8-column block `j`, the pairs
  `D[16w + g + 8r, 8j + 2t + e]` for `r, e` in {0, 1}. Mosaic GPU's
  `WGMMA_LAYOUT` stores them as registers `[0, j, 0, 0, r, 0, 0, 0, 0]`, each a
  2-vector over `e`.
* Sparse A of `wgmma.mma_async.sp.m64nNk32` (.f16/.bf16, 9.7.15.6.2.1): four
  b32 registers per thread; register `2h + r` holds the two kept 16-bit values
  (lower key first, in the low half) of row `16w + g + 8r`, 4-wide chunk
  `t + 4h` (columns `4(t + 4h) ... 4(t + 4h) + 3` of the 32-wide K block).
* Metadata (9.7.15.6.1, and the `.m16n8k32` figure it refers to): a b32 per
  thread; with sparsity selector `s`, thread `4g + 2s + h` of each quad supplies
  the word for chunks `4h ... 4h + 3`: the nibble of chunk `4h + c` of row
  `16w + g + 8r` sits at bit `4c + 16r`, holding the two kept positions
  `i0, i1` (0..3) as `i0 | i1 << 2`, the value of `i0` in the register's low
  half. Only equal positions are invalid (0b0000, 0b0101, 0b1010, 0b1111);
  the kernel writes `i0 < i1`; `i0 > i1` works too (the probe's `micro`
  section with `descending`, exact on an H200).

The kernel permutes keys so that every N:M group is thread-local: the key
matrix row that produces accumulator column `c` of a block of `4 * width`
columns is key `width * t + 2j + e` of that block, where `c = 8j + 2t + e`
(`key_order`). With `width == 4` the two groups a thread holds in each 32-key
block are exactly chunks `t` and `t + 4` of the sparse A operand, so
selection and compression need no data exchange; only the metadata words are
gathered across the quad (`gather_metadata`, three shuffles per 64 keys).
"""

from __future__ import annotations

import numpy as np

WARPGROUP = 128
SPARSE_K = 32  # keys per wgmma.mma_async.sp instruction (16-bit inputs)

_PTX_TYPES = {"bfloat16": "bf16", "float16": "f16"}


# --------------------------------------------------------------------------
# Key order and accumulator layout.


def key_order(width: int) -> np.ndarray:
  """Key (within a block of `4 * width`) behind each accumulator column.

  `width` keys per thread and row: column `c = 8j + 2t + e` holds key
  `width * t + 2j + e`. `width == 0` means the identity (no permutation).
  """
  if width == 0:
    return np.arange(8)
  if width < 4 or width & (width - 1):
    raise ValueError(f"width must be 0 or a power of two >= 4; got width={width}")
  cols = np.arange(4 * width)
  j, t, e = cols // 8, (cols % 8) // 2, cols % 2
  return width * t + 2 * j + e


def permute_keys(x: np.ndarray, width: int, axis: int) -> np.ndarray:
  """Reorders `axis` (a multiple of `4 * width`) into accumulator column order."""
  if width == 0:
    return x
  block = 4 * width
  idx = np.arange(x.shape[axis]).reshape(-1, block)[:, key_order(width)]
  return np.take(x, idx.reshape(-1), axis=axis)


def thread_coords(tid):
  """(warp, g, t) of warpgroup thread ids (ints or numpy arrays)."""
  lane = tid % 32
  return tid // 32, lane // 4, lane % 4


def to_thread_registers(mat: np.ndarray) -> np.ndarray:
  """A `[64, N]` matrix in WGMMA layout: `[128 threads, 2 (r), N // 4 (8j + ... )]`.

  Local column `2j + e` of half `r` of thread `tid` is
  `mat[16w + g + 8r, 8j + 2t + e]`.
  """
  rows, cols = mat.shape
  if rows != 64 or cols % 8:
    raise ValueError(f"expected a [64, 8k] matrix; got shape={mat.shape}")
  w, g, t = thread_coords(np.arange(WARPGROUP))
  r = np.arange(2)
  local = np.arange(cols // 4)
  row = (16 * w + g)[:, None, None] + 8 * r[None, :, None]
  col = (8 * (local // 2) + local % 2)[None, None, :] + 2 * t[:, None, None]
  return mat[row, col]


def from_thread_registers(regs: np.ndarray) -> np.ndarray:
  """Inverse of `to_thread_registers`."""
  threads, halves, local = regs.shape
  if threads != WARPGROUP or halves != 2:
    raise ValueError(f"expected [128, 2, L] registers; got shape={regs.shape}")
  mat = np.empty((64, 4 * local), regs.dtype)
  w, g, t = thread_coords(np.arange(WARPGROUP))
  loc = np.arange(local)
  for r in range(2):
    row = (16 * w + g + 8 * r)[:, None]
    col = (8 * (loc // 2) + loc % 2)[None, :] + 2 * t[:, None]
    mat[row, col] = regs[:, r, :]
  return mat


def thread_key_offset(width: int) -> int:
  """Key offset of thread `t` inside its block is `thread_key_offset * t`."""
  return 2 if width == 0 else width


def static_key(width: int, local: int) -> int:
  """Key offset (within the tile) of local column `local`, less the thread part."""
  if width == 0:
    return 8 * (local // 2) + local % 2
  block, within = divmod(local, width)  # `width` local columns per block
  return 4 * width * block + within


# --------------------------------------------------------------------------
# Metadata.


def metadata_bit(t, r):
  """Bit offset of the nibble of thread `t`'s chunk, row half `r`, in its word."""
  return 4 * t + 16 * r


def nibble(i0, i1):
  """Metadata nibble of kept positions `i0 != i1` of a 4-wide chunk."""
  return i0 | (i1 << 2)


def gather_metadata(ops, partial, t):
  """Metadata word of this thread for one pair of 32-key blocks.

  `partial[d]` (d = 2 * selector + h) is the thread's own contribution to
  the word that thread `d` of the quad supplies: block `2p + selector`,
  chunks `4h ... 4h + 3`. Round 1 exchanges with the thread whose selector
  differs (lane ^ 2), round 2 with the one whose half differs (lane ^ 1).
  Works on kernel registers (`ops` = `MlirOps`) and on the numpy twin.
  """
  sel_bit = ops.ine(ops.iand(t, ops.i32(2)), ops.i32(0))
  half_bit = ops.ine(ops.iand(t, ops.i32(1)), ops.i32(0))
  mine = [ops.sel(sel_bit, partial[2 + h], partial[h]) for h in range(2)]
  theirs = [ops.sel(sel_bit, partial[h], partial[2 + h]) for h in range(2)]
  got = [ops.shfl_xor(x, 2) for x in theirs]
  both = [ops.ior(a, b) for a, b in zip(mine, got)]
  keep = ops.sel(half_bit, both[1], both[0])
  give = ops.sel(half_bit, both[0], both[1])
  return ops.ior(keep, ops.shfl_xor(give, 1))


# --------------------------------------------------------------------------
# The instruction.


def sparse_wgmma_ptx(n: int, dtype_name: str, selector: int,
                     transpose_b: bool) -> tuple[str, str]:
  """Inline-asm text and constraints of one `wgmma.mma_async.sp` (m64nNk32).

  Operands, in order: `n // 2` f32 accumulators (read and written), four b32
  registers of sparse A, the B shared-memory descriptor (b64) and the
  metadata word (b32). Scale-d is 1 (accumulate), A and B are not negated.
  """
  if dtype_name not in _PTX_TYPES:
    raise ValueError(f"dtype must be one of {tuple(_PTX_TYPES)}; got {dtype_name!r}")
  if n % 8 or not 8 <= n <= 256:
    raise ValueError(f"n must be a multiple of 8 in [8, 256]; got n={n}")
  if selector not in (0, 1):
    raise ValueError(f"selector must be 0 or 1; got selector={selector}")
  ty = _PTX_TYPES[dtype_name]
  num_acc = n // 2
  acc = ",".join(f"${i}" for i in range(num_acc))
  a = ",".join(f"${num_acc * 2 + i}" for i in range(4))
  b_desc, meta = num_acc * 2 + 4, num_acc * 2 + 5
  asm = (f"wgmma.mma_async.sp.sync.aligned.m64n{n}k{SPARSE_K}.f32.{ty}.{ty} "
         f"{{{acc}}}, {{{a}}}, ${b_desc}, ${meta}, {selector}, 1, 1, 1, "
         f"{int(transpose_b)};")
  constraints = ",".join(["=f"] * num_acc + [str(i) for i in range(num_acc)]
                         + ["r"] * 4 + ["l", "r"])
  return asm, constraints


# --------------------------------------------------------------------------
# Numpy model of the sparse A operand, from the PTX ISA text.


def _bits16(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x).view(np.uint16).astype(np.uint32)


def encode_sparse_a(dense: np.ndarray, selector: int, *, descending=False):
  """One 64x32 block with <= 2 non-zeros per 4-chunk, as the hardware reads it.

  Returns `(a_regs [128, 4] uint32, meta [128] uint32)`. Only the quad
  threads named by `selector` get metadata; the others hold 0. Chunks with
  fewer than two non-zeros are padded with zero-valued positions. Each
  chunk's two positions go in ascending order, or descending with
  `descending=True` (the values swapped with them).
  """
  if dense.shape != (64, SPARSE_K):
    raise ValueError(f"expected a 64x32 block; got shape={dense.shape}")
  bits = _bits16(dense)
  a_regs = np.zeros((WARPGROUP, 4), np.uint32)
  meta = np.zeros(WARPGROUP, np.uint32)
  for tid in range(WARPGROUP):
    w, g, t = thread_coords(tid)
    for h in range(2):
      for r in range(2):
        row, chunk = 16 * w + g + 8 * r, t + 4 * h
        vals = dense[row, 4 * chunk:4 * chunk + 4]
        nz = [i for i in range(4) if vals[i] != 0]
        if len(nz) > 2:
          raise ValueError(f"row {row} chunk {chunk} has {len(nz)} non-zeros")
        pos = sorted(nz + [i for i in range(4) if i not in nz][:2 - len(nz)],
                     reverse=descending)
        cb = bits[row, 4 * chunk:4 * chunk + 4]
        a_regs[tid, 2 * h + r] = cb[pos[0]] | (cb[pos[1]] << 16)
        supplier = 4 * (tid // 4) + 2 * selector + h
        meta[supplier] |= np.uint32(nibble(pos[0], pos[1]) << metadata_bit(t, r))
  return a_regs, meta


def decode_sparse_a(a_regs: np.ndarray, meta: np.ndarray, selector: int,
                    dtype) -> np.ndarray:
  """The dense 64x32 block that `(a_regs, meta, selector)` denote."""
  dense = np.zeros((64, SPARSE_K), dtype)
  out_bits = dense.view(np.uint16)
  for tid in range(WARPGROUP):
    w, g, t = thread_coords(tid)
    for h in range(2):
      word = int(meta[4 * (tid // 4) + 2 * selector + h])
      for r in range(2):
        row, chunk = 16 * w + g + 8 * r, t + 4 * h
        nib = (word >> metadata_bit(t, r)) & 0xF
        i0, i1 = nib & 3, nib >> 2
        if i0 == i1:
          raise ValueError(f"invalid metadata nibble {nib:#x} (thread {tid})")
        reg = int(a_regs[tid, 2 * h + r])
        out_bits[row, 4 * chunk + i0] = reg & 0xFFFF
        out_bits[row, 4 * chunk + i1] = reg >> 16
  return dense


class NumpyOps:
  """The scalar operations of the kernel's register code, over all 128 threads.

  Every value is a numpy array of shape `[128]` (one entry per thread of the
  warpgroup); `shfl_xor` exchanges entries as `shfl.sync.bfly` exchanges
  registers. The kernel runs the same algorithms with `MlirOps`.
  """

  def thread_id(self):
    return np.arange(WARPGROUP, dtype=np.int32)

  def f32(self, v):
    return np.full(WARPGROUP, v, np.float32)

  def i32(self, v):
    return np.full(WARPGROUP, v, np.int32)

  def fmul(self, a, b):
    return (a * b).astype(np.float32)

  def fadd(self, a, b):
    return (a + b).astype(np.float32)

  def fmax(self, a, b):  # NaN-propagating, as `max.NaN.f32`
    return np.maximum(a, b).astype(np.float32)

  def fmin(self, a, b):
    return np.minimum(a, b).astype(np.float32)

  def fgt(self, a, b):
    return a > b

  def fge(self, a, b):
    return a >= b

  def sel(self, p, a, b):
    return np.where(p, a, b)

  def not_(self, p):
    return ~p

  def and_(self, p, q):
    return p & q

  def or_(self, p, q):
    return p | q

  def iadd(self, a, b):
    return (a + b).astype(np.int32)

  def isub(self, a, b):
    return (a - b).astype(np.int32)

  def imul(self, a, b):
    return (a * b).astype(np.int32)

  def iand(self, a, b):
    return a & b

  def ior(self, a, b):
    return a | b

  def ishl(self, a, b):
    return (a.astype(np.uint32) << b.astype(np.uint32)).astype(np.int32)

  def ishr(self, a, b):
    return (a.astype(np.uint32) >> b.astype(np.uint32)).astype(np.int32)

  def ine(self, a, b):
    return a != b

  def ile(self, a, b):
    return a <= b

  def ilt(self, a, b):
    return a < b

  def zext(self, p):
    return p.astype(np.int32)

  def shfl_xor(self, x, mask):
    lanes = np.arange(WARPGROUP)
    return x[(lanes & ~31) | ((lanes & 31) ^ mask)]
