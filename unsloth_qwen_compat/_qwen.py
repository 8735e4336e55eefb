"""The model types this package claims. Every patch is gated on them: another model type
(Llama, Mistral, ...) gets exactly what stock Unsloth does."""

from __future__ import annotations

from typing import Any

#: The types Unsloth's fast Llama-kernel path serves (FastLanguageModel); the RoPE, SDPA and
#: KV-cache patches work on that path only.
QWEN_MODEL_TYPES = frozenset({"qwen2", "qwen3", "qwen3_moe"})

#: The hybrid Qwen types (gated-DeltaNet linear attention beside full attention, partial
#: rotary), each config type -> the family it belongs to. Qwen3.5 checkpoints are
#: vision-language models (``qwen3_5``, ``qwen3_5_moe``) whose text configs have types of
#: their own. Unsloth loads all of them on its generic path.
HYBRID_MODEL_TYPES = {
    "qwen3_5": "Qwen3.5",
    "qwen3_5_text": "Qwen3.5",
    "qwen3_5_moe": "Qwen3.5-MoE",
    "qwen3_5_moe_text": "Qwen3.5-MoE",
    "qwen3_next": "Qwen3-Next",
}


def is_qwen(config: Any) -> bool:
    return getattr(config, "model_type", None) in QWEN_MODEL_TYPES


def hybrid_model_types_of(config: dict[str, Any]) -> list[str]:
    """The hybrid Qwen model types a raw ``config.json`` dict names (its own, its text config's)."""
    text_config = config.get("text_config")
    found = [
        config.get("model_type"),
        text_config.get("model_type") if isinstance(text_config, dict) else None,
    ]
    return [t for t in found if t in HYBRID_MODEL_TYPES]


def types_transformers_lacks(model_types: list[str]) -> list[str]:
    """Those of ``model_types`` the installed transformers cannot build a config for."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return [t for t in model_types if t not in CONFIG_MAPPING_NAMES]
