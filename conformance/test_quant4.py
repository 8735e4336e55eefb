"""4-bit: Unsloth load_in_4bit vs HF + bitsandbytes NF4, and 4-bit vs bf16 unquantized.

Both sides quantize with NF4, double quantization and bf16 compute, skipping the same
modules (Unsloth's SKIP_QUANTIZATION_MODULES: lm_head, MoE routers, ...). bitsandbytes
4-bit needs a CUDA GPU: on CPU these cases are skipped, never passed.
"""

import pytest

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
    # The two 4-bit models then differ by design: NF4-vs-NF4 parity applies only when both
    # quantized the same weights, and the case checks that the difference is exactly that.
    fused_experts = {n for n in only_candidate if n.endswith(FUSED_EXPERT_TENSORS)}
    measurements = [
        ("nf4_vs_hf_bf16", "nf4_vs_bf16_rel", tolerances.rel_error(logits, bf16_reference["logits"])),
        (
            "quantized_modules_mismatch",
            "quantized_modules_mismatch",
            len(only_hf) + len(only_candidate - fused_experts),
        ),
    ]
    if not fused_experts:
        # Against fp32 on the dequantized weights, within 2.5x HF NF4's own rounding error.
        nf4_rel = tolerances.against_truth(nf4_reference, "logits", logits)
        measurements.insert(0, ("nf4_vs_hf_nf4", "nf4_vs_hf_nf4_rel", *nf4_rel))
    else:
        # nf4_vs_hf_nf4 is not comparable here; report how many tensors differ instead.
        record.note("expert_tensors_nf4_only_in_unsloth", len(fused_experts))
    tolerances.check(
        record,
        measurements,
        "nf4",
        detail=f"{spec}: {plan.NF4_LEN} tokens; quantized only by candidate {sorted(only_candidate)[:4]}, "
        f"only by HF {sorted(only_hf)[:4]}",
    )
