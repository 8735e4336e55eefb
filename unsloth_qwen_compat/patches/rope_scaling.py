"""Keep the config's RoPE scaling when Unsloth extends the context window.

Two defects, each probed by running the installed code on a tiny config:

1. *Type replaced past the window* (2026.x up to at least 2026.10.9). When
   ``max_seq_length`` exceeds ``max_position_embeddings``, ``FastLlamaModel.from_pretrained``
   asks ``unsloth.models.llama._extended_rope_scaling`` for the scaling to use, and that
   returns plain linear scaling for every type but llama3: a Qwen3 YaRN checkpoint then
   trains on different positions than it was trained on (logits rel. error 0.51 vs HF on
   an H200). Fixed here by wrapping that function: a YaRN config that already covers
   ``max_seq_length`` (``original_max_position_embeddings x factor``) is kept unchanged,
   one that does not keeps YaRN with its factor grown to reach ``max_seq_length``.
2. *Config scaling ignored* (before 2026.6.3): Unsloth's rotary embedding builds plain
   RoPE whatever the config says (Qwen3 + YaRN: rel. error 0.56 on 2025.10.12). Fixed by
   keeping the config on each ``LlamaRotaryEmbedding`` and building its cos/sin tables
   from transformers' own RoPE init functions (inv_freq and attention factor) for the
   static types (linear, yarn, llama3). Those releases also swap YaRN for linear inside
   ``from_pretrained`` itself; there the patch passes the config's own scaling as
   ``rope_scaling`` (which skips the swap) and refuses a ``max_seq_length`` past
   ``original x factor``, which that code cannot represent.

On 2026.x, scaling types other than YaRN are left to upstream untouched; before 2026.6.3
the seq_len-dependent types (dynamic, longrope) are refused with a clear error.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

from .._env import Environment
from .._registry import AttributeSwaps, Patch, ProbeResult, native, needed, unsupported
from ._common import Unavailable, code_mentions, unsloth_module

#: Types whose inv_freq does not depend on the sequence length, so one cached table is exact.
STATIC_ROPE_TYPES = ("linear", "yarn", "llama3")

#: The probe's stand-in config: Qwen3's published long-context shape, scaled down.
_PROBE_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
_PROBE_MAX_POSITIONS = 320

#: The checkpoint's own config while an old ``from_pretrained`` loads past the window. That
#: code raises the model config's ``max_position_embeddings`` to ``max_seq_length``, and
#: transformers < 4.53 derives YaRN's factor from it (``max_position_embeddings /
#: original_max_position_embeddings``): tables built from the raised config would change the
#: model (2025.3 leg, H200: logits rel 0.88-1.0). The rotary tables come from this one instead.
_checkpoint_config: contextvars.ContextVar[Any] = contextvars.ContextVar("checkpoint_config", default=None)


def rope_scaling_of(config: Any) -> dict[str, Any]:
    """The config's RoPE scaling as a plain dict, on transformers 4 and 5 alike.

    v4 keeps it in ``rope_scaling`` (key ``type`` or ``rope_type``) beside ``rope_theta``;
    v5 keeps everything, base included, in ``rope_parameters``. ``{}`` means plain RoPE.
    """
    for attribute in ("rope_scaling", "rope_parameters"):
        value = getattr(config, attribute, None)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            to_dict = getattr(value, "to_dict", None)
            value = to_dict() if callable(to_dict) else vars(value)
        scaling = dict(value)
        if "rope_type" not in scaling and "type" in scaling:
            scaling["rope_type"] = scaling["type"]
        if scaling.get("rope_type") in (None, "default"):
            continue
        return scaling
    return {}


def rope_theta_of(config: Any, default: float = 10000.0) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        parameters = getattr(config, "rope_parameters", None)
        if isinstance(parameters, Mapping):
            theta = parameters.get("rope_theta")
    return float(theta) if theta is not None else default


def extended_yarn(config: Any, factor: float) -> dict[str, Any] | None:
    """The YaRN scaling to use at ``factor x max_position_embeddings`` tokens.

    None when the config's own YaRN already covers that many tokens (keep it as is);
    otherwise the same YaRN with its factor grown so ``original x factor`` reaches it.
    """
    scaling = rope_scaling_of(config)
    original = int(scaling.get("original_max_position_embeddings") or config.max_position_embeddings)
    wanted = factor * config.max_position_embeddings
    if wanted <= original * float(scaling.get("factor", 1.0)):
        return None
    grown = {key: value for key, value in scaling.items() if key != "type"}
    grown.update(
        rope_type="yarn",
        factor=wanted / original,
        original_max_position_embeddings=original,
        rope_theta=rope_theta_of(config),
    )
    return grown


def keep_yarn_when_extending(original: Callable[[Any, float], Any]) -> Callable[[Any, float], Any]:
    """Wrap ``_extended_rope_scaling`` so YaRN stays YaRN; every other type goes upstream."""

    @functools.wraps(original)
    def _extended_rope_scaling(config: Any, factor: float) -> Any:
        if rope_scaling_of(config).get("rope_type") != "yarn":
            return original(config, factor)
        # (None, type) is upstream's own "keep the native scaling, widen the window" answer.
        return extended_yarn(config, factor), "yarn"

    _extended_rope_scaling.__unsloth_qwen_compat__ = True  # type: ignore[attr-defined]
    return _extended_rope_scaling


class UnsupportedRopeScalingError(NotImplementedError):
    """A RoPE scaling this Unsloth cannot reproduce, refused instead of trained wrong."""


def scaled_inv_freq(config: Any) -> tuple[Any, float] | None:
    """(inv_freq, attention_scaling) for the config's scaling, by transformers' own code.

    None for plain RoPE. Static types only: a cached cos/sin table cannot follow
    dynamic NTK or longrope, whose frequencies change with the sequence length.
    """
    kind = rope_scaling_of(config).get("rope_type")
    if kind is None:
        return None
    if kind not in STATIC_ROPE_TYPES:
        raise UnsupportedRopeScalingError(
            f"RoPE scaling {kind!r} cannot be reproduced by this Unsloth's cached rotary tables; "
            f"supported: {', '.join(STATIC_ROPE_TYPES)}. Drop the scaling or upgrade Unsloth (>= 2026.6.3)."
        )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    return inv_freq.float(), float(attention_scaling)


def rope_cos_sin(inv_freq: Any, attention_scaling: float, seq_len: int) -> tuple[Any, Any]:
    """fp32 cos/sin tables of ``seq_len`` positions, laid out as Unsloth's cache expects."""
    import torch

    positions = torch.arange(seq_len, dtype=torch.int64).float()
    angles = torch.outer(positions, inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def _remembering_config(original_init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        config = _checkpoint_config.get()
        if config is None:
            config = kwargs.get("config", args[4] if len(args) > 4 else None)
        # Before the original __init__, which builds the first cos/sin cache.
        object.__setattr__(self, "_compat_rope_config", config)
        original_init(self, *args, **kwargs)

    return __init__


def _cache_from_config(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _set_cos_sin_cache(self: Any, seq_len: int, device: Any, dtype: Any) -> Any:
        config = self.__dict__.get("_compat_rope_config")
        tables = None if config is None else scaled_inv_freq(config)
        if tables is None:
            return original(self, seq_len, device, dtype)
        self.current_rope_size = seq_len
        cos, sin = rope_cos_sin(*tables, seq_len)
        cos = cos.to(dtype=dtype, device=device, non_blocking=True)
        sin = sin.to(dtype=dtype, device=device, non_blocking=True)
        if hasattr(self, "multi_gpu_cos_cached"):  # 2025.4+: one cache per device
            self.multi_gpu_cos_cached[device.index] = cos
            self.multi_gpu_sin_cached[device.index] = sin
        else:  # 2025.3 and older: plain buffers, as upstream's own method registers them
            self.register_buffer("cos_cached", cos, persistent=False)
            self.register_buffer("sin_cached", sin, persistent=False)
        return cos, sin

    return _set_cos_sin_cache


def _keeping_config_scaling(from_pretrained: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a pre-2026 ``FastLlamaModel.from_pretrained`` whose body swaps any scaling for
    linear when ``max_seq_length`` exceeds the window, unless ``rope_scaling`` is passed."""
    signature = inspect.signature(from_pretrained)

    @functools.wraps(from_pretrained)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs)
        arguments = bound.arguments
        max_seq_length = arguments.get("max_seq_length")
        if arguments.get("rope_scaling") is None and max_seq_length is not None:
            try:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(
                    arguments.get("model_name", signature.parameters["model_name"].default),
                    token=arguments.get("token"),
                    trust_remote_code=arguments.get("trust_remote_code", False),
                    revision=arguments.get("revision"),
                )
            except Exception:  # upstream reports loading problems better than we can
                return from_pretrained(*args, **kwargs)
            scaling = rope_scaling_of(config)
            if scaling.get("rope_type") == "yarn" and max_seq_length > config.max_position_embeddings:
                if extended_yarn(config, max_seq_length / config.max_position_embeddings) is not None:
                    covered = int(
                        (scaling.get("original_max_position_embeddings") or config.max_position_embeddings)
                        * float(scaling.get("factor", 1.0))
                    )
                    raise UnsupportedRopeScalingError(
                        f"max_seq_length {max_seq_length} is past what this checkpoint's YaRN covers "
                        f"({covered} tokens), and this Unsloth can only extend it by replacing YaRN with "
                        f"linear scaling, which changes the model. Use max_seq_length <= {covered}, or "
                        "Unsloth >= 2026.6.3."
                    )
                # Any rope_scaling skips upstream's swap; the argument is otherwise unused there.
                # BoundArguments.args/.kwargs spread **kwargs (FastLanguageModel forwards extra
                # keywords); bound.arguments would pass them as one argument named "kwargs".
                bound.arguments["rope_scaling"] = scaling
                token = _checkpoint_config.set(config)
                try:
                    return from_pretrained(*bound.args, **bound.kwargs)
                finally:
                    _checkpoint_config.reset(token)
        return from_pretrained(*args, **kwargs)

    wrapper.__unsloth_qwen_compat__ = True  # type: ignore[attr-defined]
    return wrapper


def _ignores_config_scaling(rotary: Any) -> bool:
    """Neither building nor caching the tables reads the config's scaling."""
    methods = [vars(rotary).get(name) for name in ("__init__", "_set_cos_sin_cache")]
    return not any(
        code_mentions(method, names=(attribute,))
        for method in methods
        for attribute in ("rope_scaling", "rope_parameters")
    )


def _swaps_for_linear_in_body(from_pretrained: Any) -> bool:
    """``rope_scaling = {"type": "linear", ...}`` built inside from_pretrained itself."""
    return code_mentions(from_pretrained, text=("linear", "kaiokendev"))


def _probe_config() -> SimpleNamespace:
    return SimpleNamespace(
        rope_scaling=dict(_PROBE_YARN),
        rope_parameters=None,
        rope_theta=10000.0,
        max_position_embeddings=_PROBE_MAX_POSITIONS,
    )


class RopeScaling(Patch):
    name = "rope_scaling"
    summary = "config RoPE scaling honoured, YaRN kept past max_position_embeddings"
    conformance_cases = ("test_rope_past_original_window", "test_forward_logits")
    reproduction = """\
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
# A 2-layer Qwen3 with Qwen3's published long-context RoPE, scaled down:
# YaRN factor 4 over an original window of 256, max_position_embeddings 320.
config = Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024,
                     max_position_embeddings=320,
                     rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 256, "rope_theta": 1e6})
Qwen3ForCausalLM(config).save_pretrained("tiny-qwen3-yarn")  # tokenizer: any Qwen one

from unsloth import FastLanguageModel
model, _ = FastLanguageModel.from_pretrained("tiny-qwen3-yarn", max_seq_length=1024,
                                             dtype=torch.float32, load_in_4bit=False)
# Compare logits of 900 tokens with transformers' Qwen3ForCausalLM (eager, fp32) loaded
# in a process that never imported unsloth: positions >= 256 differ (YaRN became linear).
"""

    def probe(self, env: Environment) -> ProbeResult:
        try:
            llama = unsloth_module(env, "unsloth.models.llama")
        except Unavailable as why:
            return why.result
        extend = getattr(llama, "_extended_rope_scaling", None)
        if extend is None:
            return self._probe_before_2026(llama)
        if getattr(extend, "__unsloth_qwen_compat__", False):
            return needed("already patched in this process")
        try:
            scaling, _ = extend(_probe_config(), 2.0)
        except Exception as exc:
            return unsupported(f"_extended_rope_scaling raised on a YaRN config: {exc}")
        kind = None if scaling is None else (scaling.get("rope_type") or scaling.get("type"))
        if scaling is not None and kind != "yarn":
            return needed(f"YaRN is replaced by {kind} scaling when max_seq_length > max_position_embeddings")
        return native("config scaling honoured and YaRN kept past max_position_embeddings")

    @staticmethod
    def _probe_before_2026(llama: Any) -> ProbeResult:
        rotary = getattr(llama, "LlamaRotaryEmbedding", None)
        from_pretrained = getattr(getattr(llama, "FastLlamaModel", None), "from_pretrained", None)
        if rotary is None or from_pretrained is None or "_set_cos_sin_cache" not in vars(rotary):
            return unsupported("LlamaRotaryEmbedding / FastLlamaModel.from_pretrained not as expected")
        defects = []
        if _ignores_config_scaling(rotary):
            defects.append("Unsloth's rotary embedding ignores the config's rope scaling (YaRN etc.)")
        if _swaps_for_linear_in_body(from_pretrained):
            defects.append("YaRN is replaced by linear scaling when max_seq_length > max_position_embeddings")
        if defects:
            return needed("; ".join(defects))
        return native("rotary embedding reads the config's rope scaling")

    def install(self, swaps: AttributeSwaps, env: Environment) -> None:
        llama = unsloth_module(env, "unsloth.models.llama")
        current = getattr(llama, "_extended_rope_scaling", None)
        if current is not None:
            if getattr(current, "__unsloth_qwen_compat__", False):
                return
            # from_pretrained looks the function up in the module globals at call time,
            # so replacing the module attribute is enough (and exactly revertible).
            swaps.set_attr(llama, "_extended_rope_scaling", keep_yarn_when_extending(current))
            return
        # Before 2026.6.3: teach the rotary embedding the config's scaling, and keep
        # from_pretrained from swapping YaRN for linear. Every Qwen model class of these
        # releases uses this one LlamaRotaryEmbedding (its pre_patch installs it).
        rotary = llama.LlamaRotaryEmbedding
        if _ignores_config_scaling(rotary):
            swaps.set_attr(rotary, "__init__", _remembering_config(vars(rotary)["__init__"]))
            swaps.set_attr(
                rotary, "_set_cos_sin_cache", _cache_from_config(vars(rotary)["_set_cos_sin_cache"])
            )
        if _swaps_for_linear_in_body(llama.FastLlamaModel.from_pretrained):
            swaps.wrap_staticmethod(llama.FastLlamaModel, "from_pretrained", _keeping_config_scaling)
