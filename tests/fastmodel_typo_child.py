"""Child of tests/test_lora_targets.py: ``FastModel.get_peft_model(target_modules=["q_proj",
"v_prj"])`` on tiny Qwen models, stock (argv[1] == "stock") or with the shim; prints, per model
type, the adapted module names or the error. Needs UNSLOTH_ALLOW_CPU=1 (Unsloth's GPU code)."""

from __future__ import annotations

import importlib
import json
import os
import sys


def main(mode: str) -> None:
    if mode == "stock":
        os.environ["UNSLOTH_QWEN_COMPAT_DISABLE"] = "1"
    importlib.import_module("unsloth_qwen_compat")  # first, as in real use
    from transformers import AutoModelForCausalLM
    from unsloth import FastModel
    from unsloth.models.vision import FastBaseModel

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import tiny_qwen_config

    # CPU stand-in for Unsloth's last step (it patches the GPU trainer loop); the adapters are
    # placed before it, by Unsloth's real code.
    FastBaseModel.post_patch_model = staticmethod(lambda model, *args, **kwargs: model)

    out = {}
    for model_type in ("qwen3", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"):
        model = AutoModelForCausalLM.from_config(tiny_qwen_config(model_type))
        model.max_seq_length = 128
        try:
            peft_model = FastModel.get_peft_model(
                model, r=4, target_modules=["q_proj", "v_prj"], use_gradient_checkpointing=False
            )
            out[model_type] = sorted(
                {
                    n.split(".lora_")[0].rsplit(".", 1)[-1]
                    for n, _ in peft_model.named_parameters()
                    if "lora_" in n
                }
            )
        except Exception as error:  # noqa: BLE001 - reported to the parent
            out[model_type] = f"{type(error).__name__}: {error}"
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
