"""4-bit: Unsloth load_in_4bit vs HF + bitsandbytes NF4, and 4-bit vs bf16 unquantized.

Both sides quantize with NF4, double quantization and bf16 compute, skipping the same
modules (Unsloth's SKIP_QUANTIZATION_MODULES: lm_head, MoE routers, ...). bitsandbytes
4-bit needs a CUDA GPU: on CPU these cases are skipped, never passed.
"""

import pytest
import torch

from conformance import candidate, plan, tolerances, zoo

pytestmark = pytest.mark.quant4

FUSED_EXPERT_TENSORS = ("experts.gate_up_proj", "experts.down_proj")


@pytest.mark.parametrize("spec", zoo.ZOO, ids=str)
def test_nf4_logits(spec, settings, oracle, candidates, record):
    if not settings.on_gpu:
        pytest.skip("bitsandbytes 4-bit needs a CUDA GPU; this run is on CPU")
    skip_modules = candidate.nf4_skip_modules()
    if skip_modules is None:
        pytest.skip("this unsloth_zoo has no SKIP_QUANTIZATION_MODULES: cannot mirror its 4-bit setup")
    nf4_reference, bf16_reference = oracle.fetch(plan.nf4(spec, skip_modules))
    model, _ = candidates.get(spec, spec.max_position_embeddings, "bf16", load_in_4bit=True)
    logits = candidate.forward_logits(model, nf4_reference["input_ids"])

    quantized = set(candidate.quantized_module_names(model))
    expected = {candidate.layer_key(n) for n in nf4_reference["quantized_modules"]}
    only_candidate, only_hf = quantized - expected, expected - quantized
    # Unsloth (2026.x on transformers 5) also packs fused MoE expert tensors to NF4;
    # bitsandbytes' HF path cannot (3-D parameters, not Linear layers) and keeps them bf16.
    # The reference then NF4-rounds the same tensors (plan.nf4's packed_tensors), so the
    # parity is checked against the 4-bit weights the candidate computes with, MoE included.
    fused_experts = sorted(candidate.layer_key(n) for n in only_candidate if n.endswith(FUSED_EXPERT_TENSORS))
    reference = nf4_reference
    if fused_experts:
        (reference,) = oracle.fetch(plan.nf4(spec, skip_modules, packed_tensors=fused_experts)[:1])
        assert torch.equal(reference["input_ids"], nf4_reference["input_ids"])
        record.note("expert_tensors_nf4_only_in_unsloth", len(fused_experts))
    # Against fp32 on the dequantized weights, within 2.5x HF NF4's own rounding error.
    measurements = [
        ("nf4_vs_hf_nf4", "nf4_vs_hf_nf4_rel", *tolerances.against_truth(reference, "logits", logits)),
        (
            "quantized_modules_mismatch",
            "quantized_modules_mismatch",
            len(only_hf) + len(only_candidate) - len(fused_experts),
        ),
    ]
    # The quantization error itself, for the record: 0.33-0.45 on the dense and MoE zoo models,
    # 0.60-0.81 on the hybrid ones (H200, every Unsloth run alike). It bounds nothing: the
    # parity above is 10x tighter and catches what a sanity bound on it would.
    record.note("nf4_vs_hf_bf16", tolerances.rel_error(logits, bf16_reference["logits"]))
    tolerances.check(
        record,
        measurements,
        "nf4",
        detail=f"{spec}: {plan.NF4_LEN} tokens; quantized only by candidate {sorted(only_candidate)[:4]}, "
        f"only by HF {sorted(only_hf)[:4]}",
    )
