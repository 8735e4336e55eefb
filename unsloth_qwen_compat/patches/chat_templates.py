"""Qwen2.5 ChatML and Qwen3 (thinking on / off) chat templates in Unsloth's registry.

``unsloth.chat_templates.get_chat_template(tokenizer, name)`` looks names up in
``CHAT_TEMPLATES``. The probe checks that the names Qwen users pass exist there; the
conformance suite checks their rendering against the templates Qwen publishes. This
release reports a missing template; registering one is not written yet.
"""

from __future__ import annotations

from .._env import Environment
from .._registry import Patch, ProbeResult, native, needed
from ._common import Unavailable, unsloth_module

#: Template names by family: any one present counts (Unsloth registers aliases).
REQUIRED_TEMPLATES = {
    "Qwen2.5": ("qwen-2.5", "qwen2.5", "qwen25"),
    "Qwen3": ("qwen-3", "qwen3"),
}


class ChatTemplates(Patch):
    name = "chat_templates"
    summary = "Qwen2.5 and Qwen3 chat templates registered"
    implemented = False

    def probe(self, env: Environment) -> ProbeResult:
        try:
            module = unsloth_module(env, "unsloth.chat_templates")
        except Unavailable as why:
            return why.result
        registry = getattr(module, "CHAT_TEMPLATES", None)
        if not isinstance(registry, dict):
            return needed("unsloth.chat_templates has no CHAT_TEMPLATES registry")
        missing = [
            family for family, names in REQUIRED_TEMPLATES.items() if not any(n in registry for n in names)
        ]
        if missing:
            return needed(f"no chat template registered for {', '.join(missing)}")
        qwen3 = next(registry[n] for n in REQUIRED_TEMPLATES["Qwen3"] if n in registry)
        if "enable_thinking" not in str(qwen3[0]):
            return needed("the Qwen3 template ignores enable_thinking (thinking on/off)")
        return native("Qwen2.5 and Qwen3 (enable_thinking) templates registered")
