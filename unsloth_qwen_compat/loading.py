"""Load a Qwen model for training on the Hugging Face path or the Unsloth path, from one config.

A training repo switches paths with one flag (``model.use_unsloth`` or
``model.framework: hf|unsloth``) and changes nothing else:

- :func:`load_base_model` loads the checkpoint with the same bitsandbytes settings on both
  paths (one :class:`~transformers.BitsAndBytesConfig`, built here, is handed to both),
  ``max_seq_length = data.max_length`` on Unsloth, and the exact checkpoint named (Unsloth
  would otherwise swap ``Qwen/Qwen3-8B`` for its own pre-quantized ``unsloth/...-bnb-4bit``);
- :func:`attach_lora` gives both paths the same r, alpha, dropout, bias, target modules
  and seed, and says when a setting sends Unsloth to its slow path;
- :func:`generation_mode` and :func:`generate_replies` switch to inference with the KV
  cache for generation inside ``compute_loss`` and always put training mode, gradient
  checkpointing and ``use_cache`` back (a model left in eval mode skips checkpointing and
  the next step takes several times the memory);
- :func:`adapter_disabled` and :func:`reference_logits` give GRPO its frozen reference
  model without a second copy of the weights.

The config is a plain mapping shaped like the training YAML. The ``model`` and ``lora``
sections belong to this loader and every key in them is checked (an unknown key or a
wrong type is an error naming the key); of ``data`` only ``max_length`` is read, and the
other sections are left to the training repo.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import os
import sys
import types
import typing
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, Union

from . import _env, environment
from .lora_targets import available_targets, check_target_modules, default_targets

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Framework = Literal["hf", "unsloth"]
HF: Framework = "hf"
UNSLOTH: Framework = "unsloth"

DTYPES = ("bfloat16", "float16", "float32")

#: Modules both paths keep out of 4-bit quantization. Stated explicitly so the two paths
#: cannot differ by their defaults; the MoE router (``mlp.gate``) is skipped as Unsloth does.
SKIP_QUANTIZATION = {"default": ("lm_head",), "qwen3_moe": ("lm_head", "mlp.gate")}

# Where the loader records what it did, on the model (visible through PEFT's wrappers).
_LOAD_INFO_ATTRIBUTE = "_unsloth_qwen_compat_load"


class ConfigError(ValueError):
    """The config has unknown keys, wrong types or conflicting settings; ``problems`` lists them."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class UnslothUnavailableError(RuntimeError):
    """``model.use_unsloth`` is set but Unsloth cannot train in this process."""


class LoaderWarning(UserWarning):
    """The loader did something other than asked (fell back to HF) or slower than it could."""


# --------------------------------------------------------------------------------------
# The config schema
# --------------------------------------------------------------------------------------


def _choices(*values: str) -> dict[str, tuple[str, ...]]:
    return {"choices": values}


@dataclass(frozen=True)
class ModelSection:
    """``model:``. ``name`` is required by :func:`load_base_model`."""

    name: str | None = None
    #: Either flag picks the path; both unset means the HF path. Setting both to
    #: different paths is an error.
    use_unsloth: bool | None = None
    framework: str | None = field(default=None, metadata=_choices(HF, UNSLOTH))
    #: With Unsloth requested but unusable here (no GPU, not installed, import failed):
    #: warn and load on the HF path instead of raising.
    allow_hf_fallback: bool = False
    load_in_4bit: bool = True
    bnb_4bit_quant_type: str = field(default="nf4", metadata=_choices("nf4", "fp4"))
    bnb_4bit_use_double_quant: bool = True
    #: None: the same as ``dtype``.
    bnb_4bit_compute_dtype: str | None = field(default=None, metadata=_choices(*DTYPES))
    #: ``auto``: bfloat16 on a GPU that has it, else float16; float32 on CPU.
    dtype: str = field(default="auto", metadata=_choices("auto", *DTYPES))
    #: HF path only: Unsloth picks its own attention kernels.
    attn_implementation: str = "sdpa"
    #: On: non-reentrant checkpointing on the HF path, Unsloth's ("unsloth") on Unsloth.
    gradient_checkpointing: bool = True
    #: Unsloth path only, with checkpointing on: keep the checkpointed activations in host
    #: memory (Unsloth's "unsloth" mode: least GPU memory) or, off, on the GPU (plain
    #: checkpointing: no host copies, more GPU memory; same losses, measured).
    offload_checkpoints: bool = True
    trust_remote_code: bool = False
    revision: str | None = None
    #: Unsloth path only: the class that loads, attaches LoRA and switches modes. Unsloth
    #: documents FastModel for MoE and Qwen3.5 models; FastLanguageModel hands every type it
    #: has no fast path for (Qwen3-MoE, the hybrids) to FastModel's loader anyway.
    unsloth_entry_point: str = field(
        default="FastLanguageModel", metadata=_choices("FastLanguageModel", "FastModel")
    )


