"""LoRA target-module names for the Qwen families, and the check that catches typos.

PEFT and Unsloth both accept a ``target_modules`` list in which some names match
nothing: the adapter then silently trains fewer matrices than asked. Here every name
must match a module (or, for fused MoE experts on transformers 5, a parameter) of the
model, or the call fails listing the names that would.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

#: The LoRA targets each supported Qwen model type offers, by the names users write.
#: qwen3_moe's experts are a ModuleList of (gate|up|down)_proj Linears on transformers 4
#: and fused 3-D parameters (gate_up_proj, down_proj) on transformers 5; the router is
#: ``mlp.gate`` on both.
QWEN_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "qwen2": ATTENTION_PROJECTIONS + MLP_PROJECTIONS,
    "qwen3": ATTENTION_PROJECTIONS + MLP_PROJECTIONS,
    "qwen3_moe": ATTENTION_PROJECTIONS + MLP_PROJECTIONS + ("gate_up_proj", "gate"),
}

#: Names Unsloth accepts besides Linear layers: it moves them to modules_to_save.
EMBEDDING_TARGETS = ("lm_head", "embed_tokens")

#: Everything LoRA can attach to: the default for ``target_modules="all"``.
DEFAULT_TARGETS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


class UnknownTargetModuleError(ValueError):
    """A ``target_modules`` name matches nothing in the model."""


def model_type_of(model: Any) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def available_targets(model: Any) -> set[str]:
    """Leaf names LoRA can target in ``model``: Linear layers and fused expert parameters."""
    import torch

    names: set[str] = set()
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear):
            names.add(leaf)
        elif "experts" in leaf:
            # transformers 5 fuses MoE experts into 3-D parameters PEFT targets by name.
            for parameter_name, parameter in module.named_parameters(recurse=False):
                if parameter.dim() == 3:
                    names.add(parameter_name)
    return names


def check_target_modules(model: Any, target_modules: str | Iterable[str] | None) -> list[str] | str | None:
    """Return ``target_modules`` unchanged if every name exists in ``model``; raise otherwise.

    A string is a PEFT regex or ``"all-linear"`` and is passed through: PEFT itself
    raises when a regex matches nothing.
    """
    if target_modules is None or isinstance(target_modules, str):
        return target_modules
    requested = list(target_modules)
    valid = available_targets(model) | set(EMBEDDING_TARGETS)
    unknown = [name for name in requested if name.rsplit(".", 1)[-1] not in valid]
    if unknown:
        model_type = model_type_of(model) or type(model).__name__
        raise UnknownTargetModuleError(
            f"target_modules {unknown} match nothing in this {model_type} model. "
            f"Valid names: {', '.join(sorted(valid))}. Fix the spelling or drop them."
        )
    return requested


def default_targets(model_type: str) -> Sequence[str]:
    try:
        return QWEN_LORA_TARGETS[model_type]
    except KeyError:
        raise ValueError(
            f"unknown model type {model_type!r}; this shim covers {', '.join(QWEN_LORA_TARGETS)}"
        ) from None
