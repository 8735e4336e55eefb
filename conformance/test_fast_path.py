"""Qwen2 and Qwen3 must load onto Unsloth's fast Llama kernels, not its generic path.

Unsloth before 2025.4.2 has no ``FastQwen3Model``: ``FastLanguageModel.from_pretrained``
sends Qwen3 to its generic path (compiled transformers code, none of the fast kernels)
and ``get_peft_model`` then rejects the type. The numerics cases cannot see this, since
the generic path is right, just not fast; this case checks the dispatch itself: the
causal-LM forward is Unsloth's fast one, and ``get_peft_model`` accepts LoRA on all
seven projections. (Whether the fused LoRA kernels engage depends on the dtype: 2026.x
leaves float32 bases on PEFT's forward, so that is not asserted here.)
"""

import pytest

from conformance import candidate, plan, tolerances, zoo

pytestmark = [pytest.mark.fast_path, pytest.mark.fast_llama_path]

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    "spec", [s for s in zoo.ZOO if s.rope == "plain" and s.family in ("qwen2", "qwen3")], ids=str
)
def test_fast_path_taken(spec, settings, record):
    model, _ = candidate.load(spec, spec.max_position_embeddings, settings.dtype)
    forward = getattr(type(model).forward, "__qualname__", repr(type(model).forward))
    generic = int("CausalLM_fast_forward" not in forward)
    tolerances.check(
        record,
        [("generic_path", "generic_path", generic)],
        settings.dtype,
        detail=f"{spec}: {type(model).__name__}.forward is {forward}",
    )
    model = candidate.attach_lora(model, plan.LORA_RANK, plan.LORA_ALPHA, ALL_PROJECTIONS)
    assert sum("lora_A" in name for name, _ in model.named_parameters()) > 0
