"""LoRA target-module names for the Qwen families, and the check that catches typos.

PEFT and Unsloth both accept a ``target_modules`` list in which some names match
nothing: the adapter then silently trains fewer matrices than asked. Here every name
must match a module (or, for fused MoE experts on transformers 5, a parameter) of the
model, or the call fails listing the names that would. The valid names are read from the
model itself, so the hybrid families' linear-attention projections (``in_proj_qkvz``,
``in_proj_ba``, ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``, ``out_proj``),
shared experts and fused experts are known without a list to keep in step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

#: Gated-DeltaNet (linear attention) projections: Qwen3-Next fuses q/k/v/z and b/a, Qwen3.5
#: keeps them apart.
QWEN3_NEXT_LINEAR_ATTENTION = ("in_proj_qkvz", "in_proj_ba", "out_proj")
QWEN3_5_LINEAR_ATTENTION = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
#: The hybrid MoE families' shared expert, named by path: a bare ``gate_proj`` also means the
#: routed experts to Unsloth's MoE detection (it adds their fused parameters), to PEFT only
#: the shared expert, so the bare names would train different models on the two paths.
SHARED_EXPERT_PROJECTIONS = tuple(f"shared_expert.{name}" for name in MLP_PROJECTIONS)

#: The LoRA targets each supported Qwen model type offers, by the names users write.
#: qwen3_moe's experts are a ModuleList of (gate|up|down)_proj Linears on transformers 4
#: and fused 3-D parameters (gate_up_proj, down_proj) on transformers 5; the router is
#: ``mlp.gate`` on both. The hybrids' defaults are the linear layers both paths put LoRA on
#: alike: attention, linear attention and the dense or shared-expert MLP (their routed
#: experts are fused parameters on every transformers that has them, Qwen3-Next on 4.57 aside).
QWEN_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "qwen2": ATTENTION_PROJECTIONS + MLP_PROJECTIONS,
    "qwen3": ATTENTION_PROJECTIONS + MLP_PROJECTIONS,
    "qwen3_moe": ATTENTION_PROJECTIONS + MLP_PROJECTIONS + ("gate_up_proj", "gate"),
    "qwen3_5": ATTENTION_PROJECTIONS + QWEN3_5_LINEAR_ATTENTION + MLP_PROJECTIONS,
    "qwen3_5_text": ATTENTION_PROJECTIONS + QWEN3_5_LINEAR_ATTENTION + MLP_PROJECTIONS,
    "qwen3_5_moe": ATTENTION_PROJECTIONS + QWEN3_5_LINEAR_ATTENTION + SHARED_EXPERT_PROJECTIONS,
    "qwen3_5_moe_text": ATTENTION_PROJECTIONS + QWEN3_5_LINEAR_ATTENTION + SHARED_EXPERT_PROJECTIONS,
    "qwen3_next": ATTENTION_PROJECTIONS + QWEN3_NEXT_LINEAR_ATTENTION + SHARED_EXPERT_PROJECTIONS,
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


def _target_paths(model: Any) -> list[str]:
    """Full paths of what LoRA can target: Linear layers and fused expert parameters."""
    import torch

    paths: list[str] = []
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear):
            paths.append(full_name)
        elif "experts" in leaf:
            # transformers 5 fuses MoE experts into 3-D parameters PEFT targets by name.
            for parameter_name, parameter in module.named_parameters(recurse=False):
                if parameter.dim() == 3:
                    paths.append(f"{full_name}.{parameter_name}")
    return paths


def available_targets(model: Any) -> set[str]:
    """Leaf names LoRA can target in ``model``: Linear layers and fused expert parameters."""
    return {path.rsplit(".", 1)[-1] for path in _target_paths(model)}


def _matches(name: str, paths: list[str]) -> bool:
    """PEFT's rule for a list entry: the whole path, or its tail after a dot."""
    return any(path == name or path.endswith("." + name) for path in paths)


def check_target_modules(model: Any, target_modules: str | Iterable[str] | None) -> list[str] | str | None:
    """Return ``target_modules`` unchanged if every name exists in ``model``; raise otherwise.

    A string is a PEFT regex or ``"all-linear"`` and is passed through: PEFT itself
    raises when a regex matches nothing.
    """
    if target_modules is None or isinstance(target_modules, str):
        return target_modules
    requested = list(target_modules)
    paths = _target_paths(model)
    valid = {path.rsplit(".", 1)[-1] for path in paths} | set(EMBEDDING_TARGETS)
    # A dotted name ("shared_expert.gate_proj") must match a path's tail, as PEFT matches it:
    # a typo in its first part would otherwise pass on a valid last part.
    unknown = [
        name
        for name in requested
        if name not in EMBEDDING_TARGETS
        and not (("." not in name and name in valid) or _matches(name, paths))
    ]
    if unknown:
        model_type = model_type_of(model) or type(model).__name__
        raise UnknownTargetModuleError(
            f"target_modules {unknown} match nothing in this {model_type} model. "
            f"Valid names: {', '.join(sorted(valid))} (or a path ending in one, e.g. "
            f"'shared_expert.gate_proj'). Fix the spelling or drop them."
        )
    return requested


def default_targets(model_type: str) -> Sequence[str]:
    try:
        return QWEN_LORA_TARGETS[model_type]
    except KeyError:
        raise ValueError(
            f"unknown model type {model_type!r}; this shim covers {', '.join(QWEN_LORA_TARGETS)}"
        ) from None
