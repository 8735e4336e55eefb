"""Reject ``target_modules`` names that match nothing in a Qwen model.

Stock ``get_peft_model`` only prints "Unsloth: You added custom modules" for a name it
does not know and lets PEFT skip it, so ``["q_proj", "v_prj"]`` trains q_proj alone.
The patch wraps ``FastLlamaModel.get_peft_model`` (which ``FastLanguageModel`` calls
through) and checks the names against the model first, for Qwen model types only.

The probe watches what upstream does with a typo: it runs the installed
``get_peft_model`` on a tiny Qwen2 built on the spot with ``["q_proj", "v_prj"]`` and
stops it where the names are handed to PEFT (``LoraConfig``). An error naming the typo
before that point is upstream's own check (``native``); reaching PEFT with the typo is the
defect (``needed``). Only when that run says neither (a release laid out otherwise) does
it fall back to reading upstream's code for the notice above.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import os
from types import ModuleType
from typing import Any

from .._env import Environment
from .._registry import AttributeSwaps, Patch, ProbeResult, native, needed, unsupported
from ..lora_targets import QWEN_LORA_TARGETS, check_target_modules, model_type_of
from ._common import code_mentions

#: The misspelt name the probe asks for (``v_proj`` is meant).
TYPO = "v_prj"


def _checking_target_modules(get_peft_model: Any) -> Any:
    signature = inspect.signature(get_peft_model)

    @functools.wraps(get_peft_model)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        if model_type_of(model) in QWEN_LORA_TARGETS:
            bound = signature.bind_partial(model, *args, **kwargs)
            if "target_modules" in bound.arguments:
                check_target_modules(model, bound.arguments["target_modules"])
        return get_peft_model(model, *args, **kwargs)

    wrapper.__unsloth_qwen_compat__ = True  # type: ignore[attr-defined]
    return wrapper


class _HandedToPeft(Exception):
    """Upstream's get_peft_model built a LoraConfig: it accepted these target_modules."""

    def __init__(self, target_modules: Any) -> None:
        super().__init__(target_modules)
        self.target_modules = target_modules


def _stop_at_peft(**arguments: Any) -> Any:
    raise _HandedToPeft(arguments.get("target_modules"))


def _tiny_qwen2() -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    )
    with torch.random.fork_rng(devices=[]):  # initialising weights must not move the caller's generator
        model = Qwen2ForCausalLM(config)
    model._saved_temp_tokenizer = None  # set by Unsloth's from_pretrained, read by get_peft_model
    return model


def typo_outcome(llama: ModuleType) -> tuple[str, str]:
    """What the installed ``FastLlamaModel.get_peft_model`` does with ``["q_proj", TYPO]``:
    ``("rejected", message)``, ``("accepted", "")`` or ``("unclear", why)``.

    Runs upstream's own code up to ``LoraConfig``, which is swapped for a stop (so PEFT never
    touches the model). Also swapped for the run: ``transformers_set_seed`` (it would reseed
    the caller's random generators); ``UNSLOTH_USE_NEW_MODEL`` is held at ``0`` (the last
    load's flag would route elsewhere), and what upstream prints is swallowed. Gradient
    checkpointing is left alone (``use_gradient_checkpointing=None`` patches nothing).
    """
    get_peft_model = llama.FastLlamaModel.get_peft_model
    stand_ins = {"LoraConfig": _stop_at_peft, "transformers_set_seed": lambda *a, **k: None}
    missing = [name for name in stand_ins if name not in vars(llama)]
    if missing:
        return "unclear", f"unsloth.models.llama has no {', '.join(missing)}"
    saved = {name: vars(llama)[name] for name in stand_ins}
    saved_flag = os.environ.get("UNSLOTH_USE_NEW_MODEL")
    try:
        model = _tiny_qwen2()
        for name, value in stand_ins.items():
            setattr(llama, name, value)
        os.environ["UNSLOTH_USE_NEW_MODEL"] = "0"
        with contextlib.redirect_stdout(io.StringIO()):
            get_peft_model(model, r=4, target_modules=["q_proj", TYPO], use_gradient_checkpointing=None)
    except _HandedToPeft as handed:
        targets = handed.target_modules
        if isinstance(targets, (list, tuple)) and TYPO in targets:
            return "accepted", ""
        return "unclear", f"LoraConfig got target_modules={targets!r}"
    except Exception as error:  # upstream's own reaction to the typo, or something else
        message = f"{type(error).__name__}: {error}"
        return ("rejected", message) if TYPO in str(error) else ("unclear", message[:300])
    else:
        return "unclear", "get_peft_model returned without building a LoraConfig"
    finally:
        for name, value in saved.items():
            setattr(llama, name, value)
        if saved_flag is None:
            os.environ.pop("UNSLOTH_USE_NEW_MODEL", None)
        else:
            os.environ["UNSLOTH_USE_NEW_MODEL"] = saved_flag


class LoraTargetMaps(Patch):
    name = "lora_target_maps"
    summary = "LoRA target names for qwen2/qwen3/qwen3_moe; typos are errors"
    unsloth_module = "unsloth.models.llama"
    conformance_cases = ("test_lora_target_typo_is_rejected",)
    reproduction = """\
from unsloth import FastLanguageModel
model, _ = FastLanguageModel.from_pretrained("Qwen/Qwen3-0.6B", load_in_4bit=False)
model = FastLanguageModel.get_peft_model(model, r=8, target_modules=["q_proj", "v_prj"])
# Prints "You added custom modules" and trains q_proj alone: no error for "v_prj".
"""

    def probe(self, llama: ModuleType, env: Environment) -> ProbeResult:
        get_peft_model = getattr(getattr(llama, "FastLlamaModel", None), "get_peft_model", None)
        if get_peft_model is None:
            return unsupported("FastLlamaModel.get_peft_model not found: layout changed upstream")
        if getattr(get_peft_model, "__unsloth_qwen_compat__", False):
            return needed("already patched in this process")
        if "target_modules" not in inspect.signature(get_peft_model).parameters:
            return unsupported("FastLlamaModel.get_peft_model takes no target_modules argument")
        outcome, detail = typo_outcome(llama)
        if outcome == "accepted":
            return needed("an unknown target_modules name is accepted with a notice and trains nothing")
        if outcome == "rejected":
            return native(
                f"get_peft_model rejects an unknown target_modules name ({detail.splitlines()[0][:120]})"
            )
        # The run said neither: read upstream's code for its only old reaction, the notice.
        if code_mentions(get_peft_model, text=("You added custom modules",)):
            return needed(
                "an unknown target_modules name is accepted with a notice and trains nothing "
                f"(read from its code; running it was inconclusive: {detail})"
            )
        return unsupported(f"cannot tell what get_peft_model does with a typo: {detail}")

    def install(self, swaps: AttributeSwaps, llama: ModuleType, env: Environment) -> None:
        swaps.wrap_staticmethod(llama.FastLlamaModel, "get_peft_model", _checking_target_modules)
