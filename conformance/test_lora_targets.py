"""A ``target_modules`` name that matches nothing must fail loudly.

Stock Unsloth prints a notice for an unknown name and PEFT skips it, so
``["q_proj", "v_prj"]`` trains q_proj alone and nobody notices. With the shim the call
raises before touching the model, listing the names that exist.
"""

import pytest

from conformance import candidate, plan, tolerances, zoo

pytestmark = pytest.mark.lora_targets

TYPO = "v_prj"


@pytest.mark.parametrize("spec", [s for s in zoo.ZOO if s.rope == "plain"], ids=str)
def test_lora_target_typo_is_rejected(spec, settings, record):
    model, _ = candidate.load(spec, spec.max_position_embeddings, settings.dtype)
    try:
        candidate.attach_lora(model, plan.LORA_RANK, plan.LORA_ALPHA, ["q_proj", TYPO])
        error = None
    except Exception as raised:  # the shim raises a ValueError subclass
        error = raised
    tolerances.check(
        record,
        [("typo_accepted", "typo_accepted", int(error is None))],
        settings.dtype,
        detail=f"{spec}: target_modules ['q_proj', {TYPO!r}] was accepted",
    )
    message = str(error)
    assert TYPO in message and "q_proj" in message and "k_proj" in message, message
