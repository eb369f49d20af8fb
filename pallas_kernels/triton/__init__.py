"""Fused N:M sparse flash attention in Pallas, lowered through Triton.

Any CUDA GPU that Pallas' Triton lowering supports; `interpret=True` runs the
same kernels in Pallas interpret mode (CPU). Every entry point consumes the
canonical `pallas_kernels.call.AttentionCall`; nothing here imports `nmattn`.
"""

from pallas_kernels.triton._common import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from pallas_kernels.triton.attention import (
    nm_flash_attention,
    nm_flash_attention_bwd,
    nm_flash_attention_fwd,
    nm_flash_attention_selection,
    nm_flash_attention_with_importance,
)
from pallas_kernels.triton.config import TuningConfig, default_tuning
from pallas_kernels.triton.support import runs_natively, unsupported_reason

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "TuningConfig",
    "default_tuning",
    "nm_flash_attention",
    "nm_flash_attention_bwd",
    "nm_flash_attention_fwd",
    "nm_flash_attention_selection",
    "nm_flash_attention_with_importance",
    "runs_natively",
    "unsupported_reason",
]
