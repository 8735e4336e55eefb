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
before. A regex (what Unsloth's ``FastLanguageModel.get_peft_model`` saves as
``target_modules``) is first resolved to the modules it matches, unless it names a routed
expert: PEFT's own resolution reduces it to leaf names (``gate_proj``), which the conversion
then moves to the routed experts. Measured: with a list fixed and a regex not, Qwen3-Next's
adapter case failed through ``FastLanguageModel`` only (HF's reload 0.21-0.24 off, on an H200,
Unsloth 2026.10.9 stock and with the shim alike), the same tensors saved through ``FastModel``
(a list) passed. A PEFT without that conversion (older legs) is left as it is.
"""

from __future__ import annotations

import functools
import re

#: The pre-fusion (transformers 4) names of the routed experts' projections PEFT converts.
_ROUTED_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


def _module_targets(targets, model) -> set[str]:
    """The dotted targets (``a.b``) that match, by PEFT's exact-or-suffix rule, a module of ``model``."""
    dotted = {t for t in targets if isinstance(t, str) and "." in t}
    if not dotted:
        return set()
    names = [name for name, _ in model.named_modules()]
    return {t for t in dotted if any(name == t or name.endswith("." + t) for name in names)}


def _regex_modules(pattern: str, model) -> list[str] | None:
    """The modules a regex ``target_modules`` full-matches (PEFT's rule for a string), or None
    where there is nothing to protect (no fused routed experts the conversion could move it
    to), where it is ``all-linear``, or where it names a routed expert (the keys PEFT's
    conversion probes: ``<experts>.gate_proj`` beside a fused ``<experts>.gate_up_proj``):
    those convert as before."""
    if pattern.lower() == "all-linear":
        return None
    fused = {
        name.rpartition(".")[0]
        for name, _ in model.named_parameters()
        if name.endswith((".gate_up_proj", ".down_proj"))
    }
    if not fused or any(
        re.fullmatch(pattern, f"{experts}.{old}") for experts in fused for old in _ROUTED_EXPERT_NAMES
    ):
        return None
    return [name for name, _ in model.named_modules() if name and re.fullmatch(pattern, name)] or None


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
        if isinstance(targets, str):
            targets = _regex_modules(targets, model) or targets
            peft_config.target_modules = targets
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
