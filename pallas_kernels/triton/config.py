"""Tile sizes and launch parameters of the Triton N:M attention kernels."""

from __future__ import annotations

import dataclasses

# Triton's smallest dot operand dimension; every tile side must be at least
# this, and so must every lane of a key tile (block_k / m keys), which keeps
# the lane axis of a score tile in each thread's registers (`_common.split_lanes`).
MIN_BLOCK = 16


def _is_power_of_two(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x > 0 and not x & (x - 1)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Tiles and launch parameters of the forward, dQ and dK/dV kernels.

  Forward: a program holds `block_q` queries and walks the keys `block_k` at a
  time. dQ: `block_q_dq` queries resident, keys `block_k_dq` at a time. dK/dV:
  `block_k_dkv` keys resident, queries `block_q_dkv` at a time. Block sizes are
  powers of two >= 16; each call shrinks them to the (padded) sequence and
  raises key blocks to `16 * m` when the N:M lanes would be narrower than 16.
  """
  block_q: int = 128
  block_k: int = 128
  num_warps: int = 8
  num_stages: int = 3
  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name.startswith("block_"):
        if not _is_power_of_two(value) or value < MIN_BLOCK:
          raise ValueError(f"TuningConfig.{field.name} must be a power of two >= "
                           f"{MIN_BLOCK}; got {field.name}={value!r}")
      elif field.name.startswith("num_warps"):
        if not _is_power_of_two(value) or value > 16:
          raise ValueError(f"TuningConfig.{field.name} must be a power of two <= 16; "
                           f"got {field.name}={value!r}")
      elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"TuningConfig.{field.name} must be a positive int; got "
                         f"{field.name}={value!r}")


def default_tuning(head_dim: int, tiled_bias_or_mask: bool = False,
                   itemsize: int = 2, block_pattern: bool = False) -> TuningConfig:
  """The tuning measured best on an H100 (docs/benchmarks_history.md, "Triton kernel").

  Swept at head_dim 128, S=4096, 2:4 in bf16; smaller head dims reuse the
  tiles with half the warps, 256 takes smaller tiles to fit shared memory
  (untuned). Tiles go by the bytes of a row of q, k and v: float32
  (`itemsize` 4) takes the tiles of a 16-bit call of twice the head_dim
  (float32 at head_dim 128 with the 16-bit tiles asked for 393728 bytes of
  the H100's 232448). A bias or mask tiled along both query and key axes is
  pipelined beside K and V; three forward stages of those exceeded the
  shared memory (bias + mask at head_dim 64), as did three at head_dim 256,
  so such calls pipeline two.

  A block pattern's forward walks a list of key tiles, whose loads Triton's
  pipeliner did not overlap; at head_dim 128 (H200, S=16k, 2:4 in 128 x 128
  blocks) key tiles of 64 with 4 warps ran 5.66 ms at full density and 1.72
  ms at 25% against 7.05 and 2.00 ms with the tiles above (loading the next
  tile's index one iteration ahead made the pipeliner overlap them: 5.90 and
  2.00 ms). docs/benchmarks_history.md, "Block patterns".
  """
  head_dim = head_dim * itemsize // 2  # the 16-bit head_dim of the same bytes
  stages = 2 if tiled_bias_or_mask or head_dim > 128 else 3
  if head_dim <= 64:
    return TuningConfig(num_warps=4, num_stages=stages)
  if head_dim <= 128:
    if block_pattern:
      return TuningConfig(block_k=64, num_warps=4, num_stages=stages)
    return TuningConfig(num_stages=stages)
  return TuningConfig(block_q=64, block_k=64, block_q_dq=32, block_k_dq=64,
                      block_q_dkv=32, block_k_dkv=64, num_stages=stages)
