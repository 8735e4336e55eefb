"""The candidate: Unsloth through one of its entry points, with the shim applied first.

Unsloth documents two entry points: ``FastLanguageModel`` (text models; it hands every model
type without a fast path of its own to FastModel's loader) and ``FastModel`` (what its docs
name for MoE and Qwen3.5 models), whose ``get_peft_model`` / ``for_inference`` /
``for_training`` are other functions. Every case runs through each (``use_entry_point``, set
per case by conftest.py's ``entry_point`` fixture).

``import unsloth_qwen_compat`` must happen before Unsloth builds any model, and Unsloth
itself wants to be imported before transformers, so conftest.py imports this module
first. With ``UNSLOTH_QWEN_COMPAT_DISABLE=1`` the shim is imported but does nothing, and
the suite measures stock Unsloth. Without the shim package installed, the suite still
runs (stock Unsloth) and says so in the report.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

try:
    import unsloth_qwen_compat as shim
except ModuleNotFoundError as error:
    if error.name != "unsloth_qwen_compat":
        raise  # the shim is installed but broken: that must fail loudly, not test stock Unsloth
    shim = None

# Read as the shim reads it (1/true/yes/on ...), so the report says what the shim did.
SHIM_DISABLED = shim is not None and shim._disabled()

import torch  # noqa: E402
import unsloth  # noqa: E402,F401  (after the shim, before transformers)
from unsloth import FastLanguageModel, FastModel  # noqa: E402

from conformance import decode, zoo  # noqa: E402
from conformance.quantized import layer_path, quantized_names  # noqa: E402
from conformance.zoo import ModelSpec  # noqa: E402


def _exact_fp32_linear_attention() -> str:
    """fp32 runs compute the hybrid models' linear attention in fp32, as the rest of the suite.

    Unsloth's vendored flash-linear-attention (injected as ``fla`` on import, on a GPU) asks for
    TF32 explicitly in the triangular solve of its chunked gated-delta-rule forward on Ampere
    and newer (``SOLVE_TRIL_DOT_PRECISION``), which ``TRITON_F32_DEFAULT=ieee`` does not reach:
    on an H200 the fp32 forward of the tiny Qwen3.5 left HF fp32 by 3.39e-5 (bound 1e-5). It is
    a precision choice of fla's (HF with fla installed makes the same), not a Qwen defect of
    Unsloth's, so the suite sets it to IEEE fp32 as it does torch's and Triton's TF32. Set once
    here, before any kernel compiles: Triton refuses a global changed after a kernel used it.
    Returns what the report records: ``ieee`` (set), or why not (left as fla has it)."""
    if os.environ.get("CONFORMANCE_DTYPE", "fp32").lower() != "fp32":
        return "left: not an fp32 run"
    module = sys.modules.get("fla.ops.gated_delta_rule.chunk_fwd")
    if module is None or not hasattr(module, "SOLVE_TRIL_DOT_PRECISION"):
        return "left: no flash-linear-attention loaded"
    import triton.language as tl

    module.SOLVE_TRIL_DOT_PRECISION = tl.constexpr("ieee")
    return "ieee"


#: What the suite did to fla's explicit TF32 solve in this process (recorded in each report).
LINEAR_ATTENTION_SOLVE = _exact_fp32_linear_attention()

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Unsloth's entry points by name, the first the default.
ENTRY_POINTS = {"FastLanguageModel": FastLanguageModel, "FastModel": FastModel}
_entry_point = "FastLanguageModel"


def use_entry_point(name: str) -> None:
    """Load, attach LoRA and switch modes through ``name`` (a key of ENTRY_POINTS) from now on."""
    global _entry_point
    if name not in ENTRY_POINTS:
        raise ValueError(f"unknown Unsloth entry point {name!r}; expected one of {', '.join(ENTRY_POINTS)}")
    _entry_point = name


def entry_point_name() -> str:
    return _entry_point


def entry_point():
    """The Unsloth class the cases go through now."""
    return ENTRY_POINTS[_entry_point]


#: Run on every model the candidate loads, and on every model it attaches LoRA to. Empty but
#: for a mutation run: conformance/mutations.py puts deliberate defects here.
AFTER_LOAD: list = []
AFTER_LORA: list = []


def _loaded(pair):
    for hook in AFTER_LOAD:
        hook(pair[0])
    return pair


def mode() -> str:
    """'gpu' for Unsloth's real code path, 'cpu-fallback' where it runs stock HF code."""
    return "cpu-fallback" if getattr(unsloth, "DEVICE_TYPE", None) == "cpu" else "gpu"


