"""Qwen2's biased q/k/v on Unsloth's fused LoRA QKV kernel (shim patch ``qwen2_fused_qkv_bias``).

Stock Unsloth installs its fused LoRA QKV kernel only on bias-free q/k/v, so every Qwen2
layer trains attention LoRA on PEFT's forward (a speed loss, not a wrong result). Each
case checks two things:

- engagement: every layer where stock fused the bias-free projections of the same layer
  (``apply_o``: proof that stock's dropout / LoRA-bias / dtype / FSDP conditions hold)
  runs q/k/v through a fused function too: upstream's ``apply_lora_qkv`` (a release that
  fuses biased q/k/v itself) or the shim's ``apply_lora_qkv_with_bias``. Stock fails this
  by design (``unfused_qkv_layers`` = number of layers), which is how the report shows
  stock vs shim. Where stock fuses nothing at all (2026.x keeps fp32 bases on PEFT's
  forward) there is nothing to engage and the case is skipped, saying so. With the shim's
  switch off (``UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS=0``; on by default, and tox and
  offline_legs.sh set it to 1) the count is a note, not a bound: PEFT's path is then chosen.
- numerics: the fused path computes what PEFT does. ``test_fused_qkv_vs_hf`` compares
  loss and every LoRA gradient with the HF + PEFT oracle (as test_lora.py does, same
  request) in ``CONFORMANCE_DTYPE``; ``test_fused_qkv_vs_hf_reduced`` does the same on a
  bf16 and an NF4 base against HF in fp32 on those weights, within 2.5x HF + PEFT's own
  error in bf16; ``test_fused_qkv_vs_peft_path`` trains the same
  Unsloth model with bf16 compute, unquantized and NF4 4-bit, once fused and once with
  q/k/v put back on PEFT's forward (stock's path for Qwen2), and compares the two.
"""

import contextlib

import pytest
import torch

from conformance import candidate, plan, tolerances, zoo

pytestmark = [pytest.mark.fused_qkv, pytest.mark.fast_llama_path]

QWEN2 = [spec for spec in zoo.ZOO if spec.family == "qwen2"]


def _llama():
    from unsloth.models import llama

    return llama


def _shim_function():
    try:
        from unsloth_qwen_compat.patches.qwen2_fused_qkv_bias import apply_lora_qkv_with_bias
    except ImportError:  # the shim is not installed: stock Unsloth
        return None
    return apply_lora_qkv_with_bias


def _attention_modules(model) -> list:
    return [layer.self_attn for layer in model.base_model.model.model.layers]


def _engagement(model) -> tuple[int, int, list[str]]:
    """(eligible layers, eligible layers whose q/k/v are not fused, their apply_qkv names)."""
    llama = _llama()
    fused = {f for f in (getattr(llama, "apply_lora_qkv", None), _shim_function()) if f is not None}
    apply_lora_o = getattr(llama, "apply_lora_o", None)
    eligible = [a for a in _attention_modules(model) if getattr(a, "apply_o", None) is apply_lora_o]
    unfused = [a for a in eligible if getattr(a, "apply_qkv", None) not in fused]
    names = [getattr(getattr(a, "apply_qkv", None), "__name__", "none") for a in unfused]
    return len(eligible), len(unfused), names


def _ledger_entry() -> str:
    status = candidate.shim_state().get("status")
    if not isinstance(status, dict):
        return "shim not installed"
    for entry in status.get("patches", []):
        if entry["name"] == "qwen2_fused_qkv_bias":
            return f"{entry['verdict']}/{entry['action']} ({entry.get('detail', '')})"
    return "no qwen2_fused_qkv_bias entry"


def _switched_off() -> bool:
    """The shim runs with its speed-only fused QKV switched off (``=0``; or, before it was on
    by default, left opt-in): q/k/v then stay on PEFT's forward by the user's choice, as on
    stock, and only the numbers are judged."""
    status = candidate.shim_state().get("status")
    if not candidate.shim_active() or not isinstance(status, dict):
        return False
    entry = next((e for e in status.get("patches", []) if e["name"] == "qwen2_fused_qkv_bias"), None)
    return entry is not None and entry.get("action") in ("switched off", "opt-in")


