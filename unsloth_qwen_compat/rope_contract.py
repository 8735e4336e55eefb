"""The RoPE contract: what the Unsloth path must compute for a Qwen config at a ``max_seq_length``.

For a Qwen2 / Qwen2.5 / Qwen3 / Qwen3-MoE config carrying any RoPE setting the installed
transformers implements (``rope_scaling`` on v4, ``rope_parameters`` on v5, any ``rope_theta``)
and any ``max_seq_length``, :func:`plan_rope` answers with exactly one of:

``same``
    the model is built with the config's own RoPE and computes what transformers computes for
    that config at every position up to ``max_seq_length``;
``extended``
    ``max_seq_length`` is past what the config itself covers (:func:`coverage`): the type is
    kept and its stretch grows so the covered window reaches ``max_seq_length`` (plain RoPE,
    which has nothing to keep, gets Unsloth's own linear interpolation). ``plan.scaling`` is the
    effective scaling; it is put on the model's config, so transformers given that config
    computes the same thing;
``refused``
    the config's RoPE changes with the sequence length inside ``max_seq_length`` (dynamic NTK
    past ``max_position_embeddings``, longrope past its original window), which one cached
    cos/sin table cannot follow: the load is refused with the type, the windows and the fix.

The windows come from transformers' own semantics, and every table is computed by
transformers' own RoPE functions (``ROPE_INIT_FUNCTIONS``), so a type transformers adds later
is classified by how its tables behave, not by a list here. This module imports no Unsloth.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

SAME, EXTENDED, REFUSED = "same", "extended", "refused"

#: Types whose stretch grows past their coverage (factor = max_seq_length / window).
GROWN_TYPES = ("linear", "yarn")


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


def rope_type_of(config: Any) -> str:
    """``default`` for plain RoPE, else the scaling's type."""
    return rope_scaling_of(config).get("rope_type", "default")


def rope_theta_of(config: Any, default: float = 10000.0) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        parameters = getattr(config, "rope_parameters", None)
        if isinstance(parameters, Mapping):
            theta = parameters.get("rope_theta")
    return float(theta) if theta is not None else default


def original_window(config: Any) -> int:
    """The pretraining window a scaling is relative to (transformers' fallback: max_position_embeddings)."""
    scaling = rope_scaling_of(config)
    original = scaling.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None
    )
    return int(original or config.max_position_embeddings)


def with_rope(config: Any, scaling: Mapping[str, Any] | None, max_position_embeddings: int) -> Any:
    """A copy of ``config`` with this RoPE scaling and window, spelled as its transformers reads it."""
    out = copy.deepcopy(config)
    out.max_position_embeddings = int(max_position_embeddings)
    scaling = dict(scaling or {})
    theta = float(scaling.pop("rope_theta", rope_theta_of(config)))
    if "type" in scaling:  # v4's old spelling of the key
        scaling.setdefault("rope_type", scaling.pop("type"))
    if isinstance(getattr(config, "rope_parameters", None), Mapping):  # transformers 5
        out.rope_parameters = {"rope_type": "default", **scaling, "rope_theta": theta}
    else:
        out.rope_scaling = scaling if scaling.get("rope_type", "default") != "default" else None
        out.rope_theta = theta
    return out