def _jsonable(value):
    for attribute in ("to_dict", "as_dict"):
        if callable(getattr(value, attribute, None)):
            value = getattr(value, attribute)()
            break
    return json.loads(json.dumps(value, default=str))


def shim_state() -> dict:
    """What the report says about the shim: installed, enabled, and its own verdicts."""
    state = {"installed": shim is not None, "enabled": shim is not None and not SHIM_DISABLED}
    if shim is None:
        state["note"] = "unsloth_qwen_compat is not installed: candidate is stock Unsloth"
        return state
    for name in ("status", "environment"):
        function = getattr(shim, name, None)
        if not callable(function):
            state[name] = f"unsloth_qwen_compat.{name}() not available"
            continue
        try:
            state[name] = _jsonable(function())
        except Exception as error:  # the report must still be written
            state[name] = f"{name}() raised {type(error).__name__}: {error}"
    return state


def nf4_skip_modules() -> list[str] | None:
    """Modules Unsloth keeps out of 4-bit quantization (the oracle must skip the same)."""
    try:
        from unsloth_zoo.peft_utils import SKIP_QUANTIZATION_MODULES
    except ImportError:
        return None
    return list(SKIP_QUANTIZATION_MODULES)


def load(
    spec: ModelSpec, max_seq_length: int, dtype: str, load_in_4bit: bool = False, path: Path | None = None
):
    """``from_pretrained`` of the entry point on a zoo model (or an adapter directory).

    Where the shim refuses the configuration (it cannot be trained right on this Unsloth),
    the case ends as ``refused`` with the shim's message: neither a pass nor a silent skip.
    """
    try:
        return _loaded(
            entry_point().from_pretrained(
                model_name=str(path or zoo.model_dir(spec)),
                max_seq_length=max_seq_length,
                dtype=TORCH_DTYPES["bf16" if load_in_4bit else dtype],
                load_in_4bit=load_in_4bit,
            )
        )
    except Exception as error:
        refused = refusal(error)
        if refused is not None:
            import pytest

            from conformance import refusals

            refusals.check(spec.family, str(error))  # an undeclared refusal fails the case
            pytest.xfail(refused)
        raise


#: Prefix of the xfail reason of a case whose configuration the shim refused.
REFUSED = "refused by unsloth_qwen_compat"
#: The same for a refusal Unsloth raised itself (a release that refuses natively, shim off).
REFUSED_BY_UNSLOTH = "refused by Unsloth"