def _engagement_measurement(record, unfused: int) -> list[tuple]:
    """The engagement count as a bounded measurement, or (switched off) as a note."""
    if _switched_off():
        record.note("unfused_qkv_layers_switched_off", unfused)
        return []
    return [("unfused_qkv_layers", "unfused_qkv_layers", unfused)]


def _skip_in_cpu_fallback() -> None:
    if candidate.mode() == "cpu-fallback":
        pytest.skip("Unsloth runs its CPU fallback (stock transformers): no fused kernels to engage")


def _skip_unless_fused_kernels(model, spec, dtype) -> int:
    eligible, _, _ = _engagement(model)
    if eligible == 0:
        pytest.skip(
            f"{spec} {dtype}: stock Unsloth fuses no LoRA kernel for this model (2026.x keeps fp32 bases "
            "on PEFT's forward), so there is no fused path to engage; the bf16 / nf4 cases cover it"
        )
    return eligible


def _loss_and_grads(model, ids, autocast_dtype=None) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    # A bf16 base trains under autocast, as a Trainer with bf16=True runs it: Unsloth keeps
    # LoRA weights in fp32 on some releases (2025.10 in an fp32 process: without autocast
    # the PEFT path fails with "mat1 and mat2 ... float != BFloat16", stock and shim alike).
    autocast = (
        contextlib.nullcontext() if autocast_dtype is None else torch.autocast("cuda", dtype=autocast_dtype)
    )
    with autocast:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {candidate.layer_key(n): p.grad for n, p in model.named_parameters() if "lora_" in n}
    return loss.item(), grads


def _fused_vs_hf(spec, reference, record, dtype: str, base: str, autocast_dtype=None) -> None:
    """Train the candidate (``dtype``; ``base`` nf4: 4-bit) from ``reference``'s adapter and
    inputs, assert the fused path engaged, and judge loss and every LoRA gradient against it."""
    model, _ = candidate.load(spec, spec.max_position_embeddings, dtype, load_in_4bit=base == "nf4")
    model = candidate.attach_lora(model, plan.LORA_RANK, plan.LORA_ALPHA, plan.lora_targets(spec.family))
    eligible = _skip_unless_fused_kernels(model, spec, base)
    candidate.load_adapter_tensors(model, reference["adapter_dir"])
    candidate.training_mode(model)
    _, unfused, names = _engagement(model)
    ids = reference["input_ids"].to(candidate.device_of(model))
    loss, grads = _loss_and_grads(model, ids, autocast_dtype)
    missing = sorted(k for k, g in grads.items() if g is None)
    assert not missing, f"{spec}: LoRA parameters without gradient: {missing[:8]}"
    worst, *grad_error = tolerances.worst_against_truth(reference, "grads", grads, candidate.layer_key)
    del model, grads
    torch.cuda.empty_cache()
    tolerances.check(
        record,
        [
            *_engagement_measurement(record, unfused),
            ("loss_rel", "lora_loss_rel", *tolerances.scalar_against_truth(reference, "loss", loss)),
            ("max_grad_rel", "lora_grad_rel", *grad_error),
        ],
        dtype,
        detail=f"{spec} {base}: {unfused} of {eligible} layers keep q/k/v on {sorted(set(names))} (stock "
        f"fused their o_proj); worst gradient {worst}; shim {_ledger_entry()}",
    )


@pytest.mark.parametrize("spec", QWEN2, ids=str)
def test_fused_qkv_vs_hf(spec, settings, oracle, record):
    _skip_in_cpu_fallback()
    reference = oracle.get(plan.lora(spec, settings.dtype, settings.device))
    _fused_vs_hf(spec, reference, record, settings.dtype, settings.dtype)


