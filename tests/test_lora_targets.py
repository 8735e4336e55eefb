"""Target-module checks on tiny Hugging Face Qwen models built in the test (CPU, no Unsloth)."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from unsloth_qwen_compat.lora_targets import (  # noqa: E402
    QWEN_LORA_TARGETS,
    UnknownTargetModuleError,
    available_targets,
    check_target_modules,
    default_targets,
)

from .conftest import REPO, requires_unsloth, run_python, tiny_qwen_config  # noqa: E402


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
    with pytest.raises(ValueError, match="covers qwen2, qwen3, qwen3_moe, qwen3_5"):
        default_targets("llama")


# -- the probe: what upstream's get_peft_model does with a typo, on stand-ins (no Unsloth) ----


def _stand_in_llama(get_peft_model):
    """A stand-in for unsloth.models.llama: the names the probe runs and swaps, nothing else."""
    from types import ModuleType

    module = ModuleType("stand_in_llama")

    class FastLlamaModel:
        pass

    class FastBaseModel:
        pass

    FastLlamaModel.get_peft_model = staticmethod(get_peft_model)
    FastBaseModel.get_peft_model = staticmethod(get_peft_model)
    module.FastLlamaModel = FastLlamaModel
    module.FastBaseModel = FastBaseModel
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
    # The stand-in classes live in this module: the probe runs FastBaseModel's there.
    monkeypatch.setattr(lora_target_maps, "defining_module", lambda module, owner: module)
    monkeypatch.setattr(lora_target_maps, "peft_drops_unmatched_names", lambda: False)
    for outcome, verdict in [("accepted", "needed"), ("rejected", "native"), ("unclear", "unsupported")]:
        monkeypatch.setattr(lora_target_maps, "typo_outcome", lambda _m, _owner="", o=outcome: (o, "why"))
        assert patch.probe(llama, None).verdict.value == verdict
    # One entry point accepting the typo is enough to need the patch; the reason names it.
    outcomes = {"FastLlamaModel": ("rejected", "ValueError: v_prj"), "FastBaseModel": ("accepted", "")}
    monkeypatch.setattr(lora_target_maps, "typo_outcome", lambda _m, owner: outcomes[owner])
    result = patch.probe(llama, None)
    assert result.verdict.value == "needed" and "through FastModel" in result.reason
    # An inconclusive run on code that still prints the old notice: needed, read from the code;
    # on FastModel's, what PEFT does with the list decides.
    monkeypatch.setattr(lora_target_maps, "typo_outcome", lambda _m, _owner="": ("unclear", "why"))
    result = patch.probe(_stand_in_llama(_stock_like), None)
    assert result.verdict.value == "needed" and "read from its code" in result.reason
    monkeypatch.setattr(lora_target_maps, "peft_drops_unmatched_names", lambda: True)
    result = patch.probe(llama, None)
    assert result.verdict.value == "needed" and "PEFT drops it" in result.reason


def test_peft_drops_a_name_that_matches_nothing_beside_one_that_matches() -> None:
    # What FastModel's get_peft_model hands its list to (PEFT 0.21.2 here): the defect is real.
    from unsloth_qwen_compat.patches.lora_target_maps import peft_drops_unmatched_names

    assert peft_drops_unmatched_names() is True


#: What each hybrid type's model offers, read from transformers' own modules.
HYBRID_NAMES = {
    "qwen3_5_text": {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "gate_proj"},
    "qwen3_5_moe_text": {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "gate_up_proj"},
    "qwen3_next": {"in_proj_qkvz", "in_proj_ba", "out_proj", "gate_up_proj"},
}


@pytest.mark.parametrize("model_type", sorted(HYBRID_NAMES))
def test_hybrid_models_offer_their_own_projection_names(model_type: str) -> None:
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the hybrid Qwen types' fused experts are transformers 5's")
    model = _model(model_type)
    names = available_targets(model)
    assert HYBRID_NAMES[model_type] | {"q_proj", "k_proj", "v_proj", "o_proj"} <= names
    assert "conv1d" not in names  # a 3-D Conv1d weight is not a fused expert
    defaults = list(default_targets(model_type))
    assert check_target_modules(model, defaults) == defaults
    with pytest.raises(UnknownTargetModuleError, match="in_proj_qkvx"):
        check_target_modules(model, ["q_proj", "in_proj_qkvx"])


def test_a_typo_in_a_path_is_an_error_even_with_a_valid_last_part() -> None:
    model = _model("qwen3_next")
    assert check_target_modules(model, ["shared_expert.gate_proj", "mlp.experts.gate_up_proj"])
    with pytest.raises(UnknownTargetModuleError, match="shared_expertt.gate_proj"):
        check_target_modules(model, ["shared_expertt.gate_proj"])


@requires_unsloth
def test_fastmodel_get_peft_model_rejects_a_typo_with_the_shim_only() -> None:
    """Unsloth's own FastModel.get_peft_model (its GPU code, UNSLOTH_ALLOW_CPU=1) on tiny models:
    stock trains q_proj alone for ["q_proj", "v_prj"]; the shim raises. Unsloth's post-PEFT
    patching needs a GPU trainer, so a CPU stand-in (returns the model) replaces that last step."""
    script = REPO / "tests" / "fastmodel_typo_child.py"
    results = {}
    for mode in ("stock", "shim"):
        done = run_python("", args=[str(script), mode], env={"UNSLOTH_ALLOW_CPU": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    for model_type in ("qwen3", *HYBRID_NAMES):
        assert results["stock"][model_type] == ["q_proj"], results["stock"]
        assert results["shim"][model_type].startswith("UnknownTargetModuleError"), results["shim"]
