"""Qwen3 fast path for Unsloth releases that predate ``FastQwen3Model`` (before 2025.4.2).

Those releases send ``model_type == "qwen3"`` to the generic path (2025.3.10+) or raise
NotImplementedError (older). The fix registers a Qwen3 model class (per-head RMSNorm on
q and k before RoPE, no qkv bias, explicit head_dim) and its dispatch. This release
probes for the defect; the registration itself is not written yet, so a needed verdict
is reported, never applied.
"""

from __future__ import annotations

from .._env import Environment
from .._registry import Patch, ProbeResult, native, needed
from ._common import Unavailable, unsloth_module


class Qwen3Registration(Patch):
    name = "qwen3_registration"
    summary = "Qwen3 fast path (FastQwen3Model and its dispatch)"
    implemented = False

    def probe(self, env: Environment) -> ProbeResult:
        try:
            models = unsloth_module(env, "unsloth.models")
        except Unavailable as why:
            return why.result
        if getattr(models, "FastQwen3Model", None) is None:
            return needed(
                "unsloth.models has no FastQwen3Model: Qwen3 falls to the generic path or is rejected"
            )
        loader = unsloth_module(env, "unsloth.models.loader")
        if getattr(loader, "FastQwen3Model", None) is None:
            return needed("FastQwen3Model exists but FastLanguageModel does not dispatch to it")
        return native("FastQwen3Model present and dispatched from FastLanguageModel.from_pretrained")
