"""One module per patch; ``ALL_PATCHES`` is the order they are probed and applied in."""

from __future__ import annotations

from .._registry import Patch
from .chat_templates import ChatTemplates
from .hybrid_qwen_models import HybridQwenModels
from .kv_cache_left_padding import KvCacheLeftPadding
from .lora_target_maps import LoraTargetMaps
from .qwen2_fused_qkv_bias import Qwen2FusedQkvBias
from .qwen3_registration import Qwen3Registration
from .rope_scaling import RopeScaling
from .sdpa_causal_fallback import SdpaCausalFallback


def all_patches() -> list[Patch]:
    """Fresh instances of every patch, registration first (later patches build on it)."""
    return [
        Qwen3Registration(),
        RopeScaling(),
        SdpaCausalFallback(),
        LoraTargetMaps(),
        ChatTemplates(),
        KvCacheLeftPadding(),
        Qwen2FusedQkvBias(),
        HybridQwenModels(),
    ]


__all__ = ["all_patches"]
