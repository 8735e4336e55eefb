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


# -- the probe: what upstream's get_peft_model does with a typo, on stand-ins (no Unsloth) ----


def _stand_in_llama(get_peft_model):
    """A stand-in for unsloth.models.llama: the names the probe runs and swaps, nothing else."""
    from types import ModuleType

    module = ModuleType("stand_in_llama")

    class FastLlamaModel:
        pass

    FastLlamaModel.get_peft_model = staticmethod(get_peft_model)
    module.FastLlamaModel = FastLlamaModel
    module.LoraConfig = "stock LoraConfig"
    module.transformers_set_seed = "stock set_seed"
    return module


def _stock_like(model, r=16, target_modules=None, use_gradient_checkpointing="unsloth", **kwargs):
    import sys

    llama = sys.modules["stand_in_llama_current"]
    llama.transformers_set_seed(3407)
    print("Unsloth: You added custom modules, but Unsloth hasn't optimized for this.")
    return llama.LoraConfig(r=r, target_modules=list(target_modules))


def _fixed_like(model, r=16, target_modules=None, use_gradient_checkpointing="unsloth", **kwargs):
    from unsloth_qwen_compat.lora_targets import check_target_modules

    check_target_modules(model, target_modules)  # raises naming the typo
    raise AssertionError("not reached")


@pytest.mark.parametrize(
    ("function", "outcome"),
    [(_stock_like, "accepted"), (_fixed_like, "rejected"), (lambda model, **kwargs: model, "unclear")],
)
def test_probe_runs_upstream_up_to_peft_and_restores_everything(
    function, outcome, monkeypatch, capsys
) -> None:
    import os
    import sys

    from unsloth_qwen_compat.patches.lora_target_maps import TYPO, typo_outcome

    llama = _stand_in_llama(function)
    monkeypatch.setitem(sys.modules, "stand_in_llama_current", llama)
    monkeypatch.setenv("UNSLOTH_USE_NEW_MODEL", "1")  # the last load's flag: held at 0 for the run
    seen = []
    llama.FastLlamaModel.get_peft_model = staticmethod(
        lambda *a, **k: (seen.append(os.environ["UNSLOTH_USE_NEW_MODEL"]), function(*a, **k))[1]
    )
    got, detail = typo_outcome(llama)
    assert got == outcome, detail
    assert seen == ["0"] and os.environ["UNSLOTH_USE_NEW_MODEL"] == "1"
    assert (llama.LoraConfig, llama.transformers_set_seed) == ("stock LoraConfig", "stock set_seed")
    assert capsys.readouterr().out == ""  # upstream's notice does not reach the caller's stdout
    if outcome == "rejected":
        assert TYPO in detail


def test_probe_verdicts_from_the_run_and_the_fallback(monkeypatch) -> None:
    from unsloth_qwen_compat.patches import lora_target_maps

    patch = lora_target_maps.LoraTargetMaps()
    llama = _stand_in_llama(_fixed_like)
    for outcome, verdict in [("accepted", "needed"), ("rejected", "native"), ("unclear", "unsupported")]:
        monkeypatch.setattr(lora_target_maps, "typo_outcome", lambda _llama, o=outcome: (o, "why"))
        assert patch.probe(llama, None).verdict.value == verdict
    # An inconclusive run on code that still prints the old notice: needed, read from the code.
    monkeypatch.setattr(lora_target_maps, "typo_outcome", lambda _llama: ("unclear", "why"))
    result = patch.probe(_stand_in_llama(_stock_like), None)
    assert result.verdict.value == "needed" and "read from its code" in result.reason
