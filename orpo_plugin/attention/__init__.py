"""Attention for rows that hold several sequences (padding-free, packed, prefix-shared), registered with
transformers' AttentionInterface so every model built on that interface can use it.

- `contract`: what each attention keyword means and which path honours it; every path reads its keywords there
  and either honours a feature exactly or refuses it at the first forward.
- `sdpa`: `orpo_sdpa`, per-segment padded buckets, one batched sdpa call each (any device, every feature).
- `varlen`: `orpo_flash` (flash-attn) and `orpo_varlen` (torch's varlen_attn), the row as cu_seqlens.
- `flex`: `orpo_flex`, flex_attention with the row's BlockMask.
- `backends`: which of them runs a row (`pick_attention`, `choose_backend`), their registration,
  `attention_implementation`.
"""

from .backends import (
    BACKEND_CHOICES,
    BACKENDS,
    NATIVE_PACKED,
    attention_implementation,
    backend_features,
    choose_backend,
    model_features,
    on_cuda,
    pick_attention,
    register,
)
from .contract import (
    ATTENTION_NAME,
    FEATURES,
    FLASH_NAME,
    FLEX_NAME,
    SUPPORTED_BY,
    VARLEN_NAME,
    Features,
    host_list,
    prefix_sharing_mask,
    read_features,
    register_host_layout,
)
from .flex import ORPO_FLEX_FEATURES, flex_available, orpo_flex_attention, packed_block_mask, prefix_sharing_block_mask
from .sdpa import ORPO_SDPA_FEATURES, orpo_sdpa_attention
from .varlen import (
    ORPO_FLASH_FEATURES,
    flash_attn_available,
    orpo_flash_attention,
    orpo_varlen_attention,
    torch_varlen_kernel,
    varlen_arguments,
    varlen_layout,
    varlen_reference,
)

__all__ = [
    "ATTENTION_NAME",
    "BACKENDS",
    "BACKEND_CHOICES",
    "FEATURES",
    "FLASH_NAME",
    "FLEX_NAME",
    "Features",
    "host_list",
    "register_host_layout",
    "NATIVE_PACKED",
    "ORPO_FLASH_FEATURES",
    "ORPO_FLEX_FEATURES",
    "ORPO_SDPA_FEATURES",
    "SUPPORTED_BY",
    "VARLEN_NAME",
    "attention_implementation",
    "backend_features",
    "choose_backend",
    "flash_attn_available",
    "flex_available",
    "model_features",
    "on_cuda",
    "orpo_flash_attention",
    "orpo_flex_attention",
    "orpo_sdpa_attention",
    "orpo_varlen_attention",
    "pick_attention",
    "packed_block_mask",
    "prefix_sharing_block_mask",
    "prefix_sharing_mask",
    "read_features",
    "register",
    "torch_varlen_kernel",
    "varlen_arguments",
    "varlen_layout",
    "varlen_reference",
]
