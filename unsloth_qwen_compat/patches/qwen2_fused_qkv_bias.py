"""Fused LoRA QKV for Qwen2 / Qwen2.5, whose q/k/v projections carry a bias.

Stock Unsloth engages its fused LoRA QKV kernel only when q/k/v have no bias, so every
Qwen2-family layer trains attention LoRA on the plain PEFT path (while its log counts
the layer as patched). This is a speed patch, not a correctness one. This release probes
for the gate; the bias-aware kernel is not written yet.
"""

from __future__ import annotations

from .._env import Environment
from .._registry import Patch, ProbeResult, native, needed, unsupported
from ._common import Unavailable, code_mentions, unsloth_module


class Qwen2FusedQkvBias(Patch):
    name = "qwen2_fused_qkv_bias"
    summary = "fused LoRA QKV kernel for Qwen2's biased q/k/v (speed)"
    implemented = False
    speed_only = True

    def probe(self, env: Environment) -> ProbeResult:
        try:
            llama = unsloth_module(env, "unsloth.models.llama")
        except Unavailable as why:
            return why.result
        patch_peft_model = getattr(getattr(llama, "FastLlamaModel", None), "patch_peft_model", None)
        if patch_peft_model is None:
            return unsupported("FastLlamaModel.patch_peft_model not found: layout changed upstream")
        # The fused QKV path is gated on the base q/k/v ``.bias`` (None for Llama, Qwen3).
        if code_mentions(patch_peft_model, names=("apply_lora_qkv", "bias")):
            return needed("fused LoRA QKV is gated on q/k/v having no bias, so Qwen2 never gets it")
        return native("the fused LoRA QKV path no longer requires bias-free q/k/v")
