"""Qwen2.5 ChatML and Qwen3 (thinking on / off) chat templates in Unsloth's registry.

``unsloth.chat_templates.get_chat_template(tokenizer, name)`` looks names up in
``CHAT_TEMPLATES``. A family none of whose names is registered (Qwen3 before Unsloth
2025.4) gets the template Qwen publishes (``unsloth_qwen_compat/templates``, byte copies
of the checkpoints' ``chat_template``) under all of its names, as does a Qwen3 template
that ignores ``enable_thinking``. The probe checks presence
only: rendering a template means compiling it with Jinja, too slow for import time; the
conformance suite's chat-template case compares renderings with Qwen's templates.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from types import ModuleType
from typing import Any

from .._env import Environment
from .._registry import AttributeSwaps, Patch, ProbeResult, native, needed, unsupported

#: Family -> (published template file, the names Unsloth registers it under).
FAMILIES = {
    "Qwen2.5": ("qwen2_5.jinja", ("qwen-2.5", "qwen2.5", "qwen25", "qwen-25")),
    "Qwen3": ("qwen3.jinja", ("qwen-3", "qwen3")),
}
EOS = "<|im_end|>"


@cache
def published_template(family: str) -> str:
    return resources.files("unsloth_qwen_compat").joinpath("templates", FAMILIES[family][0]).read_text()


def missing_families(registry: dict[str, Any]) -> dict[str, str]:
    """Family -> what is wrong with its registration (absent, or Qwen3 without thinking)."""
    out = {}
    for family, (_, names) in FAMILIES.items():
        templates = [str(registry[name][0]) for name in names if name in registry]
        if not templates:
            out[family] = "not registered"
        elif family == "Qwen3" and not all("enable_thinking" in t for t in templates):
            out[family] = "ignores enable_thinking (thinking on/off)"
    return out


class ChatTemplates(Patch):
    name = "chat_templates"
    summary = "Qwen2.5 and Qwen3 (thinking on/off) chat templates registered"
    unsloth_module = "unsloth.chat_templates"
    conformance_cases = ("test_chat_template",)

    def probe(self, module: ModuleType, env: Environment) -> ProbeResult:
        registry = getattr(module, "CHAT_TEMPLATES", None)
        if not isinstance(registry, dict):
            return unsupported("unsloth.chat_templates has no CHAT_TEMPLATES registry")
        missing = missing_families(registry)
        if missing:
            return needed("; ".join(f"{family} template {why}" for family, why in missing.items()))
        return native("Qwen2.5 and Qwen3 (enable_thinking) templates registered")

    def install(self, swaps: AttributeSwaps, module: ModuleType, env: Environment) -> None:
        registry = module.CHAT_TEMPLATES
        system_messages = getattr(module, "DEFAULT_SYSTEM_MESSAGE", None)
        for family in missing_families(registry):
            # Entries are (template, stop word, map eos?, ollama modelfile) in every release
            # that has the registry; there is no ollama modelfile to offer.
            for name in FAMILIES[family][1]:
                swaps.set_item(registry, name, (published_template(family), EOS, False, ""))
                if isinstance(system_messages, dict):
                    # Qwen's templates carry their own default system prompt.
                    swaps.set_item(system_messages, name, None)
