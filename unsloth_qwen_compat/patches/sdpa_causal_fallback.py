"""Causal attention on Unsloth's SDPA fallback when neither xformers nor flash-attn is installed.

Unsloth's ``LlamaAttention_fast_forward`` (which Qwen2 and Qwen3 run) picks xformers or
flash-attn when the batch has no padding mask and relies on them for causality. Before
2025.10 its third branch, PyTorch SDPA, passes ``attn_mask=attention_mask`` with
``is_causal=False``. Without padding, transformers' mask helper returns ``None``, so that
branch attends to future tokens: every unpadded forward is wrong. That branch is the one
taken wherever neither is installed, e.g. on a torch for which no xformers build exists.
2025.10 passes ``is_causal=True`` there itself. How far off stock's logits are, and the
shim's with this patch, is measured by the conformance suite's forward cases on leg
2025.3 (CONFORMANCE.md; summary in the README's patch table).

The fix makes the SDPA call causal exactly where upstream's is missing it: Unsloth's Llama
module reads ``scaled_dot_product_attention`` as a global at call time, so the patch
swaps in a wrapper that sets ``is_causal=True`` for a call with no mask whose queries and
keys have the same length (a full-sequence forward: training or prefill). Decode steps
(one query against the cache), masked calls, and calls from a non-Qwen model's attention
(Llama and Mistral run the same function) are passed through unchanged.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType
from typing import Any

from .._env import Environment
from .._qwen import is_qwen
from .._registry import AttributeSwaps, Patch, ProbeResult, native, needed, unsupported
from ._common import code_mentions


def _called_by_qwen_attention() -> bool:
    """Whether the attention module calling SDPA is a Qwen model's. Unsloth's
    ``LlamaAttention_fast_forward`` calls it directly with the module as ``self``; a Llama or
    Mistral (which run the same function) keeps stock behaviour."""
    caller = sys._getframe(2)  # 0: here, 1: the SDPA wrapper, 2: the attention forward
    return is_qwen(getattr(caller.f_locals.get("self"), "config", None))


def causal_when_unmasked(sdpa: Any) -> Any:
    @functools.wraps(sdpa)
    def scaled_dot_product_attention(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        unmasked = kwargs.get("attn_mask") is None and not args
        full_sequence = query.shape[-2] == key.shape[-2] > 1
        if unmasked and not kwargs.get("is_causal", False) and full_sequence and _called_by_qwen_attention():
            kwargs["is_causal"] = True
        return sdpa(query, key, value, *args, **kwargs)

    scaled_dot_product_attention.__unsloth_qwen_compat__ = True  # type: ignore[attr-defined]
    return scaled_dot_product_attention


class SdpaCausalFallback(Patch):
    name = "sdpa_causal_fallback"
    summary = "causal mask on Unsloth's SDPA attention fallback (no xformers / flash-attn)"
    unsloth_module = "unsloth.models.llama"
    conformance_cases = ("test_forward_logits", "test_greedy_generate")
    reproduction = """\
# Unsloth 2025.3.x with neither xformers nor flash-attn installed (e.g. torch 2.11)
import torch
from unsloth import FastLanguageModel
model, _ = FastLanguageModel.from_pretrained("Qwen/Qwen2.5-0.5B", dtype=torch.bfloat16, load_in_4bit=False)
ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device="cuda")
full = model(input_ids=ids).logits[0, 3]
prefix = model(input_ids=ids[:, :4]).logits[0, 3]
print((full - prefix).abs().max())  # not ~0: position 3 attended to positions 4-7
"""

    def probe(self, llama: ModuleType, env: Environment) -> ProbeResult:
        forward = getattr(llama, "LlamaAttention_fast_forward", None)
        if forward is None or not hasattr(llama, "scaled_dot_product_attention"):
            return unsupported("LlamaAttention_fast_forward / scaled_dot_product_attention not found")
        code = getattr(getattr(forward, "__func__", forward), "__code__", None)
        if code is None:
            return unsupported("LlamaAttention_fast_forward is not a plain function: layout changed upstream")
        if "is_causal" in code.co_varnames:
            return native("LlamaAttention_fast_forward chooses is_causal itself")
        if not code_mentions(forward, names=("scaled_dot_product_attention",)):
            # 2026.x: attention goes through upstream's backend dispatch, which sets causality.
            return native("LlamaAttention_fast_forward delegates attention to a backend dispatch")
        if getattr(llama, "HAS_FLASH_ATTENTION", False) or getattr(llama, "HAS_XFORMERS", False):
            return native("xformers or flash-attn is installed and handles the unpadded case causally")
        return needed(
            "no xformers or flash-attn here, and Unsloth's SDPA fallback runs unpadded batches "
            "with is_causal=False: attention sees future tokens"
        )

    def install(self, swaps: AttributeSwaps, llama: ModuleType, env: Environment) -> None:
        swaps.set_attr(
            llama, "scaled_dot_product_attention", causal_when_unmasked(llama.scaled_dot_product_attention)
        )