@pytest.mark.parametrize("base", ["bf16", "nf4"])
@pytest.mark.parametrize("spec", QWEN2, ids=str)
def test_fused_qkv_vs_hf_reduced(spec, base, settings, oracle, record):
    """The fused kernel on a bf16 or NF4 base against HF + PEFT on the same base: loss and
    every LoRA gradient against HF in fp32 on the same (rounded / dequantized) weights, within
    2.5x HF + PEFT's own error in bf16 (under bf16 autocast, as a Trainer with bf16=True runs it)."""
    if not settings.on_gpu:
        pytest.skip("Unsloth's fused kernels (and bitsandbytes 4-bit) need a CUDA GPU; this run is on CPU")
    skip_modules = candidate.nf4_skip_modules()
    if base == "nf4" and skip_modules is None:
        pytest.skip("this unsloth_zoo has no SKIP_QUANTIZATION_MODULES: cannot mirror its 4-bit setup")
    reference = oracle.get(plan.lora_reduced(spec, base, settings.device, skip_modules))
    _fused_vs_hf(spec, reference, record, "bf16", base, torch.bfloat16)


@pytest.mark.parametrize("base", ["bf16", "nf4"])
@pytest.mark.parametrize("spec", QWEN2, ids=str)
def test_fused_qkv_vs_peft_path(spec, base, settings, oracle, record):
    if not settings.on_gpu:
        pytest.skip("Unsloth's fused kernels (and bitsandbytes 4-bit) need a CUDA GPU; this run is on CPU")
    # The oracle's adapter (non-zero B) and inputs; its fp32 numbers are not compared here.
    if _switched_off():
        pytest.skip(
            "the shim's fused QKV is switched off (UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS): no fused path to "
            "compare with PEFT's"
        )
    reference = oracle.get(plan.lora(spec, settings.dtype, settings.device))
    model, _ = candidate.load(spec, spec.max_position_embeddings, "bf16", load_in_4bit=base == "nf4")
    model = candidate.attach_lora(model, plan.LORA_RANK, plan.LORA_ALPHA, plan.lora_targets(spec.family))
    eligible = _skip_unless_fused_kernels(model, spec, base)
    candidate.load_adapter_tensors(model, reference["adapter_dir"])
    candidate.training_mode(model)
    _, unfused, names = _engagement(model)
    ids = reference["input_ids"].to(candidate.device_of(model))

    fused_loss, fused_grads = _loss_and_grads(model, ids, torch.bfloat16)
    fused_grads = {k: g.detach().clone() for k, g in fused_grads.items() if g is not None}
    # Stock's path for Qwen2: every layer's q/k/v through PEFT's own forward.
    attention = _attention_modules(model)
    installed = [a.apply_qkv for a in attention]
    for module in attention:
        module.apply_qkv = _llama().original_apply_qkv
    try:
        peft_loss, peft_grads = _loss_and_grads(model, ids, torch.bfloat16)
    finally:
        for module, function in zip(attention, installed):
            module.apply_qkv = function
    assert set(fused_grads) == {k for k, g in peft_grads.items() if g is not None}
    errors = {k: tolerances.rel_error(fused_grads[k], peft_grads[k]) for k in peft_grads}
    worst = max(errors, key=errors.get)
    tolerances.check(
        record,
        [
            ("unfused_qkv_layers", "unfused_qkv_layers", unfused),
            ("loss_rel_vs_peft_path", "lora_loss_rel", abs(fused_loss - peft_loss) / abs(peft_loss)),
            ("max_grad_rel_vs_peft_path", "lora_grad_rel", errors[worst]),
        ],
        "bf16",
        detail=f"{spec} {base}: {unfused} of {eligible} layers keep q/k/v on {sorted(set(names))}; worst "
        f"gradient {worst}; shim {_ledger_entry()}",
    )
    del model
    torch.cuda.empty_cache()
