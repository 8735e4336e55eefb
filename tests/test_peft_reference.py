"""The oracle's HF + PEFT reference puts LoRA where the target names say, also where PEFT 0.21's
transformers-v5 MoE conversion would move a shared-expert target to the routed experts
(conformance/peft_reference.py; huggingface/peft#3711). CPU, on the zoo's tiny Qwen3-Next."""

from __future__ import annotations

from pathlib import Path

import pytest

conversion = pytest.importorskip("peft.utils.transformers_weight_conversion")

from conformance import peft_reference, plan, zoo  # noqa: E402


def _lora_modules(model) -> set[str]:
    """LoRA-carrying modules of layer 0's MLP, relative to it (``shared_expert.up_proj``, ``experts``)."""
    return {
        name.split(".lora_")[0].split(".layers.0.mlp.", 1)[1].removesuffix(".base_layer")
        for name, _ in model.named_parameters()
        if "lora_" in name and ".layers.0.mlp." in name
    }


@pytest.fixture
def qwen3_next(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("CONFORMANCE_CACHE", str(tmp_path))
    spec = zoo.by_name("qwen3_next-plain")
    if not zoo.transformers_builds(spec):
        pytest.skip("this transformers has no qwen3_next")
    zoo.build(spec)
    from transformers import AutoModelForCausalLM

    # Restored after the test: the patch is meant for the oracle process only.
    monkeypatch.setattr(conversion, "_convert_peft_config_moe", conversion._convert_peft_config_moe)
    return lambda: AutoModelForCausalLM.from_pretrained(zoo.model_dir(spec))


def test_shared_expert_targets_stay_on_the_shared_expert(qwen3_next, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    targets = plan.lora_targets("qwen3_next")
    assert "shared_expert.down_proj" in targets

    def config():
        return LoraConfig(r=4, lora_alpha=8, target_modules=list(targets))

    stock = _lora_modules(get_peft_model(qwen3_next(), config()))
    if not any(name.startswith("experts") for name in stock):
        pytest.skip("this PEFT leaves shared-expert targets alone already")
    assert not any(name.startswith("shared_expert") for name in stock)  # the defect, as PEFT has it

    assert peft_reference.keep_module_targets()
    assert peft_reference.keep_module_targets()  # idempotent
    wanted = {f"shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    model = get_peft_model(qwen3_next(), config())
    assert _lora_modules(model) == wanted
    # A saved adapter (what Unsloth writes) reloads onto the same modules.
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(qwen3_next(), tmp_path / "adapter")
    assert _lora_modules(reloaded) == wanted
    # A bare name (no module path) still converts as PEFT intends.
    bare = get_peft_model(qwen3_next(), LoraConfig(r=4, target_modules=["down_proj"]))
    assert any(name.startswith("experts") for name in _lora_modules(bare))


#: What Unsloth 2026.10.9's FastLanguageModel.get_peft_model saved as ``target_modules`` for the
#: zoo's Qwen3-Next with plan.lora_targets (adapter_config.json from an H200 run): a regex.
UNSLOTH_REGEX = (
    r"(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mixer|mlp|feed_forward|ffn|dense|mixer).*?\."
    r"(?:q_proj|k_proj|v_proj|o_proj|in_proj_qkvz|in_proj_ba|out_proj|shared_expert\.gate_proj|"
    r"shared_expert\.up_proj|shared_expert\.down_proj))|(?:\bmodel\.layers\.[\d]{1,}(?!.*\.experts\.\d)\..*?"
    r"(?:self_attn|attention|attn|mixer|mlp|feed_forward|ffn|dense|mixer).*?\.(?:(?:q_proj|k_proj|v_proj|o_proj|"
    r"in_proj_qkvz|in_proj_ba|out_proj|shared_expert\.gate_proj|shared_expert\.up_proj|shared_expert\.down_proj)))"
)


def test_a_regex_target_stays_on_the_modules_it_matches(qwen3_next) -> None:
    """Unsloth's FastLanguageModel saves its targets as a regex; PEFT reduced it to leaf names
    and moved the shared expert's LoRA to the routed experts on reload (the Qwen3-Next adapter
    case then failed through FastLanguageModel only). Resolved to its modules, it stays."""
    from peft import LoraConfig, get_peft_model

    def lora(targets):
        return _lora_modules(get_peft_model(qwen3_next(), LoraConfig(r=4, target_modules=targets)))

    stock = lora(UNSLOTH_REGEX)
    if not any(name.startswith("experts") for name in stock):
        pytest.skip("this PEFT leaves a regex's shared-expert targets alone already")
    assert peft_reference.keep_module_targets()
    wanted = {f"shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert lora(UNSLOTH_REGEX) == wanted
    # The same modules as the list Unsloth's FastModel saves for the same request.
    assert lora(list(plan.lora_targets("qwen3_next"))) == wanted
    # A regex that names the routed experts still converts to them, as PEFT intends.
    assert any(
        name.startswith("experts") for name in lora(r".*\.mlp\.experts\.(gate_proj|up_proj|down_proj)")
    )


def test_a_regex_on_a_model_without_fused_experts_is_left_to_peft() -> None:
    """Nothing there for the conversion to move a target to: the regex stays PEFT's to match."""
    import torch

    model = torch.nn.Module()
    model.q_proj, model.gate_proj = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert peft_reference._regex_modules(r".*(q_proj|gate_proj)", model) is None
    model.experts = torch.nn.Module()
    model.experts.gate_up_proj = torch.nn.Parameter(torch.zeros(2, 4, 2))
    assert peft_reference._regex_modules(r"(q_proj|gate_proj)", model) == ["q_proj", "gate_proj"]
    assert peft_reference._regex_modules(r".*gate_proj", model) is None  # names the routed experts
