"""The model types this package claims. Every patch is gated on them: another model type
(Llama, Mistral, ...) gets exactly what stock Unsloth does."""

from __future__ import annotations

from typing import Any

QWEN_MODEL_TYPES = frozenset({"qwen2", "qwen3", "qwen3_moe"})


def is_qwen(config: Any) -> bool:
    return getattr(config, "model_type", None) in QWEN_MODEL_TYPES
