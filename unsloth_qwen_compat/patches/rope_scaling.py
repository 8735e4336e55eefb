"""Hold Unsloth's Qwen RoPE to the contract of :mod:`unsloth_qwen_compat.rope_contract`.

Defects, each probed by running the installed code on a grid of tiny Qwen configs (every
type transformers' ``ROPE_INIT_FUNCTIONS`` holds, at windows inside, past
``max_position_embeddings`` and past the config's own coverage):

1. *Scaling replaced past the window* (2026.x up to at least 2026.10.9). When
   ``max_seq_length`` exceeds ``max_position_embeddings``, ``FastLlamaModel.from_pretrained``
   takes the scaling to build with from ``unsloth.models.llama._extended_rope_scaling``, which
   answers linear x (max_seq_length / max_position_embeddings) for every type but llama3: YaRN,
   a linear factor, dynamic NTK and longrope all become another model, at every position.
   Fixed by wrapping that function for Qwen configs: it answers the contract's plan.
2. *Config scaling ignored* (before 2026.6.3): Unsloth's rotary embedding builds plain RoPE
   whatever the config says, and ``from_pretrained`` swaps any scaling for linear past the
   window. Fixed by building each Qwen rotary's cos/sin tables with transformers' own RoPE
   function for the plan's config, and passing ``rope_scaling`` (which skips the swap).
3. *Length-dependent types trained with one table* (every release): dynamic NTK past
   ``max_position_embeddings`` and longrope past its original window change their
   frequencies with the sequence length in transformers; Unsloth's cached table cannot.
   Refused at load time with the windows and the fix.

Only Qwen model types are touched: a Llama or Mistral config goes through stock code.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from .._env import Environment
from .._qwen import is_qwen
from .._registry import (
    AttributeSwaps,
    Patch,
    ProbeResult,
    UnsupportedConfigurationError,
    native,
    needed,
    unsupported,
)
from ..rope_contract import (
    EXTENDED,
    REFUSED,
    RopePlan,
    build_config,
    coverage,
    plan_rope,
    rope_scaling_of,
    rope_tables,
    rope_theta_of,
    rope_type_of,
    same_tables,
    with_rope,
)
from ._common import code_mentions

__all__ = ["RopeScaling", "UnsupportedRopeScalingError", "rope_scaling_of", "rope_theta_of"]


class UnsupportedRopeScalingError(UnsupportedConfigurationError):
    """A RoPE setting this Unsloth cannot train as transformers computes it, refused at load."""


#: The config a Qwen rotary embedding builds its tables from while a load is in progress (the
#: plan's config: the checkpoint's RoPE or its extension, at the widened window).
_building_config: contextvars.ContextVar[Any] = contextvars.ContextVar("building_config", default=None)


def _refuse(plan: RopePlan) -> None:
    if plan.outcome == REFUSED:
        raise UnsupportedRopeScalingError(f"unsloth_qwen_compat: {plan.model_type}: {plan.reason}")


def _announce(plan: RopePlan) -> None:
    """Say so when the model will not compute what its checkpoint config says."""
    if plan.outcome != EXTENDED:
        return
    from .. import UnslothQwenCompatWarning

    warnings.warn(
        f"unsloth_qwen_compat: {plan.model_type} max_seq_length {plan.max_seq_length} > "
        f"the {plan.coverage} tokens its {plan.rope_type} RoPE covers: {plan.reason}. The model is "
        f"built with rope scaling {plan.scaling} (also on model.config).",
        UnslothQwenCompatWarning,
        stacklevel=4,
    )


def extending_by_contract(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``_extended_rope_scaling(config, factor)``: Qwen configs get the contract's plan,
    anything else (and plain RoPE, where upstream's linear rule is the contract's) goes upstream."""

    @functools.wraps(original)
    def _extended_rope_scaling(config: Any, factor: float, *args: Any, **kwargs: Any) -> Any:
        if not is_qwen(config) or rope_type_of(config) == "default":
            return original(config, factor, *args, **kwargs)
        plan = plan_rope(config, round(factor * config.max_position_embeddings))
        _refuse(plan)
        # An explicit scaling, never None: None would let the widened max_position_embeddings
        # stand in for a missing original window.
        return dict(plan.scaling), plan.rope_type

    _extended_rope_scaling.__unsloth_qwen_compat__ = True  # type: ignore[attr-defined]
    return _extended_rope_scaling


