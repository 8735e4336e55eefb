"""Deliberately broken patches, to show the suite catches a wrong fix.

Load with ``-p conformance.mutations`` and pick one with ``CONFORMANCE_MUTATION``:

- ``rope-base-1pct``: the RoPE patch builds Qwen models past max_position_embeddings with
  rope_theta 1% too large.
- ``rope-linear-factor``: a linear scaling is built with its factor 25% too large.
- ``rope-dynamic-static``: dynamic NTK past max_position_embeddings is trained with its init
  table instead of refused.
- ``rope-yarn-linear``: YaRN past max_position_embeddings becomes linear scaling (stock
  Unsloth 2026.10.9's rule).
- ``qkv-bias-dropped``: Qwen2's q/k/v projections compute without their biases.
- ``non-causal``: attention over more than one query ignores causality and masks (every
  scaled_dot_product_attention the candidate process reaches; stock Unsloth 2025.3's defect).
- ``lora-scale-x2``: every LoRA layer scales its update by 2 x alpha / r.
- ``qk-norm-skipped``: Qwen3's per-head q/k RMSNorm is skipped (module and Unsloth's kernels).
- ``decode-mask-dropped``: decode steps (one new token on a KV cache) run without the
  attention mask, so left padding is attended to.

Every case that goes through the mutated code must fail; the rest must still pass. The
mutations act in the candidate's process only (hooks in candidate.py, or functions the
candidate's code reaches): the HF reference runs in its own process and is never mutated.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

MUTATION = os.environ.get("CONFORMANCE_MUTATION", "")


def _mutate_plan(change: Callable[[Any, Any], Any]) -> None:
    """Wrap the plan the RoPE patch follows (looked up in its module at every load)."""
    from unsloth_qwen_compat.patches import rope_scaling

    honest = rope_scaling.plan_rope

    def plan_rope(config: Any, max_seq_length: int) -> Any:
        return change(config, honest(config, max_seq_length))

    rope_scaling.plan_rope = plan_rope


def _with_scaling(plan: Any, **changes: Any) -> Any:
    return dataclasses.replace(plan, scaling={**plan.scaling, **changes})


def _rope_base_off_by_one_percent() -> None:
    def change(config: Any, plan: Any) -> Any:
        if plan.scaling is None or plan.max_seq_length <= plan.max_position_embeddings:
            return plan
        return _with_scaling(plan, rope_theta=plan.scaling["rope_theta"] * 1.01)

    _mutate_plan(change)


def _linear_factor_off() -> None:
    def change(config: Any, plan: Any) -> Any:
        if plan.scaling is None or plan.scaling.get("rope_type") != "linear":
            return plan
        return _with_scaling(plan, factor=plan.scaling["factor"] * 1.25)

    _mutate_plan(change)


def _dynamic_trained_static() -> None:
    from unsloth_qwen_compat.rope_contract import SAME, rope_scaling_of, rope_theta_of

    def change(config: Any, plan: Any) -> Any:
        if plan.rope_type != "dynamic" or plan.outcome != "refused":
            return plan
        scaling = {**rope_scaling_of(config), "rope_theta": rope_theta_of(config)}
        return dataclasses.replace(plan, outcome=SAME, scaling=scaling, reason="mutated: kept")

    _mutate_plan(change)


def _yarn_becomes_linear() -> None:
    def change(config: Any, plan: Any) -> Any:
        if plan.rope_type != "yarn" or plan.max_seq_length <= plan.max_position_embeddings:
            return plan
        factor = plan.max_seq_length / plan.max_position_embeddings
        scaling = {"rope_type": "linear", "factor": factor, "rope_theta": plan.scaling["rope_theta"]}
        return dataclasses.replace(plan, scaling=scaling)

    _mutate_plan(change)


def _drop_qkv_bias() -> None:
    import torch

    from conformance import candidate

    def hook(model) -> None:
        with torch.no_grad():
            for name, module in model.named_modules():
                if (
                    name.endswith(("q_proj", "k_proj", "v_proj"))
                    and getattr(module, "bias", None) is not None
                ):
                    module.bias.zero_()

    candidate.AFTER_LOAD.append(hook)


def _non_causal() -> None:
    import sys

    import torch.nn.functional as F

    honest = F.scaled_dot_product_attention

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        if query.shape[-2] > 1:  # prefill / training: every query sees every key
            attn_mask, is_causal = None, False
        return honest(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    # Unsloth binds the function under its own names (e.g. ``_torch_sdpa``) at import.
    for module in list(sys.modules.values()):
        for attribute, value in list(getattr(module, "__dict__", {}).items()):
            if value is honest:
                setattr(module, attribute, scaled_dot_product_attention)


def _lora_scale_doubled() -> None:
    from conformance import candidate

    def hook(model) -> None:
        for module in model.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict):
                for adapter in scaling:
                    scaling[adapter] *= 2

    candidate.AFTER_LORA.append(hook)


def _qk_norm_skipped() -> None:
    import functools
    import sys

    from conformance import candidate

    def hook(model) -> None:
        for name, module in model.named_modules():
            if name.endswith(("q_norm", "k_norm")):
                module._conformance_skipped = True
                module.forward = lambda hidden_states, *a, **k: hidden_states

    def skipping(function):
        @functools.wraps(function)
        def wrapper(layernorm, X, *args, **kwargs):
            if getattr(layernorm, "_conformance_skipped", False):
                return X
            return function(layernorm, X, *args, **kwargs)

        return wrapper

    # Unsloth's attention calls its RMSNorm kernels with the norm module, bypassing forward.
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("unsloth"):
            continue
        for attribute, value in list(getattr(module, "__dict__", {}).items()):
            if callable(value) and attribute.startswith("fast_rms_layernorm"):
                setattr(module, attribute, skipping(value))
    candidate.AFTER_LOAD.append(hook)


def _decode_mask_dropped() -> None:
    import functools

    import torch

    from conformance import candidate

    def hook(model) -> None:
        honest = model.forward

        @functools.wraps(honest)
        def forward(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            if (
                ids is not None
                and ids.shape[1] == 1
                and mask is not None
                and kwargs.get("past_key_values") is not None
            ):
                kwargs["attention_mask"] = torch.ones_like(mask)
            return honest(*args, **kwargs)

        model.forward = forward

    candidate.AFTER_LOAD.append(hook)


MUTATIONS = {
    "rope-base-1pct": _rope_base_off_by_one_percent,
    "rope-linear-factor": _linear_factor_off,
    "rope-dynamic-static": _dynamic_trained_static,
    "rope-yarn-linear": _yarn_becomes_linear,
    "qkv-bias-dropped": _drop_qkv_bias,
    "non-causal": _non_causal,
    "lora-scale-x2": _lora_scale_doubled,
    "qk-norm-skipped": _qk_norm_skipped,
    "decode-mask-dropped": _decode_mask_dropped,
}


def pytest_configure(config) -> None:
    if not MUTATION:
        return
    if MUTATION not in MUTATIONS:
        raise ValueError(f"CONFORMANCE_MUTATION={MUTATION!r}; known: {', '.join(MUTATIONS)}")
    MUTATIONS[MUTATION]()
    config._conformance_mutation = MUTATION


def pytest_report_header(config) -> str:
    return f"conformance mutation: {MUTATION or 'none'}"
