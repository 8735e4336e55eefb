"""Qwen3 fast path for Unsloth releases that predate ``FastQwen3Model`` (before 2025.4.2).

Those releases send ``model_type == "qwen3"`` from ``FastLanguageModel.from_pretrained``
to the generic ``FastModel`` path (2025.3.10+) or raise NotImplementedError (older), and
``patch_peft_model`` rejects the type. Qwen3's decoder is Qwen2's (Llama's) except in
attention: an RMSNorm over each head of q and k before RoPE, no q/k/v bias, and an
explicit ``head_dim``. So the fast path here is Unsloth's own Llama code, called with the
per-head norms put where Qwen3 has them:

- training and prefill: ``Qwen3Attention.forward`` is Unsloth's ``LlamaAttention_fast_forward``
  with ``self.apply_qkv`` (the plain or fused-LoRA projection Unsloth installs per layer)
  wrapped to normalise each head of Q and K;
- KV-cache decoding: Unsloth's decode step for Llama, run with its ``fast_linear_forward``
  global bound to one that normalises the output of each Qwen3 ``q_proj`` / ``k_proj``;
- dispatch: ``FastLanguageModel.from_pretrained`` sends qwen3 configs to ``FastQwen3Model``
  (a ``FastLlamaModel`` with the Qwen3 classes patched, exactly as upstream does for
  Qwen2), and ``patch_peft_model`` treats qwen3 as the SwiGLU model it is.

As with every Unsloth model class, loading a model patches the transformers Qwen3
classes in place; ``revert()`` restores Unsloth's entry points, not classes a load has
already patched. 8-bit loading and full fine-tuning of Qwen3 stay on upstream's generic
path; vLLM fast inference of Qwen3, and Qwen3-MoE on such an Unsloth (no MoE support; its
generic path fails on current torch; through ``FastModel`` too), are refused with an
UnsupportedConfigurationError that says what to do instead.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
import weakref
from typing import Any

from .._env import Environment
from .._registry import (
    AttributeSwaps,
    Patch,
    ProbeResult,
    UnsupportedConfigurationError,
    import_unsloth,
    native,
    needed,
    unsupported,
)

#: Unsloth's Llama building blocks the Qwen3 path is made of; all are in 2024.x–2025.3.x.
_LLAMA_PARTS = (
    "FastLlamaModel",
    "LlamaAttention_fast_forward",
    "LlamaAttention_fast_forward_inference",
    "LlamaDecoderLayer_fast_forward",
    "LlamaModel_fast_forward",
    "LlamaModel_fast_forward_inference",
    "CausalLM_fast_forward",
    "PeftModelForCausalLM_fast_forward",
    "fix_prepare_inputs_for_generation",
    "fast_linear_forward",
    "original_apply_qkv",
    "LlamaRotaryEmbedding",
)

_SHIM_OWNED = "__unsloth_qwen_compat__"


def _norm_heads(norm: Any, states: Any, head_dim: int) -> Any:
    """Apply a per-head RMSNorm to ``(..., heads * head_dim)`` projections, shape kept."""
    shape = states.shape
    return norm(states.reshape(*shape[:-1], -1, head_dim)).reshape(shape)


def _with_qk_norm(apply_qkv: Any) -> Any:
    """Wrap one of Unsloth's ``apply_qkv(self, X) -> (Q, K, V)`` functions with Qwen3's q/k norms."""

    def apply_qkv_with_qk_norm(self: Any, X: Any) -> Any:
        Q, K, V = apply_qkv(self, X)
        return _norm_heads(self.q_norm, Q, self.head_dim), _norm_heads(self.k_norm, K, self.head_dim), V

    apply_qkv_with_qk_norm.wrapped = apply_qkv  # type: ignore[attr-defined]
    return apply_qkv_with_qk_norm


class _Qwen3Kernels:
    """Qwen3 versions of Unsloth's Llama forward functions, built from the installed ones."""

    def __init__(self, llama: types.ModuleType) -> None:
        self.llama = llama
        # q_proj / k_proj module -> (its norm, head_dim), filled as attention layers decode.
        self._decode_norms: weakref.WeakKeyDictionary[Any, tuple[Any, int]] = weakref.WeakKeyDictionary()
        decode_globals = dict(vars(llama))
        decode_globals["fast_linear_forward"] = self._linear_with_qk_norm(llama.fast_linear_forward)
        self._llama_attention_decode = _rebind(llama.LlamaAttention_fast_forward_inference, decode_globals)
        model_globals = dict(vars(llama))
        model_globals["LlamaAttention_fast_forward_inference"] = self.attention_decode
        self.model_decode = _rebind(llama.LlamaModel_fast_forward_inference, model_globals)

    def _linear_with_qk_norm(self, fast_linear_forward: Any) -> Any:
        norms = self._decode_norms

        def fast_linear_forward_with_qk_norm(proj: Any, X: Any, *args: Any, **kwargs: Any) -> Any:
            out = fast_linear_forward(proj, X, *args, **kwargs)
            entry = norms.get(proj)
            if entry is not None:
                # Write back into Unsloth's preallocated buffer: the decode step reuses it.
                out.copy_(_norm_heads(entry[0], out, entry[1]))
            return out

        return fast_linear_forward_with_qk_norm

    def attention_forward(self, attention: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        # Unsloth reassigns ``apply_qkv`` per layer (plain at load, fused LoRA after
        # get_peft_model): wrap whatever is there now, once.
        apply_qkv = getattr(attention, "apply_qkv", self.llama.original_apply_qkv)
        if not hasattr(apply_qkv, "wrapped"):
            attention.apply_qkv = _with_qk_norm(apply_qkv)
        return self.llama.LlamaAttention_fast_forward(attention, hidden_states, *args, **kwargs)

    def attention_decode(self, attention: Any, *args: Any, **kwargs: Any) -> Any:
        self._decode_norms[attention.q_proj] = (attention.q_norm, attention.head_dim)
        self._decode_norms[attention.k_proj] = (attention.k_norm, attention.head_dim)
        return self._llama_attention_decode(attention, *args, **kwargs)


def _rebind(function: Any, globals_: dict[str, Any]) -> Any:
    """``function`` with its module globals replaced (Unsloth's functions have no closures)."""
    clone = types.FunctionType(
        function.__code__, globals_, function.__name__, function.__defaults__, function.__closure__
    )
    clone.__kwdefaults__ = function.__kwdefaults__
    return functools.update_wrapper(clone, function)


def _fast_qwen3_model(llama: types.ModuleType) -> type:
    """A ``FastQwen3Model`` built like upstream's ``FastQwen2Model``, on the Qwen3 classes."""
    FastLlamaModel = llama.FastLlamaModel

    class FastQwen3Model(FastLlamaModel):  # type: ignore[misc, valid-type]
        """Qwen3 on Unsloth's Llama kernels, with per-head q/k RMSNorm (unsloth_qwen_compat)."""

        @staticmethod
        def pre_patch() -> None:
            from transformers.models.qwen3 import modeling_qwen3 as qwen3

            kernels = _Qwen3Kernels(llama)

            def forward(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
                return kernels.attention_forward(self, hidden_states, *args, **kwargs)

            qwen3.Qwen3Attention.forward = forward
            qwen3.Qwen3DecoderLayer.forward = llama.LlamaDecoderLayer_fast_forward
            qwen3.Qwen3Model.forward = llama.LlamaModel_fast_forward
            qwen3.Qwen3ForCausalLM.forward = llama.CausalLM_fast_forward(kernels.model_decode)
            llama.PeftModelForCausalLM.forward = llama.PeftModelForCausalLM_fast_forward
            llama.fix_prepare_inputs_for_generation(qwen3.Qwen3ForCausalLM)
            # Unsloth's rotary (cos/sin cache, extend_rope_embedding) in place of transformers',
            # as upstream does for Qwen2; rope_scaling's patch keeps the config's scaling on it.
            qwen3.Qwen3RotaryEmbedding = llama.LlamaRotaryEmbedding

        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            kwargs["model_patcher"] = FastQwen3Model
            # Looked up at call time, so other patches' wrappers of it apply.
            return llama.FastLlamaModel.from_pretrained(*args, **kwargs)

    setattr(FastQwen3Model, _SHIM_OWNED, True)
    return FastQwen3Model


def _resolve(bound: inspect.BoundArguments, loader: types.ModuleType) -> tuple[str | None, str, str | None]:
    """(model_type, base model name, adapter name or None) of a from_pretrained call.

    A LoRA adapter directory or repo is resolved to its base model, as upstream does.
    ``model_type`` is None where the name cannot be read: upstream's own errors apply.
    """
    from transformers import AutoConfig

    args = bound.arguments
    name = args["model_name"]
    if not args.get("use_exact_model_name", False) and hasattr(loader, "get_model_name"):
        name = loader.get_model_name(name, args.get("load_in_4bit", True))
    common = {"token": args.get("token"), "revision": args.get("revision")}
    adapter = None
    try:
        from peft import PeftConfig

        base = PeftConfig.from_pretrained(name, **common).base_model_name_or_path
        adapter, name = name, base
    except Exception:
        pass  # not an adapter: a base model (or nothing readable)
    try:
        config = AutoConfig.from_pretrained(
            name, trust_remote_code=args.get("trust_remote_code", False), **common
        )
    except Exception:
        return None, name, adapter
    return getattr(config, "model_type", None), name, adapter


def _refuse_qwen3_moe(model_type: str | None, loader: types.ModuleType) -> None:
    if model_type == "qwen3_moe" and not hasattr(loader, "FastQwen3MoeModel"):
        raise UnsupportedConfigurationError(
            "unsloth_qwen_compat: this Unsloth has no Qwen3-MoE support (its generic path is "
            "untested for Qwen3-MoE, and on torch >= 2.9 it fails while patching compiled "
            "autograd). Load Qwen3-MoE on the HF path (loader config use_unsloth: false), or "
            "use Unsloth 2025.10 or later."
        )


def _refusing_qwen3_moe(from_pretrained: Any, loader: types.ModuleType) -> Any:
    """FastModel's from_pretrained: the same Qwen3-MoE refusal as FastLanguageModel's, else upstream
    (its generic path is where FastLanguageModel would send Qwen3 anyway)."""
    signature = inspect.signature(from_pretrained)

    @functools.wraps(from_pretrained)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        _refuse_qwen3_moe(_resolve(bound, loader)[0], loader)
        return from_pretrained(*args, **kwargs)

    setattr(wrapper, _SHIM_OWNED, True)
    return wrapper


def _dispatching_qwen3(from_pretrained: Any, fast_qwen3: type, loader: types.ModuleType) -> Any:
    signature = inspect.signature(from_pretrained)

    @functools.wraps(from_pretrained)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        model_type, base_name, adapter = _resolve(bound, loader)
        _refuse_qwen3_moe(model_type, loader)
        if model_type != "qwen3" or a.get("load_in_8bit") or a.get("full_finetuning"):
            return from_pretrained(*args, **kwargs)
        if a.get("fast_inference"):
            raise UnsupportedConfigurationError(
                "unsloth_qwen_compat: this Unsloth has no vLLM fast inference for Qwen3; "
                "load with fast_inference=False, or upgrade Unsloth to 2025.4.2 or later."
            )
        extra = dict(a.get("kwargs") or {})
        model, tokenizer = fast_qwen3.from_pretrained(
            model_name=base_name,
            max_seq_length=a["max_seq_length"],
            dtype=loader._get_dtype(a["dtype"]),
            load_in_4bit=a["load_in_4bit"],
            token=a["token"],
            device_map=a["device_map"],
            rope_scaling=a["rope_scaling"],
            fix_tokenizer=a["fix_tokenizer"],
            tokenizer_name=_tokenizer_source(adapter),
            trust_remote_code=a["trust_remote_code"],
            revision=None if adapter else a.get("revision"),
            **extra,
        )
        # What FastLanguageModel.from_pretrained does after its own dispatch.
        if a.get("resize_model_vocab") is not None:
            model.resize_token_embeddings(a["resize_model_vocab"])
        for tagged in (model, tokenizer):
            if hasattr(tagged, "add_model_tags"):
                tagged.add_model_tags(["unsloth"])
        if a["load_in_4bit"]:
            _record_bnb_config(model)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(
                model, adapter, token=a["token"], revision=a.get("revision"), is_trainable=True
            )
            model = fast_qwen3.patch_peft_model(model, a.get("use_gradient_checkpointing", True))
        return model, tokenizer

    setattr(wrapper, _SHIM_OWNED, True)
    return wrapper


def _tokenizer_source(adapter: str | None) -> str | None:
    """The adapter directory when it carries its own tokenizer (upstream's rule), else the base's."""
    import os

    if adapter and all(
        os.path.exists(os.path.join(adapter, f))
        for f in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")
    ):
        return adapter
    return None


def _record_bnb_config(model: Any) -> None:
    """Write the 4-bit settings Unsloth loads with into the config, so saving works."""
    model.config.update(
        {
            "quantization_config": {
                "bnb_4bit_compute_dtype": model.config.to_dict()["torch_dtype"],
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": True,
                "llm_int8_enable_fp32_cpu_offload": False,
                "llm_int8_has_fp16_weight": False,
                "llm_int8_skip_modules": None,
                "llm_int8_threshold": 6.0,
                "load_in_4bit": True,
                "load_in_8bit": False,
                "quant_method": "bitsandbytes",
            }
        }
    )


def _peft_patching_qwen3(patch_peft_model: Any) -> Any:
    """Let ``patch_peft_model`` accept qwen3: it picks the MLP kernel by model_type, and
    Qwen3's MLP is the SwiGLU one it uses for qwen2."""

    @functools.wraps(patch_peft_model)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        config = model.config
        if getattr(config, "model_type", None) != "qwen3":
            return patch_peft_model(model, *args, **kwargs)
        had_own = "model_type" in vars(config)
        config.model_type = "qwen2"
        try:
            return patch_peft_model(model, *args, **kwargs)
        finally:
            if had_own:
                config.model_type = "qwen3"
            else:
                del config.model_type  # back to Qwen3Config's class attribute

    setattr(wrapper, _SHIM_OWNED, True)
    return wrapper


class Qwen3Registration(Patch):
    name = "qwen3_registration"
    summary = "Qwen3 fast path (FastQwen3Model and its dispatch)"
    unsloth_module = "unsloth.models"
    conformance_cases = (
        "test_forward_logits",
        "test_lora_gradients",
        "test_greedy_generate",
        "test_fast_path_taken",
    )
    reproduction = """\
from unsloth import FastLanguageModel  # Unsloth before 2025.4.2
model, _ = FastLanguageModel.from_pretrained("Qwen/Qwen3-0.6B", load_in_4bit=False)
print(type(model).forward.__qualname__)  # generic path, not Unsloth's fast Llama kernels
FastLanguageModel.get_peft_model(model, r=8)  # NotImplementedError: qwen3 is not yet implemented
"""

    def probe(self, models: types.ModuleType, env: Environment) -> ProbeResult:
        existing = getattr(models, "FastQwen3Model", None)
        if existing is not None and not getattr(existing, _SHIM_OWNED, False):
            loader = import_unsloth(env, "unsloth.models.loader")
            if getattr(loader, "FastQwen3Model", None) is None:
                return needed(
                    "FastQwen3Model exists but FastLanguageModel does not dispatch to it", fixable=False
                )
            return native("FastQwen3Model present and dispatched from FastLanguageModel.from_pretrained")
        try:
            importlib.import_module("transformers.models.qwen3.modeling_qwen3")
        except ImportError:
            return unsupported("this transformers has no Qwen3 (added in 4.51): nothing to register")
        llama = import_unsloth(env, "unsloth.models.llama")
        missing = [part for part in _LLAMA_PARTS if not hasattr(llama, part)]
        loader = import_unsloth(env, "unsloth.models.loader")
        if not hasattr(getattr(loader, "FastLanguageModel", None), "from_pretrained"):
            missing.append("loader.FastLanguageModel")
        if missing:
            return unsupported(f"unsloth.models has no FastQwen3Model and its layout changed: {missing}")
        return needed("unsloth.models has no FastQwen3Model: Qwen3 falls to the generic path or is rejected")

    def install(self, swaps: AttributeSwaps, models: types.ModuleType, env: Environment) -> None:
        llama = import_unsloth(env, "unsloth.models.llama")
        loader = import_unsloth(env, "unsloth.models.loader")
        fast_qwen3 = _fast_qwen3_model(llama)

        swaps.wrap_staticmethod(
            loader.FastLanguageModel, "from_pretrained", lambda f: _dispatching_qwen3(f, fast_qwen3, loader)
        )
        # FastModel (the generic path, from_pretrained of its own or FastBaseModel's) refuses
        # Qwen3-MoE the same way.
        fast_model = getattr(loader, "FastModel", None)
        owner = next((c for c in getattr(fast_model, "__mro__", ()) if "from_pretrained" in vars(c)), None)
        if owner is not None and owner is not loader.FastLanguageModel:
            swaps.wrap_staticmethod(owner, "from_pretrained", lambda f: _refusing_qwen3_moe(f, loader))
        swaps.wrap_staticmethod(llama.FastLlamaModel, "patch_peft_model", _peft_patching_qwen3)
        swaps.set_attr(models, "FastQwen3Model", fast_qwen3)
        swaps.set_attr(loader, "FastQwen3Model", fast_qwen3)