def _checkpoint_config(arguments: dict[str, Any], signature: inspect.Signature) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            arguments.get("model_name", signature.parameters["model_name"].default),
            token=arguments.get("token"),
            trust_remote_code=arguments.get("trust_remote_code", False),
            revision=arguments.get("revision"),
        )
    except Exception:  # upstream reports loading problems better than we can
        return None


def _expose(model: Any, plan: RopePlan) -> None:
    """Put the scaling the model computes on its config (what save_pretrained writes)."""
    config = getattr(model, "config", None)
    if config is None or plan.scaling is None:
        return
    if isinstance(getattr(config, "rope_parameters", None), dict):  # transformers 5
        config.rope_parameters = dict(plan.scaling)
    else:
        config.rope_scaling = {k: v for k, v in plan.scaling.items() if k != "rope_theta"}


def guarding_from_pretrained(
    *, rotary_reads_config: bool
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap ``FastLlamaModel.from_pretrained`` for Qwen checkpoints: refuse what the contract
    refuses, before any weight is read; on releases whose rotary ignores the config, build
    the tables from the plan's config and keep upstream's linear swap out."""

    def wrap(from_pretrained: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(from_pretrained)

        @functools.wraps(from_pretrained)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind_partial(*args, **kwargs)
            arguments = bound.arguments
            max_seq_length = arguments.get("max_seq_length")
            if max_seq_length is None or arguments.get("rope_scaling") is not None:
                return from_pretrained(*args, **kwargs)  # the caller's own scaling: upstream's rules
            config = _checkpoint_config(arguments, signature)
            if config is None or not is_qwen(config):
                return from_pretrained(*args, **kwargs)
            plan = plan_rope(config, int(max_seq_length))
            _refuse(plan)
            _announce(plan)
            if rotary_reads_config:  # 2026.x: _extended_rope_scaling hands the plan over
                return from_pretrained(*args, **kwargs)
            if max_seq_length > config.max_position_embeddings:
                # Any rope_scaling skips upstream's linear swap; the argument is otherwise unused
                # there. BoundArguments.args/.kwargs spread **kwargs (FastLanguageModel forwards
                # extra keywords); bound.arguments would pass them as one argument named "kwargs".
                arguments["rope_scaling"] = plan.scaling or {"rope_type": "default"}
            token = _building_config.set(build_config(config, plan))
            try:
                model, tokenizer = from_pretrained(*bound.args, **bound.kwargs)
            finally:
                _building_config.reset(token)
            if max_seq_length > config.max_position_embeddings:
                _expose(model, plan)
            return model, tokenizer

        wrapper.__unsloth_qwen_compat__ = True  # type: ignore[attr-defined]
        return wrapper

    return wrap


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
        config = _building_config.get()
        if config is None:
            passed = kwargs.get("config", args[4] if len(args) > 4 else None)
            config = passed if is_qwen(passed) else None
        # Before the original __init__, which builds the first cos/sin cache.
        object.__setattr__(self, "_compat_rope_config", config)
        original_init(self, *args, **kwargs)

    return __init__


def _cache_from_config(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _set_cos_sin_cache(self: Any, seq_len: int, device: Any, dtype: Any) -> Any:
        config = self.__dict__.get("_compat_rope_config")
        if config is None or rope_type_of(config) == "default":
            return original(self, seq_len, device, dtype)  # not Qwen, or plain RoPE: upstream's own
        self.current_rope_size = seq_len
        cos, sin = rope_cos_sin(*rope_tables(config), seq_len)
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


# --- the probe's grid ----------------------------------------------------------------------

#: A tiny Qwen3 shape for the probe (head_dim 16: eight frequencies, every RoPE branch used).
_PROBE_SHAPE = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=64
)
_PROBE_WINDOW = 64


def _probe_scalings(kinds: list[str], window: int) -> Iterator[dict[str, Any]]:
    """One representative scaling per RoPE type (a type without a recipe gets the generic one)."""
    half = _PROBE_SHAPE["head_dim"] // 2
    recipes = {
        "linear": {"factor": 2.5},
        "dynamic": {"factor": 2.0},
        "yarn": {"factor": 3.0, "original_max_position_embeddings": window // 2},
        "llama3": {
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": window // 2,
        },
        "longrope": {
            "short_factor": [1.0 + i / half for i in range(half)],
            "long_factor": [2.0 + i / half for i in range(half)],
            "original_max_position_embeddings": window // 2,
        },
    }
    yield {}
    for kind in kinds:
        yield {"rope_type": kind, **recipes.get(kind, {"factor": 2.0})}


def probe_configs() -> Iterator[Any]:
    """Tiny Qwen3 configs, one per RoPE type the installed transformers implements."""
    import logging

    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kinds = sorted(k for k in ROPE_INIT_FUNCTIONS if k != "default")
    v5 = hasattr(Qwen3Config(), "rope_parameters") and isinstance(Qwen3Config().rope_parameters, dict)
    quiet = logging.getLogger("transformers.modeling_rope_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # rope validation warnings about the probe's own odd configs
    try:
        for scaling in _probe_scalings(kinds, _PROBE_WINDOW):
            kwargs = dict(_PROBE_SHAPE, max_position_embeddings=_PROBE_WINDOW)
            if v5:
                kwargs["rope_parameters"] = {"rope_type": "default", **scaling, "rope_theta": 10000.0}
            else:
                kwargs.update(rope_theta=10000.0, rope_scaling=scaling or None)
            try:
                yield Qwen3Config(**kwargs)
            except Exception:  # a type transformers cannot build from the generic recipe
                continue
    finally:
        quiet.setLevel(level)


def probe_windows(config: Any) -> list[int]:
    """Inside max_position_embeddings, past it inside the coverage, and past the coverage."""
    window, covered = config.max_position_embeddings, coverage(config)
    out = [window * 3 // 4]
    if covered > window:
        out.append((window + covered) // 2)
    out.append(max(window, covered) * 3 // 2)
    return out


def answers_inside_window(extend: Callable[..., Any]) -> bool:
    """Whether ``_extended_rope_scaling`` also answers for lengths inside max_position_embeddings
    (factor < 1), keeping a plain config as it is there: the sign of a from_pretrained that asks
    it at every length, so that a RoPE which changes with the length can be refused inside the
    window too. Stock's answer is an extension whatever the factor (linear x factor), and its
    from_pretrained asks only past the window: there, the checkpoint's RoPE is used as it is."""
    config = next(probe_configs())  # plain RoPE
    try:
        scaling, _ = extend(config, 0.5)
    except Exception:
        return False
    if scaling is None:
        return True
    kept = with_rope(config, scaling, config.max_position_embeddings)
    return rope_type_of(kept) == "default" and same_tables(rope_tables(kept), rope_tables(config))


def upstream_rope_defects(
    extend: Callable[..., Any], inv_freq_from_config: Callable[..., Any] | None
) -> list[str]:
    """What the installed 2026-style code gets wrong on the probe grid, one line per type.

    Past max_position_embeddings the grid takes ``extend``'s answer; inside it, the checkpoint's
    own RoPE, unless ``extend`` answers there too (:func:`answers_inside_window`).
    """
    defects: dict[str, str] = {}
    inside_too = answers_inside_window(extend)
    for config in probe_configs():
        kind = rope_type_of(config)
        window = config.max_position_embeddings
        if inv_freq_from_config is not None and kind != "default":
            try:
                built = inv_freq_from_config(
                    config, getattr(config, "rope_scaling", None) or rope_scaling_of(config)
                )
                if built[0] is not None and not same_tables(
                    (built[0].float(), float(built[1])), rope_tables(config)
                ):
                    defects.setdefault(kind, f"{kind}: rotary tables differ from transformers'")
            except Exception as exc:
                defects.setdefault(kind, f"{kind}: rotary raised {type(exc).__name__}")
        for max_seq_length in probe_windows(config):
            plan = plan_rope(config, max_seq_length)
            try:
                if max_seq_length > window or inside_too:
                    scaling, _ = extend(config, max_seq_length / window)
                    upstream = rope_scaling_of(config) if scaling is None else dict(scaling)
                else:
                    upstream = rope_scaling_of(config)
            except Exception:
                upstream = None  # upstream refused
            if plan.outcome == REFUSED:
                if upstream is not None:
                    defects.setdefault(kind, f"{kind}: one table past {plan.coverage} tokens, not refused")
                continue
            if upstream is None:
                defects.setdefault(kind, f"{kind}: refused at max_seq_length {max_seq_length}")
                continue
            if "rope_type" not in upstream and "type" in upstream:
                upstream["rope_type"] = upstream["type"]
            mine = rope_tables(build_config(config, plan))
            theirs = rope_tables(with_rope(config, upstream, max(window, max_seq_length)))
            if not same_tables(mine, theirs):
                defects.setdefault(
                    kind,
                    f"{kind}: becomes {upstream.get('rope_type') or 'plain'} "
                    f"x{float(upstream.get('factor', 1)):.3g} at {max_seq_length} > {window} positions",
                )
    return [defects[k] for k in sorted(defects)]


class RopeScaling(Patch):
    name = "rope_scaling"
    summary = "Qwen RoPE: every scaling type right, extended by a stated rule, or refused"
    unsloth_module = "unsloth.models.llama"
    conformance_cases = ("test_rope_grid", "test_rope_past_original_window", "test_forward_logits")
    reproduction = """\
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
# A 2-layer Qwen3 whose RoPE has linear scaling x2 over a 256-token window (covers 512).
config = Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024,
                     max_position_embeddings=256,
                     rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})
Qwen3ForCausalLM(config).save_pretrained("tiny-qwen3-linear")  # tokenizer: any Qwen one

from unsloth import FastLanguageModel
model, _ = FastLanguageModel.from_pretrained("tiny-qwen3-linear", max_seq_length=384,
                                             dtype=torch.float32, load_in_4bit=False)
# Compare logits of 384 tokens with transformers' Qwen3ForCausalLM (eager, fp32) loaded in a
# process that never imported unsloth: every position differs (linear x2 became x1.5).
"""

    def probe(self, llama: ModuleType, env: Environment) -> ProbeResult:
        extend = getattr(llama, "_extended_rope_scaling", None)
        if extend is None:
            return self._probe_before_2026(llama)
        if getattr(extend, "__unsloth_qwen_compat__", False):
            return needed("already patched in this process")
        try:
            defects = upstream_rope_defects(extend, getattr(llama, "_compute_config_rope_inv_freq", None))
        except Exception as exc:
            return unsupported(f"the RoPE probe grid raised {type(exc).__name__}: {exc}")
        if defects:
            return needed("RoPE probe grid: " + "; ".join(defects))
        return native("every RoPE type right or refused at every window (probe grid)")

    @staticmethod
    def _probe_before_2026(llama: Any) -> ProbeResult:
        rotary = getattr(llama, "LlamaRotaryEmbedding", None)
        from_pretrained = getattr(getattr(llama, "FastLlamaModel", None), "from_pretrained", None)
        if rotary is None or from_pretrained is None or "_set_cos_sin_cache" not in vars(rotary):
            return unsupported("LlamaRotaryEmbedding / FastLlamaModel.from_pretrained not as expected")
        defects = []
        if _ignores_config_scaling(rotary):
            defects.append("Unsloth's rotary embedding ignores the config's RoPE scaling (every type)")
        if _swaps_for_linear_in_body(from_pretrained):
            defects.append("any scaling is replaced by linear when max_seq_length > max_position_embeddings")
        if not _rotary_follows_length(llama):
            defects.append("dynamic / longrope: one cos/sin table for every length, not refused")
        if defects:
            return needed("; ".join(defects))
        return native("rotary embedding reads the config's RoPE scaling")

    def install(self, swaps: AttributeSwaps, llama: ModuleType, env: Environment) -> None:
        current = getattr(llama, "_extended_rope_scaling", None)
        model = llama.FastLlamaModel
        if current is not None:
            if getattr(current, "__unsloth_qwen_compat__", False):
                return
            # from_pretrained looks the function up in the module globals at call time,
            # so replacing the module attribute is enough (and exactly revertible).
            swaps.set_attr(llama, "_extended_rope_scaling", extending_by_contract(current))
            swaps.wrap_staticmethod(
                model, "from_pretrained", guarding_from_pretrained(rotary_reads_config=True)
            )
            return
        # Before 2026.6.3: teach the rotary embedding the plan's RoPE for Qwen models, and keep
        # from_pretrained from swapping it for linear. Every Qwen model class of these releases
        # uses this one LlamaRotaryEmbedding (its pre_patch installs it).
        rotary = llama.LlamaRotaryEmbedding
        if _ignores_config_scaling(rotary):
            swaps.set_attr(rotary, "__init__", _remembering_config(vars(rotary)["__init__"]))
            swaps.set_attr(
                rotary, "_set_cos_sin_cache", _cache_from_config(vars(rotary)["_set_cos_sin_cache"])
            )
        swaps.wrap_staticmethod(model, "from_pretrained", guarding_from_pretrained(rotary_reads_config=False))


def _rotary_follows_length(llama: Any) -> bool:
    """Whether Unsloth's rotary can rebuild its tables per sequence length for a config's type
    (a ``seq_len`` parameter on the function that computes them from the config)."""
    compute = getattr(llama, "_compute_config_rope_inv_freq", None)
    return compute is not None and "seq_len" in inspect.signature(compute).parameters
