"""Reject ``target_modules`` names that match nothing in a Qwen model, on both entry points.

Stock ``get_peft_model`` only prints "Unsloth: You added custom modules" for a name it
does not know and lets PEFT skip it, so ``["q_proj", "v_prj"]`` trains q_proj alone.
``FastModel.get_peft_model`` (the entry point Unsloth documents for MoE and Qwen3.5 models,
and the generic path ``FastLanguageModel`` sends every type without a fast path to) hands
an explicit list to PEFT as it is, and PEFT drops a name that matches nothing as long as
another name matches. The patch wraps ``FastLlamaModel.get_peft_model`` (which
``FastLanguageModel`` calls through) and ``FastBaseModel.get_peft_model`` (which
``FastModel`` calls through) and checks the names against the model first, for Qwen model
types only: the fast-path ones and the hybrids (Qwen3.5, Qwen3.5-MoE, Qwen3-Next), whose
valid names are read from the model.

The probe watches what upstream does with a typo: it runs each installed
``get_peft_model`` on a tiny Qwen2 built on the spot with ``["q_proj", "v_prj"]`` and
stops it where the names are handed to PEFT (``LoraConfig``). An error naming the typo
before that point is upstream's own check (``native``); reaching PEFT with the typo is the
defect (``needed``). Only when that run says neither (a release laid out otherwise) does
it fall back to reading upstream's code for the notice above (FastLanguageModel) or to what
PEFT itself does with the list (FastModel).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import io
import os
import types
import warnings
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


def _with_signature_of(original: Any, stop: Any) -> Any:
    """``stop`` wearing ``original``'s signature: FastBaseModel passes LoraConfig only the
    arguments its signature names."""
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):
        return stop

    def stop_here(**arguments: Any) -> Any:
        return stop(**arguments)

    stop_here.__signature__ = signature  # type: ignore[attr-defined]
    return stop_here


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
    model.max_seq_length = 64  # likewise (FastBaseModel's get_peft_model reads it)
    return model


def peft_drops_unmatched_names() -> bool:
    """Whether PEFT, given ``["q_proj", TYPO]`` on a module with a ``q_proj`` Linear only,
    silently adapts q_proj alone (a two-layer toy module: milliseconds, no side effect)."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    toy = torch.nn.Module()
    toy.q_proj = torch.nn.Linear(4, 4)
    toy.k_proj = torch.nn.Linear(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj", TYPO]), toy)
        except Exception:  # noqa: BLE001 - a PEFT that rejects the name is what we want to see
            return False
    return any("lora_" in name for name, _ in toy.named_parameters())


def typo_outcome(module: ModuleType, owner: str = "FastLlamaModel") -> tuple[str, str]:
    """What the installed ``<owner>.get_peft_model`` does with ``["q_proj", TYPO]``:
    ``("rejected", message)``, ``("accepted", "")`` or ``("unclear", why)``. ``owner`` is
    ``FastLlamaModel`` (FastLanguageModel's, in ``unsloth.models.llama``) or ``FastBaseModel``
    (FastModel's, in ``unsloth.models.vision``); ``module`` is the one that defines it.

    Runs upstream's own code up to ``LoraConfig``, which is swapped for a stop (so PEFT never
    touches the model). Also swapped for the run: ``transformers_set_seed`` (it would reseed
    the caller's random generators) and, where the module has it, ``gc`` (FastBaseModel's
    three ``gc.collect()`` calls took 0.73 s of ``import unsloth_qwen_compat``, with nothing
    of the probe's to free); ``UNSLOTH_USE_NEW_MODEL`` is held at ``0`` (the last
    load's flag would route elsewhere), and what upstream prints is swallowed. Gradient
    checkpointing is left alone (``use_gradient_checkpointing=None`` patches nothing).
    """
    get_peft_model = getattr(module, owner).get_peft_model
    stand_ins = {"LoraConfig": _stop_at_peft, "transformers_set_seed": lambda *a, **k: None}
    missing = [name for name in stand_ins if name not in vars(module)]
    if missing:
        return "unclear", f"{module.__name__} has no {', '.join(missing)}"
    if "gc" in vars(module):
        stand_ins["gc"] = types.SimpleNamespace(collect=lambda *args, **kwargs: 0)
    saved = {name: vars(module)[name] for name in stand_ins}
    stand_ins["LoraConfig"] = _with_signature_of(saved["LoraConfig"], _stop_at_peft)
    saved_flag = os.environ.get("UNSLOTH_USE_NEW_MODEL")
    try:
        model = _tiny_qwen2()
        for name, value in stand_ins.items():
            setattr(module, name, value)
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
            setattr(module, name, value)
        if saved_flag is None:
            os.environ.pop("UNSLOTH_USE_NEW_MODEL", None)
        else:
            os.environ["UNSLOTH_USE_NEW_MODEL"] = saved_flag


def defining_module(llama: ModuleType, owner: str) -> ModuleType:
    """The module that defines ``owner`` (where its ``LoraConfig`` is looked up): llama itself
    for FastLlamaModel, ``unsloth.models.vision`` for FastBaseModel."""
    return llama if owner == "FastLlamaModel" else importlib.import_module(getattr(llama, owner).__module__)


class LoraTargetMaps(Patch):
    name = "lora_target_maps"
    summary = "LoRA target names for the Qwen types (hybrids included); typos are errors on both entry points"
    unsloth_module = "unsloth.models.llama"
    conformance_cases = ("test_lora_target_typo_is_rejected",)
    reproduction = """\
from unsloth import FastLanguageModel
model, _ = FastLanguageModel.from_pretrained("Qwen/Qwen3-0.6B", load_in_4bit=False)
model = FastLanguageModel.get_peft_model(model, r=8, target_modules=["q_proj", "v_prj"])
# Prints "You added custom modules" and trains q_proj alone: no error for "v_prj".
from unsloth import FastModel
model, _ = FastModel.from_pretrained("Qwen/Qwen3-0.6B", load_in_4bit=False)
model = FastModel.get_peft_model(model, r=8, target_modules=["q_proj", "v_prj"])
# Says nothing and trains q_proj alone.
"""

    def probe(self, llama: ModuleType, env: Environment) -> ProbeResult:
        entries = {"FastLanguageModel": "FastLlamaModel", "FastModel": "FastBaseModel"}
        findings: dict[str, tuple[str, str]] = {}
        for entry, owner in entries.items():
            get_peft_model = getattr(getattr(llama, owner, None), "get_peft_model", None)
            if get_peft_model is None:
                return unsupported(f"{owner}.get_peft_model not found: layout changed upstream")
            if getattr(get_peft_model, "__unsloth_qwen_compat__", False):
                return needed("already patched in this process")
            if "target_modules" not in inspect.signature(get_peft_model).parameters:
                return unsupported(f"{owner}.get_peft_model takes no target_modules argument")
            outcome, detail = typo_outcome(defining_module(llama, owner), owner)
            if outcome == "unclear":  # the run said neither: what is known of the old reactions
                if owner == "FastLlamaModel" and code_mentions(
                    get_peft_model, text=("You added custom modules",)
                ):
                    outcome, detail = "accepted", f"read from its code; running it was inconclusive: {detail}"
                elif owner == "FastBaseModel" and peft_drops_unmatched_names():
                    outcome, detail = "accepted", f"PEFT drops it; running it was inconclusive: {detail}"
            findings[entry] = (outcome, detail)
        accepted = [
            f"{entry} ({detail})" if detail else entry
            for entry, (o, detail) in findings.items()
            if o == "accepted"
        ]
        if accepted:
            return needed(
                "an unknown target_modules name is accepted and trains nothing through " + ", ".join(accepted)
            )
        if all(outcome == "rejected" for outcome, _ in findings.values()):
            first = next(iter(findings.values()))[1].splitlines()[0][:120]
            return native(
                f"get_peft_model rejects an unknown target_modules name on both entry points ({first})"
            )
        unclear = "; ".join(f"{entry}: {detail}" for entry, (o, detail) in findings.items() if o == "unclear")
        return unsupported(f"cannot tell what get_peft_model does with a typo: {unclear}")

    def install(self, swaps: AttributeSwaps, llama: ModuleType, env: Environment) -> None:
        for owner in (llama.FastLlamaModel, llama.FastBaseModel):
            swaps.wrap_staticmethod(owner, "get_peft_model", _checking_target_modules)
