"""4-bit: Unsloth load_in_4bit vs HF + bitsandbytes NF4, and 4-bit vs bf16 unquantized.

Both sides quantize with NF4, double quantization and bf16 compute, skipping the same
modules (Unsloth's SKIP_QUANTIZATION_MODULES: lm_head, MoE routers, ...). bitsandbytes
4-bit needs a CUDA GPU: on CPU these cases are skipped, never passed.
"""

import pytest

from conformance import candidate, plan, tolerances, zoo

pytestmark = pytest.mark.quant4


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
    tolerances.check(
        record,
        [
            ("nf4_vs_hf_nf4", "nf4_vs_hf_nf4_rel", tolerances.rel_error(logits, nf4_reference["logits"])),
            ("nf4_vs_hf_bf16", "nf4_vs_bf16_rel", tolerances.rel_error(logits, bf16_reference["logits"])),
            ("quantized_modules_mismatch", "quantized_modules_mismatch", len(quantized ^ expected)),
        ],
        "nf4",
        detail=f"{spec}: {plan.NF4_LEN} tokens; quantized only by candidate {sorted(quantized - expected)[:4]}, "
        f"only by HF {sorted(expected - quantized)[:4]}",
    )