@dataclass(frozen=True)
class DataSection:
    """``data:``; only ``max_length`` is the loader's (Unsloth's ``max_seq_length``)."""

    max_length: int | None = None


@dataclass(frozen=True)
class LoraSection:
    """``lora:``, handed unchanged to PEFT's LoraConfig or Unsloth's get_peft_model."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    bias: str = field(default="none", metadata=_choices("none", "all", "lora_only"))
    #: None: every projection the model type offers (see ``lora_targets.default_targets``).
    target_modules: list[str] | None = None
    use_rslora: bool = False
    #: Seeds the adapter's initialisation on both paths.
    seed: int = 3407


#: Sections whose every key is checked; ``data`` is shared with the training repo.
_STRICT_SECTIONS = {"model": ModelSection, "lora": LoraSection}
_SECTIONS = {**_STRICT_SECTIONS, "data": DataSection}


@dataclass(frozen=True)
class LoaderConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)

    @property
    def requested_framework(self) -> Framework:
        """The path the config asks for (before any fallback)."""
        if self.model.use_unsloth is not None:
            return UNSLOTH if self.model.use_unsloth else HF
        return UNSLOTH if self.model.framework == UNSLOTH else HF

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> LoaderConfig:
        """Parse and check a training-YAML-shaped mapping; raise :class:`ConfigError` listing every problem."""
        if not isinstance(config, Mapping):
            raise ConfigError([f"config: expected a mapping of sections, got {type(config).__name__}"])
        problems: list[str] = []
        for key in config:
            close = difflib.get_close_matches(str(key), list(_SECTIONS), n=1, cutoff=0.75)
            if key not in _SECTIONS and close and close[0] not in config:
                problems.append(f"{key}: unknown section; did you mean {close[0]}?")
        sections: dict[str, Any] = {}
        for name, section_cls in _SECTIONS.items():
            raw = config.get(name)
            if raw is None:
                sections[name] = section_cls()
            elif not isinstance(raw, Mapping):
                problems.append(f"{name}: expected a mapping, got {type(raw).__name__}")
                sections[name] = section_cls()
            else:
                sections[name] = _parse_section(name, section_cls, raw, problems)
        model: ModelSection = sections["model"]
        if model.use_unsloth is not None and model.framework is not None:
            if (model.use_unsloth and model.framework != UNSLOTH) or (
                not model.use_unsloth and model.framework == UNSLOTH
            ):
                problems.append(
                    f"model.use_unsloth: {str(model.use_unsloth).lower()} conflicts with "
                    f"model.framework: {model.framework}; set only one of them"
                )
        lora: LoraSection = sections["lora"]
        if lora.r <= 0:
            problems.append(f"lora.r: must be a positive integer, got {lora.r}")
        if not 0.0 <= lora.dropout < 1.0:
            problems.append(f"lora.dropout: must be in [0, 1), got {lora.dropout}")
        max_length = sections["data"].max_length
        if max_length is not None and max_length <= 0:
            problems.append(f"data.max_length: must be a positive integer, got {max_length}")
        if problems:
            raise ConfigError(problems)
        return cls(**sections)


def as_loader_config(config: Mapping[str, Any] | LoaderConfig) -> LoaderConfig:
    """``config`` parsed and checked (a :class:`LoaderConfig` is returned as is)."""
    return config if isinstance(config, LoaderConfig) else LoaderConfig.from_mapping(config)


def _parse_section(name: str, section_cls: type, raw: Mapping[str, Any], problems: list[str]) -> Any:
    hints = typing.get_type_hints(section_cls)
    known = {f.name: f for f in fields(section_cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            if section_cls is DataSection:
                if key != "max_length" and difflib.get_close_matches(str(key), ["max_length"], cutoff=0.75):
                    if "max_length" not in raw:
                        problems.append(f"data.{key}: unknown key; did you mean data.max_length?")
                continue  # the rest of data: belongs to the training repo
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean {name}.{close[0]}?" if close else f"; known keys: {', '.join(known)}"
            problems.append(f"{name}.{key}: unknown key{hint}")
            continue
        problem = _type_problem(hints[key], known[key].metadata.get("choices"), value)
        if problem:
            problems.append(f"{name}.{key}: {problem}")
        else:
            values[key] = list(value) if isinstance(value, tuple) else value
    try:
        return section_cls(**values)
    except TypeError as exc:  # pragma: no cover - every key was checked above
        problems.append(f"{name}: {exc}")
        return section_cls()


def _type_problem(hint: Any, choices: tuple[str, ...] | None, value: Any) -> str | None:
    """Why ``value`` does not fit ``hint`` (and ``choices``), or None when it does."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    if value is None:
        return None if type(None) in options else f"expected {_describe(hint)}, got null"
    for option in options:
        if option is bool and type(value) is bool:
            return None
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if option is str and isinstance(value, str):
            if choices and value not in choices:
                close = difflib.get_close_matches(value, list(choices), n=1)
                guess = f" (did you mean {close[0]}?)" if close else ""
                return f"expected one of {', '.join(choices)}, got {value!r}{guess}"
            return None
        if typing.get_origin(option) is list and isinstance(value, (list, tuple)):
            if all(isinstance(item, str) for item in value):
                return None
            return f"expected a list of strings, got {value!r}"
    return f"expected {_describe(hint)}, got {value!r} ({type(value).__name__})"


