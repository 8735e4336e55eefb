"""LoRA parity: loss and every lora_A / lora_B gradient vs HF + PEFT at the same init.

The oracle builds PEFT LoRA (r=8, alpha=16, dropout 0, bias none) with random A and
non-zero B, saves the adapter, and computes loss and gradients. The candidate attaches
LoRA through FastLanguageModel.get_peft_model with the same settings and loads those
adapter tensors, so both start from identical weights.
"""

import pytest

from conformance import candidate, plan, tolerances, zoo

pytestmark = pytest.mark.lora


@pytest.mark.parametrize("spec", zoo.ZOO, ids=str)
def test_lora_gradients(spec, settings, oracle, record):
    reference = oracle.get(plan.lora(spec, settings.dtype, settings.device))
    model, _ = candidate.load(spec, spec.max_position_embeddings, settings.dtype)
    model = candidate.attach_lora(model, plan.LORA_RANK, plan.LORA_ALPHA, plan.lora_targets(spec.family))
    candidate.load_adapter_tensors(model, reference["adapter_dir"])
    candidate.training_mode(model)

    ids = reference["input_ids"].to(candidate.device_of(model))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()

    grads = {candidate.layer_key(n): p.grad for n, p in model.named_parameters() if "lora_" in n}
    missing = sorted(k for k, g in grads.items() if g is None)
    assert not missing, f"{spec}: LoRA parameters without gradient: {missing[:8]}"
    worst, *grad_error = tolerances.worst_against_truth(reference, "grads", grads, candidate.layer_key)
    base_with_grad = [n for n, p in model.named_parameters() if "lora_" not in n and p.grad is not None]

    tolerances.check(
        record,
        [
            ("loss_rel", "lora_loss_rel", *tolerances.scalar_against_truth(reference, "loss", loss.item())),
            ("max_grad_rel", "lora_grad_rel", *grad_error),
            ("base_weight_grads", "base_weight_grads", len(base_with_grad)),
        ],
        settings.dtype,
        detail=f"{spec}: worst gradient {worst}; {len(reference['grads'])} LoRA tensors on {plan.lora_targets(spec.family)}; "
        f"base weights with grad: {base_with_grad[:4]}",
    )
