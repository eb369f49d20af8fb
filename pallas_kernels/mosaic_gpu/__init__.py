"""Hopper (sm_90a) kernels written with Pallas' Mosaic GPU backend."""

from pallas_kernels.mosaic_gpu.forward import (
    MosaicTuning, nm_flash_attention_fwd, shape_unsupported_reason)

__all__ = ["MosaicTuning", "nm_flash_attention_fwd", "shape_unsupported_reason"]
