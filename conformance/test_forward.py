"""Forward parity: logits of 900 tokens vs HF on the same weights.

fp32: against HF fp32, fixed bound. bf16 / fp16: against HF fp32 on the same rounded
weights (the truth), within 2.5x HF's own error in that dtype (tolerances.rounding_bound).
"""

import pytest

from conformance import candidate, plan, tolerances, zoo

pytestmark = pytest.mark.forward


@pytest.mark.parametrize("spec", zoo.ZOO, ids=str)
def test_forward_logits(spec, settings, oracle, candidates, record):
    reference = oracle.get(plan.forward(spec, settings.dtype, settings.device))
    # max_seq_length = max_position_embeddings: the everyday setting (the RoPE cases vary it).
    # Unsloth's forward silently cuts inputs to max_seq_length, so the case feeds at most
    # that many tokens; the logits of a causal model's prefix are the reference's prefix.
    max_seq_length = spec.max_position_embeddings
    length = min(max_seq_length, plan.FORWARD_LEN)
    model, _ = candidates.get(spec, max_seq_length, settings.dtype)
    logits = candidate.forward_logits(model, reference["input_ids"][:, :length])
    prefix = {**reference, "logits": reference["logits"][:length]}
    if "truth" in reference:
        prefix["truth"] = {"logits": reference["truth"]["logits"][:length]}
    tolerances.check(
        record,
        [("logits_rel", "logits_rel", *tolerances.against_truth(prefix, "logits", logits))],
        settings.dtype,
        detail=f"{spec}: {length} tokens, max_seq_length {max_seq_length}",
    )
