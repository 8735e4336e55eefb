"""Forward parity: logits of 900 tokens vs HF on the same weights."""

import pytest

from conformance import candidate, plan, tolerances, zoo

pytestmark = pytest.mark.forward


@pytest.mark.parametrize("spec", zoo.ZOO, ids=str)
def test_forward_logits(spec, settings, oracle, candidates, record):
    reference = oracle.get(plan.forward(spec, settings.dtype, settings.device))
    # max_seq_length = max_position_embeddings: the everyday setting (the RoPE cases vary it).
    model, _ = candidates.get(spec, spec.max_position_embeddings, settings.dtype)
    logits = candidate.forward_logits(model, reference["input_ids"])
    tolerances.check(
        record,
        [("logits_rel", "logits_rel", tolerances.rel_error(logits, reference["logits"]))],
        settings.dtype,
        detail=f"{spec}: {plan.FORWARD_LEN} tokens, max_seq_length {spec.max_position_embeddings}",
    )