def _describe(hint: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    words = [
        names.get(option, "a list of strings" if typing.get_origin(option) is list else str(option))
        for option in options
        if option is not type(None)
    ]
    return " or ".join(words) + (" or null" if type(None) in options else "")


# --------------------------------------------------------------------------------------
# Which path, which device, which dtype
# --------------------------------------------------------------------------------------


def unsloth_unavailable_reason(env: _env.Environment | None = None) -> str | None:
    """Why Unsloth cannot train in this process, or None when it can."""
    env = environment() if env is None else env
    mode = env.unsloth.mode
    if mode == _env.MODE_MISSING:
        return "Unsloth is not installed (pip install unsloth)"
    if mode == _env.MODE_IMPORT_FAILED:
        return f"`import unsloth` failed ({env.unsloth.error})"
    if mode == _env.MODE_NOT_IMPORTED:
        return "Unsloth was not imported in this process"
    if env.gpu is None or mode in (_env.MODE_CPU_FALLBACK, _env.MODE_CPU_ALLOWED):
        return "no CUDA GPU is visible (Unsloth cannot train on CPU)"
    if not env.unsloth.usable:  # pragma: no cover - a mode added later
        return f"Unsloth is in mode {mode!r}"
    return None


def resolve_framework(config: Mapping[str, Any] | LoaderConfig) -> Framework:
    """The path :func:`load_base_model` takes: the one asked for, or HF when falling back.

    Raises :class:`UnslothUnavailableError` when Unsloth is asked for, cannot train here,
    and ``model.allow_hf_fallback`` is off; warns (:class:`LoaderWarning`) when it is on.
    """
    cfg = as_loader_config(config)
    if cfg.requested_framework == HF:
        return HF
    reason = unsloth_unavailable_reason()
    if reason is None:
        return UNSLOTH
    flag = "model.use_unsloth is true" if cfg.model.use_unsloth else "model.framework is unsloth"
    if cfg.model.allow_hf_fallback:
        warnings.warn(
            f"{flag} but {reason}; loading on the Hugging Face path instead (model.allow_hf_fallback)",
            LoaderWarning,
            stacklevel=3,
        )
        return HF
    off = "model.use_unsloth: false" if cfg.model.use_unsloth else "model.framework: hf"
    raise UnslothUnavailableError(f"{flag} but {reason}; set {off} or model.allow_hf_fallback: true")


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config dtype name (``auto``: bf16 / fp16 on a GPU, fp32 on CPU)."""
    import torch

    if name == "auto":
        if not torch.cuda.is_available():
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def device_map_for_this_process() -> dict[str, int] | None:
    """``{"": local_rank}`` on a GPU (DDP: each process on its own card), None on CPU.

    ``LOCAL_RANK`` is set by ``torchrun`` and ``accelerate launch``; a single process is rank 0.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
            "launch at most one process per GPU"
        )
    torch.cuda.set_device(local_rank)
    return {"": local_rank}


