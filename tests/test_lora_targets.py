"""Target-module checks on tiny Hugging Face Qwen models built in the test (CPU, no Unsloth)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from unsloth_qwen_compat.lora_targets import (  # noqa: E402
    QWEN_LORA_TARGETS,
    UnknownTargetModuleError,
    available_targets,
    check_target_modules,
    default_targets,
)

from .conftest import tiny_qwen_config  # noqa: E402


def _model(model_type: str):
    return transformers.AutoModelForCausalLM.from_config(tiny_qwen_config(model_type))


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_dense_models_offer_all_seven_projections(model_type: str) -> None:
    model = _model(model_type)
    assert set(QWEN_LORA_TARGETS[model_type]) <= available_targets(model)
    assert check_target_modules(model, list(default_targets(model_type))) == list(default_targets(model_type))


def test_moe_experts_are_targetable_by_name() -> None:
    model = _model("qwen3_moe")
    names = available_targets(model)
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= names
    # transformers 4: experts are a ModuleList of Linears; 5: fused 3-D parameters.
    assert {"gate_proj", "up_proj", "down_proj"} <= names or {"gate_up_proj", "down_proj"} <= names


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "qwen3_moe"])
def test_a_typo_is_an_error_listing_valid_names(model_type: str) -> None:
    model = _model(model_type)
    with pytest.raises(UnknownTargetModuleError) as error:
        check_target_modules(model, ["q_proj", "v_prj"])
    message = str(error.value)
    assert "v_prj" in message and "q_proj" in message and "Valid names" in message


def test_regex_strings_and_none_pass_through() -> None:
    model = _model("qwen3")
    assert check_target_modules(model, "all-linear") == "all-linear"
    assert check_target_modules(model, None) is None


def test_unknown_model_type_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="covers qwen2, qwen3, qwen3_moe"):
        default_targets("llama")