def _raised_by_unsloth(error: BaseException) -> bool:
    """The innermost frame of the traceback is Unsloth's own code."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    root = str(Path(unsloth.__file__).resolve().parent)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(root)


def refusal(error: BaseException) -> str | None:
    """The xfail reason when ``error`` is a refusal, else None: the shim's
    ``UnsupportedConfigurationError``, or, with the shim off, a ``NotImplementedError`` raised
    by Unsloth's own code (how a release that fixes a defect upstream refuses what it cannot
    train right). The contract checks each one (refusals.py, the RoPE grid's facts)."""
    shim_refusal = getattr(shim, "UnsupportedConfigurationError", None)
    if shim_refusal is not None and isinstance(error, shim_refusal):
        return f"{REFUSED}: {error}"
    if not shim_active() and isinstance(error, NotImplementedError) and _raised_by_unsloth(error):
        return f"{REFUSED_BY_UNSLOTH}: {error}"
    return None


def load_or_refusal(spec: ModelSpec, max_seq_length: int, dtype: str):
    """(model, tokenizer, None), or (None, None, the refusal: see :func:`refusal`)."""
    try:
        model, tokenizer = _loaded(
            entry_point().from_pretrained(
                model_name=str(zoo.model_dir(spec)),
                max_seq_length=max_seq_length,
                dtype=TORCH_DTYPES[dtype],
                load_in_4bit=False,
            )
        )
    except Exception as error:
        refused = refusal(error)
        if refused is not None:
            return None, None, refused
        raise
    return model, tokenizer, None


def shim_active() -> bool:
    """The shim is installed and enabled in this process (the candidate is not stock Unsloth)."""
    return shim is not None and not SHIM_DISABLED


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def forward_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of one sequence (positions x vocab), with no KV cache involved."""
    # Unsloth's generate (2025.x) ends by switching the model to training mode, so a cached
    # model may come back in it: every forward states the mode it is measured in.
    inference_mode(model)
    with torch.no_grad():
        out = model(input_ids=input_ids.to(device_of(model)), use_cache=False)
    return out.logits[0]


def layer_key(parameter_name: str) -> str:
    """A LoRA parameter name reduced to ``layers.N.<path>.lora_X.weight``.

    Wrappers differ in prefix (PeftModel / base_model / model) and the live name carries the
    adapter name (``.default``) that a saved adapter drops; the layer path is what must match.
    """
    return layer_path(parameter_name.replace(".default", ""))


def load_adapter_tensors(model, adapter_dir: str) -> int:
    """Copy a saved PEFT adapter into ``model``'s LoRA parameters, by layer path.

    Every LoRA parameter of the candidate must be found in the file and every tensor of the
    file must be used: a mismatch means the candidate put adapters on other modules than
    PEFT did, which the gradient comparison could otherwise only half see.
    """
    from safetensors.torch import load_file

    saved = {
        layer_key(k): v for k, v in load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items()
    }
    used, missing = set(), []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" not in name:
                continue
            key = layer_key(name)
            if key not in saved:
                missing.append(key)
                continue
            param.copy_(saved[key].to(device=param.device, dtype=param.dtype))
            used.add(key)
    unused = sorted(set(saved) - used)
    if missing or unused:
        raise AssertionError(
            f"LoRA placement differs from PEFT's: candidate-only {sorted(missing)[:8]}, reference-only {unused[:8]}"
        )
    return len(used)


def attach_lora(model, r: int, alpha: int, targets: list[str]):
    model = entry_point().get_peft_model(
        model,
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(targets),
        use_gradient_checkpointing="unsloth",
        random_state=3407,
    )
    for hook in AFTER_LORA:
        hook(model)
    return model


class ModelCache:
    """Candidate models loaded once per (entry point, model, max_seq_length, dtype, 4-bit) for
    read-only cases.

    Cases that mutate a model (LoRA, adapters) load their own.
    """

    def __init__(self) -> None:
        self._models: dict[tuple, tuple] = {}

    def get(self, spec: ModelSpec, max_seq_length: int, dtype: str, load_in_4bit: bool = False):
        key = (_entry_point, spec.name, max_seq_length, dtype, load_in_4bit)
        if key not in self._models:
            model, tokenizer = load(spec, max_seq_length, dtype, load_in_4bit)
            entry_point().for_inference(model)
            self._models[key] = (model, tokenizer)
        return self._models[key]


def inference_mode(model):
    entry_point().for_inference(model)
    return model


def training_mode(model):
    entry_point().for_training(model)
    return model


def greedy(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    new_tokens: int,
    pad_id: int,
    use_cache: bool,
) -> torch.Tensor:
    """Greedy continuation (new tokens only), exactly ``new_tokens`` long (no early EOS)."""
    out = decode.greedy_generate(model, input_ids, attention_mask, new_tokens, pad_id, use_cache=use_cache)
    sequences = out.sequences if hasattr(out, "sequences") else out
    return sequences[:, input_ids.shape[1] :].cpu()


def quantized_module_names(model) -> list[str]:
    """Layer paths of the weights stored in 4 bits (prefix-free, see layer_key)."""
    return sorted(layer_key(name) for name in quantized_names(model))