def quantization_config(cfg: LoaderConfig, model_type: str | None = None) -> BitsAndBytesConfig | None:
    """The one BitsAndBytesConfig both paths load with, or None when 4-bit is off."""
    if not cfg.model.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    compute = cfg.model.bnb_4bit_compute_dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.model.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.model.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=resolve_dtype(compute if compute else cfg.model.dtype),
        llm_int8_skip_modules=list(SKIP_QUANTIZATION.get(model_type or "", SKIP_QUANTIZATION["default"])),
    )


@dataclass(frozen=True)
class LoadInfo:
    """What :func:`load_base_model` did, kept on the model (see :func:`load_info`)."""

    framework: Framework
    requested_framework: Framework
    gradient_checkpointing: bool
    max_length: int | None
    dtype: str
    load_in_4bit: bool
    offload_checkpoints: bool = True
    #: Unsloth path: the entry point that loaded the model (attach_lora and the modes use it too).
    entry_point: str = "FastLanguageModel"


def load_info(model: Any) -> LoadInfo | None:
    """What :func:`load_base_model` recorded on ``model`` (also through PEFT's wrappers)."""
    try:
        return getattr(model, _LOAD_INFO_ATTRIBUTE)
    except AttributeError:
        return None


def framework_of(model: Any) -> Framework:
    """The path ``model`` was loaded on: ``unsloth`` or ``hf``."""
    info = load_info(model)
    if info is not None:
        return info.framework
    # Loaded by someone else: Unsloth leaves its flags on the models it patches.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if (
        "unsloth" in sys.modules
        and hasattr(base, "max_seq_length")
        and hasattr(base, "_saved_temp_tokenizer")
    ):
        return UNSLOTH
    return HF


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_base_model(
    config: Mapping[str, Any] | LoaderConfig,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``model.name`` on the path the config picks; return ``(model, tokenizer)`` in training mode.

    Both paths get the same dtype, the same BitsAndBytesConfig (nf4/fp4, double quant,
    compute dtype), gradient checkpointing as configured and ``{"": LOCAL_RANK}`` as
    device map on a GPU. HF: AutoModelForCausalLM, then ``prepare_model_for_kbit_training``
    when 4-bit. Unsloth: ``FastLanguageModel.from_pretrained`` with ``max_seq_length =
    data.max_length`` and the exact checkpoint named.
    """
    cfg = as_loader_config(config)
    problems = []
    if not cfg.model.name:
        problems.append("model.name: required (a hub id or a local directory)")
    if cfg.data.max_length is None:
        problems.append("data.max_length: required (the longest training sequence; Unsloth's max_seq_length)")
    if problems:
        raise ConfigError(problems)
    framework = resolve_framework(cfg)
    import torch

    if cfg.model.load_in_4bit and not torch.cuda.is_available():
        raise RuntimeError(
            "model.load_in_4bit is true but no CUDA GPU is visible (bitsandbytes 4-bit training needs "
            "one); set model.load_in_4bit: false to train in model.dtype on CPU"
        )
    from transformers import AutoConfig

    from .patches.hybrid_qwen_models import refuse_if_unbuildable

    assert cfg.model.name is not None
    # Before transformers' own config lookup, which fails without saying why on an older release.
    refuse_if_unbuildable(cfg.model.name, environment(), revision=cfg.model.revision)
    model_type = getattr(
        AutoConfig.from_pretrained(
            cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        ),
        "model_type",
        None,
    )
    dtype = resolve_dtype(cfg.model.dtype)
    bnb = quantization_config(cfg, model_type)
    device_map = device_map_for_this_process()
    if bnb is not None and model_type == "qwen3_moe" and (environment().transformers_major or 0) >= 5:
        # Measured by the conformance suite (quant4 case, Unsloth 2026.10.9, H200).
        warnings.warn(
            "Qwen3-MoE in 4-bit on transformers 5: Unsloth also stores the fused expert weights "
            "(experts.gate_up_proj / down_proj) in NF4, transformers' bitsandbytes path keeps them "
            "in bf16, so the two paths do not train the same 4-bit model. Compare paths in bf16.",
            LoaderWarning,
            stacklevel=2,
        )
    if framework == UNSLOTH:
        model, tokenizer = _load_unsloth(cfg, dtype, bnb, device_map)
    else:
        if "unsloth" in sys.modules and environment().unsloth.mode == _env.MODE_GPU:
            logger.warning(
                "HF path in a process that imported Unsloth: Unsloth patches transformers globally on "
                "import, so this is not stock transformers. For a stock reference, run the HF path in a "
                "process that never imports Unsloth."
            )
        model, tokenizer = _load_hf(cfg, dtype, bnb, device_map)
    object.__setattr__(
        model,
        _LOAD_INFO_ATTRIBUTE,
        LoadInfo(
            framework=framework,
            requested_framework=cfg.requested_framework,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            max_length=cfg.data.max_length,
            dtype=str(dtype).removeprefix("torch."),
            load_in_4bit=cfg.model.load_in_4bit,
            offload_checkpoints=cfg.model.offload_checkpoints,
            entry_point=cfg.model.unsloth_entry_point,
        ),
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = cfg.data.max_length
    if cfg.model.gradient_checkpointing:
        model.config.use_cache = False
    # Both loaders may leave the model in eval mode, where gradient checkpointing is skipped.
    model.train()
    logger.info("loaded %s on the %s path (%s)", cfg.model.name, framework, _describe_load(cfg, dtype))
    return model, tokenizer


def _describe_load(cfg: LoaderConfig, dtype: torch.dtype) -> str:
    quant = (
        f"4-bit {cfg.model.bnb_4bit_quant_type}, double quant {cfg.model.bnb_4bit_use_double_quant}"
        if cfg.model.load_in_4bit
        else "not quantized"
    )
    return f"{dtype}, {quant}, gradient checkpointing {cfg.model.gradient_checkpointing}"


def _dtype_keyword() -> str:
    """``dtype`` (transformers >= 4.56) or ``torch_dtype`` (older)."""
    from packaging.version import Version

    version = _env.parse_version(_env.distribution_version("transformers"))
    return "dtype" if version is None or version >= Version("4.56") else "torch_dtype"


def _load_hf(
    cfg: LoaderConfig, dtype: torch.dtype, bnb: BitsAndBytesConfig | None, device_map: dict[str, int] | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {
        _dtype_keyword(): dtype,
        "attn_implementation": cfg.model.attn_implementation,
        "revision": cfg.model.revision,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    if device_map is not None:
        kwargs["device_map"] = device_map
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    assert cfg.model.name is not None
    if not cfg.model.offload_checkpoints:
        logger.info(
            "model.offload_checkpoints applies to the Unsloth path only: HF keeps checkpoints on the GPU"
        )
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name, **kwargs)
    checkpointing_kwargs = {"use_reentrant": False}
    if bnb is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.model.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    elif cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        # LoRA freezes the embeddings; checkpointed layers still need an input that requires grad.
        model.enable_input_require_grads()
    tokenizer = AutoTokenizer.from_pretrained(
        cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    return model, tokenizer


def _fast_language_model() -> Any:
    from unsloth import FastLanguageModel

    return FastLanguageModel


def _unsloth_entry(name: str) -> Any:
    """Unsloth's ``FastLanguageModel`` or ``FastModel`` (``model.unsloth_entry_point``)."""
    if name == "FastModel":
        from unsloth import FastModel

        return FastModel
    return _fast_language_model()


def _entry_of(model: Any) -> Any:
    info = load_info(model)
    return _unsloth_entry(info.entry_point if info is not None else "FastLanguageModel")


def unsloth_from_pretrained_kwargs(
    cfg: LoaderConfig,
    dtype: torch.dtype,
    bnb: BitsAndBytesConfig | None,
    device_map: dict[str, int] | None,
    accepted: Sequence[str],
) -> dict[str, Any]:
    """Keyword arguments for ``FastLanguageModel.from_pretrained``; ``accepted`` is its signature's names."""
    kwargs: dict[str, Any] = {
        "model_name": cfg.model.name,
        "max_seq_length": cfg.data.max_length,
        "dtype": dtype,
        "load_in_4bit": bnb is not None,
        "trust_remote_code": cfg.model.trust_remote_code,
        "use_gradient_checkpointing": unsloth_checkpointing(
            cfg.model.gradient_checkpointing, cfg.model.offload_checkpoints
        ),
    }
    if cfg.model.revision is not None:
        kwargs["revision"] = cfg.model.revision
    if device_map is not None:
        kwargs["device_map"] = device_map
    if bnb is not None:
        # An explicit config is authoritative in Unsloth: no settings of its own (it would
        # otherwise always build nf4 + double quant).
        kwargs["quantization_config"] = bnb
    if "use_exact_model_name" in accepted:
        # Otherwise Qwen/Qwen3-8B + load_in_4bit loads unsloth/Qwen3-8B-bnb-4bit instead.
        kwargs["use_exact_model_name"] = True
    return kwargs


def unsloth_checkpointing(enabled: bool, offload: bool) -> str | bool:
    """Unsloth's ``use_gradient_checkpointing``: "unsloth" offloads to host memory, True is plain."""
    if not enabled:
        return False
    return "unsloth" if offload else True


def _load_unsloth(
    cfg: LoaderConfig, dtype: torch.dtype, bnb: BitsAndBytesConfig | None, device_map: dict[str, int] | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    fast = _unsloth_entry(cfg.model.unsloth_entry_point)
    accepted = list(inspect.signature(fast.from_pretrained).parameters)
    kwargs = unsloth_from_pretrained_kwargs(cfg, dtype, bnb, device_map, accepted)
    if "use_exact_model_name" not in kwargs:
        logger.warning(
            "this Unsloth has no use_exact_model_name; the loaded checkpoint is checked after loading"
        )
    if cfg.model.attn_implementation != ModelSection.attn_implementation:
        logger.info("model.attn_implementation applies to the HF path only: Unsloth uses its own kernels")
    model, tokenizer = fast.from_pretrained(**kwargs)
    loaded = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    assert cfg.model.name is not None
    if loaded and not _same_checkpoint(cfg.model.name, loaded):
        raise RuntimeError(
            f"Unsloth loaded {loaded!r} instead of model.name {cfg.model.name!r} (it maps names to its own "
            "pre-quantized copies); both paths must train the same checkpoint: set model.name to the one "
            "you want, or upgrade Unsloth to a release with use_exact_model_name"
        )
    return model, tokenizer


def _same_checkpoint(requested: str, loaded: str) -> bool:
    if os.path.isdir(requested) and os.path.isdir(loaded):
        return os.path.samefile(requested, loaded)
    return requested.rstrip("/") == loaded.rstrip("/")


# --------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------


def lora_targets_for(model: Any, lora: LoraSection) -> list[str]:
    """The target modules: ``lora.target_modules`` checked against ``model``, or the model type's defaults."""
    if lora.target_modules is not None:
        checked = check_target_modules(model, lora.target_modules)
        return list(checked or [])
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    present = available_targets(model)
    # The defaults name what the model type can offer; keep those this model has as
    # modules (e.g. no fused expert parameters on transformers 4).
    targets = [name for name in default_targets(str(model_type)) if name.rsplit(".", 1)[-1] in present]
    return list(check_target_modules(model, targets) or [])


def unsloth_slow_path_reasons(
    lora: LoraSection, dtype: str | None = None, *, fused_dropout: bool | None = None
) -> list[str]:
    """Settings that make Unsloth skip its fused LoRA kernels (PEFT's slower forward instead).

    ``fused_dropout``: whether the installed Unsloth fuses LoRA dropout (2026.x does unless
    ``UNSLOTH_FUSED_LORA_DROPOUT=0``); None reads it from Unsloth when it is usable here.
    """
    if fused_dropout is None:
        fused_dropout = _unsloth_fuses_dropout()
    reasons = []
    if lora.dropout != 0 and not fused_dropout:
        reasons.append(f"lora.dropout = {lora.dropout} (this Unsloth fuses only dropout 0)")
    if lora.bias != "none":
        reasons.append(f"lora.bias = {lora.bias!r} (only 'none' is fused)")
    if dtype == "float32":
        reasons.append("dtype float32 (the fused kernels need 16-bit base weights)")
    return reasons


def _unsloth_fuses_dropout() -> bool:
    if not environment().unsloth.usable:
        return False
    try:
        from unsloth.kernels import fast_lora
    except Exception:
        return False
    return bool(getattr(fast_lora, "FUSED_LORA_DROPOUT", False))


def attach_lora(model: PreTrainedModel, config: Mapping[str, Any] | LoaderConfig) -> PreTrainedModel:
    """Add a LoRA adapter from ``config``'s ``lora`` section with the same settings on both paths.

    Target names are checked against the model (a typo is an error listing the valid
    names). Returns the adapted model (a PEFT model) in training mode.
    """
    cfg = as_loader_config(config)
    lora = cfg.lora
    info = load_info(model)
    framework = framework_of(model)
    loaded = info or cfg.model  # what the model was loaded with, where it was recorded
    targets = lora_targets_for(model, lora)
    dtype = info.dtype if info else None
    if framework == UNSLOTH:
        reasons = unsloth_slow_path_reasons(lora, None if info and info.load_in_4bit else dtype)
        if reasons:
            warnings.warn(
                "Unsloth takes its slow LoRA path (no fused kernels) because of " + "; ".join(reasons),
                LoaderWarning,
                stacklevel=2,
            )
        adapted = _entry_of(model).get_peft_model(
            model,
            r=lora.r,
            target_modules=targets,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            bias=lora.bias,
            use_gradient_checkpointing=unsloth_checkpointing(
                loaded.gradient_checkpointing, loaded.offload_checkpoints
            ),
            random_state=lora.seed,
            use_rslora=lora.use_rslora,
            max_seq_length=info.max_length if info and info.max_length else cfg.data.max_length or 2048,
        )
    else:
        reasons = unsloth_slow_path_reasons(lora, dtype, fused_dropout=True)
        if reasons:
            logger.info("on the Unsloth path these settings would skip its fused LoRA kernels: %s", reasons)
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        set_seed(lora.seed)  # as Unsloth's get_peft_model does with random_state
        adapted = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                bias=lora.bias,
                target_modules=targets,
                use_rslora=lora.use_rslora,
                task_type="CAUSAL_LM",
            ),
        )
    if info is not None and load_info(adapted) is None:
        object.__setattr__(adapted, _LOAD_INFO_ATTRIBUTE, info)
    adapted.train()
    logger.info(
        "LoRA r=%d alpha=%d on %s: %d trainable parameters",
        lora.r,
        lora.alpha,
        ", ".join(targets),
        count_trainable_parameters(adapted),
    )
    return adapted


