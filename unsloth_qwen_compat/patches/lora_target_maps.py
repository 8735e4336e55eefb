"""Reject ``target_modules`` names that match nothing in a Qwen model.

Stock ``get_peft_model`` only prints "Unsloth: You added custom modules" for a name it
does not know and lets PEFT skip it, so ``["q_proj", "v_prj"]`` trains q_proj alone.
The patch wraps ``FastLlamaModel.get_peft_model`` (which ``FastLanguageModel`` calls
through) and checks the names against the model first, for Qwen model types only.
"""

from __future__ import annotations

import functools
import inspect
from types import ModuleType
from typing import Any

from .._env import Environment
from .._registry import AttributeSwaps, Patch, ProbeResult, native, needed, unsupported
from ..lora_targets import QWEN_LORA_TARGETS, check_target_modules, model_type_of
from ._common import code_mentions


def _checking_target_modules(get_peft_model: Any) -> Any:
    signature = inspect.signature(get_peft_model)

    @functools.wraps(get_peft_model)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        if model_type_of(model) in QWEN_LORA_TARGETS:
            bound = signature.bind_partial(model, *args, **kwargs)
            if "target_modules" in bound.arguments:
                check_target_modules(model, bound.arguments["target_modules"])
        return get_peft_model(model, *args, **kwargs)

    wrapper.__unsloth_qwen_compat__ = True  # type: ignore[attr-defined]
    return wrapper


class LoraTargetMaps(Patch):
    name = "lora_target_maps"
    summary = "LoRA target names for qwen2/qwen3/qwen3_moe; typos are errors"
    unsloth_module = "unsloth.models.llama"
    conformance_cases = ("test_lora_target_typo_is_rejected",)
    reproduction = """\
from unsloth import FastLanguageModel
model, _ = FastLanguageModel.from_pretrained("Qwen/Qwen3-0.6B", load_in_4bit=False)
model = FastLanguageModel.get_peft_model(model, r=8, target_modules=["q_proj", "v_prj"])
# Prints "You added custom modules" and trains q_proj alone: no error for "v_prj".
"""

    def probe(self, llama: ModuleType, env: Environment) -> ProbeResult:
        get_peft_model = getattr(getattr(llama, "FastLlamaModel", None), "get_peft_model", None)
        if get_peft_model is None:
            return unsupported("FastLlamaModel.get_peft_model not found: layout changed upstream")
        if "target_modules" not in inspect.signature(get_peft_model).parameters:
            return unsupported("FastLlamaModel.get_peft_model takes no target_modules argument")
        # Upstream's only reaction to an unknown name is this notice; PEFT then skips it.
        if code_mentions(get_peft_model, text=("You added custom modules",)):
            return needed("an unknown target_modules name is accepted with a notice and trains nothing")
        return native("get_peft_model no longer accepts unknown target_modules silently")

    def install(self, swaps: AttributeSwaps, llama: ModuleType, env: Environment) -> None:
        swaps.wrap_staticmethod(llama.FastLlamaModel, "get_peft_model", _checking_target_modules)