def rope_tables(config: Any, seq_len: int | None = None) -> tuple[Any, float]:
    """(inv_freq, attention_scaling) as the installed transformers computes them for ``config``
    at a forward of ``seq_len`` tokens (None: the tables it builds at init)."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = rope_type_of(config)
    if kind == "default" and kind not in ROPE_INIT_FUNCTIONS:  # transformers 5 computes it inline
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (rope_theta_of(config) ** exponents), 1.0
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)
    return inv_freq.float(), float(attention_scaling)


def same_tables(a: tuple[Any, float], b: tuple[Any, float]) -> bool:
    import torch

    return a[1] == b[1] and a[0].shape == b[0].shape and bool(torch.equal(a[0], b[0]))


def length_dependence(config: Any, max_seq_length: int) -> int | None:
    """The first sequence length up to ``max_seq_length`` at which transformers' tables for
    ``config`` differ from its init tables (it recomputes them per forward), or None.

    Dynamic NTK changes past ``max_position_embeddings``, longrope past its original window;
    a bisection finds the step for any type that changes once and stays changed.
    """
    base = rope_tables(config)
    if same_tables(base, rope_tables(config, max_seq_length)):
        return None
    low, high = 1, max_seq_length  # tables(low) == base (checked below), tables(high) != base
    if not same_tables(base, rope_tables(config, low)):
        return low
    while high - low > 1:
        middle = (low + high) // 2
        if same_tables(base, rope_tables(config, middle)):
            low = middle
        else:
            high = middle
    return high


def _yarn_factor(config: Any) -> float:
    """YaRN's stretch as transformers applies it: releases before 4.56 derive it from
    max_position_embeddings / original whenever the original window is given."""
    scaling = rope_scaling_of(config)
    factor = scaling.get("factor")
    if "original_max_position_embeddings" in scaling and _yarn_factor_from_max_positions():
        return config.max_position_embeddings / int(scaling["original_max_position_embeddings"])
    if factor is None:
        return config.max_position_embeddings / original_window(config)
    return float(factor)


_YARN_DERIVES_FACTOR: bool | None = None


def _yarn_factor_from_max_positions() -> bool:
    """Whether the installed transformers ignores YaRN's ``factor`` when the original window is
    given (measured once on a tiny config, not read from a version number)."""
    global _YARN_DERIVES_FACTOR
    if _YARN_DERIVES_FACTOR is None:
        from transformers import Qwen2Config

        scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
        kwargs = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
        if _transformers_major() >= 5:
            kwargs["rope_parameters"] = {**scaling, "rope_theta": 10000.0}
        else:
            kwargs["rope_scaling"] = scaling
        a = rope_tables(Qwen2Config(max_position_embeddings=128, **kwargs))
        b = rope_tables(Qwen2Config(max_position_embeddings=512, **kwargs))
        _YARN_DERIVES_FACTOR = not same_tables(a, b)
    return _YARN_DERIVES_FACTOR


def _transformers_major() -> int:
    from importlib.metadata import version

    return int(version("transformers").split(".")[0])


def coverage(config: Any) -> int:
    """Tokens the config's own RoPE covers, by transformers' semantics of each type.

    - plain RoPE, and any type not named here: ``max_position_embeddings``;
    - linear: ``factor x max_position_embeddings`` (positions are divided by the factor);
    - yarn: ``factor x original`` (original: ``original_max_position_embeddings``, else
      ``max_position_embeddings``; before transformers 4.56 the factor is derived as
      ``max_position_embeddings / original``, so it covers ``max_position_embeddings``);
    - llama3: ``factor x original_max_position_embeddings``;
    - dynamic: ``max_position_embeddings`` (one table up to there; past it the table changes
      with every length);
    - longrope: the original window (short factors up to there, long factors past it).
    """
    kind = rope_type_of(config)
    scaling = rope_scaling_of(config)
    window = int(config.max_position_embeddings)
    if kind == "linear":
        return math.floor(float(scaling.get("factor", 1.0)) * window)
    if kind == "yarn":
        return math.floor(_yarn_factor(config) * original_window(config))
    if kind == "llama3":
        return math.floor(float(scaling.get("factor", 1.0)) * original_window(config))
    if kind == "longrope":
        return original_window(config)
    return window


@dataclass(frozen=True)
class RopePlan:
    model_type: str
    rope_type: str  # "default" for plain RoPE
    max_seq_length: int
    max_position_embeddings: int  # the checkpoint's
    coverage: int
    outcome: str  # same | extended | refused
    #: The scaling the model is built with, explicit (original window and theta pinned);
    #: None for plain RoPE and for a refusal.
    scaling: dict[str, Any] | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pinned(config: Any, scaling: dict[str, Any]) -> dict[str, Any]:
    """The scaling with what Unsloth's widened window would otherwise change written out:
    Unsloth builds the model with max_position_embeddings = max_seq_length, and transformers
    falls back to that for a missing original window."""
    out = {k: v for k, v in scaling.items() if k != "type"}
    if out.get("rope_type") in ("yarn", "longrope", "llama3"):
        out.setdefault("original_max_position_embeddings", original_window(config))
    if out.get("rope_type") == "yarn":
        out["factor"] = _yarn_factor(config)
    return out


def plan_rope(config: Any, max_seq_length: int) -> RopePlan:
    """The contract's answer for a Qwen ``config`` at ``max_seq_length`` (see the module doc)."""
    kind = rope_type_of(config)
    window = int(config.max_position_embeddings)
    covered = coverage(config)
    scaling = rope_scaling_of(config)
    theta = rope_theta_of(config)

    def plan(outcome: str, effective: dict[str, Any] | None, reason: str) -> RopePlan:
        if effective is not None:
            effective = {**effective, "rope_theta": theta}
        return RopePlan(
            getattr(config, "model_type", "?"),
            kind,
            int(max_seq_length),
            window,
            covered,
            outcome,
            effective,
            reason,
        )

    changes_at = length_dependence(config, max_seq_length)
    if changes_at is not None:
        static = changes_at - 1
        return plan(
            REFUSED,
            None,
            f"{kind} RoPE changes its frequencies with the sequence length past {static} tokens "
            f"(max_position_embeddings {window}, original window {original_window(config)}), and Unsloth's "
            f"rotary embedding keeps one cos/sin table for every length, so max_seq_length "
            f"{max_seq_length} would train positions transformers computes differently. Use "
            f"max_seq_length <= {static}, or give the checkpoint a static scaling for the window you "
            f"need (e.g. rope_scaling={{'rope_type': 'yarn', 'factor': {max_seq_length / window:.4g}, "
            f"'original_max_position_embeddings': {window}}}).",
        )
    if max_seq_length <= window:
        return plan(SAME, _pinned(config, scaling) if scaling else None, "inside max_position_embeddings")
    if kind == "default":
        factor = max_seq_length / window
        return plan(
            EXTENDED,
            {"rope_type": "linear", "factor": factor},
            f"plain RoPE past max_position_embeddings {window}: linear interpolation x{factor:.4g} "
            "(Unsloth's own rule)",
        )
    if max_seq_length <= covered or kind not in GROWN_TYPES:
        kept = plan(
            SAME,
            _pinned(config, scaling),
            f"{kind} kept as configured: max_seq_length "
            f"{'inside' if max_seq_length <= covered else 'past'} the {covered} tokens it covers",
        )
        # Unsloth builds the model with max_position_embeddings = max_seq_length: the tables
        # must not move with it (a type that reads the window would otherwise change silently).
        if not same_tables(rope_tables(build_config(config, kept)), rope_tables(config)):
            return plan(
                REFUSED,
                None,
                f"{kind} RoPE reads max_position_embeddings, which Unsloth widens to max_seq_length "
                f"{max_seq_length}: its tables would change. Use max_seq_length <= {window}.",
            )
        return kept
    grown = _pinned(config, scaling)
    base_window = window if kind == "linear" else int(grown["original_max_position_embeddings"])
    grown["factor"] = max_seq_length / base_window
    return plan(
        EXTENDED,
        grown,
        f"{kind} past the {covered} tokens it covers: factor {float(scaling.get('factor', 1.0)):.4g} -> "
        f"{grown['factor']:.4g} so it covers max_seq_length {max_seq_length}",
    )


def build_config(config: Any, plan: RopePlan) -> Any:
    """The config the Unsloth path builds the model from: Unsloth widens max_position_embeddings
    to max_seq_length, and the plan's scaling replaces the checkpoint's."""
    return with_rope(config, plan.scaling, max(plan.max_position_embeddings, plan.max_seq_length))


def effective_rope(model_config: Any) -> dict[str, Any]:
    """What a loaded model's config says it computes (type, scaling and window), for reports."""
    return {
        "rope_type": rope_type_of(model_config),
        "scaling": rope_scaling_of(model_config),
        "rope_theta": rope_theta_of(model_config),
        "max_position_embeddings": getattr(model_config, "max_position_embeddings", None),
    }