def count_trainable_parameters(model: torch.nn.Module) -> int:
    """Parameters that receive gradients (the adapter, plus anything else left trainable)."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


# --------------------------------------------------------------------------------------
# Generation inside the loss
# --------------------------------------------------------------------------------------


@dataclass
class _TrainingState:
    """Every flag generation may change: each module's mode, checkpointing, ``use_cache``."""

    root_training: bool
    modes: list[tuple[Any, bool]]
    checkpointing: list[tuple[Any, Any]]
    use_cache: list[tuple[Any, Any]]

    @classmethod
    def capture(cls, model: torch.nn.Module) -> _TrainingState:
        modules = list(model.modules())
        configs: dict[int, Any] = {}
        for module in modules:
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "use_cache"):
                configs.setdefault(id(config), config)
        return cls(
            root_training=model.training,
            modes=[(module, module.training) for module in modules],
            checkpointing=[
                (module, module.gradient_checkpointing)
                for module in modules
                if hasattr(module, "gradient_checkpointing")
            ],
            use_cache=[(config, config.use_cache) for config in configs.values()],
        )

    def restore(self, model: torch.nn.Module) -> None:
        model.train(self.root_training)  # runs any custom train() first
        for module, training in self.modes:
            if module.training != training:
                module.training = training
        for module, value in self.checkpointing:
            module.gradient_checkpointing = value
        for config, value in self.use_cache:
            config.use_cache = value


