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
   RoPE whatever the config says. Detected and reported; this release does not fix it.

Other scaling types (linear, dynamic, longrope) are left to upstream untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

from .._env import Environment
from .._registry import AttributeSwaps, Patch, ProbeResult, native, needed, unsupported
from ._common import Unavailable, unsloth_module

#: The probe's stand-in config: Qwen3's published long-context shape, scaled down.
_PROBE_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
_PROBE_MAX_POSITIONS = 320


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

    def probe(self, env: Environment) -> ProbeResult:
        try:
            llama = unsloth_module(env, "unsloth.models.llama")
        except Unavailable as why:
            return why.result
        extend = getattr(llama, "_extended_rope_scaling", None)
        if getattr(llama, "_compute_config_rope_inv_freq", None) is None or extend is None:
            # Before 2026.6.3 the rotary embedding builds plain RoPE from rope_theta alone.
            return needed(
                "Unsloth's rotary embedding ignores the config's rope scaling (YaRN etc.)",
                fixable=False,
            )
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

    def install(self, swaps: AttributeSwaps, env: Environment) -> None:
        llama = unsloth_module(env, "unsloth.models.llama")
        current = llama._extended_rope_scaling
        if getattr(current, "__unsloth_qwen_compat__", False):
            return
        # from_pretrained looks the function up in the module globals at call time,
        # so replacing the module attribute is enough (and exactly revertible).
        swaps.set_attr(llama, "_extended_rope_scaling", keep_yarn_when_extending(current))
