"""The HF + PEFT reference puts LoRA exactly where its target names say (oracle process only).

PEFT 0.21's transformers-v5 MoE conversion (``peft.utils.transformers_weight_conversion.
_convert_peft_config_moe``) rewrites every target ending in ``.gate_proj`` / ``.up_proj`` /
``.down_proj`` to the routed experts' fused parameters, fully qualified names included: asked
for ``shared_expert.gate_proj`` (the shared expert's ``nn.Linear``, which Qwen3-Next and
Qwen3.5-MoE keep as modules), it adapts ``experts.gate_up_proj`` instead and leaves the
shared expert without LoRA. That is PEFT's defect (huggingface/peft#3711, fixed by #3715),
not the semantics the suite compares Unsloth with; measured here: the Qwen3-Next adapter case
failed on an H200 with "LoRA placement differs from PEFT's" (candidate: the shared expert,
PEFT: the routed experts), on transformers 5.17 and 5.24 alike.

``keep_module_targets()`` makes the conversion leave alone a dotted target that names modules
the model has (what the upstream fix does); bare names and routed-expert paths convert as
before. A PEFT without that conversion (older legs) is left as it is.
"""

from __future__ import annotations

import functools


def _module_targets(targets, model) -> set[str]:
    """The dotted targets (``a.b``) that match, by PEFT's exact-or-suffix rule, a module of ``model``."""
    dotted = {t for t in targets if isinstance(t, str) and "." in t}
    if not dotted:
        return set()
    names = [name for name, _ in model.named_modules()]
    return {t for t in dotted if any(name == t or name.endswith("." + t) for name in names)}


def keep_module_targets() -> bool:
    """Patch PEFT's MoE target conversion as described above; whether there was one to patch."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:
        return False
    original = getattr(conversion, "_convert_peft_config_moe", None)
    if original is None or getattr(original, "_keeps_module_targets", False):
        return original is not None

    @functools.wraps(original)
    def convert(peft_config, model):
        targets = peft_config.target_modules
        kept = _module_targets(targets, model) if isinstance(targets, (list, set, tuple)) else set()
        if kept:
            peft_config.target_modules = [t for t in targets if t not in kept]
        try:
            original(peft_config, model)
        finally:
            if kept:
                peft_config.target_modules = set(peft_config.target_modules or ()) | kept

    convert._keeps_module_targets = True
    conversion._convert_peft_config_moe = convert
    return True