@contextlib.contextmanager
def generation_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inference mode with the KV cache on inside; on exit, exactly the modes and flags from before.

    Unsloth: the entry point's ``for_inference`` / ``for_training``; HF: ``model.eval()``
    and ``config.use_cache = True``. On exit (also when generation raises) every module's
    training flag, every gradient checkpointing flag and ``use_cache`` are put back.
    """
    state = _TrainingState.capture(model)
    unsloth = framework_of(model) == UNSLOTH
    try:
        if unsloth:
            _entry_of(model).for_inference(model)
        else:
            model.eval()
        for config, _ in state.use_cache:
            config.use_cache = True
        yield model
    finally:
        try:
            if unsloth:
                _entry_of(model).for_training(model)
        finally:
            state.restore(model)


@dataclass
class GeneratedReplies:
    """What :func:`generate_replies` produced, in the shape a GRPO-style loss needs.

    Rows are grouped by prompt: rows ``i*k .. i*k+k-1`` belong to prompt ``i`` (k =
    ``num_return_sequences``).
    """

    texts: list[list[str]]  # per prompt, its k completions, special tokens removed
    sequences: torch.Tensor  # (n*k, prompt_length + new) left-padded prompt + completion ids
    attention_mask: torch.Tensor  # same shape: 0 on prompt padding and after each completion's EOS
    completion_mask: torch.Tensor  # (n*k, new): 1 up to and including the first EOS
    prompt_length: int

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]


def generate_replies(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Sequence[Mapping[str, str]]],
    num_return_sequences: int = 1,
    **sampling: Any,
) -> GeneratedReplies:
    """Generate ``num_return_sequences`` replies per prompt on either path, inside :func:`generation_mode`.

    A prompt is text, or chat messages (rendered with the tokenizer's chat template and
    the generation prompt). ``sampling`` goes to ``model.generate`` (``max_new_tokens``
    defaults to 64).
    """
    import torch

    texts = [
        prompt
        if isinstance(prompt, str)
        else tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        for prompt in prompts
    ]
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only batches are padded on the left for generation
    try:
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = padding_side
    device = next(model.parameters()).device
    encoded = {key: value.to(device) for key, value in encoded.items()}
    sampling.setdefault("max_new_tokens", 64)
    sampling.setdefault("pad_token_id", tokenizer.pad_token_id)
    with generation_mode(model):
        sequences = model.generate(**encoded, num_return_sequences=num_return_sequences, **sampling)
    # Unsloth's generate runs under torch.inference_mode, so its ids are inference tensors, and
    # a loss that indexes log-probs with them (gather) raises "Inference tensors cannot be saved
    # for backward" (seen on an H200 with Unsloth 2026.10.9 in the GRPO loop and bench --rl).
    # A copy made out here is an ordinary tensor: both paths hand back ids autograd accepts.
    if sequences.is_inference():
        sequences = sequences.clone()
    prompt_length = encoded["input_ids"].shape[1]
    completion = sequences[:, prompt_length:]
    eos_ids = _eos_ids(model, tokenizer)
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
    positions = torch.arange(completion.shape[1], device=completion.device).expand_as(completion)
    first_eos = torch.where(is_eos, positions, completion.shape[1]).min(dim=1, keepdim=True).values
    completion_mask = (positions <= first_eos).long()
    prompt_mask = encoded["attention_mask"].repeat_interleave(num_return_sequences, dim=0)
    decoded = tokenizer.batch_decode(completion, skip_special_tokens=True)
    grouped = [decoded[i * num_return_sequences : (i + 1) * num_return_sequences] for i in range(len(texts))]
    return GeneratedReplies(
        texts=grouped,
        sequences=sequences,
        attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
        completion_mask=completion_mask,
        prompt_length=prompt_length,
    )


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for value in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


# --------------------------------------------------------------------------------------
# GRPO's reference model
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The base model without its LoRA adapter, inside; no second copy of the weights.

    Uses PEFT's ``disable_adapter()`` (Unsloth's models are PEFT models too).
    """
    disable = getattr(model, "disable_adapter", None)
    if disable is None or not hasattr(model, "peft_config"):
        raise TypeError(
            f"adapter_disabled needs a model with a LoRA adapter, got {type(model).__name__}; "
            "call attach_lora first"
        )
    with disable():
        yield model


def reference_logits(model: torch.nn.Module, **inputs: Any) -> torch.Tensor:
    """Logits of the frozen base model (adapter disabled, no gradients) for ``inputs``.

    ``labels`` are dropped: Unsloth returns no logits for a forward with labels in training.
    """
    import torch

    inputs.pop("labels", None)
    with torch.no_grad(), adapter_disabled(model):
        return model(**inputs).logits


__all__ = [
    "HF",
    "UNSLOTH",
    "ConfigError",
    "DataSection",
    "GeneratedReplies",
    "LoadInfo",
    "LoaderConfig",
    "LoaderWarning",
    "LoraSection",
    "ModelSection",
    "UnslothUnavailableError",
    "adapter_disabled",
    "as_loader_config",
    "attach_lora",
    "count_trainable_parameters",
    "device_map_for_this_process",
    "framework_of",
    "generate_replies",
    "generation_mode",
    "load_base_model",
    "load_info",
    "lora_targets_for",
    "quantization_config",
    "reference_logits",
    "resolve_dtype",
    "resolve_framework",
    "unsloth_from_pretrained_kwargs",
    "unsloth_slow_path_reasons",
    "unsloth_unavailable_reason",
]
